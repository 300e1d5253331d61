"""The ``promptcore`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import List, Optional

from .methods import METHODS


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
                           progress=step, provider=args.provider)
    print(report.summary())
    for f in report.files:
        print(f"  {f}")
    return 0


def _verify(args) -> int:
    from promptcore.export.pipeline import verify_folder_model

    result = verify_folder_model(args.model, batch_sizes=tuple(args.batch), provider=args.provider)
    status = "ok" if result["ok"] else "MISMATCH"
    print(f"{status}: {args.model} ({result['method']}, {result['num_classes']} classes): onnxruntime "
          f"({result['provider']}) vs PyTorch "
          f"max |diff| {result['max_abs_diff']:.2e} (allowed {result['tolerance']:.2e}), top-1 agreement "
          f"{result['top1_agreement'] * 100:.1f}%; PyTorch {result['torch_ms']:.1f} ms, onnxruntime "
          f"{result['onnxruntime_ms']:.1f} ms at batch {args.batch[-1]}")
    if result["provider_note"]:
        print(result["provider_note"])
    if not result["ok"]:
        print(f"promptcore verify: {args.model}: {result['failure']}", file=sys.stderr)
    return 0 if result["ok"] else 1


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch size {text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size {value} is not valid: batch sizes must be >= 1")
    return value


# -- folder runs: ``promptcore eval`` and ``promptcore tpt`` (see promptcore/runner.py) -------------------------


def _add_model_options(cmd, default: Optional[str] = None) -> None:
    """--model (required without a default), --pretrained and --model-config."""
    if default is None:
        cmd.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-16")
    else:
        cmd.add_argument("--model", default=default, help=f"open_clip architecture (default {default})")
    cmd.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint file")
    cmd.add_argument("--model-config", default=None, help="open_clip model config JSON to register (custom models)")


def _add_folder_options(cmd, batch: int) -> None:
    import torch

    cmd.add_argument("folder", help="root/<class folder>/<image>; labels follow the sorted folder names")
    cmd.add_argument("--out", required=True, help="predictions, one JSON row per image (summary beside it as "
                                                  "<stem>.summary.json); rerun with the same --out to resume")
    cmd.add_argument("--classnames", default=None, help="file with one class name per line in label order")
    cmd.add_argument("--dataset", default=None, help="built-in class names of a data set (e.g. imagenet)")
    cmd.add_argument("--classnames-in-folder-order", action="store_true",
                     help="the class names (--classnames, --dataset or the checkpoint's) are in the sorted order "
                          "of the class folders; without it, folders must match class names by name ('_' as a "
                          "space, case ignored), and labels follow the names")
    _add_model_options(cmd, default="ViT-B-16")
    cmd.add_argument("--batch", type=int, default=batch, help=f"images per batch (default {batch})")
    cmd.add_argument("--workers", type=int, default=None, help="DataLoader decoding processes (default 4 on CUDA, "
                                                               "1 on CPU; 0 decodes in the main process)")
    cmd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="under torchrun, CUDA ranks use cuda:LOCAL_RANK")
    cmd.add_argument("--limit", type=int, default=None, help="first N images of the sorted data set only")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the per-image view generators")
    cmd.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    cmd.add_argument("--timeout", type=float, default=1800.0, help="seconds before a collective between "
                                                                   "torchrun ranks gives up (default 1800)")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar or result line")


def _folder_setup(args):
    """Checks shared by the folder commands, before any model is loaded or file written: the folder, the
    class names (file, data set or folder names) and the --out location."""
    from .models import builtin_classnames
    from .runner import check_out_folder, folder_classnames, scan_image_folder

    if args.classnames and args.dataset:
        raise ValueError("--classnames and --dataset both give class names: pass one")
    for name in ("batch", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    folder = scan_image_folder(args.folder)
    given = args.classnames or (builtin_classnames(args.dataset) if args.dataset else None)
    names = folder_classnames(folder, given, args.classnames_in_folder_order) if given is not None else None
    check_out_folder(args.out)
    if args.model_config:
        from promptcore.export.pipeline import register_model_config

        register_model_config(args.model_config)
    return folder, names


def _run_options(args, dist) -> dict:
    workers = args.workers if args.workers is not None else (4 if dist.device.type == "cuda" else 1)
    return dict(batch_size=args.batch, workers=workers, seed=args.seed, limit=args.limit, strict=args.strict,
                progress=not args.quiet and dist.rank == 0, device=dist.device,
                classnames_in_folder_order=args.classnames_in_folder_order)


def _eval(args) -> int:
    from .models import load_model
    from .runner import build_eval_module, check_eval_options, distributed, run_folder

    check_eval_options(args.method, args.checkpoint, args.templates)
    folder, names = _folder_setup(args)
    templates = args.templates
    if templates is not None and templates not in ("openai", "simple"):
        from .models import read_classnames

        templates = read_classnames(templates)  # a file: one template per line, "{}" for the class name
    if names is None and (args.method == "zeroshot" or not str(args.checkpoint).endswith(".safetensors")):
        names = list(folder.classes)  # a promptcore prompt file carries its own class names
    options = {"n_ctx": args.n_ctx, "ctx_init": args.ctx_init, "class_token_position": args.class_token_position,
               "depth": args.depth}
    with distributed(args.device, args.timeout) as dist:
        model, tokenizer = load_model(args.model, args.pretrained, dist.device, args.precision)
        module = build_eval_module(args.method, model, tokenizer, names, checkpoint=args.checkpoint,
                                   templates=templates, options=options, allow_new_classes=args.allow_new_classes)
        config = {"command": "eval", "method": args.method, "model": args.model, "pretrained": args.pretrained,
                  "checkpoint": args.checkpoint, "templates": templates, "precision": args.precision,
                  "options": {k: v for k, v in options.items() if v is not None}}
        run_folder(module, folder.root, args.out, mode="eval", config=config, **_run_options(args, dist))
    return 0


def _tpt(args) -> int:
    from .models import load_model
    from .runner import distributed, run_folder
    from .tpt import TPT

    selection = args.selection if args.selection is not None else (0.3 if args.zero else 0.1)
    folder, names = _folder_setup(args)
    names = names if names is not None else list(folder.classes)
    autocast = args.precision in ("amp", "amp_bf16")
    weights = "fp32" if autocast else args.precision
    with distributed(args.device, args.timeout) as dist:
        model, tokenizer = load_model(args.model, args.pretrained, dist.device, weights)
        tpt = TPT(model, names, tokenizer=tokenizer, n_ctx=args.n_ctx, ctx_init=args.ctx_init or None,
                  n_views=args.views, selection=selection, lr=args.lr, steps=args.steps,
                  augmix=args.augmix, precision=args.precision if autocast else "native",
                  batch_size=args.batch, seed=args.seed)
        if args.init:
            info = tpt.load_official(args.init)
            if not args.quiet and dist.rank == 0:
                print(f"initialised from {info['method']} checkpoint {info['file']}")
        config = {"command": "tpt", "model": args.model, "pretrained": args.pretrained, "init": args.init,
                  "ctx_init": args.ctx_init, "n_ctx": args.n_ctx, "views": args.views, "selection": selection,
                  "lr": args.lr, "steps": args.steps, "augmix": args.augmix, "precision": args.precision,
                  "device": dist.device.type}
        run_folder(tpt, folder.root, args.out, mode="zero" if args.zero else "tpt", zero_selection=selection,
                   config=config, **_run_options(args, dist))
    return 0


def _serve(args) -> int:
    # promptcore.serve imports ray only when the server starts: argument errors need no ray
    from .serve import build_module, serve_forever, spec_from_args

    spec = spec_from_args(args)
    # build once here: a bad checkpoint, class file or model fails now with its own message, not in a replica
    build_module(spec)
    return serve_forever(spec, host=args.host, port=args.port, address=args.address, replicas=args.replicas,
                         name=args.name, log=lambda *a, **k: print(*a, file=sys.stderr, **k))


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
    _add_model_options(exp)
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
    exp.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"],
                     help="onnxruntime execution provider of the verification (auto: the best available)")
    exp.add_argument("--device", default="cpu")
    exp.add_argument("--quiet", action="store_true", help="no progress display")
    exp.set_defaults(func=_export)

    ver = sub.add_parser("verify", help="run an exported model in onnxruntime and PyTorch on the same inputs")
    ver.add_argument("model", help="model.onnx written by promptcore export")
    ver.add_argument("--batch", type=_batch_size, nargs="+", default=[1, 3], help="batch sizes to compare")
    ver.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"],
                     help="onnxruntime execution provider (auto: the best available, said in the report)")
    ver.set_defaults(func=_verify)

    ev = sub.add_parser("eval", help="accuracy of learned prompts (or zero-shot) over an ImageFolder-layout folder; "
                                     "runs under torchrun")
    _add_folder_options(ev, batch=32)
    ev.add_argument("--method", required=True, choices=["coop", "cocoop", "maple", "zeroshot"])
    ev.add_argument("--checkpoint", default=None,
                    help="official checkpoint (model.pth.tar-N or its folder) or a promptcore .safetensors file")
    ev.add_argument("--templates", default=None, help="zeroshot: openai, simple, or a file of templates with {}")
    ev.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="model weights")
    ev.add_argument("--allow-new-classes", action="store_true",
                    help="accept class names other than the checkpoint's training classes (base-to-new)")
    ev.add_argument("--n-ctx", type=int, default=None, help="context length (default: from the checkpoint)")
    ev.add_argument("--ctx-init", default=None, help="context init phrase used in training")
    ev.add_argument("--class-token-position", default=None, choices=["end", "middle", "front"])
    ev.add_argument("--depth", type=int, default=None, help="MaPLe prompt depth (default: from the checkpoint)")
    ev.set_defaults(func=_eval)

    tpt = sub.add_parser("tpt", help="test-time prompt tuning (or ZERO) over an ImageFolder-layout folder; runs "
                                     "under torchrun")
    _add_folder_options(tpt, batch=8)
    tpt.add_argument("--init", default=None, help="official CoOp/CoCoOp checkpoint to initialise the context from")
    tpt.add_argument("--ctx-init", default="a photo of a", help="init phrase (default 'a photo of a'; '' for random)")
    tpt.add_argument("--n-ctx", type=int, default=4)
    tpt.add_argument("--views", type=int, default=64, help="views per image, view 0 included (default 64)")
    tpt.add_argument("--selection", type=float, default=None, help="confident fraction (default 0.1; ZERO 0.3)")
    tpt.add_argument("--lr", type=float, default=5e-3)
    tpt.add_argument("--steps", type=int, default=1)
    tpt.add_argument("--augmix", action="store_true", help="AugMix views (official for fine-grained sets)")
    tpt.add_argument("--zero", action="store_true", help="ZERO: vote of confident views, no tuning")
    tpt.add_argument("--precision", default="amp", choices=["amp", "amp_bf16", "fp32", "fp16", "bf16"],
                     help="amp: fp32 weights, fp16 autocast on CUDA and fp32 elsewhere (official); amp_bf16: "
                          "fp32 weights under bf16 autocast; others: weights in that dtype")
    tpt.set_defaults(func=_tpt)

    serve = sub.add_parser("serve", help="serve a promptcore module over HTTP on Ray Serve with dynamic batching")
    serve.add_argument("--method", required=True, choices=list(METHODS))
    _add_model_options(serve)
    serve.add_argument("--checkpoint", default=None,
                       help="learned prompts: official checkpoint or promptcore .safetensors (coop/cocoop/maple; "
                            "optional for tpt)")
    names = serve.add_mutually_exclusive_group(required=True)
    names.add_argument("--classnames", default=None, help="class names, one per line")
    names.add_argument("--dataset", default=None, help="built-in class list, e.g. imagenet")
    serve.add_argument("--allow-new-classes", action="store_true",
                       help="accept class names other than an official checkpoint's training classes")
    serve.add_argument("--templates", default=None, help="zeroshot templates: openai, simple or a file")
    serve.add_argument("--n-ctx", type=int, default=None)
    serve.add_argument("--ctx-init", default=None)
    serve.add_argument("--n-views", type=int, default=None, help="TPT views per image (official 64)")
    serve.add_argument("--tpt-steps", type=int, default=None, help="TPT optimizer steps per image")
    serve.add_argument("--device", default="cpu", help="cpu or cuda")
    serve.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    serve.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 to listen on every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=32, help="images per forward pass (and per request)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="longest wait for requests still being read or decoded (queued ones never wait)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests queued or running per replica before new ones get 503 overloaded")
    serve.add_argument("--max-image-pixels", type=int, default=40_000_000, help="largest image accepted (pixels)")
    serve.add_argument("--top-k", type=int, default=5, help="labels returned per image (default 5)")
    serve.add_argument("--seed", type=int, default=0, help="TPT's default view seed (requests may pass their own)")
    serve.add_argument("--replicas", type=int, default=1, help="model replicas (Ray places them on the cluster)")
    serve.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica (also its torch threads)")
    serve.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 with a cuda device)")
    serve.add_argument("--address", default=None,
                       help="join a running Ray cluster (e.g. auto or HEAD:6379) instead of starting a private one "
                            "(without it RAY_ADDRESS and `ray start` clusters are ignored)")
    serve.add_argument("--name", default="promptcore",
                       help="Serve application name (with --address: refused if the cluster already runs one)")
    serve.set_defaults(func=_serve)
    return parser


TRACEBACK_ENV = "PROMPTCORE_TRACEBACK"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``promptcore`` command: every error is one line on stderr and exit status 2 (the
    full traceback too when ``PROMPTCORE_TRACEBACK=1``); Ctrl-C exits with 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if _traceback_wanted():
            traceback.print_exc()
        print(f"promptcore {args.command}: interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:  # an optional dependency (onnx, onnxruntime, ...) is not installed
        if _traceback_wanted():
            traceback.print_exc()
        print(f"promptcore {args.command}: error: {exc.name or exc} is not installed "
              "(pip install 'promptcore[export]' for export and verify)", file=sys.stderr)
        return 2
    except Exception as exc:  # the backstop: a message, never a traceback, unless asked for
        from .runner import error_text

        if _traceback_wanted():
            traceback.print_exc()
        reason = error_text(exc)
        if not isinstance(exc, (ValueError, TypeError, OSError, RuntimeError)):
            reason = f"{type(exc).__name__}: {reason}"  # e.g. a KeyError's message alone is just the key
        print(f"promptcore {args.command}: error: {reason}", file=sys.stderr)
        return 2


def _traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


if __name__ == "__main__":
    sys.exit(main())
