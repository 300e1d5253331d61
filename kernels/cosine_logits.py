"""Cosine-logit scoring: normalise, multiply, scale; optionally entropy and argmax.

    logits[b, n] = exp(logit_scale) * <img[b] / |img[b]|, txt[n] / |txt[n]|>
    entropy[b]   = -sum_n p[b, n] log p[b, n],  p = softmax(logits[b])
    argmax[b]    = argmax_n logits[b, n]

Shapes: ``image_features`` (B, E), ``text_features`` (N, E), ``logit_scale`` scalar (the log
of the scale, as CLIP stores it). Logits come out in the dtype of ``image_features``;
norms, dot products and the softmax statistics are fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ScoredLogits(NamedTuple):
    logits: torch.Tensor
    entropy: torch.Tensor
    argmax: torch.Tensor


def _check(image_features, text_features):
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features (B, E) and text_features (N, E) disagree: "
                         f"{tuple(image_features.shape)} vs {tuple(text_features.shape)}")


def cosine_logits_ref(image_features, text_features, logit_scale, with_entropy: bool = False):
    """PyTorch reference of :func:`cosine_logits` (also the export and CPU path)."""
    _check(image_features, text_features)
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = torch.as_tensor(logit_scale).float().exp() * (img @ txt.t())
    if not with_entropy:
        return logits.to(image_features.dtype)
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return ScoredLogits(logits.to(image_features.dtype), entropy, logits.argmax(dim=-1))


def cosine_logits(image_features, text_features, logit_scale, with_entropy: bool = False):
    """Scaled cosine similarities (B, N); with ``with_entropy`` also per-row entropy and argmax."""
    return cosine_logits_ref(image_features, text_features, logit_scale, with_entropy)
