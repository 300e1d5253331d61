"""The ``promptcore`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(model_name=args.model, pretrained=args.pretrained, dataset=args.dataset,
                      num_classes=args.classes, n_ctx=args.n_ctx, steps=args.steps, batch=args.batch,
                      device=args.device, precision=args.precision, seed=args.seed, repeats=args.repeats)
    if result["top1_agreement"] < 1.0 or result["max_rel_diff"] > 1e-2:
        print("error: the fast and naive text paths disagree", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptcore", description="Fast CLIP prompt learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train CoOp briefly on a random-weight CLIP and compare the naive and fast "
                                       "text paths (offline, CPU, about a minute)")
    demo.add_argument("--model", default="ViT-B-16", help="open_clip architecture (default ViT-B-16)")
    demo.add_argument("--pretrained", default=None,
                      help="open_clip pretrained tag or local checkpoint file (default: random weights)")
    demo.add_argument("--dataset", default="imagenet", help="built-in class list (default imagenet)")
    demo.add_argument("--classes", type=int, default=100, help="number of classes (default 100)")
    demo.add_argument("--n-ctx", type=int, default=16, help="context tokens (default 16)")
    demo.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    demo.add_argument("--batch", type=int, default=8, help="random images per step (default 8)")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    demo.add_argument("--repeats", type=int, default=1, help="timing repeats (median)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``promptcore`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"promptcore {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
