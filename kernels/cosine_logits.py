"""Cosine-logit scoring: normalise, multiply, scale; optionally entropy and argmax.

    logits[b, n] = exp(logit_scale) * <img[b] / |img[b]|, txt[n] / |txt[n]|>
    entropy[b]   = -sum_n p[b, n] log p[b, n],  p = softmax(logits[b])
    argmax[b]    = argmax_n logits[b, n]

Shapes: ``image_features`` (B, E), ``text_features`` (N, E), ``logit_scale`` scalar (the log
of the scale, as CLIP stores it). Logits come out in the dtype of ``image_features``;
norms, dot products and the softmax statistics are fp32.

Triton path (fp16, bf16, fp32; any B, N, E):

* ``_l2_norm_kernel``: a small pre-pass writing each row's fp32 L2 norm (``F.normalize``'s
  ``max(|x|, 1e-12)`` is applied where the norm is used);
* ``_cosine_logits_fwd_kernel``: one program per (BLOCK_B x BLOCK_N) tile of logits, looping
  over E; the raw dot products are scaled by both inverse norms and ``exp(logit_scale)`` in
  the epilogue (read from device memory: no host sync) and rounded once. With
  ``with_entropy`` each tile also writes per-row partial softmax statistics (max, sum of
  exponentials, sum of exponentials times logits, argmax) from its fp32 logits;
* ``_cosine_logits_stats_kernel``: a row-wise pass over those partials (one per N tile)
  combining them into entropy and argmax (ties go to the first index, as torch's);
* backward: ``_cosine_logits_bwd_kernel`` computes d(normalised x) = exp(s) * dlogits @ y_hat
  as a tiled product (fp32 out), and ``_l2_normalize_bwd_kernel`` projects it back through
  the normalisation row by row, also writing <d x_hat, x_hat> per row, whose sum over image
  rows is d logit_scale. Entropy and argmax carry no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._utils import (
    HAS_TRITON,
    INTERPRETED,
    cast_for_store,
    dot_in_input_dtype,
    dot_precision,
    needs_bf16_rounding,
    next_pow2,
    no_zero_strides,
    tl,
    triton,
    vector_aligned,
)
from .backend import use_triton

NORM_EPS = 1e-12  # F.normalize's default eps
STATS_TILES_PER_STEP = 64  # N tiles combined per step of the entropy/argmax pass (a power of two)


class ScoredLogits(NamedTuple):
    logits: torch.Tensor
    entropy: torch.Tensor
    argmax: torch.Tensor


if HAS_TRITON:

    @triton.jit
    def _l2_norm_kernel(norm_ptr, x_ptr, sx_r, M, E, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < M
        ss = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, E, BLOCK_E):
            cols = start + tl.arange(0, BLOCK_E)
            x = tl.load(x_ptr + (rows * sx_r)[:, None] + cols[None, :],
                        mask=row_ok[:, None] & (cols < E)[None, :], other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        tl.store(norm_ptr + rows, tl.sqrt(ss), mask=row_ok)

    @triton.jit
    def _cosine_logits_fwd_kernel(
        out_ptr, so_b, so_n,
        stats_ptr, idx_ptr,
        img_ptr, si_b,
        txt_ptr, st_n,
        img_norm_ptr, txt_norm_ptr, logit_scale_ptr,
        B, N, E, eps,
        WITH_STATS: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr, GROUP_B: tl.constexpr,
        RTNE_BF16: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        # 1-D grid, tiles ordered in groups of GROUP_B row blocks so neighbours share text tiles in L2
        pid = tl.program_id(0).to(tl.int64)
        n_tiles_b = tl.cdiv(B, BLOCK_B)
        n_tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_B * n_tiles_n
        first_b = (pid // per_group) * GROUP_B
        group_rows = tl.minimum(n_tiles_b - first_b, GROUP_B)
        pid_b = first_b + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < B
        col_ok = cols < N
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        img_rows = rows * si_b  # int64 per-row offsets (vectors); feature dims are unit-stride
        txt_rows = cols * st_n
        for start in range(0, E, BLOCK_E):
            e = start + tl.arange(0, BLOCK_E)
            e_ok = e < E
            a = tl.load(img_ptr + img_rows[:, None] + e[None, :], mask=row_ok[:, None] & e_ok[None, :], other=0.0)
            bt = tl.load(txt_ptr + txt_rows[None, :] + e[:, None], mask=col_ok[None, :] & e_ok[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            acc += tl.dot(a, bt, input_precision=DOT)

        scale = tl.exp(tl.load(logit_scale_ptr).to(tl.float32))
        r_img = 1.0 / tl.maximum(tl.load(img_norm_ptr + rows, mask=row_ok, other=1.0), eps)
        r_txt = 1.0 / tl.maximum(tl.load(txt_norm_ptr + cols, mask=col_ok, other=1.0), eps)
        logits = acc * (r_img * scale)[:, None] * r_txt[None, :]
        tl.store(out_ptr + rows[:, None] * so_b + cols[None, :] * so_n, cast_for_store(logits, out_ptr, RTNE_BF16),
                 mask=row_ok[:, None] & col_ok[None, :])
        if WITH_STATS:
            # per-row partials of this N tile, from the fp32 logits: max, sum e^(l-max), sum e^(l-max)(l-max)
            lg = tl.where(col_ok[None, :], logits, float("-inf"))
            m = tl.max(lg, axis=1)
            arg = tl.argmax(lg, axis=1)
            shifted = tl.where(col_ok[None, :], logits - m[:, None], 0.0)
            w = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
            z = tl.sum(w, axis=1)
            t = tl.sum(w * shifted, axis=1)
            base = (rows * n_tiles_n + pid_n) * 3
            tl.store(stats_ptr + base, m, mask=row_ok)
            tl.store(stats_ptr + base + 1, z, mask=row_ok)
            tl.store(stats_ptr + base + 2, t, mask=row_ok)
            tl.store(idx_ptr + rows * n_tiles_n + pid_n, pid_n * BLOCK_N + arg.to(tl.int64), mask=row_ok)

    @triton.jit
    def _cosine_logits_stats_kernel(
        entropy_ptr, argmax_ptr, stats_ptr, idx_ptr, B, T,
        BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Combine the T per-tile partials of each row into its entropy and argmax."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < B
        run_m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        run_z = tl.zeros([BLOCK_R], tl.float32)
        run_t = tl.zeros([BLOCK_R], tl.float32)
        run_i = tl.zeros([BLOCK_R], tl.int64)
        for start in range(0, T, BLOCK_T):
            tiles = start + tl.arange(0, BLOCK_T)
            ok = row_ok[:, None] & (tiles < T)[None, :]
            base = (rows[:, None] * T + tiles[None, :]) * 3
            m = tl.load(stats_ptr + base, mask=ok, other=float("-inf"))
            z = tl.load(stats_ptr + base + 1, mask=ok, other=0.0)
            t = tl.load(stats_ptr + base + 2, mask=ok, other=0.0)
            idx = tl.load(idx_ptr + rows[:, None] * T + tiles[None, :], mask=ok, other=0)
            chunk_m = tl.max(m, axis=1)
            chunk_arg = tl.argmax(m, axis=1)  # first tile reaching the max: ties go to the lowest index
            chunk_i = tl.sum(tl.where(tl.arange(0, BLOCK_T)[None, :] == chunk_arg[:, None], idx, 0), axis=1)
            new_m = tl.maximum(run_m, chunk_m)
            safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
            w = tl.where(ok, tl.exp(m - safe_m[:, None]), 0.0)
            # re-centre each tile's sum of e^(l-m_j)(l-m_j) on the new max: + (m_j - M) * z_j
            chunk_z = tl.sum(w * z, axis=1)
            chunk_t = tl.sum(w * (t + tl.where(ok, m - safe_m[:, None], 0.0) * z), axis=1)
            first = run_m == float("-inf")
            shift = tl.where(first, 0.0, run_m - safe_m)  # <= 0; written so that no inf * 0 is formed
            alpha = tl.where(first, 0.0, tl.exp(shift))
            run_t = alpha * (run_t + shift * run_z) + chunk_t
            run_z = alpha * run_z + chunk_z
            run_i = tl.where(chunk_m > run_m, chunk_i, run_i)
            run_m = new_m
        run_z = tl.where(row_ok, run_z, 1.0)  # padding rows: keep the arithmetic finite
        entropy = tl.log(run_z) - run_t / run_z
        tl.store(entropy_ptr + rows, entropy, mask=row_ok)
        tl.store(argmax_ptr + rows, run_i, mask=row_ok)

    @triton.jit
    def _cosine_logits_bwd_kernel(
        dxh_ptr, sd_m,
        g_ptr, sg_m, sg_n,
        y_ptr, sy_n,
        y_norm_ptr, logit_scale_ptr,
        M, N, E, eps,
        UPCAST: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """d x_hat[m, :] = exp(logit_scale) * sum_n dlogits[m, n] * y[n, :] / |y[n]|   (fp32 out)."""
        pid_m = tl.program_id(0).to(tl.int64)
        pid_e = tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        row_ok = rows < M
        e_ok = e < E
        acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
        g_rows = rows * sg_m
        for start in range(0, N, BLOCK_N):
            n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
            n_ok = n < N
            g = tl.load(g_ptr + g_rows[:, None] + (n * sg_n)[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            y = tl.load(y_ptr + (n * sy_n)[:, None] + e[None, :], mask=n_ok[:, None] & e_ok[None, :], other=0.0)
            r_y = 1.0 / tl.maximum(tl.load(y_norm_ptr + n, mask=n_ok, other=1.0), eps)
            y_hat = y.to(tl.float32) * r_y[:, None]
            if UPCAST:
                acc += tl.dot(g.to(tl.float32), y_hat, input_precision=DOT)
            else:
                acc += tl.dot(g, y_hat.to(g.dtype))
        acc = acc * tl.exp(tl.load(logit_scale_ptr).to(tl.float32))
        tl.store(dxh_ptr + (rows * sd_m)[:, None] + e[None, :], acc, mask=row_ok[:, None] & e_ok[None, :])

    @triton.jit
    def _l2_normalize_bwd_kernel(
        dx_ptr, sdx_r,
        rowdot_ptr,
        dxh_ptr, sdh_r,
        x_ptr, sx_r,
        norm_ptr, M, E, eps,
        RTNE_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """dx = (dxh - x_hat <dxh, x_hat>) / |x|, with x_hat = x / max(|x|, eps) (no projection if clamped)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < M
        norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
        r = 1.0 / tl.maximum(norm, eps)
        dot = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, E, BLOCK_E):
            e = start + tl.arange(0, BLOCK_E)
            mask = row_ok[:, None] & (e < E)[None, :]
            dh = tl.load(dxh_ptr + (rows * sdh_r)[:, None] + e[None, :], mask=mask, other=0.0)
            x = tl.load(x_ptr + (rows * sx_r)[:, None] + e[None, :], mask=mask, other=0.0)
            dot += tl.sum(dh * x.to(tl.float32), axis=1)
        dot = dot * r  # <dxh, x_hat>
        tl.store(rowdot_ptr + rows, dot, mask=row_ok)
        proj = tl.where(norm >= eps, dot, 0.0)  # below eps the denominator is the constant eps
        for start in range(0, E, BLOCK_E):
            e = start + tl.arange(0, BLOCK_E)
            mask = row_ok[:, None] & (e < E)[None, :]
            dh = tl.load(dxh_ptr + (rows * sdh_r)[:, None] + e[None, :], mask=mask, other=0.0)
            x = tl.load(x_ptr + (rows * sx_r)[:, None] + e[None, :], mask=mask, other=0.0)
            dx = (dh - x.to(tl.float32) * (r * proj)[:, None]) * r[:, None]
            tl.store(dx_ptr + (rows * sdx_r)[:, None] + e[None, :],
                     cast_for_store(dx, dx_ptr, RTNE_BF16), mask=mask)


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    """Unit stride along the features (the kernels assume it) and no stride-0 dims; else a copy."""
    t = no_zero_strides(t)
    return t if t.stride(-1) == 1 else t.contiguous()


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


