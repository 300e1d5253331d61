"""The CoCoOp meta-net (KaiyangZhou/CoOp trainers/cocoop.py), shared by CoCoOp and by TPT's CoCoOp
initialisation: Linear(vis_dim, vis_dim // 16) -> ReLU -> Linear(vis_dim // 16, ctx_dim), keys
``linear1.*`` and ``linear2.*`` (``meta_net.*`` inside a prompt learner)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Tuple

import torch.nn as nn


def build_meta_net(vis_dim: int, ctx_dim: int) -> nn.Sequential:
    """The official meta-net: Linear(vis_dim, vis_dim // 16) -> ReLU -> Linear(vis_dim // 16, ctx_dim).

    Initialised as ``nn.Linear`` does by default (torch's global generator), as officially.
    """
    hidden = vis_dim // 16
    if hidden < 1:
        raise ValueError(f"the image feature dim {vis_dim} is too small for CoCoOp's meta-net (hidden = dim // 16)")
    return nn.Sequential(OrderedDict([
        ("linear1", nn.Linear(vis_dim, hidden)),
        ("relu", nn.ReLU()),
        ("linear2", nn.Linear(hidden, ctx_dim)),
    ]))


def image_feature_dim(model: nn.Module, fallback: int) -> int:
    """The image tower's output dim (official ``clip_model.visual.output_dim``), else ``fallback``."""
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    return int(dim) if isinstance(dim, int) else int(fallback)


def meta_net_shapes(vis_dim: int, ctx_dim: int, prefix: str = "meta_net.") -> Dict[str, Tuple[int, ...]]:
    """The shape of every meta-net tensor, keyed as in a prompt learner's state dict."""
    hidden = vis_dim // 16
    return {f"{prefix}linear1.weight": (hidden, vis_dim), f"{prefix}linear1.bias": (hidden,),
            f"{prefix}linear2.weight": (ctx_dim, hidden), f"{prefix}linear2.bias": (ctx_dim,)}

