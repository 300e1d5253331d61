"""Zero-shot classifier building: open_clip's ``build_zero_shot_classifier`` vs ``promptcore.ZeroShot``.

Both build the (n_cls, E) classifier from the same class names and templates (the 80 CLIP
ImageNet templates, or the first ``--templates N``): open_clip encodes every full 77-token
prompt; promptcore shares each template's common prefix and truncates at the EOT. The two
classifiers are compared (max abs difference scaled by the largest value) as well as timed.

``promptcore.ZeroShot`` is written on another branch: until it exists this benchmark says so
and returns no rows. The one call to adapt if its API differs is :func:`promptcore_classifier`.

    python benchmarks/bench_zeroshot.py                        # CPU: 10 100 classes, 8 templates
    python benchmarks/bench_zeroshot.py --device cuda          # GPU: fp16, 10 100 1000 classes, 80 templates
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, bench_model, case_args, comparison_fields, environment, measure  # noqa: E402

import promptcore  # noqa: E402
from promptcore.models import builtin_classnames  # noqa: E402

TEMPLATES = Path(promptcore.__file__).resolve().parent / "data" / "classnames" / "imagenet_templates.txt"


def available() -> bool:
    """Whether this build of promptcore has the ZeroShot module."""
    return hasattr(promptcore, "ZeroShot")


def promptcore_classifier(model, tokenizer, names, templates) -> torch.Tensor:
    """The normalised (n_cls, E) classifier built by ``promptcore.ZeroShot``."""
    zeroshot = promptcore.ZeroShot(model, names, tokenizer=tokenizer, templates=templates)
    return zeroshot.text_features


def open_clip_classifier(model, tokenizer, names, templates, device) -> torch.Tensor:
    """The classifier as open_clip builds it, transposed to (n_cls, E)."""
    from open_clip import build_zero_shot_classifier

    return build_zero_shot_classifier(model, tokenizer, names, templates, num_classes_per_batch=10,
                                      device=device, use_tqdm=False).t()


def run(args) -> list:
    if not available():
        print("zeroshot: skipped, promptcore.ZeroShot is not in this build", flush=True)
        return []
    device = torch.device(args.device)
    model, tokenizer = bench_model(args.model, device, args.precision)
    templates = [t.strip() for t in TEMPLATES.read_text().splitlines() if t.strip()][: args.templates]
    env = environment(device)
    rows = []
    for num_classes in args.classes:
        names = builtin_classnames(args.dataset)[:num_classes]
        res = {}

        def ours():
            res["promptcore"] = promptcore_classifier(model, tokenizer, names, templates)

        def theirs():
            res["open_clip"] = open_clip_classifier(model, tokenizer, names, templates, device)

        with torch.no_grad():
            timings = {"open_clip": measure(theirs, device, args.repeats, args.warmup),
                       "promptcore": measure(ours, device, args.repeats, args.warmup)}
        ref, got = res["open_clip"].float(), res["promptcore"].float()
        scaled_err = ((got - ref).abs().max() / ref.abs().max()).item()
        row = {"bench": "zeroshot", "model": args.model, "precision": args.precision, "classes": num_classes,
               "templates": len(templates), "open_clip": timings["open_clip"], "promptcore": timings["promptcore"],
               "speedup": timings["open_clip"]["median_s"] / timings["promptcore"]["median_s"],
               "scaled_max_err": scaled_err, **env, **comparison_fields(timings, "open_clip")}
        rows.append(row)
        ms = {name: t["median_s"] * 1e3 for name, t in timings.items()}
        print(f"zeroshot {args.model} {args.precision} classes={num_classes} templates={len(templates)}: open_clip "
              f"{ms['open_clip']:.1f} ms, promptcore {ms['promptcore']:.1f} ms, "
              f"speed-up {row['speedup']:.2f}x, scaled max err {scaled_err:.1e}", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights) or 'tiny'")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="default 10 100 1000 (GPU), 10 100 (CPU)")
    parser.add_argument("--templates", type=int, default=None, help="first N templates; default 80 (GPU), 8 (CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 (GPU), 3 (CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    return parser


def resolve(args):
    gpu = str(args.device).startswith("cuda")
    args.precision = args.precision or ("fp16" if gpu else "fp32")
    args.classes = args.classes or ([10, 100, 1000] if gpu else [10, 100])
    args.templates = args.templates or (80 if gpu else 8)
    args.repeats = args.repeats or (10 if gpu else 3)
    return args


def case(**options) -> list:
    """Run this benchmark from Python (options named like the flags); returns the rows without saving them."""
    return run(case_args(build_parser(), resolve, options))


def main(argv=None):
    args = resolve(build_parser().parse_args(argv))
    args.peaks = None
    rows = run(args)
    if rows and not args.no_save:
        print(f"rows appended to {append_rows('zeroshot.jsonl', rows)}")


if __name__ == "__main__":
    main()
