"""onnxruntime vs PyTorch for each exported method (images -> logits), measured in one run.

Each method's module gets random prompts over the same CLIP, is exported with
``promptcore.export.to_onnx`` (verified) and then timed at one batch size: the PyTorch graph
(eager) and onnxruntime with every execution provider this machine offers (CPU here; CUDA where
onnxruntime-gpu is installed). Rows are appended to benchmarks/results/export.jsonl.

    python benchmarks/bench_export.py                       # CPU: ViT-B-32, 100 classes, batch 8
    python benchmarks/bench_export.py --model ViT-B-16 --classes 1000 --batch 64 --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
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

from promptcore.export import to_onnx  # noqa: E402
from promptcore.export.graphs import build_graph  # noqa: E402
from promptcore.export.onnx_export import ort_runner, torch_backend  # noqa: E402
from promptcore.methods import get_method  # noqa: E402
from promptcore.models import builtin_classnames  # noqa: E402


def run(args) -> list:
    import onnxruntime as ort

    device = torch.device(args.device)
    names = builtin_classnames(args.dataset)[: args.classes]
    env = environment(device)
    env["onnxruntime"] = ort.__version__
    rows = []
    for method in args.methods:
        model, tokenizer = bench_model(args.model, device, "fp32")
        options = {"depth": args.depth} if method == "maple" and args.depth else {}
        module = get_method(method)(model, names, tokenizer=tokenizer, seed=0, **options).eval()
        module.model_name = args.model
        size = model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        dtype = torch.float16 if args.dtype == "fp16" else torch.float32
        images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
        with tempfile.TemporaryDirectory() as tmp:
            report = to_onnx(module, Path(tmp) / f"{method}.onnx", dtype=args.dtype)
            graph = build_graph(module, args.dtype).to(device)
            x = images.to(device)

            def run_torch():
                with torch.no_grad(), torch_backend():
                    return graph(x)

            timings = {"pytorch": measure(run_torch, device, args.repeats)}
            feed = {"images": images.numpy()}
            available = ort.get_available_providers()
            for provider in available:
                if provider not in ("CPUExecutionProvider", "CUDAExecutionProvider"):
                    continue
                if provider == "CPUExecutionProvider" and device.type == "cuda" and \
                        "CUDAExecutionProvider" in available:
                    continue  # a GPU run compares on the GPU (onnxruntime's CPU fp16 path is emulated and slow)
                session = ort.InferenceSession(report.path, providers=[provider])
                # IO binding: inputs copied to the provider's device once, outputs left there
                timings[f"onnxruntime-{provider.replace('ExecutionProvider', '').lower()}"] = measure(
                    ort_runner(session, feed, provider), torch.device("cpu"), args.repeats)
            with torch.no_grad(), torch_backend():
                ref = graph(x).float().cpu().numpy()
            got = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"]).run(None, feed)[0]
            agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
            max_diff = float(np.abs(got.astype(np.float32) - ref).max())
        base = timings["pytorch"]["median_s"]
        extra = module.n_ctx if method == "maple" else 0
        row = {"bench": "export", "method": method, "model": args.model, "dtype": args.dtype,
               "classes": len(names), "batch": args.batch, "timings": timings, "top1_agreement": agree,
               "max_abs_diff": max_diff, "images_per_s": {k: args.batch / v["median_s"] for k, v in timings.items()},
               "speedup_vs_pytorch": {k: base / v["median_s"] for k, v in timings.items()}, **env,
               # CoCoOp's graph also encodes text per image: the image tower alone undercounts its work
               **comparison_fields(timings, "pytorch", image_flops(model, args.batch, extra),
                                   peak_tflops_for(args.peaks, args.dtype) if args.peaks else None)}
        rows.append(row)
        line = ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms ({base / v['median_s']:.2f}x)" for k, v in timings.items())
        print(f"{method:7s} {args.model} {args.dtype} {len(names)} classes batch {args.batch}: {line}; "
              f"top-1 agreement {agree * 100:.0f}%, max |diff| {max_diff:.1e}", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["coop", "cocoop", "maple"])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model (random weights) or 'tiny'")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--device", default="cpu", help="device of the PyTorch side")
    parser.add_argument("--depth", type=int, default=None, help="MaPLe prompt depth (default: the method's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-save", action="store_true")
    return parser


def resolve(args):
    return args


def case(**options) -> list:
    """Run this benchmark from Python (options named like the flags, plus ``peaks`` measured by the
    caller for the fraction-of-peak fields); returns the rows without saving them."""
    return run(case_args(build_parser(), resolve, options))


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.peaks = None
    rows = run(args)
    if not args.no_save:
        print(f"rows appended to {append_rows('export.jsonl', rows)}")


if __name__ == "__main__":
    main()
