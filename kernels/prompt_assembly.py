"""Prompt assembly: gather token embeddings, insert learned context, add positions.

    out[g, c, s, :] = (ctx_row(g, c, slot[c, s]) + bias[g]   if slot[c, s] >= 0
                       token_embeds[c, s]                   otherwise) + pos[s]

Shapes: ``token_embeds`` (C, S, D); ``slots`` (C, S) integer, -1 for "keep the token",
k >= 0 for "context row k"; ``pos`` (S, D); ``ctx`` (K, D) shared, (C, K, D) per class
(``ctx_layout="class"``) or (G, K, D) per group (``ctx_layout="group"``); ``bias`` (G, D)
added to context rows only (CoCoOp's meta-net output). Output (G, C, S, D) in the dtype of
``token_embeds``; sums are taken in fp32 and rounded once.

Triton path (any float dtypes; ctx/bias may differ in dtype from the tokens, e.g. fp32
learned context over fp16 CLIP embeddings):

* ``_assemble_prompts_fwd_kernel``: one program per (block of flattened (c, s) rows, group),
  looping over D: each row reads either its token embedding or its context row (+ bias) and
  its position, sums in fp32, rounds once at the store. Token embeddings are only read for
  token rows, context rows only for context slots (masked loads).
* ``_assemble_prompts_bwd_kernel``: stage 1 of the context/bias gradients: the output grad of
  every context position, summed over groups in registers where groups share context and have
  no bias, is stored to an fp32 (groups, C, K, D) partial (one writer per (class, slot), no
  atomics); stage 2 sums the partials over classes and/or groups in a fixed order, so the
  results are deterministic.
* grads of ``token_embeds`` and ``pos`` (rarely wanted: they are frozen CLIP weights) are
  plain torch reductions of the output grad, computed only when asked for.
* slots >= K (no such context row) read a zero context row here; the reference raises.
* tiles and warps: ``CONFIGS`` per alignment class, each config checked by the resource gate; on CUDA
  ``triton.autotune`` picks one per (rows, suffix length, D, dtypes), the interpreter runs the first.
  The partition never changes a sum's order (one writer per partial row, groups summed in a fixed
  loop), so every config gives bit-identical results.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._utils import (
    HAS_TRITON,
    autotuned,
    cast_for_store,
    fit_tiles,
    needs_bf16_rounding,
    no_zero_strides,
    tl,
    triton,
    vector_aligned,
)
from .backend import use_triton

CTX_LAYOUTS = ("shared", "class", "group")

if HAS_TRITON:

    @triton.jit
    def _assemble_prompts_fwd_kernel(
        out_ptr, so_g, so_c, so_s,
        tok_ptr, st_c, st_s,
        slots_ptr, ssl_c, ssl_s,
        pos_ptr, sp_s,
        ctx_ptr, sx_g, sx_c, sx_k,
        bias_ptr, sb_g,
        R, S, D, K,
        HAS_CTX: tl.constexpr, HAS_BIAS: tl.constexpr, RTNE_BF16: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened c * S + s
        g = tl.program_id(1).to(tl.int64)
        row_ok = rows < R
        c = rows // S
        s = rows % S
        if HAS_CTX:
            slot = tl.load(slots_ptr + c * ssl_c + s * ssl_s, mask=row_ok, other=-1).to(tl.int64)
            is_ctx = row_ok & (slot >= 0)
            is_tok = row_ok & (slot < 0)
            ctx_row = ctx_ptr + g * sx_g + c * sx_c + slot * sx_k
        else:
            is_tok = row_ok
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            d_ok = cols < D
            p = tl.load(pos_ptr + s[:, None] * sp_s + cols[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            tok = tl.load(tok_ptr + c[:, None] * st_c + s[:, None] * st_s + cols[None, :],
                          mask=is_tok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            val = tok + p
            if HAS_CTX:
                x = tl.load(ctx_row[:, None] + cols[None, :], mask=(is_ctx & (slot < K))[:, None] & d_ok[None, :],
                            other=0.0).to(tl.float32)
                if HAS_BIAS:
                    x += tl.load(bias_ptr + g * sb_g + cols, mask=d_ok, other=0.0).to(tl.float32)[None, :]
                val = tl.where(is_ctx[:, None], x + p, val)
            tl.store(out_ptr + g * so_g + c[:, None] * so_c + s[:, None] * so_s + cols[None, :],
                     cast_for_store(val, out_ptr, RTNE_BF16), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _assemble_prompts_bwd_kernel(
        part_ptr, sp_g, sp_c, sp_k,
        dout_ptr, sdo_g, sdo_c, sdo_s,
        slots_ptr, ssl_c, ssl_s,
        R, S, D, K, GROUPS_PER_PROGRAM,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Stage 1 of the context grads: part[g, c, slot] = sum over this program's groups of dout[g, c, s].

        Each (class, slot) pair is one prompt position, so every partial row has exactly one writer:
        plain stores, no atomics. The launcher sums the partials over classes/groups in a fixed order.
        """
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        g0 = tl.program_id(1).to(tl.int64) * GROUPS_PER_PROGRAM
        row_ok = rows < R
        c = rows // S
        s = rows % S
        slot = tl.load(slots_ptr + c * ssl_c + s * ssl_s, mask=row_ok, other=-1).to(tl.int64)
        is_ctx = row_ok & (slot >= 0) & (slot < K)
        part_row = part_ptr + tl.program_id(1).to(tl.int64) * sp_g + c * sp_c + slot * sp_k
        dout_row = dout_ptr + c * sdo_c + s * sdo_s
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = is_ctx[:, None] & (cols < D)[None, :]
            acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
            for gi in range(0, GROUPS_PER_PROGRAM):
                acc += tl.load(dout_row[:, None] + (g0 + gi) * sdo_g + cols[None, :], mask=mask,
                               other=0.0).to(tl.float32)
            tl.store(part_row[:, None] + cols[None, :], acc, mask=mask)


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


