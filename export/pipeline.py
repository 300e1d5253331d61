"""From a checkpoint to a verified export folder, and back (``promptcore export`` / ``verify``).

An export folder holds ``model.onnx`` (metadata: method, options, class names, model name,
pretrained weights), ``prompts.safetensors`` (the prompts, so ``verify`` can rebuild the PyTorch
side), ``export_report.json`` and, on request, a Triton Inference Server repository. Everything
is staged in a temporary folder and moved into place at the end: a failure leaves no file.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .graphs import EXPORTABLE, ExportError, build_graph
from .onnx_export import _stage, compare_with_onnxruntime, provider_list, read_metadata, to_onnx, tolerance
from .serving import write_triton_repository

SERVING = ("triton-server",)


def register_model_config(path) -> str:
    """Register an open_clip model config JSON file; returns the model name (the file stem)."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model config file at {path}")
    open_clip.add_model_config(path)
    return path.stem


def classes_disagreement(module, suffix: Optional[torch.Tensor]) -> Optional[str]:
    """Compare the class list with the training classes an official checkpoint records.

    Official prompt learners save ``token_suffix`` (:attr:`promptcore.official.OfficialCheckpoint.token_suffix`):
    the token embeddings of the training prompts after SOS and the context. Returns a reason when they
    differ, None when they match or the checkpoint records none.
    """
    from promptcore.prompts import clean_classnames, context_prompts

    if suffix is None:
        return None
    names = clean_classnames(module.classnames)
    if suffix.shape[0] != len(names):
        return f"the class file has {len(names)} names, the checkpoint was trained on {suffix.shape[0]} classes"
    tower = module.engine.tower
    n_ctx = module.n_ctx
    # the official learners save the suffix of the class-at-the-end prompts, whatever the class position
    ids = context_prompts(module.tokenizer, names, n_ctx, module.prompt_prefix, tower.context_length, "end").ids
    with torch.no_grad():
        ours = tower.token_embedding(ids.to(tower.device))[:, 1 + n_ctx:].float().cpu()
    theirs = suffix.float()
    if ours.shape != theirs.shape:
        return (f"the checkpoint's class tokens have shape {tuple(theirs.shape)}, "
                f"the class file gives {tuple(ours.shape)}")
    row_err = (ours - theirs).abs().amax(dim=(1, 2))
    scale = theirs.abs().amax().clamp_min(1e-6)
    bad = (row_err > 1e-2 * scale).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        return f"class {i} ({module.classnames[i]!r}) is not the class the checkpoint was trained with at that row"
    return None


def build_from_checkpoint(method: str, model, tokenizer, checkpoint, classnames: Optional[List[str]],
                          options: Optional[Dict[str, object]] = None, allow_new_classes: bool = False):
    """A promptcore module with the prompts of ``checkpoint`` (official Dassl file/folder or promptcore file)."""
    from promptcore.methods import get_method
    from promptcore.official import read_official

    cls = get_method(method)
    if method == "tpt" or method not in EXPORTABLE:
        raise ExportError(f"{cls.__name__} cannot be exported: TPT tunes a context per test image and has nothing "
                          "frozen to export; export the CoOp/CoCoOp prompts it starts from instead")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    accepted = inspect.signature(cls.__init__).parameters
    for key in options:
        if key not in accepted:
            raise ExportError(f"option {key!r} does not apply to {cls.__name__}")
    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        module = cls.from_file(path, model, tokenizer=tokenizer, **options)
        if classnames is not None and list(classnames) != list(module.classnames):
            if not allow_new_classes:
                raise ExportError(f"the class file disagrees with {path}: it lists {len(classnames)} names, the "
                                  f"prompt file {len(module.classnames)} (first difference at "
                                  f"{_first_difference(classnames, module.classnames)})")
            module.set_classnames(classnames)
        return module
    if classnames is None:
        raise ExportError("an official checkpoint records no class names: pass a class-name file")
    ckpt = read_official(path, method)
    implied = ckpt.options()
    for key, value in options.items():
        if key in implied and key != "ctx_init" and implied[key] != value:
            raise ExportError(f"{key}={value} disagrees with {ckpt.file}, whose prompts have {key}={implied[key]}")
    module = cls(model, classnames, tokenizer=tokenizer, **{**implied, **options})
    if not allow_new_classes:
        reason = classes_disagreement(module, ckpt.token_suffix)
        if reason is not None:
            raise ExportError(f"the class file disagrees with {ckpt.file}: {reason} (pass --allow-new-classes for "
                              "base-to-new evaluation)")
    module.load_official(ckpt)  # the file is read once
    return module


