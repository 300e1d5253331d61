"""Prompt assembly: gather token embeddings, insert learned context, add positions.

    out[g, c, s, :] = (ctx_row(g, c, slot[c, s]) + bias[g]   if slot[c, s] >= 0
                       token_embeds[c, s]                   otherwise) + pos[s]

Shapes: ``token_embeds`` (C, S, D); ``slots`` (C, S) integer, -1 for "keep the token",
k >= 0 for "context row k"; ``pos`` (S, D); ``ctx`` (K, D) shared, (C, K, D) per class
(``ctx_layout="class"``) or (G, K, D) per group (``ctx_layout="group"``); ``bias`` (G, D)
added to context rows only (CoCoOp's meta-net output). Output (G, C, S, D) in the dtype of
``token_embeds``; sums are taken in fp32 and rounded once.
"""

from __future__ import annotations

from typing import Optional

import torch

CTX_LAYOUTS = ("shared", "class", "group")


def _check(token_embeds, slots, pos, ctx, bias, ctx_layout):
    if ctx_layout not in CTX_LAYOUTS:
        raise ValueError(f"ctx_layout must be one of {CTX_LAYOUTS}, got {ctx_layout!r}")
    if token_embeds.dim() != 3 or slots.shape != token_embeds.shape[:2]:
        raise ValueError(f"token_embeds (C, S, D) and slots (C, S) disagree: {tuple(token_embeds.shape)}, "
                         f"{tuple(slots.shape)}")
    if pos.shape != token_embeds.shape[1:]:
        raise ValueError(f"pos must be (S, D) = {tuple(token_embeds.shape[1:])}, got {tuple(pos.shape)}")
    if ctx is not None:
        want = 2 if ctx_layout == "shared" else 3
        if ctx.dim() != want or ctx.shape[-1] != token_embeds.shape[-1]:
            raise ValueError(f"ctx for layout {ctx_layout!r} must have {want} dims ending in "
                             f"D={token_embeds.shape[-1]}, got {tuple(ctx.shape)}")
        if ctx_layout == "class" and ctx.shape[0] != token_embeds.shape[0]:
            raise ValueError(f"class-specific ctx has {ctx.shape[0]} rows for {token_embeds.shape[0]} classes")
    if bias is not None:
        if bias.dim() != 2 or bias.shape[-1] != token_embeds.shape[-1]:
            raise ValueError(f"bias must be (G, D), got {tuple(bias.shape)}")
        if ctx is not None and ctx_layout == "group" and bias.shape[0] != ctx.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} groups, ctx has {ctx.shape[0]}")


def assemble_prompts_ref(
    token_embeds: torch.Tensor,
    slots: torch.Tensor,
    pos: torch.Tensor,
    ctx: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ctx_layout: str = "shared",
) -> torch.Tensor:
    """PyTorch reference of :func:`assemble_prompts` (also the export and CPU path)."""
    _check(token_embeds, slots, pos, ctx, bias, ctx_layout)
    out_dtype = token_embeds.dtype
    base = token_embeds.float() + pos.float()
    if ctx is None:
        return base.unsqueeze(0).to(out_dtype)
    slots = slots.long()
    is_ctx = (slots >= 0).unsqueeze(-1)
    index = slots.clamp(min=0)
    if ctx_layout == "shared":
        rows = ctx[index].unsqueeze(0)
    elif ctx_layout == "class":
        rows = ctx[torch.arange(ctx.shape[0], device=ctx.device).unsqueeze(1), index].unsqueeze(0)
    else:
        rows = ctx[:, index]
    rows = rows.float()
    if bias is not None:
        rows = rows + bias.float()[:, None, None, :]
    out = torch.where(is_ctx, rows + pos.float(), base)
    return out.to(out_dtype)


def assemble_prompts(
    token_embeds: torch.Tensor,
    slots: torch.Tensor,
    pos: torch.Tensor,
    ctx: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ctx_layout: str = "shared",
) -> torch.Tensor:
    """Assemble encoder inputs (G, C, S, D) from tokens, context and positions in one pass."""
    return assemble_prompts_ref(token_embeds, slots, pos, ctx, bias, ctx_layout)
