"""Cosine-logit scoring: normalise, multiply, scale; optionally entropy and argmax.

    logits[g, b, n] = exp(logit_scale) * <img[g, b] / |img[g, b]|, txt[g, n] / |txt[g, n]|>
    entropy[g, b]   = -sum_n p[g, b, n] log p[g, b, n],  p = softmax(logits[g, b])
    argmax[g, b]    = argmax_n logits[g, b, n]

Shapes: ``image_features`` (B, E) with ``text_features`` (N, E) -> logits (B, N), entropy and
argmax (B,); or per group, ``image_features`` (G, B, E) with ``text_features`` (G, N, E) -> logits
(G, B, N), entropy and argmax (G, B): each group's images scored against that group's own classes
(CoCoOp: one image per group against its own prompts; TPT: an image's views against its tuned
classifier). ``logit_scale`` is a scalar (the log of the scale, as CLIP stores it). Logits come out
in ``out_dtype`` (default: the dtype of ``image_features``); norms, dot products and the softmax
statistics are fp32.

Triton path (fp16, bf16, fp32; any G, B, N, E; a 2-D call is the G = 1 case):

* ``_l2_norm_kernel``: a small pre-pass writing each row's fp32 L2 norm (``F.normalize``'s
  ``max(|x|, 1e-12)`` is applied where the norm is used);
* ``_cosine_logits_fwd_kernel``: one program per (group, BLOCK_B x BLOCK_N tile of logits), looping
  over E; the raw dot products are scaled by both inverse norms and ``exp(logit_scale)`` in
  the epilogue (read from device memory: no host sync) and rounded once. With
  ``with_entropy`` each tile also writes per-row partial softmax statistics (max, sum of
  exponentials, sum of exponentials times logits, argmax) from its fp32 logits;
* ``_cosine_logits_stats_kernel``: a row-wise pass over those partials (one per N tile)
  combining them into entropy and argmax (ties go to the first index, as torch's);
* backward: ``_cosine_logits_bwd_kernel`` computes d(normalised x) = exp(s) * dlogits @ y_hat
  per group as a tiled product (fp32 out), and ``_l2_normalize_bwd_kernel`` projects it back
  through the normalisation row by row, also writing <d x_hat, x_hat> per row, whose sum over
  image rows is d logit_scale. Entropy and argmax carry no gradient.
* on CUDA the logits and d x_hat kernels launch through ``triton.autotune``: one tuner per kernel and
  class (fp32 or fp16/bf16 operands, aligned or not; the with-stats forward apart), keyed on the per-group
  sizes (B, N, E; M, N, E), tiles pruned to what those sizes need (``FWD_CONFIGS``, ``BWD_CONFIGS``).

Group strides are runtime arguments: a tensor expanded over the groups (stride 0, e.g. one class
matrix shared by every group) is read in place, never copied; a stride-0 row or feature dim is copied.

The op is registered with ``torch.library`` as ``promptcore::cosine_logits`` (backward
``promptcore::cosine_logits_backward``); :func:`cosine_logits` calls it when the backend switch
picks Triton and :func:`cosine_logits_ref` otherwise (CPU without the interpreter, ONNX export).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ._utils import (
    HAS_TRITON,
    INTERPRETED,
    autotuned,
    cast_for_store,
    dot_in_input_dtype,
    dot_precision,
    fit_tiles,
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
    def _l2_norm_kernel(norm_ptr, sn_g, x_ptr, sx_g, sx_r, M, E, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        n_blocks = tl.cdiv(M, BLOCK_R)
        group = pid // n_blocks
        rows = (pid % n_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < M
        x_ptr += group * sx_g
        ss = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, E, BLOCK_E):
            cols = start + tl.arange(0, BLOCK_E)
            x = tl.load(x_ptr + (rows * sx_r)[:, None] + cols[None, :],
                        mask=row_ok[:, None] & (cols < E)[None, :], other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        tl.store(norm_ptr + group * sn_g + rows, tl.sqrt(ss), mask=row_ok)

    @triton.jit
    def _cosine_logits_fwd_kernel(
        out_ptr, so_g, so_b, so_n,
        stats_ptr, idx_ptr,
        img_ptr, si_g, si_b,
        txt_ptr, st_g, st_n,
        img_norm_ptr, sin_g, txt_norm_ptr, stn_g, logit_scale_ptr,
        B, N, E, eps,
        WITH_STATS: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr, GROUP_B: tl.constexpr,
        RTNE_BF16: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        # 1-D grid: groups outermost (no grid-axis limit on G); within a group, tiles ordered in
        # bands of GROUP_B row blocks so neighbours share text tiles in L2
        pid = tl.program_id(0).to(tl.int64)
        n_tiles_b = tl.cdiv(B, BLOCK_B)
        n_tiles_n = tl.cdiv(N, BLOCK_N)
        group = pid // (n_tiles_b * n_tiles_n)
        pid = pid % (n_tiles_b * n_tiles_n)
        per_band = GROUP_B * n_tiles_n
        first_b = (pid // per_band) * GROUP_B
        band_rows = tl.minimum(n_tiles_b - first_b, GROUP_B)
        pid_b = first_b + (pid % per_band) % band_rows
        pid_n = (pid % per_band) // band_rows

        img_ptr += group * si_g
        txt_ptr += group * st_g
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
        r_img = 1.0 / tl.maximum(tl.load(img_norm_ptr + group * sin_g + rows, mask=row_ok, other=1.0), eps)
        r_txt = 1.0 / tl.maximum(tl.load(txt_norm_ptr + group * stn_g + cols, mask=col_ok, other=1.0), eps)
        logits = acc * (r_img * scale)[:, None] * r_txt[None, :]
        tl.store(out_ptr + group * so_g + rows[:, None] * so_b + cols[None, :] * so_n,
                 cast_for_store(logits, out_ptr, RTNE_BF16), mask=row_ok[:, None] & col_ok[None, :])
        if WITH_STATS:
            # per-row partials of this N tile, from the fp32 logits: max, sum e^(l-max), sum e^(l-max)(l-max)
            lg = tl.where(col_ok[None, :], logits, float("-inf"))
            m = tl.max(lg, axis=1)
            arg = tl.argmax(lg, axis=1)
            shifted = tl.where(col_ok[None, :], logits - m[:, None], 0.0)
            w = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
            z = tl.sum(w, axis=1)
            t = tl.sum(w * shifted, axis=1)
            slot = (group * B + rows) * n_tiles_n + pid_n  # the (G, B, T) partials are contiguous
            tl.store(stats_ptr + slot * 3, m, mask=row_ok)
            tl.store(stats_ptr + slot * 3 + 1, z, mask=row_ok)
            tl.store(stats_ptr + slot * 3 + 2, t, mask=row_ok)
            tl.store(idx_ptr + slot, pid_n * BLOCK_N + arg.to(tl.int64), mask=row_ok)

    @triton.jit
    def _cosine_logits_stats_kernel(
        entropy_ptr, argmax_ptr, stats_ptr, idx_ptr, B, T,
        BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Combine the T per-tile partials of each row into its entropy and argmax (rows of all groups)."""
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
        dxh_ptr, sd_g, sd_m,
        g_ptr, sg_g, sg_m, sg_n,
        y_ptr, sy_g, sy_n,
        y_norm_ptr, syn_g, logit_scale_ptr,
        M, N, E, eps,
        UPCAST: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """d x_hat[g, m, :] = exp(logit_scale) * sum_n dlogits[g, m, n] * y[g, n, :] / |y[g, n]|   (fp32 out)."""
        pid = tl.program_id(0).to(tl.int64)
        pid_e = tl.program_id(1).to(tl.int64)
        n_blocks = tl.cdiv(M, BLOCK_M)
        group = pid // n_blocks
        rows = (pid % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        row_ok = rows < M
        e_ok = e < E
        g_ptr += group * sg_g
        y_ptr += group * sy_g
        y_norm_ptr += group * syn_g
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
        tl.store(dxh_ptr + group * sd_g + (rows * sd_m)[:, None] + e[None, :], acc,
                 mask=row_ok[:, None] & e_ok[None, :])

    @triton.jit
    def _l2_normalize_bwd_kernel(
        dx_ptr, sdx_g, sdx_r,
        rowdot_ptr,
        dxh_ptr, sdh_g, sdh_r,
        x_ptr, sx_g, sx_r,
        norm_ptr, sn_g, M, E, eps,
        RTNE_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """dx = (dxh - x_hat <dxh, x_hat>) / |x|, with x_hat = x / max(|x|, eps) (no projection if clamped)."""
        pid = tl.program_id(0).to(tl.int64)
        n_blocks = tl.cdiv(M, BLOCK_R)
        group = pid // n_blocks
        rows = (pid % n_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < M
        dx_ptr += group * sdx_g
        dxh_ptr += group * sdh_g
        x_ptr += group * sx_g
        norm = tl.load(norm_ptr + group * sn_g + rows, mask=row_ok, other=1.0)
        r = 1.0 / tl.maximum(norm, eps)
        dot = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, E, BLOCK_E):
            e = start + tl.arange(0, BLOCK_E)
            mask = row_ok[:, None] & (e < E)[None, :]
            dh = tl.load(dxh_ptr + (rows * sdh_r)[:, None] + e[None, :], mask=mask, other=0.0)
            x = tl.load(x_ptr + (rows * sx_r)[:, None] + e[None, :], mask=mask, other=0.0)
            dot += tl.sum(dh * x.to(tl.float32), axis=1)
        dot = dot * r  # <dxh, x_hat>
        tl.store(rowdot_ptr + group * M + rows, dot, mask=row_ok)
        proj = tl.where(norm >= eps, dot, 0.0)  # below eps the denominator is the constant eps
        for start in range(0, E, BLOCK_E):
            e = start + tl.arange(0, BLOCK_E)
            mask = row_ok[:, None] & (e < E)[None, :]
            dh = tl.load(dxh_ptr + (rows * sdh_r)[:, None] + e[None, :], mask=mask, other=0.0)
            x = tl.load(x_ptr + (rows * sx_r)[:, None] + e[None, :], mask=mask, other=0.0)
            dx = (dh - x.to(tl.float32) * (r * proj)[:, None]) * r[:, None]
            tl.store(dx_ptr + (rows * sdx_r)[:, None] + e[None, :],
                     cast_for_store(dx, dx_ptr, RTNE_BF16), mask=mask)


def _check(image_features, text_features, out_dtype=None):
    shapes = f"{tuple(image_features.shape)} vs {tuple(text_features.shape)}"
    if image_features.dim() != text_features.dim() or image_features.dim() not in (2, 3):
        raise ValueError(f"cosine_logits takes image_features (B, E) with text_features (N, E), or per group "
                         f"(G, B, E) with (G, N, E); got {shapes}")
    if image_features.shape[-1] != text_features.shape[-1]:
        raise ValueError(f"image and text features differ in feature size E: {shapes}")
    if image_features.dim() == 3 and image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image and text features differ in the number of groups G: {shapes}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")


def cosine_logits_ref(image_features, text_features, logit_scale, with_entropy: bool = False,
                      out_dtype: Optional[torch.dtype] = None):
    """PyTorch reference of :func:`cosine_logits` (also the export and CPU path)."""
    _check(image_features, text_features, out_dtype)
    out_dtype = out_dtype or image_features.dtype
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = torch.as_tensor(logit_scale).float().exp() * (img @ txt.transpose(-1, -2))
    if not with_entropy:
        return logits.to(out_dtype)
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return ScoredLogits(logits.to(out_dtype), entropy, logits.argmax(dim=-1))


# ----------------------------------------------------------------------------------------------
# host launchers


def _shared_group(t: torch.Tensor) -> bool:
    """Whether a 3-D tensor is one (R, E) matrix expanded over its groups (group stride 0)."""
    return t.shape[0] > 1 and t.stride(0) == 0


def _as_groups(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """A (G', R, E) view of a 2-D (R, E) or 3-D tensor for the kernels, and the group stride to pass.

    Features unit-stride and rows without stride 0, else a copy. A group dim of stride 0 (one tensor
    expanded over the groups) stays uncopied: G' = 1 and the group stride passed is 0.
    """
    if t.dim() == 2:
        t = t.unsqueeze(0)
    shared = _shared_group(t)
    if shared:
        t = t[:1]
    t = no_zero_strides(t)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, 0 if shared or t.shape[0] == 1 else t.stride(0)


def _norm_group_stride(norm: torch.Tensor) -> int:
    """Group stride of row norms (R,) or (G', R) as the kernels read them: 0 for one row of norms shared by
    every group. Read from the norms themselves, so saved norms stay right whatever strides the features
    reach the backward with (e.g. an expanded matrix materialised by a compiler)."""
    return 0 if norm.dim() == 1 or norm.shape[0] == 1 else norm.stride(0)


def _row_block(E: int, *tensors) -> int:
    """Feature columns per tile of the row-wise kernels; a quarter for unaligned (scalar) loads."""
    return min(128 if vector_aligned(*tensors) else 32, next_pow2(E, 16))


def _row_norms(x: torch.Tensor, sx_g: int) -> torch.Tensor:
    """fp32 row norms (G', R) of a (G', R, E) tensor from :func:`_as_groups`."""
    G, M, E = x.shape
    norm = torch.empty((G, M), dtype=torch.float32, device=x.device)
    block_r = 32
    _l2_norm_kernel[(triton.cdiv(M, block_r) * G,)](norm, M, x, sx_g, x.stride(1), M, E,
                                                    BLOCK_R=block_r, BLOCK_E=_row_block(E, x))
    return norm


# Autotune configs ((BLOCK_B or BLOCK_M rows, BLOCK_N, BLOCK_E), warps, stages) per kernel and class (fp32 or
# mixed-dtype operands, i.e. 3xTF32 / upcast dots; vector-aligned inputs or not), the first the class default.
# Every one passes the resource gate (python -m promptcore.kernels.resources: no spill, >= 1 CTA per SM on sm_80
# and sm_90, Triton 3.8 and 3.9). Unaligned inputs load element by element (a 64-bit address each) and fit one
# small tile only: not tuned. Under the interpreter every launch uses ``INTERPRETER`` instead (few, large programs).
FWD_CONFIGS = {  # logits kernel: BLOCK_B image rows x BLOCK_N classes, E in BLOCK_E steps
    (False, True): [((64, 128, 64), 8, 3), ((16, 128, 64), 4, 3), ((32, 128, 64), 4, 3), ((64, 64, 64), 4, 3)],
    (True, True): [((64, 64, 32), 8, 3), ((16, 64, 32), 4, 3), ((32, 64, 32), 4, 3), ((64, 128, 32), 8, 3)],
    (False, False): [((32, 64, 32), 4, 3)],  # (16-row tiles spilled here: fp32, sm_90, Triton 3.8)
    (True, False): [((32, 64, 32), 4, 3)],
}
BWD_CONFIGS = {  # d x_hat kernel: BLOCK_M rows x BLOCK_E features, N (the reduction) in BLOCK_N steps
    (False, True): [((64, 32, 64), 4, 3), ((64, 64, 64), 4, 3), ((32, 64, 64), 4, 3)],
    # fp32 (3xTF32): BLOCK_N=64 spilled 16 B (Triton 3.8), 32 x 32 x 64 spilled 8 B at 128 registers (3.9, sm_80)
    (True, True): [((64, 32, 64), 4, 3), ((64, 32, 32), 4, 3)],
    (False, False): [((32, 32, 32), 4, 3)],
    (True, False): [((32, 16, 32), 4, 3)],  # fp32 operands spilled 8 B on sm_80 at BLOCK_N=32 (group strides)
}
INTERPRETER = {"fwd": ((64, 64, 32), 4, 3), "bwd": ((64, 32, 64), 4, 3)}
_NAMES = {"fwd": ("BLOCK_B", "BLOCK_N", "BLOCK_E"), "bwd": ("BLOCK_M", "BLOCK_N", "BLOCK_E")}
# per-group sizes; the group count only multiplies the grid (Triton adds the tensors' dtypes)
_TUNE_KEYS = {"fwd": ["B", "N", "E"], "bwd": ["M", "N", "E"]}
# the tile dims pruned to what the problem needs (the reduction dim, BLOCK_E resp. BLOCK_N, is not)
_FIT = {"fwd": (("BLOCK_B", "B"), ("BLOCK_N", "N")), "bwd": (("BLOCK_M", "M"), ("BLOCK_E", "E"))}


def configs(kind: str, fp32: bool, aligned: bool, with_stats: bool = False) -> list:
    """Autotune configs of ``kind`` ("fwd" or "bwd") for a class: ``(meta-parameters, num_warps, num_stages)``.

    ``fp32``: fp32 or mixed-dtype operands (upcast dots); ``aligned``: :func:`vector_aligned` inputs. Under
    the interpreter the one ``INTERPRETER`` config. With entropy statistics (forward) only the configs with
    the default's BLOCK_N: the partials buffer has one slot per N tile, allocated before the tuner picks.
    """
    table = [INTERPRETER[kind]] if INTERPRETED else (FWD_CONFIGS if kind == "fwd" else BWD_CONFIGS)[(fp32, aligned)]
    out = [(dict(zip(_NAMES[kind], tiles)), w, s) for tiles, w, s in table]
    if with_stats:
        out = [c for c in out if c[0]["BLOCK_N"] == out[0][0]["BLOCK_N"]]
    return out


def _fit_tiles(kind: str):
    """``early_config_prune`` of ``kind``: per tile dim of ``_FIT``, nothing wider than the problem needs
    when a narrower tile remains (16-row tiles only for groups of <= 16 images)."""
    return fit_tiles(_FIT[kind])


def _tuned(kernel_fn, kind: str, fp32: bool, aligned: bool, with_stats: bool = False):
    """``kernel_fn`` under the autotuner of its class, and the class's configs (first: the default)."""
    cfgs = configs(kind, fp32, aligned, with_stats)
    name = f"cosine_logits.{kind}.{'fp32' if fp32 else 'low'}.{aligned}{'.stats' if with_stats else ''}"
    return autotuned(kernel_fn, name, cfgs, _TUNE_KEYS[kind], _fit_tiles(kind)), cfgs


def _cosine_logits_fwd(img, txt, logit_scale, with_stats, out_dtype: Optional[torch.dtype] = None):
    """Launch the forward: logits (G, B, N) (or (B, N) for 2-D inputs), norms, and with stats entropy/argmax.

    Returns ``(logits, img_norm, txt_norm, entropy, argmax)``; the norms are (G', rows) fp32, entropy and
    argmax (G, B) (or (B,)), ``None`` without stats.
    """
    flat = img.dim() == 2
    G = 1 if flat else img.shape[0]
    img, si_g = _as_groups(img)
    txt, st_g = _as_groups(txt)
    B, E = img.shape[1:]
    N = txt.shape[1]
    img_norm, txt_norm = _row_norms(img, si_g), _row_norms(txt, st_g)
    out = torch.empty((G, B, N), dtype=out_dtype or img.dtype, device=img.device)
    upcast = not dot_in_input_dtype(img) or img.dtype != txt.dtype
    fp32 = img.dtype == torch.float32 or txt.dtype != img.dtype
    kernel, cfgs = _tuned(_cosine_logits_fwd_kernel, "fwd", fp32, vector_aligned(img, txt), with_stats)
    if with_stats:  # every config of a stats class has the same BLOCK_N (see configs): one partial per N tile
        n_tiles_n = triton.cdiv(N, cfgs[0][0]["BLOCK_N"])
        stats = torch.empty((G, B, n_tiles_n, 3), dtype=torch.float32, device=img.device)
        idx = torch.empty((G, B, n_tiles_n), dtype=torch.int64, device=img.device)
    else:
        stats = idx = img_norm  # never touched
    kernel[lambda cfg: (triton.cdiv(B, cfg["BLOCK_B"]) * triton.cdiv(N, cfg["BLOCK_N"]) * G,)](
        out, out.stride(0), out.stride(1), out.stride(2),
        stats, idx,
        img, si_g, img.stride(1),
        txt, st_g, txt.stride(1),
        img_norm, _norm_group_stride(img_norm), txt_norm, _norm_group_stride(txt_norm), logit_scale,
        B, N, E, NORM_EPS,
        WITH_STATS=with_stats, UPCAST=upcast, DOT=dot_precision(torch.float32 if upcast else img.dtype), GROUP_B=8,
        RTNE_BF16=needs_bf16_rounding(out),
    )
    shape = (B,) if flat else (G, B)
    out = out[0] if flat else out
    if not with_stats:
        return out, img_norm, txt_norm, None, None
    entropy = torch.empty(shape, dtype=torch.float32, device=img.device)
    argmax = torch.empty(shape, dtype=torch.int64, device=img.device)
    block_r = 32
    _cosine_logits_stats_kernel[(triton.cdiv(G * B, block_r),)](
        entropy, argmax, stats, idx, G * B, n_tiles_n,
        BLOCK_R=block_r, BLOCK_T=min(STATS_TILES_PER_STEP, next_pow2(n_tiles_n)),
    )
    return out, img_norm, txt_norm, entropy, argmax


def _normalised_grad(dlogits_view, x, y, y_norm, logit_scale, sg_m, sg_n, sg_g=0, groups=1):
    """fp32 d x_hat (G, M, E) (or (M, E) for 2-D ``x``) from dlogits read through the strides (sg_g, sg_m, sg_n).

    ``x`` and ``y`` as given to the forward (2-D, or 3-D possibly expanded over the groups); ``y_norm``
    the (G', N) or (N,) norms of ``y`` from the forward; ``groups``: G.
    """
    flat = x.dim() == 2
    x, _ = _as_groups(x)
    y, sy_g = _as_groups(y)
    M, E = x.shape[1:]
    N = y.shape[1]
    dxh = torch.empty((groups, M, E), dtype=torch.float32, device=x.device)
    upcast = not dot_in_input_dtype(dlogits_view) or dlogits_view.dtype != y.dtype
    fp32 = dlogits_view.dtype == torch.float32 or dlogits_view.dtype != y.dtype
    kernel, _ = _tuned(_cosine_logits_bwd_kernel, "bwd", fp32, vector_aligned(dlogits_view, y))
    kernel[lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * groups, triton.cdiv(E, cfg["BLOCK_E"]))](
        dxh, dxh.stride(0), dxh.stride(1),
        dlogits_view, sg_g, sg_m, sg_n,
        y, sy_g, y.stride(1),
        y_norm, _norm_group_stride(y_norm), logit_scale,
        M, N, E, NORM_EPS,
        UPCAST=upcast, DOT=dot_precision(torch.float32),
    )
    return dxh[0] if flat else dxh


def _l2_normalize_bwd(dxh, x, norm):
    """d x (shaped as ``dxh``, ``x``'s dtype) and the per-row <dxh, x_hat> from d x_hat (fp32, 2-D or 3-D).

    ``x`` as given to the forward (may be expanded over the groups); ``norm`` its norms from the forward.
    """
    flat = dxh.dim() == 2
    dxh3 = dxh.unsqueeze(0) if flat else dxh
    G, M, E = dxh3.shape
    x, sx_g = _as_groups(x)
    dx = torch.empty((G, M, E), dtype=x.dtype, device=x.device)
    rowdot = torch.empty((G, M), dtype=torch.float32, device=x.device)
    block_r = 32
    _l2_normalize_bwd_kernel[(triton.cdiv(M, block_r) * G,)](
        dx, dx.stride(0), dx.stride(1),
        rowdot,
        dxh3, dxh3.stride(0), dxh3.stride(1),
        x, sx_g, x.stride(1),
        norm, _norm_group_stride(norm), M, E, NORM_EPS,
        # fp32 rows at 128 columns spilled 8 B on sm_90 (Triton 3.8): fp32 takes half the columns
        RTNE_BF16=needs_bf16_rounding(dx), BLOCK_R=block_r,
        BLOCK_E=min(_row_block(E, dx, dxh3, x), 64 if x.dtype == torch.float32 else 128),
        num_warps=8,  # 4 warps left ptxas (Triton 3.9, sm_90) spilling the fp16 variant at 80 registers
    )
    return (dx[0], rowdot[0]) if flat else (dx, rowdot)


def _cosine_logits_bwd(dlogits, img, txt, logit_scale, img_norm, txt_norm, need_img, need_txt, need_scale):
    """Gradients (d img, d txt, d logit_scale) for 3-D inputs (any may be None when not needed), from the
    row norms the forward computed."""
    G = img.shape[0]
    dlogits = no_zero_strides(dlogits)
    d_img = d_txt = d_scale = None
    sg = dlogits.stride()
    if need_img or need_scale:
        dxh = _normalised_grad(dlogits, img, txt, txt_norm, logit_scale, sg[1], sg[2], sg[0], G)
        d_img, rowdot = _l2_normalize_bwd(dxh, img, img_norm)
        d_scale = rowdot.sum().reshape(logit_scale.shape) if need_scale else None
        d_img = d_img if need_img else None
    if need_txt:
        dxh = _normalised_grad(dlogits, txt, img, img_norm, logit_scale, sg[2], sg[1], sg[0], G)
        d_txt, _ = _l2_normalize_bwd(dxh, txt, txt_norm)
    return d_img, d_txt, d_scale


# ----------------------------------------------------------------------------------------------
# torch.library registration: the op torch.compile and CUDA graphs see (the Triton launchers inside)


# Schemas spelled out: inferring them from annotations under postponed evaluation varies across torch versions.
_COSINE_LOGITS_SCHEMA = ("(Tensor image_features, Tensor text_features, Tensor logit_scale, bool with_entropy, "
                         "ScalarType out_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_COSINE_LOGITS_BACKWARD_SCHEMA = ("(Tensor d_logits, Tensor image_features, Tensor text_features, Tensor logit_scale, "
                                  "Tensor image_norm, Tensor text_norm, bool need_image, bool need_text, "
                                  "bool need_scale) -> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("promptcore::cosine_logits", mutates_args=(), schema=_COSINE_LOGITS_SCHEMA)
def _cosine_logits_op(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                      with_entropy: bool, out_dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """Grouped inputs (G, B, E), (G, N, E), 0-d fp32 ``logit_scale`` -> logits (G, B, N), entropy and argmax
    (G, B) (empty without ``with_entropy``), and the fp32 row norms of both inputs, (G', B) and (G', N) with
    G' = 1 for a group dim of stride 0: the backward's residuals, not differentiable."""
    out, img_norm, txt_norm, entropy, argmax = _cosine_logits_fwd(image_features, text_features, logit_scale,
                                                                  with_entropy, out_dtype)
    if not with_entropy:
        entropy = out.new_empty(0, dtype=torch.float32)
        argmax = out.new_empty(0, dtype=torch.int64)
    return out, entropy, argmax, img_norm, txt_norm


def _norms_fake(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((1 if _shared_group(t) else t.shape[0], t.shape[1]), dtype=torch.float32)


@_cosine_logits_op.register_fake
def _(image_features, text_features, logit_scale, with_entropy, out_dtype):
    G, B, _ = image_features.shape
    N = text_features.shape[1]
    out = image_features.new_empty((G, B, N), dtype=out_dtype)
    stats = (G, B) if with_entropy else (0,)
    return (out, image_features.new_empty(stats, dtype=torch.float32),
            image_features.new_empty(stats, dtype=torch.int64), _norms_fake(image_features), _norms_fake(text_features))


@torch.library.custom_op("promptcore::cosine_logits_backward", mutates_args=(), schema=_COSINE_LOGITS_BACKWARD_SCHEMA)
def _cosine_logits_backward_op(
    d_logits: torch.Tensor, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
    image_norm: torch.Tensor, text_norm: torch.Tensor, need_image: bool, need_text: bool, need_scale: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d image, d text, d logit_scale) of :func:`_cosine_logits_op`, given its row norms; the ones not needed
    come back empty."""
    d_img, d_txt, d_scale = _cosine_logits_bwd(d_logits, image_features, text_features, logit_scale,
                                               image_norm, text_norm, need_image, need_text, need_scale)
    empty = d_logits.new_empty(0, dtype=torch.float32)
    return (d_img if d_img is not None else empty, d_txt if d_txt is not None else empty.clone(),
            d_scale if d_scale is not None else empty.clone())


@_cosine_logits_backward_op.register_fake
def _(d_logits, image_features, text_features, logit_scale, image_norm, text_norm, need_image, need_text,
      need_scale):
    empty = d_logits.new_empty(0, dtype=torch.float32)
    return (image_features.new_empty(image_features.shape) if need_image else empty,
            text_features.new_empty(text_features.shape) if need_text else empty.clone(),
            logit_scale.new_empty(logit_scale.shape) if need_scale else empty.clone())


def _setup_context(ctx, inputs, output):
    image_features, text_features, logit_scale, _, _ = inputs
    ctx.save_for_backward(image_features, text_features, logit_scale, output[3], output[4])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, d_logits, _d_entropy, _d_argmax, _d_img_norm, _d_txt_norm):
    image_features, text_features, logit_scale, img_norm, txt_norm = ctx.saved_tensors
    need_img, need_txt, need_scale = ctx.needs_input_grad[:3]
    d_img, d_txt, d_scale = torch.ops.promptcore.cosine_logits_backward(
        d_logits, image_features, text_features, logit_scale, img_norm, txt_norm, need_img, need_txt, need_scale)
    return (d_img if need_img else None, d_txt if need_txt else None, d_scale if need_scale else None, None, None)


_cosine_logits_op.register_autograd(_backward, setup_context=_setup_context)


def cosine_logits(image_features, text_features, logit_scale, with_entropy: bool = False,
                  out_dtype: Optional[torch.dtype] = None):
    """Scaled cosine similarities (B, N), or per group (G, B, N); with ``with_entropy`` also entropy and argmax.

    ``image_features`` (B, E) with ``text_features`` (N, E), or (G, B, E) with (G, N, E). Same signature
    and results as :func:`cosine_logits_ref`; the fused Triton kernels (``torch.ops.promptcore.cosine_logits``)
    run when :func:`use_triton` says so (empty inputs take the reference). ``logit_scale`` may be a Python
    number or a one-element tensor (it gets a gradient if it requires one). ``out_dtype``: the logits'
    dtype (default the image features'); entropy is fp32, argmax int64, both without gradient.
    """
    _check(image_features, text_features, out_dtype)
    if not use_triton(image_features, text_features) or image_features.numel() == 0 or text_features.numel() == 0:
        return cosine_logits_ref(image_features, text_features, logit_scale, with_entropy, out_dtype)
    scale = torch.as_tensor(logit_scale).to(device=image_features.device, dtype=torch.float32).reshape(())
    flat = image_features.dim() == 2
    img = image_features.unsqueeze(0) if flat else image_features
    txt = text_features.unsqueeze(0) if flat else text_features
    logits, entropy, argmax, _, _ = torch.ops.promptcore.cosine_logits(img, txt, scale, bool(with_entropy),
                                                                        out_dtype or image_features.dtype)
    if flat:
        logits = logits[0]
        if with_entropy:
            entropy, argmax = entropy[0], argmax[0]
    return ScoredLogits(logits, entropy, argmax) if with_entropy else logits
