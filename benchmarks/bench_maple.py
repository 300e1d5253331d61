"""MaPLe evaluation throughput (images/s): official-style vs promptcore vs the bare image encoder.

Providers, measured in one run on the same model, prompts and image batch:

* ``official``: what the official ``CustomCLIP.forward`` does at test time: all class prompts
  re-encoded as full 77-token sequences on every batch, plus the prompted image tower;
* ``fast_text``: the same, text re-encoded every batch, but through promptcore's shared-prefix,
  EOT-truncated path (what training pays per step);
* ``promptcore``: ``MaPLe`` in eval mode: text features cached, prompted image tower only;
* ``bare_image``: ``model.encode_image`` (no prompts, no text): the ceiling.

Appends JSON rows to benchmarks/results/maple.jsonl.

    python benchmarks/bench_maple.py                                   # CPU: batch 4, 50 classes, fp32
    python benchmarks/bench_maple.py --device cuda                     # GPU: fp16, batch 128, 1000 classes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, environment, measure  # noqa: E402

from promptcore.maple import MaPLe  # noqa: E402
from promptcore.models import builtin_classnames, load_model  # noqa: E402


def run(args) -> list:
    device = torch.device(args.device)
    model, tokenizer = load_model(args.model, None, device, args.precision)
    names = builtin_classnames(args.dataset)[: args.classes]
    maple = MaPLe(model, names, tokenizer=tokenizer, depth=args.depth, seed=0).eval()
    size = maple.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    live_fast, live_naive = maple.prompt_learner.prompts.live_tokens

    def official():
        return maple.logits(maple.encode_images(images), maple.encode_text("naive"))

    def fast_text():
        return maple.logits(maple.encode_images(images), maple.encode_text("fast"))

    def promptcore():
        return maple(images)

    def bare_image():
        return model.encode_image(images.to(maple.image_dtype))

    providers = {"official": official, "fast_text": fast_text, "promptcore": promptcore, "bare_image": bare_image}
    env = environment(device)
    timings = {}
    with torch.no_grad():
        for name in args.providers:
            timings[name] = measure(providers[name], device, args.repeats, args.warmup)
            t = timings[name]
            t["images_per_s"] = args.batch / t["median_s"]
            print(f"{args.model} {args.precision} depth={args.depth} classes={len(names)} batch={args.batch} "
                  f"{name:10s} {t['median_s'] * 1e3:9.1f} ms  {t['images_per_s']:9.1f} images/s", flush=True)
    row = {"bench": "maple_eval", "model": args.model, "precision": args.precision, "dataset": args.dataset,
           "classes": len(names), "batch": args.batch, "depth": args.depth, "n_ctx": maple.n_ctx,
           "live_tokens_naive": live_naive, "live_tokens_fast": live_fast, **timings, **env}
    if "official" in timings and "promptcore" in timings:
        row["speedup_vs_official"] = timings["official"]["median_s"] / timings["promptcore"]["median_s"]
        print(f"promptcore vs official: {row['speedup_vs_official']:.1f}x", flush=True)
    if "bare_image" in timings and "promptcore" in timings:
        row["fraction_of_bare_image"] = timings["bare_image"]["median_s"] / timings["promptcore"]["median_s"]
        print(f"promptcore throughput = {row['fraction_of_bare_image']:.2f} x bare image encoder", flush=True)
    return [row]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip ViT model (random weights)")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default fp16 on CUDA (as the official runs), fp32 on CPU")
    parser.add_argument("--classes", type=int, default=None, help="default 1000 (GPU), 50 (CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (GPU), 4 (CPU)")
    parser.add_argument("--depth", type=int, default=9, help="prompt depth J (official default 9)")
    parser.add_argument("--providers", nargs="+", default=["official", "fast_text", "promptcore", "bare_image"],
                        choices=["official", "fast_text", "promptcore", "bare_image"])
    parser.add_argument("--repeats", type=int, default=None, help="default 20 (GPU), 2 (CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.precision = args.precision or ("fp16" if gpu else "fp32")
    args.classes = args.classes or (1000 if gpu else 50)
    args.batch = args.batch or (128 if gpu else 4)
    args.repeats = args.repeats or (20 if gpu else 2)
    rows = run(args)
    if not args.no_save:
        print(f"rows appended to {append_rows('maple.jsonl', rows)}")


if __name__ == "__main__":
    main()
