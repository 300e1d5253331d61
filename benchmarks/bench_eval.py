"""CoOp / MaPLe evaluation throughput (images/s): official-style vs promptcore vs the bare image encoder.

Providers, measured in one run on the same model, prompts and image batch:

* ``official``: what the official ``CustomCLIP.forward`` does at test time: all class prompts
  re-encoded as full 77-token sequences on every batch, plus the (prompted, for MaPLe) image tower;
* ``fast_text``: the same, text re-encoded every batch, but through promptcore's shared-prefix,
  EOT-truncated path (what training pays per step);
* ``promptcore``: the module in eval mode: text features cached, (prompted) image tower only;
* ``bare_image``: ``model.encode_image`` (no prompts, no text): the ceiling.

Appends JSON rows to benchmarks/results/<method>_eval.jsonl (MaPLe: maple.jsonl, see bench_maple.py).

    python benchmarks/bench_eval.py --method coop                      # CPU: batch 4, 50 classes, fp32
    python benchmarks/bench_eval.py --method maple --device cuda       # GPU: fp16, batch 128, 1000 classes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    append_rows,
    bench_model,
    case_args,
    comparison_fields,
    environment,
    image_flops,
    measure,
    peak_tflops_for,
)

from promptcore.models import builtin_classnames  # noqa: E402

PROVIDERS = ("official", "fast_text", "promptcore", "bare_image")
METHODS = ("coop", "maple")


def _make(method: str, model, names, tokenizer, args):
    if method == "maple":
        from promptcore.maple import MaPLe

        return MaPLe(model, names, tokenizer=tokenizer, depth=args.depth, seed=0).eval()
    from promptcore.coop import CoOp

    return CoOp(model, names, tokenizer=tokenizer, seed=0).eval()


def run(args) -> list:
    device = torch.device(args.device)
    model, tokenizer = bench_model(args.model, device, args.precision)
    rows = []
    env = environment(device)
    for num_classes in args.classes:
        names = builtin_classnames(args.dataset)[:num_classes]
        module = _make(args.method, model, names, tokenizer, args)
        size = module.model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        live_fast, live_naive = module.prompt_learner.prompts.live_tokens

        def official():
            return module.logits(module.encode_images(images), module.encode_text("naive"))

        def fast_text():
            return module.logits(module.encode_images(images), module.encode_text("fast"))

        def promptcore():
            return module(images)

        def bare_image():
            return model.encode_image(images.to(module.image_dtype))

        providers = {"official": official, "fast_text": fast_text, "promptcore": promptcore,
                     "bare_image": bare_image}
        timings = {}
        with torch.no_grad():
            for name in args.providers:
                timings[name] = measure(providers[name], device, args.repeats, args.warmup)
                t = timings[name]
                t["images_per_s"] = args.batch / t["median_s"]
                print(f"{args.method} {args.model} {args.precision} classes={len(names)} batch={args.batch} "
                      f"{name:10s} {t['median_s'] * 1e3:9.1f} ms  {t['images_per_s']:9.1f} images/s", flush=True)
        extra_tokens = module.n_ctx if args.method == "maple" else 0
        useful = image_flops(module.model, args.batch, extra_tokens)
        peak = peak_tflops_for(args.peaks, args.precision) if args.peaks else None
        baseline = "official" if "official" in timings else next(iter(timings))
        row = {"bench": f"{args.method}_eval", "method": args.method, "model": args.model,
               "precision": args.precision, "dataset": args.dataset, "classes": len(names), "batch": args.batch,
               "n_ctx": module.n_ctx, "live_tokens_naive": live_naive, "live_tokens_fast": live_fast, **timings,
               **env, **comparison_fields(timings, baseline, useful, peak)}
        if args.method == "maple":
            row["depth"] = args.depth
        if "official" in timings and "promptcore" in timings:
            row["speedup_vs_official"] = timings["official"]["median_s"] / timings["promptcore"]["median_s"]
            print(f"promptcore vs official: {row['speedup_vs_official']:.1f}x", flush=True)
        if "bare_image" in timings and "promptcore" in timings:
            row["fraction_of_bare_image"] = timings["bare_image"]["median_s"] / timings["promptcore"]["median_s"]
            print(f"promptcore throughput = {row['fraction_of_bare_image']:.2f} x bare image encoder", flush=True)
        rows.append(row)
    return rows


def build_parser(method_default: str = "coop") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default=method_default, choices=METHODS)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip ViT model (random weights) or 'tiny'")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default fp16 on CUDA (as the official runs), fp32 on CPU")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="default 1000 (GPU), 50 (CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (GPU), 4 (CPU)")
    parser.add_argument("--depth", type=int, default=9, help="MaPLe prompt depth J (official default 9)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--repeats", type=int, default=None, help="default 20 (GPU), 2 (CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    return parser


def resolve(args):
    gpu = str(args.device).startswith("cuda")
    args.precision = args.precision or ("fp16" if gpu else "fp32")
    if isinstance(args.classes, int):
        args.classes = [args.classes]
    args.classes = args.classes or ([1000] if gpu else [50])
    args.batch = args.batch or (128 if gpu else 4)
    args.repeats = args.repeats or (20 if gpu else 2)
    return args


def case(**options) -> list:
    """Run this benchmark from Python (options named like the flags, plus ``peaks`` measured by the
    caller for the fraction-of-peak fields); returns the rows without saving them."""
    return run(case_args(build_parser(), resolve, options))


def main(argv=None, method_default: str = "coop", results_file=None):
    args = resolve(build_parser(method_default).parse_args(argv))
    args.peaks = None
    rows = run(args)
    if not args.no_save:
        print(f"rows appended to {append_rows(results_file or f'{args.method}_eval.jsonl', rows)}")


if __name__ == "__main__":
    main()