def build_zeroshot(model, tokenizer, classnames: Optional[List[str]], templates: Optional[str] = None,
                   options: Optional[Dict[str, object]] = None, progress: bool = True):
    """A ZeroShot classifier for ``promptcore export --method zeroshot`` (no checkpoint).

    ``templates`` is "openai" (the default), "simple" or a file with one template per line.
    """
    from promptcore.zeroshot import ZeroShot, read_templates

    for key, value in (options or {}).items():
        if value is not None:
            raise ExportError(f"option {key!r} does not apply to ZeroShot")
    if classnames is None:
        raise ExportError("a zero-shot classifier needs class names: pass --classnames FILE or --dataset NAME")
    return ZeroShot(model, classnames, templates=read_templates(templates or "openai"), tokenizer=tokenizer,
                    progress=progress)


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"row {i}: {x!r} vs {y!r}"
    return f"row {min(len(a), len(b))}"


def export_folder(module, out, dtype: str = "fp32", with_features: bool = False, serving: Optional[str] = None,
                  pretrained: Optional[str] = None, model_config: Optional[str] = None,
                  progress: Optional[Callable[[str], None]] = None, provider: str = "auto"):
    """Write a verified export folder for ``module`` (verified on onnxruntime ``provider``); returns the report."""
    if serving is not None and serving not in SERVING:
        raise ExportError(f"unknown serving layout {serving!r}; choose one of {', '.join(SERVING)}")
    out = Path(out)
    parent = out.parent if not out.exists() else out
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if not parent.is_dir():
        raise ExportError(f"folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"folder {parent} is not writable")
    stage = Path(tempfile.mkdtemp(prefix=".promptcore-export.", dir=parent))
    try:
        extra = {"prompts_file": "prompts.safetensors", "pretrained": pretrained or "",
                 "model_config": str(Path(model_config).resolve()) if model_config else ""}
        module.save(stage / "prompts.safetensors")
        report = to_onnx(module, stage / "model.onnx", dtype=dtype, with_features=with_features,
                         extra_metadata=extra, progress=progress, provider=provider)
        if serving == "triton-server":
            if progress:
                progress("writing the Triton Inference Server repository")
            write_triton_repository(stage / "triton-server", stage / "model.onnx", f"promptcore_{module.method}",
                                    module.classnames)
        report.path = str(out / "model.onnx")
        report.files = []
        (stage / "export_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        out.mkdir(exist_ok=True)
        for item in sorted(stage.iterdir()):
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
            report.files.append(str(target))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def verify_folder_model(onnx_path, batch_sizes: Sequence[int] = (1, 3), provider: str = "auto") -> Dict[str, object]:
    """Rebuild the PyTorch module of an exported model and compare onnxruntime (on ``provider``) with it."""
    from promptcore.methods import get_method
    from promptcore.models import load_model

    provider_list(provider)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    meta = read_metadata(onnx_path)
    prompts = onnx_path.parent / str(meta.get("prompts_file") or "prompts.safetensors")
    if not prompts.is_file():
        raise FileNotFoundError(f"{prompts} is missing: verify needs the prompts file written beside the model")
    if meta.get("model_config"):
        register_model_config(meta["model_config"])
    model_name = str(meta.get("model_name") or "")
    if not model_name:
        raise ExportError(f"{onnx_path} does not name its open_clip model")
    model, tokenizer = load_model(model_name, str(meta.get("pretrained") or "") or None)
    # a zero-shot classifier is rebuilt from its templates, so the check covers the text side too
    rebuild = {"use_saved": False} if meta["method"] == "zeroshot" else {}
    module = get_method(str(meta["method"])).from_file(prompts, model, tokenizer=tokenizer, **rebuild)
    dtype = str(meta["dtype"])
    graph = build_graph(module, dtype, "image_features" in meta.get("outputs", []))
    with _stage(f"running {onnx_path} in onnxruntime against PyTorch"):
        result = compare_with_onnxruntime(graph, onnx_path, int(meta["image_size"]), dtype, batch_sizes,
                                          provider=provider)
    result["tolerance"] = tolerance(dtype, result["max_abs_logit"])
    result["ok"] = bool(result["max_abs_diff"] <= result["tolerance"])
    result["method"] = meta["method"]
    result["num_classes"] = len(meta["classnames"])
    return result
