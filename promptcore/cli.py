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


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(total=None, bar_format="{desc}", leave=False, file=sys.stderr)
    return lambda message: bar.set_description_str(f"promptcore: {message}")


def _export(args) -> int:
    from promptcore.export.pipeline import build_from_checkpoint, export_folder, register_model_config

    from .models import builtin_classnames, load_model, read_classnames

    if args.model_config:
        register_model_config(args.model_config)
    step = _progress(not args.quiet)
    if args.classnames and args.dataset:
        raise ValueError("pass --classnames or --dataset, not both")
    classnames = read_classnames(args.classnames) if args.classnames else None
    if args.dataset:
        classnames = builtin_classnames(args.dataset)
    zeroshot = args.method == "zeroshot" and args.checkpoint is None
    if not zeroshot and args.checkpoint is None:
        raise ValueError(f"--checkpoint is required for --method {args.method}")
    if args.templates is not None and args.method != "zeroshot":
        raise ValueError("--templates applies to --method zeroshot only")
    if zeroshot:
        from promptcore.zeroshot import check_templates, read_templates

        check_templates(read_templates(args.templates or "openai"))  # bad templates fail before the model loads
    if step:
        step(f"loading {args.model}")
    model, tokenizer = load_model(args.model, args.pretrained, args.device, args.precision)
    options = {"n_ctx": args.n_ctx, "ctx_init": args.ctx_init, "csc": args.csc or None,
               "class_token_position": args.class_token_position, "depth": args.depth}
    if zeroshot:
        from promptcore.export.pipeline import build_zeroshot

        module = build_zeroshot(model, tokenizer, classnames, args.templates, options, progress=not args.quiet)
    else:
        if step:
            step(f"loading prompts from {args.checkpoint}")
        module = build_from_checkpoint(args.method, model, tokenizer, args.checkpoint, classnames, options,
                                       allow_new_classes=args.allow_new_classes)
    module.model_name = args.model
    report = export_folder(module, args.out, dtype=args.dtype, with_features=args.with_features,
                           serving=args.serving, pretrained=args.pretrained, model_config=args.model_config,
                           progress=step)
    print(report.summary())
    for f in report.files:
        print(f"  {f}")
    return 0


def _verify(args) -> int:
    from promptcore.export.pipeline import verify_folder_model

    result = verify_folder_model(args.model, batch_sizes=tuple(args.batch))
    status = "ok" if result["ok"] else "MISMATCH"
    print(f"{status}: {args.model} ({result['method']}, {result['num_classes']} classes): onnxruntime vs PyTorch "
          f"max |diff| {result['max_abs_diff']:.2e} (allowed {result['tolerance']:.2e}), top-1 agreement "
          f"{result['top1_agreement'] * 100:.1f}%; PyTorch {result['torch_ms']:.1f} ms, onnxruntime "
          f"{result['onnxruntime_ms']:.1f} ms at batch {args.batch[-1]}")
    return 0 if result["ok"] else 1


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

    exp = sub.add_parser("export", help="export learned prompts to a verified ONNX model (images -> logits)")
    exp.add_argument("--method", required=True, help="coop, cocoop, maple or zeroshot")
    exp.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-16")
    exp.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint file")
    exp.add_argument("--model-config", default=None, help="open_clip model config JSON to register (custom models)")
    exp.add_argument("--checkpoint", default=None,
                     help="official checkpoint (model.pth.tar-N or its folder) or a promptcore .safetensors file "
                          "(required except for zeroshot)")
    exp.add_argument("--classnames", default=None, help="class names, one per line (required for official checkpoints)")
    exp.add_argument("--dataset", default=None, help="built-in class names instead of --classnames (e.g. imagenet)")
    exp.add_argument("--templates", default=None,
                     help="zeroshot templates: openai (default), simple, or a file with one '{}' template per line")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="ONNX graph precision")
    exp.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="PyTorch model precision")
    exp.add_argument("--with-features", action="store_true", help="also output normalised image features")
    exp.add_argument("--serving", default=None, choices=["triton-server"], help="also write a serving layout")
    exp.add_argument("--allow-new-classes", action="store_true",
                     help="accept class names other than the checkpoint's training classes (base-to-new)")
    exp.add_argument("--n-ctx", type=int, default=None, help="context length (default: from the checkpoint)")
    exp.add_argument("--ctx-init", default=None, help="context init phrase used in training")
    exp.add_argument("--csc", action="store_true", help="CoOp class-specific context")
    exp.add_argument("--class-token-position", default=None, choices=["end", "middle", "front"])
    exp.add_argument("--depth", type=int, default=None, help="MaPLe prompt depth (default: from the checkpoint)")
    exp.add_argument("--device", default="cpu")
    exp.add_argument("--quiet", action="store_true", help="no progress display")
    exp.set_defaults(func=_export)

    ver = sub.add_parser("verify", help="run an exported model in onnxruntime and PyTorch on the same inputs")
    ver.add_argument("model", help="model.onnx written by promptcore export")
    ver.add_argument("--batch", type=int, nargs="+", default=[1, 3], help="batch sizes to compare")
    ver.set_defaults(func=_verify)
    from .tpt import add_tpt_subparser
    add_tpt_subparser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``promptcore`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())
        print(f"promptcore {args.command}: error: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