# ----------------------------------------------------------------------------------------------
# host launchers


def _rowwise(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Unit stride along D and no stride-0 dims (then a copy); every other layout passes as is."""
    if t is None:
        return None
    t = no_zero_strides(t)
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_groups(ctx, bias, ctx_layout) -> int:
    if ctx is None:
        return 1
    if ctx_layout == "group":
        return ctx.shape[0]
    return bias.shape[0] if bias is not None else 1


def _ctx_strides(t, ctx_layout):
    """(group, class, row) strides of the context, 0 where its layout lacks the dimension."""
    if ctx_layout == "shared":
        return 0, 0, t.stride(0)
    if ctx_layout == "class":
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), 0, t.stride(1)


# Autotune configs ((BLOCK_R rows, BLOCK_D columns), warps, stages), the first the default (and the
# interpreter's); every one passes the resource gate with no spill and >= 2 CTAs per SM on sm_80 and sm_90
# (python -m promptcore.kernels.resources). Unaligned inputs load element by element, a 64-bit address each,
# so their tiles are a quarter of the size, and they are not tuned.
CONFIGS = {
    True: [((32, 128), 4, 3), ((16, 128), 4, 3)],
    False: [((32, 32), 4, 3)],
}
_TUNE_KEYS = {"fwd": ["R", "S", "D"], "bwd": ["R", "S", "D", "K", "GROUPS_PER_PROGRAM"]}


_fit_columns = fit_tiles((("BLOCK_D", "D"),))  # ``early_config_prune``: column tiles no wider than D needs


def _tuned(kernel_fn, kind: str, *tensors):
    """``kernel_fn`` under the autotuner of its class (``kind`` "fwd" or "bwd", aligned inputs or not)."""
    aligned = vector_aligned(*tensors)
    configs = [({"BLOCK_R": r, "BLOCK_D": d}, w, s) for (r, d), w, s in CONFIGS[aligned]]
    return autotuned(kernel_fn, f"prompt_assembly.{kind}.{aligned}", configs, _TUNE_KEYS[kind], _fit_columns)


def _assemble_prompts_fwd(token_embeds, slots, pos, ctx, bias, ctx_layout):
    C, S, D = token_embeds.shape
    G = _num_groups(ctx, bias, ctx_layout)
    R = C * S
    out = torch.empty((G, C, S, D), dtype=token_embeds.dtype, device=token_embeds.device)
    has_ctx = ctx is not None
    has_bias = has_ctx and bias is not None
    kernel = _tuned(_assemble_prompts_fwd_kernel, "fwd", out, token_embeds, pos, ctx, bias)
    kernel[lambda cfg: (triton.cdiv(R, cfg["BLOCK_R"]), G)](
        out, out.stride(0), out.stride(1), out.stride(2),
        token_embeds, token_embeds.stride(0), token_embeds.stride(1),
        slots, slots.stride(0), slots.stride(1),
        pos, pos.stride(0),
        ctx if has_ctx else out, *(_ctx_strides(ctx, ctx_layout) if has_ctx else (0, 0, 0)),
        bias if has_bias else out, bias.stride(0) if has_bias else 0,
        R, S, D, ctx.shape[-2] if has_ctx else 0,
        HAS_CTX=has_ctx, HAS_BIAS=has_bias, RTNE_BF16=needs_bf16_rounding(out),
    )
    return out


def _assemble_prompts_bwd(dout, slots, ctx, bias, ctx_layout):
    G, C, S, D = dout.shape
    R = C * S
    K = ctx.shape[-2]
    # stage 1: per-(group, class, slot) partials; groups stay apart when they have their own context
    # or bias, otherwise one program sums every group in registers
    per_group = ctx_layout == "group" or bias is not None
    part = torch.zeros((G if per_group else 1, C, K, D), dtype=torch.float32, device=dout.device)
    kernel = _tuned(_assemble_prompts_bwd_kernel, "bwd", part, dout)
    kernel[lambda cfg: (triton.cdiv(R, cfg["BLOCK_R"]), G if per_group else 1)](
        part, part.stride(0), part.stride(1), part.stride(2),
        dout, dout.stride(0), dout.stride(1), dout.stride(2),
        slots, slots.stride(0), slots.stride(1),
        R, S, D, K, 1 if per_group else G,
    )
    # stage 2: fixed-order sums (deterministic, unlike atomics into rows shared by every class)
    dims = {"shared": (0, 1), "class": (0,), "group": (1,)}[ctx_layout]
    dctx = part.sum(dims).reshape(ctx.shape)
    dbias = part.sum((1, 2)) if bias is not None else None
    return dctx.to(ctx.dtype), (dbias.to(bias.dtype) if bias is not None else None)


# ----------------------------------------------------------------------------------------------
# custom ops: torch.compile and CUDA graphs capture the kernels as opaque ops; the fakes give
# shapes and dtypes only, and the backward is an op of its own so compiled training graphs hold it.
# Schemas are spelled out: inferring them from annotations under `from __future__ import annotations`
# depends on the torch version.

_ASSEMBLE_PROMPTS_SCHEMA = ("(Tensor token_embeds, Tensor slots, Tensor pos, Tensor? ctx, Tensor? bias, str ctx_layout)"
                            " -> Tensor")
_ASSEMBLE_PROMPTS_BACKWARD_SCHEMA = ("(Tensor dout, Tensor slots, Tensor ctx, Tensor? bias, str ctx_layout)"
                                     " -> (Tensor, Tensor)")


@torch.library.custom_op("promptcore::assemble_prompts", mutates_args=(), schema=_ASSEMBLE_PROMPTS_SCHEMA)
def _assemble_prompts_op(token_embeds: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                         ctx: Optional[torch.Tensor], bias: Optional[torch.Tensor], ctx_layout: str) -> torch.Tensor:
    token_embeds, slots, pos, ctx, bias = (_rowwise(t) for t in (token_embeds, slots, pos, ctx, bias))
    return _assemble_prompts_fwd(token_embeds, slots, pos, ctx, bias, ctx_layout)


@_assemble_prompts_op.register_fake
def _assemble_prompts_fake(token_embeds, slots, pos, ctx, bias, ctx_layout):
    C, S, D = token_embeds.shape
    return token_embeds.new_empty((_num_groups(ctx, bias, ctx_layout), C, S, D))


@torch.library.custom_op("promptcore::assemble_prompts_backward", mutates_args=(),
                         schema=_ASSEMBLE_PROMPTS_BACKWARD_SCHEMA)
def _assemble_prompts_backward_op(dout: torch.Tensor, slots: torch.Tensor, ctx: torch.Tensor,
                                  bias: Optional[torch.Tensor], ctx_layout: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d ctx, d bias); d bias is an empty tensor when there is no bias (an op returns tensors, not None)."""
    d_ctx, d_bias = _assemble_prompts_bwd(_rowwise(dout), _rowwise(slots), _rowwise(ctx), _rowwise(bias), ctx_layout)
    return d_ctx, (d_bias if d_bias is not None else ctx.new_empty((0,)))


@_assemble_prompts_backward_op.register_fake
def _assemble_prompts_backward_fake(dout, slots, ctx, bias, ctx_layout):
    return ctx.new_empty(ctx.shape), (bias.new_empty(bias.shape) if bias is not None else ctx.new_empty((0,)))


def _assemble_prompts_setup(ctx, inputs, output):
    # ``ctx`` is autograd's context here (torch.library passes it by that name); the prompt context is ``context``
    token_embeds, slots, pos, context, bias, ctx_layout = inputs
    ctx.save_for_backward(slots, context, bias)
    ctx.ctx_layout = ctx_layout
    ctx.meta = (token_embeds.dtype, pos.dtype)


def _assemble_prompts_grad(ctx, dout):
    slots, context, bias = ctx.saved_tensors
    need_tok, _, need_pos, need_ctx, need_bias, _ = ctx.needs_input_grad
    d_tok = d_pos = d_ctx = d_bias = None
    if context is not None and (need_ctx or need_bias):
        d_ctx, d_bias = torch.ops.promptcore.assemble_prompts_backward(dout, slots, context, bias, ctx.ctx_layout)
    if need_tok or need_pos:  # frozen CLIP weights in practice: plain reductions suffice
        tok_dtype, pos_dtype = ctx.meta
        summed = dout.float().sum(0)  # (C, S, D)
        if need_tok:
            d_tok = summed if context is None else torch.where((slots < 0).unsqueeze(-1), summed, 0.0)
            d_tok = d_tok.to(tok_dtype)
        if need_pos:
            d_pos = summed.sum(0).to(pos_dtype)
    return d_tok, None, d_pos, d_ctx if need_ctx else None, d_bias if need_bias else None, None


_assemble_prompts_op.register_autograd(_assemble_prompts_grad, setup_context=_assemble_prompts_setup)


def assemble_prompts(
    token_embeds: torch.Tensor,
    slots: torch.Tensor,
    pos: torch.Tensor,
    ctx: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ctx_layout: str = "shared",
) -> torch.Tensor:
    """Assemble encoder inputs (G, C, S, D) from tokens, context and positions in one pass.

    Same signature and results as :func:`assemble_prompts_ref`; the fused Triton kernel runs, as the
    custom op ``torch.ops.promptcore.assemble_prompts`` (which torch.compile captures), when
    :func:`use_triton` says so (empty inputs take the reference).
    """
    _check(token_embeds, slots, pos, ctx, bias, ctx_layout)
    if not use_triton(token_embeds, slots, pos, ctx, bias) or token_embeds.numel() == 0:
        return assemble_prompts_ref(token_embeds, slots, pos, ctx, bias, ctx_layout)
    if ctx is None:
        bias = None  # unused without context, as in the reference
    return torch.ops.promptcore.assemble_prompts(token_embeds, slots, pos, ctx, bias, ctx_layout)