# ----------------------------------------------------------------------------------------------
# host launchers


def _row_block(E: int, *tensors) -> int:
    """Feature columns per tile of the row-wise kernels; a quarter for unaligned (scalar) loads."""
    return min(128 if vector_aligned(*tensors) else 32, next_pow2(E, 16))


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    M, E = x.shape
    norm = torch.empty(M, dtype=torch.float32, device=x.device)
    block_r = 32
    _l2_norm_kernel[(triton.cdiv(M, block_r),)](norm, x, x.stride(0), M, E,
                                                BLOCK_R=block_r, BLOCK_E=_row_block(E, x))
    return norm


def _fwd_blocks(img: torch.Tensor, txt: torch.Tensor) -> dict:
    """Tiles of the logits kernel: fp32 (3xTF32) and unaligned inputs get half the fp16/bf16 tile."""
    if INTERPRETED:
        return dict(BLOCK_B=64, BLOCK_N=64, BLOCK_E=32)  # few, large programs
    if not vector_aligned(img, txt):
        return dict(BLOCK_B=32, BLOCK_N=64, BLOCK_E=32, num_warps=4, num_stages=3)
    if img.dtype == torch.float32 or txt.dtype != img.dtype:
        return dict(BLOCK_B=64, BLOCK_N=64, BLOCK_E=32, num_warps=4, num_stages=3)
    return dict(BLOCK_B=64, BLOCK_N=128, BLOCK_E=64, num_warps=8, num_stages=3)


