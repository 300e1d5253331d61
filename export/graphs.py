"""The graphs promptcore exports: images -> logits (and, on request, normalised image features).

* CoOp, MaPLe and zero-shot classifiers: the image encoder (MaPLe's with its visual prompts) and cosine scoring against
  a baked, L2-normalised class matrix; the text side is folded into that constant.
* CoCoOp: the text side stays in the graph (it depends on each image through the meta-net),
  prefix-shared and EOT-truncated, with the EOT positions as constants.
"""

from __future__ import annotations

import copy
import unicodedata
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptcore.kernels import cosine_logits

EXPORTABLE = ("coop", "cocoop", "maple", "zeroshot")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class ExportError(ValueError):
    """The module or its options cannot be exported."""


# Characters that end a line for Triton's labels.txt reader or for Python's str.splitlines: a class name holding one
# would shift every label after it.
_LINE_BREAKING = {"Cc", "Zl", "Zp"}


def check_classnames(names: Sequence[str]) -> None:
    """Refuse class names holding control or line-separator characters (they would split labels.txt lines)."""
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ExportError(f"class {i} is {type(name).__name__} {name!r}, not a string")
        for ch in name:
            if unicodedata.category(ch) in _LINE_BREAKING:
                raise ExportError(f"class {i} ({name!r}) holds the control character {ch!r} "
                                  f"(U+{ord(ch):04X}); class names must be single printable lines")


def check_exportable(module: nn.Module) -> str:
    """The method name of an exportable promptcore module, or a clear error."""
    method = getattr(module, "method", None)
    if method == "tpt":
        raise ExportError("TPT tunes a context per test image and has nothing frozen to export; export the "
                          "CoOp/CoCoOp prompts it starts from, or a CoOp module holding one tuned context")
    if method not in EXPORTABLE:
        raise ExportError(f"cannot export {type(module).__name__}: only promptcore CoOp, CoCoOp, MaPLe and ZeroShot "
                          f"modules export (method {method!r})")
    return method


class ClassMatrixGraph(nn.Module):
    """Image encoder + cosine scoring against a constant, normalised class matrix (CoOp, MaPLe, ZeroShot)."""

    def __init__(self, module: nn.Module, text_features: torch.Tensor, with_features: bool):
        super().__init__()
        self.module = module
        self.register_buffer("class_matrix", F.normalize(text_features.float(), dim=-1))
        self.register_buffer("scale", module.model.logit_scale.detach().float().exp())
        self.with_features = with_features

    def forward(self, images: torch.Tensor):
        feats = self.module.encode_images(images)
        if feats.dtype == torch.float32:
            # the one scoring op (its reference while exporting); the scale buffer holds exp(logit_scale)
            logits = cosine_logits(feats, self.class_matrix, self.scale.log())
        else:
            # fp16: the op's fp32 scoring after the fp16 encoder makes onnxruntime's CPU NCHWc layout pass
            # (ORT_ENABLE_ALL) segfault at session creation, so the scoring stays in the graph's one dtype
            logits = self.scale * ((feats / feats.norm(dim=-1, keepdim=True)) @ self.class_matrix.t())
        if not self.with_features:
            return logits
        return logits, feats / feats.norm(dim=-1, keepdim=True)


class ImageConditionedGraph(nn.Module):
    """The whole method forward, text side included (CoCoOp)."""

    def __init__(self, module: nn.Module, with_features: bool):
        super().__init__()
        self.module = module
        self.with_features = with_features

    def forward(self, images: torch.Tensor):
        feats = self.module.encode_images(images)
        logits = self.module.logits_from_image_features(feats)
        if not self.with_features:
            return logits
        return logits, feats / feats.norm(dim=-1, keepdim=True)


def build_graph(module: nn.Module, dtype: str = "fp32", with_features: bool = False) -> nn.Module:
    """An eval-mode copy of ``module`` in ``dtype``, wrapped as the graph to export."""
    method = check_exportable(module)
    if dtype not in DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    was_training = module.training
    if method != "cocoop":
        module.eval()
        with torch.no_grad():  # the constant class matrix, in the module's own precision
            text = module.text_features().detach().clone()
        module.train(was_training)
    work = copy.deepcopy(module).eval()
    work.to(DTYPES[dtype])
    work.clear_cache()
    if method == "cocoop":
        return ImageConditionedGraph(work, with_features).eval()
    # One dtype through the whole graph: onnxruntime's CPU optimiser has crashed on mixed fp16/fp32 graphs.
    return ClassMatrixGraph(work, text, with_features).to(DTYPES[dtype]).eval()
