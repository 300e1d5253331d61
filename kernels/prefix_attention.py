"""Shared-prefix causal attention.

Each (group g, class c) suffix of S rows attends to its group's P prefix keys/values and to
its own suffix keys/values under the causal mask:

    out[g, c, i] = softmax_j([q_i . k_prefix[g, j] for j < P] ++ [q_i . k[g, c, j] for j <= i]) * scale
                   @ [v_prefix[g] ; v[g, c]]

Shapes: ``q, k, v`` (G, C, S, H, d); ``k_prefix, v_prefix`` (G, P, H, d); ``suffix_lens``
(C,) optional: rows i >= suffix_lens[c] are dead (after the EOT) and come out as zeros.
The prefix is read per group, never expanded over classes. Statistics in fp32; output in
the dtype of ``q``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def prefix_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    suffix_lens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`prefix_attention` (also the export and CPU path)."""
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (G, C, S, H, d) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    G, C, S, H, d = q.shape
    if k_prefix.dim() != 4 or k_prefix.shape[0] not in (1, G) or k_prefix.shape[2:] != (H, d):
        raise ValueError(f"k_prefix must be (G, P, H, d) with G={G}, H={H}, d={d}, got {tuple(k_prefix.shape)}")
    if v_prefix.shape != k_prefix.shape:
        raise ValueError(f"v_prefix {tuple(v_prefix.shape)} differs from k_prefix {tuple(k_prefix.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    P = k_prefix.shape[1]
    qf = q.float().permute(0, 1, 3, 2, 4)  # G C H S d
    kp = k_prefix.float().permute(0, 2, 1, 3)  # G H P d
    vp = v_prefix.float().permute(0, 2, 1, 3)
    ks = k.float().permute(0, 1, 3, 2, 4)
    vs = v.float().permute(0, 1, 3, 2, 4)
    scores_prefix = torch.einsum("gchsd,ghpd->gchsp", qf, kp) * scale
    scores_self = (qf @ ks.transpose(-1, -2)) * scale
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
    scores_self = scores_self.masked_fill(causal, float("-inf"))
    probs = torch.cat([scores_prefix, scores_self], dim=-1).softmax(dim=-1)
    out = torch.einsum("gchsp,ghpd->gchsd", probs[..., :P], vp) + probs[..., P:] @ vs
    out = out.permute(0, 1, 3, 2, 4)
    if suffix_lens is not None:
        live = torch.arange(S, device=q.device)[None, :] < suffix_lens.to(q.device)[:, None]  # C S
        out = out * live[None, :, :, None, None]
    return out.to(q.dtype)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    suffix_lens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Suffix queries over [group prefix K/V ; own causal suffix K/V]; returns (G, C, S, H, d)."""
    return prefix_attention_ref(q, k, v, k_prefix, v_prefix, suffix_lens, scale)
