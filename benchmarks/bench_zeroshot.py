"""Zero-shot classifier build: open_clip's ``build_zero_shot_classifier`` vs ``promptcore.ZeroShot``.

Both build the same (n_cls, E) classifier on the same model in one run, from class names and
templates (ImageNet names x the 80 OpenAI templates by default), tokenization included. open_clip
encodes every (class, template) prompt at 77 tokens; ZeroShot encodes each template's prefix once
and only the EOT-truncated class suffixes. Reports the time ratio beside the live-token ratio (tokens
per layer over the whole build), the scaled difference between the two classifiers, and on GPU the
peak memory. Appends JSON rows to benchmarks/results/zeroshot.jsonl.

    python benchmarks/bench_zeroshot.py                      # CPU default: fp32, 100 classes, 1 repeat
    python benchmarks/bench_zeroshot.py --device cuda        # GPU default: fp16, 1000 classes, 5 repeats
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, environment, measure  # noqa: E402

from promptcore.models import builtin_classnames, load_model  # noqa: E402
from promptcore.zeroshot import ZeroShot, template_set  # noqa: E402


def run(args) -> list:
    import open_clip

    device = torch.device(args.device)
    model, tokenizer = load_model(args.model, None, device, args.precision)
    names = builtin_classnames(args.dataset)
    templates = template_set(args.templates)
    env = environment(device)
    rows = []
    for num_classes in args.classes:
        classes = names[:num_classes]

        built = {}  # the last classifier of each provider, compared below (no extra build)

        def build_open_clip():
            built["open_clip"] = open_clip.build_zero_shot_classifier(
                model, tokenizer, classes, templates, num_classes_per_batch=args.builder_batch, device=device).T

        def build_promptcore():
            zs = ZeroShot(model, classes, templates=args.templates, tokenizer=tokenizer, max_prompts=args.max_prompts,
                          progress=False)
            built["promptcore"] = zs.text_features()

        timings = {}
        for name, fn in (("open_clip", build_open_clip), ("promptcore", build_promptcore)):
            cpu = []  # process CPU seconds per call: on a shared, loaded CPU the wall clock also counts waiting

            def timed(fn=fn, cpu=cpu):
                t0 = time.process_time()
                fn()
                cpu.append(time.process_time() - t0)

            timings[name] = measure(timed, device, args.repeats, args.warmup)
            if device.type == "cpu":
                timings[name]["cpu_median_s"] = statistics.median(cpu[args.warmup:])
        reference, ours = built["open_clip"].double(), built["promptcore"].double()
        scaled_diff = ((ours - reference).abs().max() / reference.abs().max()).item()
        zs = ZeroShot(model, classes, templates=args.templates, tokenizer=tokenizer, max_prompts=args.max_prompts,
                      progress=False)
        fast_tokens, naive_tokens = zs.live_tokens
        speedup = timings["open_clip"]["median_s"] / timings["promptcore"]["median_s"]
        row = {"bench": "zeroshot", "model": args.model, "precision": args.precision, "dataset": args.dataset,
               "classes": num_classes, "templates": args.templates, "num_templates": len(templates),
               "prompts": num_classes * len(templates), "passes": len(zs._plan), "max_prompts": args.max_prompts,
               "builder_classes_per_batch": args.builder_batch, "weights": "random",
               "live_tokens_open_clip": naive_tokens, "live_tokens_promptcore": fast_tokens,
               "token_ratio": naive_tokens / fast_tokens, "open_clip": timings["open_clip"],
               "promptcore": timings["promptcore"], "speedup": speedup, "scaled_max_diff": scaled_diff, **env}
        if device.type == "cpu":
            row["speedup_cpu_time"] = timings["open_clip"]["cpu_median_s"] / timings["promptcore"]["cpu_median_s"]
            row["load_average_1min"] = os.getloadavg()[0]
        rows.append(row)
        mem = ""
        if device.type == "cpu":
            mem = (f"  (CPU time {timings['open_clip']['cpu_median_s']:.2f} s vs "
                   f"{timings['promptcore']['cpu_median_s']:.2f} s = {row['speedup_cpu_time']:.1f}x; "
                   f"load average {row['load_average_1min']:.1f})")
        if device.type == "cuda":
            mem = (f"  peak open_clip {timings['open_clip']['peak_mem_bytes'] / 2**20:.0f} MiB,"
                   f" promptcore {timings['promptcore']['peak_mem_bytes'] / 2**20:.0f} MiB")
        print(f"{args.model} {args.precision} {num_classes} classes x {len(templates)} templates: "
              f"live tokens/layer {naive_tokens} / {fast_tokens} = {row['token_ratio']:.1f}x;  "
              f"open_clip {timings['open_clip']['median_s']:.2f} s, "
              f"promptcore {timings['promptcore']['median_s']:.2f} s = {speedup:.1f}x;  "
              f"classifiers differ by {scaled_diff:.1e} (scaled max){mem}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights)")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--templates", default="openai", choices=["openai", "simple"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="default 1000 (GPU), 100 (CPU)")
    parser.add_argument("--max-prompts", type=int, default=None,
                        help="ZeroShot prompts per encoder pass (default 8192)")
    parser.add_argument("--builder-batch", type=int, default=10,
                        help="open_clip's num_classes_per_batch (its default, 10)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (GPU), 1 (CPU: the builder takes minutes)")
    parser.add_argument("--warmup", type=int, default=None, help="default 1 (GPU), 0 (CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 avoids barrier waits on a loaded machine)")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    args.precision = args.precision or ("fp16" if gpu else "fp32")
    args.classes = args.classes or ([1000] if gpu else [100])
    args.repeats = args.repeats or (5 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (1 if gpu else 0)
    rows = run(args)
    if not args.no_save:
        print(f"rows appended to {append_rows('zeroshot.jsonl', rows)}")


if __name__ == "__main__":
    main()
