"""Text encoding, naive (official full 77-token prompts) vs promptcore's shared-prefix path.

For CoOp prompts over real ImageNet class names: forward and forward+backward (gradient of the
context), at several class counts and context lengths. Prints the live-token ratio and the time
ratio measured in the same run; appends JSON rows to benchmarks/results/text_encoding.jsonl.

    python benchmarks/bench_text_encoding.py                      # CPU default: 10/100/200 classes
    python benchmarks/bench_text_encoding.py --device cuda --precision fp16 --classes 10 100 1000
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
    measure,
    measure_peaks,
    peak_tflops_for,
    text_flops,
    text_tower_size,
)

from promptcore import CoOp  # noqa: E402
from promptcore.models import builtin_classnames  # noqa: E402


def run(args) -> list:
    device = torch.device(args.device)
    model, tokenizer = bench_model(args.model, device, args.precision)
    names = builtin_classnames(args.dataset)
    env = environment(device)
    peaks = args.peaks or measure_peaks(device)
    env.update(peaks)
    peak = peak_tflops_for(peaks, args.precision)
    print(f"peaks measured in this run: {peak:.2f} TFLOP/s ({args.precision} matmul), "
          f"{peaks['peak_gbps']:.0f} GB/s (copy)")
    tower_width, tower_layers = text_tower_size(model)
    rows = []
    for n_ctx in args.n_ctx:
        for num_classes in args.classes:
            coop = CoOp(model, names[:num_classes], tokenizer=tokenizer, n_ctx=n_ctx, seed=0)
            live_fast, live_naive = coop.prompt_learner.prompts.live_tokens
            ctx = coop.prompt_learner.ctx
            encoders = {"naive": lambda: coop.encode_text("naive"), "fast": lambda: coop.encode_text("fast")}
            if args.compile:  # the official computation under torch.compile (PyTorch ops only while compiling)
                prompts = coop.prompt_learner.prompts
                compiled = torch.compile(lambda c: coop.engine.encode_naive(prompts, c)[0])
                encoders["naive_compiled"] = lambda: compiled(ctx)
            for mode in args.modes:
                timings = {}
                for path, encode in encoders.items():
                    if mode == "fwd":
                        def fn(encode=encode):
                            with torch.no_grad():
                                return encode()
                    else:
                        def fn(encode=encode):
                            feats = encode()
                            (grad,) = torch.autograd.grad(feats.float().pow(2).sum(), ctx)
                            return grad
                    timings[path] = measure(fn, device, args.repeats, args.warmup)
                    # fwd+bwd: frozen weights, so backward needs activation grads only, about one forward
                    flops = text_flops(coop.prompt_learner.prompts, tower_width, tower_layers, path)
                    flops *= 1 if mode == "fwd" else 2
                    timings[path]["model_flops"] = flops
                    timings[path]["tflops"] = flops / timings[path]["median_s"] / 1e12
                    timings[path]["fraction_of_peak"] = timings[path]["tflops"] / peak
                row = {"bench": "text_encoding", "model": args.model, "precision": args.precision,
                       "dataset": args.dataset, "classes": num_classes, "n_ctx": n_ctx, "mode": mode,
                       "live_tokens_naive": live_naive, "live_tokens_fast": live_fast,
                       "token_ratio": live_naive / live_fast,
                       "timings": timings, "naive": timings["naive"], "fast": timings["fast"],
                       "speedup": timings["naive"]["median_s"] / timings["fast"]["median_s"], **env,
                       **comparison_fields(timings, "naive", timings["fast"]["model_flops"], peak)}
                if "naive_compiled" in timings:
                    row["speedup_vs_compiled"] = timings["naive_compiled"]["median_s"] / timings["fast"]["median_s"]
                rows.append(row)
                print(f"{args.model} {args.precision} n_ctx={n_ctx:2d} classes={num_classes:5d} {mode:7s} "
                      f"tokens {live_naive}/{live_fast} = {row['token_ratio']:.1f}x  "
                      f"naive {timings['naive']['median_s'] * 1e3:9.2f} ms  "
                      f"fast {timings['fast']['median_s'] * 1e3:9.2f} ms"
                      f"  speed-up {row['speedup']:.1f}x  fast at {timings['fast']['tflops']:.2f} TFLOP/s "
                      f"({timings['fast']['fraction_of_peak'] * 100:.0f}% of peak)"
                      + (f"  (naive compiled {timings['naive_compiled']['median_s'] * 1e3:.2f} ms, "
                         f"speed-up {row['speedup_vs_compiled']:.1f}x)" if "naive_compiled" in timings else ""),
                      flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights) or 'tiny'")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="default 10 100 1000 (GPU), 10 100 200 (CPU)")
    parser.add_argument("--n-ctx", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=None, help="default 20 (GPU), 3 (CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the naive path under torch.compile (default: on for CUDA)")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    return parser


def resolve(args):
    gpu = str(args.device).startswith("cuda")
    args.precision = args.precision or ("fp16" if gpu else "fp32")
    args.classes = args.classes or ([10, 100, 1000] if gpu else [10, 100, 200])
    args.repeats = args.repeats or (20 if gpu else 3)
    args.compile = gpu if args.compile is None else args.compile
    return args


def case(**options) -> list:
    """Run this benchmark from Python (options named like the flags, plus ``peaks`` measured by the
    caller); returns the rows without saving them."""
    return run(case_args(build_parser(), resolve, options))


def main(argv=None):
    args = resolve(build_parser().parse_args(argv))
    args.peaks = None
    rows = run(args)
    if not args.no_save:
        print(f"rows appended to {append_rows('text_encoding.jsonl', rows)}")


if __name__ == "__main__":
    main()
