"""The CoCoOp meta-net (KaiyangZhou/CoOp trainers/cocoop.py), shared by CoCoOp and by TPT's CoCoOp
initialisation: Linear(vis_dim, vis_dim // 16) -> ReLU -> Linear(vis_dim // 16, ctx_dim), keys
``linear1.*`` and ``linear2.*`` (``meta_net.*`` inside a prompt learner)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Tuple

import torch
import torch.nn as nn

from .checkpoints import CheckpointError, check_learned_tensor, shape_mismatch


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


def check_meta_net_state(state: Dict[str, torch.Tensor], vis_dim: int, ctx_dim: int, source, owner: str) -> None:
    """Raise a :class:`CheckpointError` unless ``state`` holds every ``meta_net.*`` tensor, finite and floating,
    in the shapes of a meta-net for ``vis_dim`` -> ``ctx_dim`` (``owner`` names the module in messages)."""
    for key, want in meta_net_shapes(vis_dim, ctx_dim).items():
        if key not in state:
            raise CheckpointError(f"{source} lacks {key}")
        check_learned_tensor(key, state[key], source)
        got = tuple(state[key].shape)
        if got != want:
            raise CheckpointError(shape_mismatch(key, got, want, source, owner))