def _cosine_logits_fwd(img, txt, logit_scale, with_stats):
    B, E = img.shape
    N = txt.shape[0]
    img_norm, txt_norm = _row_norms(img), _row_norms(txt)
    out = torch.empty((B, N), dtype=img.dtype, device=img.device)
    cfg = _fwd_blocks(img, txt)
    upcast = not dot_in_input_dtype(img) or img.dtype != txt.dtype
    n_tiles_n = triton.cdiv(N, cfg["BLOCK_N"])
    if with_stats:
        stats = torch.empty((B, n_tiles_n, 3), dtype=torch.float32, device=img.device)
        idx = torch.empty((B, n_tiles_n), dtype=torch.int64, device=img.device)
    else:
        stats = idx = img_norm  # never touched
    grid = (triton.cdiv(B, cfg["BLOCK_B"]) * n_tiles_n,)
    _cosine_logits_fwd_kernel[grid](
        out, out.stride(0), out.stride(1),
        stats, idx,
        img, img.stride(0),
        txt, txt.stride(0),
        img_norm, txt_norm, logit_scale,
        B, N, E, NORM_EPS,
        WITH_STATS=with_stats, UPCAST=upcast, DOT=dot_precision(torch.float32 if upcast else img.dtype), GROUP_B=8,
        RTNE_BF16=needs_bf16_rounding(out), **cfg,
    )
    if not with_stats:
        return out, img_norm, txt_norm, None, None
    entropy = torch.empty(B, dtype=torch.float32, device=img.device)
    argmax = torch.empty(B, dtype=torch.int64, device=img.device)
    block_r = 32
    _cosine_logits_stats_kernel[(triton.cdiv(B, block_r),)](
        entropy, argmax, stats, idx, B, n_tiles_n,
        BLOCK_R=block_r, BLOCK_T=min(STATS_TILES_PER_STEP, next_pow2(n_tiles_n)),
    )
    return out, img_norm, txt_norm, entropy, argmax


