"""CoCoOp evaluation: the official per-image loop (n_cls full 77-token prompts per image) vs
promptcore's one shared-prefix pass per batch (a prefix per image, EOT-truncated class suffixes).

Times the text side and scoring from precomputed image features (the frozen image tower costs the
same on both paths and is timed once, for the end-to-end figure). Reports images/s, the speed-up
measured in the same run, live tokens per layer and, on GPU, peak memory; on CPU peak memory is
not measured and the analytical size of one hidden state (tokens x width) per layer is reported
instead. Appends JSON rows to benchmarks/results/cocoop.jsonl.

    python benchmarks/bench_cocoop.py                       # CPU default: batch 4, classes 10 50
    python benchmarks/bench_cocoop.py --device cuda         # GPU default: fp16, batch 100, classes 10 100 1000
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
    block_flops,
    case_args,
    comparison_fields,
    environment,
    measure,
    peak_tflops_for,
    text_tower_size,
)

from promptcore.cocoop import CoCoOp  # noqa: E402
from promptcore.models import builtin_classnames  # noqa: E402


def _mib(n: float) -> float:
    return n / 2**20


def run(args) -> list:
    device = torch.device(args.device)
    model, tokenizer = bench_model(args.model, device, args.precision)
    names = builtin_classnames(args.dataset)
    env = environment(device)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for num_classes in args.classes:
        cocoop = CoCoOp(model, names[:num_classes], tokenizer=tokenizer, seed=0).eval()
        prompts = cocoop.prompt_learner.prompts
        width = cocoop.engine.tower.width
        nbytes = torch.finfo(cocoop.dtype).bits // 8
        B, C, L = args.batch, num_classes, prompts.ids.shape[1]
        P, S = prompts.prefix_len, prompts.suffix_len
        tokens_naive, tokens_fast = B * C * L, B * (P + C * S)
        # useful work: per image, its prefix once and every class suffix (max suffix length, an upper bound)
        t_width, t_layers = text_tower_size(model)
        useful = B * t_layers * (block_flops(t_width, range(1, P + 1))
                                 + C * block_flops(t_width, range(P + 1, P + S + 1)))
        with torch.no_grad():
            image_time = measure(lambda: cocoop.encode_images(images), device, args.repeats, args.warmup)
            feats = cocoop.encode_images(images)
        for mode in args.modes:
            timings = {}
            for path in ("naive", "fast"):
                if mode == "fwd":
                    def fn(path=path):
                        with torch.no_grad():
                            return cocoop.logits_from_image_features(feats, path, args.max_images)
                else:
                    def fn(path=path):
                        logits = cocoop.logits_from_image_features(feats, path, args.max_images)
                        logits.float().logsumexp(-1).sum().backward()
                timings[path] = measure(fn, device, args.repeats, args.warmup)
            cocoop.prompt_learner.zero_grad(set_to_none=True)
            t_img = image_time["median_s"]
            row = {"bench": "cocoop", "model": args.model, "precision": args.precision, "dataset": args.dataset,
                   "batch": B, "classes": C, "n_ctx": cocoop.n_ctx, "mode": mode, "prefix_len": P, "suffix_len": S,
                   "live_tokens_naive": tokens_naive, "live_tokens_fast": tokens_fast,
                   "token_ratio": tokens_naive / tokens_fast,
                   # one hidden state per layer: the official loop holds one image's C x 77 prompts at a time
                   # (and first stacks all B x C x 77 prompt embeddings); promptcore holds the whole batch
                   "hidden_state_bytes_naive_per_image": C * L * width * nbytes,
                   "official_stacked_prompts_bytes": B * C * L * width * nbytes,
                   "hidden_state_bytes_fast_batch": tokens_fast * width * nbytes,
                   "image_encoder": image_time, "naive": timings["naive"], "fast": timings["fast"],
                   "images_per_s_naive": B / timings["naive"]["median_s"],
                   "images_per_s_fast": B / timings["fast"]["median_s"],
                   "images_per_s_end_to_end_naive": B / (t_img + timings["naive"]["median_s"]),
                   "images_per_s_end_to_end_fast": B / (t_img + timings["fast"]["median_s"]),
                   "speedup": timings["naive"]["median_s"] / timings["fast"]["median_s"], **env,
                   **comparison_fields(timings, "naive", useful * (1 if mode == "fwd" else 2),
                                       peak_tflops_for(args.peaks, args.precision) if args.peaks else None)}
            rows.append(row)
            mem = ""
            if device.type == "cuda":
                mem = (f"  peak naive {_mib(timings['naive']['peak_mem_bytes']):.0f} MiB"
                       f" fast {_mib(timings['fast']['peak_mem_bytes']):.0f} MiB")
            else:
                mem = (f"  hidden state/layer: naive {_mib(row['hidden_state_bytes_naive_per_image']):.1f} MiB/image"
                       f" (official stacked prompts {_mib(row['official_stacked_prompts_bytes']):.1f} MiB),"
                       f" fast {_mib(row['hidden_state_bytes_fast_batch']):.1f} MiB/batch")
            print(f"{args.model} {args.precision} batch={B} classes={C:5d} {mode:7s} "
                  f"tokens {tokens_naive}/{tokens_fast} = {row['token_ratio']:.1f}x  "
                  f"naive {row['images_per_s_naive']:8.2f} img/s  fast {row['images_per_s_fast']:8.2f} img/s  "
                  f"speed-up {row['speedup']:.1f}x  (with image tower: {row['images_per_s_end_to_end_naive']:.2f} "
                  f"vs {row['images_per_s_end_to_end_fast']:.2f} img/s){mem}", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights) or 'tiny'")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="images per batch; default 100 (GPU), 4 (CPU)")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="default 10 100 1000 (GPU), 10 50 (CPU)")
    parser.add_argument("--modes", nargs="+", default=["fwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--max-images", type=int, default=None,
                        help="images per fast-path pass (bounds memory); default: the whole batch")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 (GPU), 3 (CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    return parser


def resolve(args):
    gpu = str(args.device).startswith("cuda")
    args.precision = args.precision or ("fp16" if gpu else "fp32")
    args.batch = args.batch or (100 if gpu else 4)
    args.classes = args.classes or ([10, 100, 1000] if gpu else [10, 50])
    args.repeats = args.repeats or (10 if gpu else 3)
    return args


def case(**options) -> list:
    """Run this benchmark from Python (options named like the flags, plus ``peaks`` measured by the
    caller for the fraction-of-peak fields); returns the rows without saving them."""
    return run(case_args(build_parser(), resolve, options))


def main(argv=None):
    args = resolve(build_parser().parse_args(argv))
    args.peaks = None
    rows = run(args)
    if not args.no_save:
        print(f"rows appended to {append_rows('cocoop.jsonl', rows)}")


if __name__ == "__main__":
    main()