def _normalised_grad(dlogits_view, x, y, y_norm, logit_scale, sg_m, sg_n):
    """fp32 d x_hat (M, E) from dlogits read as (M, N) through the strides (sg_m, sg_n)."""
    M, E = x.shape
    N = y.shape[0]
    dxh = torch.empty((M, E), dtype=torch.float32, device=x.device)
    upcast = not dot_in_input_dtype(dlogits_view) or dlogits_view.dtype != y.dtype
    if INTERPRETED or vector_aligned(dlogits_view, y):
        bm, bn, be = 64, 32, 64
    else:
        bm, bn, be = 32, 32, 32
    grid = (triton.cdiv(M, bm), triton.cdiv(E, be))
    _cosine_logits_bwd_kernel[grid](
        dxh, dxh.stride(0),
        dlogits_view, sg_m, sg_n,
        y, y.stride(0),
        y_norm, logit_scale,
        M, N, E, NORM_EPS,
        UPCAST=upcast, DOT=dot_precision(torch.float32), BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=be,
    )
    return dxh


def _l2_normalize_bwd(dxh, x, norm):
    M, E = x.shape
    dx = torch.empty((M, E), dtype=x.dtype, device=x.device)
    rowdot = torch.empty(M, dtype=torch.float32, device=x.device)
    block_r = 32
    _l2_normalize_bwd_kernel[(triton.cdiv(M, block_r),)](
        dx, dx.stride(0),
        rowdot,
        dxh, dxh.stride(0),
        x, x.stride(0),
        norm, M, E, NORM_EPS,
        RTNE_BF16=needs_bf16_rounding(dx), BLOCK_R=block_r, BLOCK_E=_row_block(E, dx, dxh, x),
        num_warps=8,  # 4 warps left ptxas (Triton 3.9, sm_90) spilling the fp16 variant at 80 registers
    )
    return dx, rowdot


class CosineLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, with_entropy):
        img, txt = _rowwise(image_features), _rowwise(text_features)
        out, img_norm, txt_norm, entropy, argmax = _cosine_logits_fwd(img, txt, logit_scale, with_entropy)
        ctx.save_for_backward(img, txt, img_norm, txt_norm, logit_scale)
        if not with_entropy:
            return out
        ctx.mark_non_differentiable(entropy, argmax)
        return out, entropy, argmax

    @staticmethod
    def backward(ctx, dlogits, *_unused):
        img, txt, img_norm, txt_norm, logit_scale = ctx.saved_tensors
        need_img, need_txt, need_scale, _ = ctx.needs_input_grad
        dlogits = no_zero_strides(dlogits)
        d_img = d_txt = d_scale = None
        if need_img or need_scale:
            dxh = _normalised_grad(dlogits, img, txt, txt_norm, logit_scale, dlogits.stride(0), dlogits.stride(1))
            d_img, rowdot = _l2_normalize_bwd(dxh, img, img_norm)
            d_scale = rowdot.sum().reshape(logit_scale.shape) if need_scale else None
            d_img = d_img if need_img else None
        if need_txt:
            dxh = _normalised_grad(dlogits, txt, img, img_norm, logit_scale, dlogits.stride(1), dlogits.stride(0))
            d_txt, _ = _l2_normalize_bwd(dxh, txt, txt_norm)
        return d_img, d_txt, d_scale, None


def cosine_logits(image_features, text_features, logit_scale, with_entropy: bool = False):
    """Scaled cosine similarities (B, N); with ``with_entropy`` also per-row entropy and argmax.

    Same signature and results as :func:`cosine_logits_ref`; the fused Triton kernels run when
    :func:`use_triton` says so (empty inputs take the reference). ``logit_scale`` may be a
    Python number or a one-element tensor (it gets a gradient if it requires one).
    """
    _check(image_features, text_features)
    if not use_triton(image_features, text_features) or image_features.numel() == 0 or text_features.numel() == 0:
        return cosine_logits_ref(image_features, text_features, logit_scale, with_entropy)
    scale = torch.as_tensor(logit_scale).to(device=image_features.device, dtype=torch.float32).reshape(())
    res = CosineLogitsFunction.apply(image_features, text_features, scale, bool(with_entropy))
    return ScoredLogits(*res) if with_entropy else res
