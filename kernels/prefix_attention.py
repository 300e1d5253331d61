"""Shared-prefix causal attention.

Each (group g, class c) suffix of S rows attends to its group's P prefix keys/values and to
its own suffix keys/values under the causal mask:

    out[g, c, i] = softmax_j([q_i . k_prefix[g, j] for j < P] ++ [q_i . k[g, c, j] for j <= i]) * scale
                   @ [v_prefix[g] ; v[g, c]]

Shapes: ``q, k, v`` (G, C, S, H, d); ``k_prefix, v_prefix`` (G, P, H, d); ``suffix_lens``
(C,) optional: rows i >= suffix_lens[c] are dead (after the EOT) and come out as zeros.
The prefix is read per group, never expanded over classes. Statistics in fp32; output in
the dtype of ``q``.

Triton path (fp16, bf16, fp32; head dims up to 128, padded to 64 or 128 with masks; any P >= 0):

* forward: one program per (block of BLOCK_M flattened suffix rows (c, i), group, head).
  It streams the group's prefix K/V in BLOCK_N chunks, then the suffix keys of the classes its
  rows belong to (block-diagonal causal mask), with an online base-2 softmax in fp32 (one helper,
  ``_online_softmax_update``); it writes the output and the row log-sum-exp (fp32, for the backward).
* backward, three launches of two kernels: (1) per query block: delta = <dout, out> and dq;
  (2) per suffix-key block: dk, dv of the suffix (no other program touches those keys); (3) per
  prefix-key block and split of SPLIT_ROWS query rows: an fp32 partial of dk_prefix/dv_prefix,
  the partials then summed in a fixed order (deterministic; no atomics; the split does not depend on tiles).
* tiles, warps and fp32 dot precision per kernel, dtype, alignment and head dim (``_CONFIGS``), every
  config checked by the static resource gate (``python -m promptcore.kernels.resources``); on CUDA
  ``triton.autotune`` picks among a class's configs per (rows, suffix length, prefix length, head dim,
  dtype); the interpreter runs the first. Head dims above 128 take the reference.
* q/k/v may be strided views of a fused qkv projection: strides are passed as they are
  (the head dim must have stride 1, and expanded stride-0 views are copied).
* on CUDA, fp16/bf16 tiles go to ``tl.dot`` as they are (fp32 accumulation, probabilities
  rounded to the input dtype before P @ V, as FlashAttention does); compiled fp32 runs 3xTF32
  or IEEE fp32 dots (see ``_IEEE_FP32``); under the interpreter every tile is upcast to fp32.
* ``k_prefix`` with a group dim of 1 is broadcast over groups (stride 0, not copied); its
  grads are then summed over groups too.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ._utils import (
    HAS_TRITON,
    autotuned,
    cast_for_store,
    dot_in_input_dtype,
    dot_precision,
    needs_bf16_rounding,
    no_zero_strides,
    tl,
    triton,
    vector_aligned,
)
from .backend import use_triton

if HAS_TRITON:

    @triton.jit
    def _load_rows(base, row_off, dcol, row_ok, d_ok, UPCAST: tl.constexpr):
        """A (rows, BLOCK_D) tile: per-row int64 offsets (a vector) plus the unit-stride head dim."""
        x = tl.load(base + row_off[:, None] + dcol[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _load_cols(base, col_off, dcol, col_ok, d_ok, UPCAST: tl.constexpr):
        """The transposed (BLOCK_D, cols) tile, read so from memory: no in-register transpose before a dot."""
        x = tl.load(base + col_off[None, :] + dcol[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _online_softmax_update(q, kt, vv, live, m_i, l_i, acc, qk_scale, DOT: tl.constexpr):
        """Fold one block of keys into the running base-2 softmax state (max m_i, sum l_i, acc) of q's rows."""
        s = tl.dot(q, kt, input_precision=DOT) * qk_scale
        s = tl.where(live, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no live key yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=DOT)
        return m_new, l_i, acc

    @triton.jit
    def _softmax_grad(a, bt, x, yt, lse, delta, live, qk_scale, DOT: tl.constexpr):
        """Probabilities p and score grads ds = p (dp - delta) over one block of (query, key) pairs.

        Query-major: a = q, bt = k^T, x = dout, yt = v^T, lse/delta as (rows, 1). Key-major (the same
        math transposed): a = k, bt = q^T, x = v, yt = dout^T, lse/delta as (1, rows).
        """
        s = tl.dot(a, bt, input_precision=DOT) * qk_scale
        p = tl.where(live, tl.exp2(s - lse), 0.0)
        dp = tl.dot(x, yt, input_precision=DOT)
        return p, p * (dp - delta)

    @triton.jit
    def _prefix_attention_fwd_kernel(
        out_ptr, so_g, so_c, so_s, so_h,
        lse_ptr,
        q_ptr, sq_g, sq_c, sq_s, sq_h,
        k_ptr, sk_g, sk_c, sk_s, sk_h,
        v_ptr, sv_g, sv_c, sv_s, sv_h,
        kp_ptr, skp_g, skp_p, skp_h,
        vp_ptr, svp_g, svp_p, svp_h,
        lens_ptr,
        R, S, H, P, D, qk_scale,
        UPCAST: tl.constexpr, DOT: tl.constexpr, RTNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        pid_gh = tl.program_id(1).to(tl.int64)
        g = pid_gh // H
        h = pid_gh % H
        # R = C * S suffix rows per (group, head), flattened as c * S + i; only (BLOCK_M,) vectors are int64
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        c_q = rows // S
        i_q = rows % S
        dcol = tl.arange(0, BLOCK_D)
        d_ok = dcol < D
        q = _load_rows(q_ptr + g * sq_g + h * sq_h, c_q * sq_c + i_q * sq_s, dcol, row_ok, d_ok, UPCAST)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # 1) the group's prefix, shared by every row of the block
        kp_base = kp_ptr + g * skp_g + h * skp_h
        vp_base = vp_ptr + g * svp_g + h * svp_h
        for start in range(0, P, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)  # int32: a prefix is short
            n_ok = n < P
            kt = _load_cols(kp_base, n * skp_p, dcol, n_ok, d_ok, UPCAST)
            vv = _load_rows(vp_base, n * svp_p, dcol, n_ok, d_ok, UPCAST)
            m_i, l_i, acc = _online_softmax_update(q, kt, vv, n_ok[None, :], m_i, l_i, acc, qk_scale, DOT)

        # 2) the suffix keys of the classes in this block: same class, key position <= query position
        lo = (pid_m * BLOCK_M // S) * S
        hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, R)
        k_base = k_ptr + g * sk_g + h * sk_h
        v_base = v_ptr + g * sv_g + h * sv_h
        for start in range(lo, hi, BLOCK_N):
            n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
            n_ok = n < R
            c_k = n // S
            i_k = n % S
            kt = _load_cols(k_base, c_k * sk_c + i_k * sk_s, dcol, n_ok, d_ok, UPCAST)
            vv = _load_rows(v_base, c_k * sv_c + i_k * sv_s, dcol, n_ok, d_ok, UPCAST)
            live = (c_k[None, :] == c_q[:, None]) & (n[None, :] <= rows[:, None]) & n_ok[None, :]
            m_i, l_i, acc = _online_softmax_update(q, kt, vv, live, m_i, l_i, acc, qk_scale, DOT)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past R, which are never stored
        n_live = tl.load(lens_ptr + c_q, mask=row_ok, other=0)
        out = tl.where((i_q < n_live)[:, None], acc / l_safe[:, None], 0.0)
        o_ptrs = out_ptr + g * so_g + h * so_h + (c_q * so_c + i_q * so_s)[:, None] + dcol[None, :]
        tl.store(o_ptrs, cast_for_store(out, out_ptr, RTNE_BF16), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + pid_gh * R + rows, m_i + tl.log2(l_safe), mask=row_ok)

    @triton.jit
    def _prefix_attention_bwd_dq_kernel(
        dq_ptr, sdq_g, sdq_c, sdq_s, sdq_h,
        delta_ptr,
        q_ptr, sq_g, sq_c, sq_s, sq_h,
        k_ptr, sk_g, sk_c, sk_s, sk_h,
        v_ptr, sv_g, sv_c, sv_s, sv_h,
        kp_ptr, skp_g, skp_p, skp_h,
        vp_ptr, svp_g, svp_p, svp_h,
        o_ptr, so_g, so_c, so_s, so_h,
        do_ptr, sdo_g, sdo_c, sdo_s, sdo_h,
        lse_ptr, lens_ptr,
        R, S, H, P, D, qk_scale, scale,
        UPCAST: tl.constexpr, DOT: tl.constexpr, RTNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Per query block: delta = <dout, out> per row, and dq over the prefix and own-class suffix keys."""
        pid_m = tl.program_id(0).to(tl.int64)
        pid_gh = tl.program_id(1).to(tl.int64)
        g = pid_gh // H
        h = pid_gh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        c_q = rows // S
        i_q = rows % S
        dcol = tl.arange(0, BLOCK_D)
        d_ok = dcol < D
        # dead rows (past the suffix length) were multiplied by zero: no gradient flows through them
        row_live = row_ok & (i_q < tl.load(lens_ptr + c_q, mask=row_ok, other=0))
        q = _load_rows(q_ptr + g * sq_g + h * sq_h, c_q * sq_c + i_q * sq_s, dcol, row_ok, d_ok, UPCAST)
        do = _load_rows(do_ptr + g * sdo_g + h * sdo_h, c_q * sdo_c + i_q * sdo_s, dcol, row_live, d_ok, UPCAST)
        o = _load_rows(o_ptr + g * so_g + h * so_h, c_q * so_c + i_q * so_s, dcol, row_live, d_ok, UPCAST)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        tl.store(delta_ptr + pid_gh * R + rows, delta, mask=row_ok)
        lse = tl.load(lse_ptr + pid_gh * R + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        kp_base = kp_ptr + g * skp_g + h * skp_h
        vp_base = vp_ptr + g * svp_g + h * svp_h
        for start in range(0, P, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)  # int32: a prefix is short
            n_ok = n < P
            kk = _load_rows(kp_base, n * skp_p, dcol, n_ok, d_ok, UPCAST)
            kt = _load_cols(kp_base, n * skp_p, dcol, n_ok, d_ok, UPCAST)
            vt = _load_cols(vp_base, n * svp_p, dcol, n_ok, d_ok, UPCAST)
            live = n_ok[None, :] & row_ok[:, None]
            p, ds = _softmax_grad(q, kt, do, vt, lse[:, None], delta[:, None], live, qk_scale, DOT)
            dq += tl.dot(ds.to(kk.dtype), kk, input_precision=DOT)

        lo = (pid_m * BLOCK_M // S) * S
        hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, R)
        k_base = k_ptr + g * sk_g + h * sk_h
        v_base = v_ptr + g * sv_g + h * sv_h
        for start in range(lo, hi, BLOCK_N):
            n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
            n_ok = n < R
            c_k = n // S
            i_k = n % S
            kk = _load_rows(k_base, c_k * sk_c + i_k * sk_s, dcol, n_ok, d_ok, UPCAST)
            kt = _load_cols(k_base, c_k * sk_c + i_k * sk_s, dcol, n_ok, d_ok, UPCAST)
            vt = _load_cols(v_base, c_k * sv_c + i_k * sv_s, dcol, n_ok, d_ok, UPCAST)
            live = (c_k[None, :] == c_q[:, None]) & (n[None, :] <= rows[:, None]) & n_ok[None, :] & row_ok[:, None]
            p, ds = _softmax_grad(q, kt, do, vt, lse[:, None], delta[:, None], live, qk_scale, DOT)
            dq += tl.dot(ds.to(kk.dtype), kk, input_precision=DOT)

        dq = dq * scale
        tl.store(dq_ptr + g * sdq_g + h * sdq_h + (c_q * sdq_c + i_q * sdq_s)[:, None] + dcol[None, :],
                 cast_for_store(dq, dq_ptr, RTNE_BF16), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _prefix_attention_bwd_dkdv_kernel(
        dk_ptr, sdk_s, sdk_c, sdk_g, sdk_n, sdk_h,
        dv_ptr, sdv_s, sdv_c, sdv_g, sdv_n, sdv_h,
        q_ptr, sq_g, sq_c, sq_s, sq_h,
        k_ptr, sk_g, sk_c, sk_s, sk_h,
        v_ptr, sv_g, sv_c, sv_s, sv_h,
        do_ptr, sdo_g, sdo_c, sdo_s, sdo_h,
        lse_ptr, delta_ptr, lens_ptr,
        R, S, H, NK, D, ROWS_PER_SPLIT, qk_scale, scale,
        PREFIX_KEYS: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr, RTNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Per key block: dk, dv from the queries that see those keys.

        Suffix keys (``PREFIX_KEYS`` off; ``k`` strides are (g, c, s, h), NK = R): the queries of the
        same class at or after each key; no other program touches these keys. Prefix keys (``k`` is the
        (g, p, h) prefix: sk_c = 0, sk_s its position stride, NK = P): every query row of split
        ``program_id(2)`` (ROWS_PER_SPLIT rows); each split writes its own fp32 partial (dk strides
        lead with the split), summed afterwards in a fixed order: deterministic, no atomics.
        """
        pid_n = tl.program_id(0).to(tl.int64)
        pid_gh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2).to(tl.int64)
        g = pid_gh // H
        h = pid_gh % H
        keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = keys < NK
        if PREFIX_KEYS:
            c_k = keys * 0
            i_k = keys
            lo = split * ROWS_PER_SPLIT
            hi = tl.minimum(lo + ROWS_PER_SPLIT, R)
        else:
            c_k = keys // S
            i_k = keys % S
            lo = pid_n * BLOCK_N
            hi = tl.minimum((tl.minimum(lo + BLOCK_N, R) - 1) // S * S + S, R)  # end of the block's last class
        dcol = tl.arange(0, BLOCK_D)
        d_ok = dcol < D
        kk = _load_rows(k_ptr + g * sk_g + h * sk_h, c_k * sk_c + i_k * sk_s, dcol, key_ok, d_ok, UPCAST)
        vv = _load_rows(v_ptr + g * sv_g + h * sv_h, c_k * sv_c + i_k * sv_s, dcol, key_ok, d_ok, UPCAST)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

        q_base = q_ptr + g * sq_g + h * sq_h
        do_base = do_ptr + g * sdo_g + h * sdo_h
        for start in range(lo, hi, BLOCK_M):
            m = (start + tl.arange(0, BLOCK_M)).to(tl.int64)  # the loop counter may be int32; offsets are not
            m_ok = m < hi
            c_q = m // S
            i_q = m % S
            m_live = m_ok & (i_q < tl.load(lens_ptr + c_q, mask=m_ok, other=0))
            q_off = c_q * sq_c + i_q * sq_s
            do_off = c_q * sdo_c + i_q * sdo_s
            q = _load_rows(q_base, q_off, dcol, m_ok, d_ok, UPCAST)
            qt = _load_cols(q_base, q_off, dcol, m_ok, d_ok, UPCAST)
            do = _load_rows(do_base, do_off, dcol, m_live, d_ok, UPCAST)
            dot_ = _load_cols(do_base, do_off, dcol, m_live, d_ok, UPCAST)
            lse = tl.load(lse_ptr + pid_gh * R + m, mask=m_ok, other=0.0)
            delta = tl.load(delta_ptr + pid_gh * R + m, mask=m_ok, other=0.0)
            if PREFIX_KEYS:
                live = key_ok[:, None] & m_ok[None, :]
            else:
                live = (c_k[:, None] == c_q[None, :]) & (keys[:, None] <= m[None, :]) & key_ok[:, None] & m_ok[None, :]
            # key-major (keys, queries) tiles: p^T and ds^T come out ready for dv += p^T do, dk += ds^T q
            pt, dst = _softmax_grad(kk, qt, vv, dot_, lse[None, :], delta[None, :], live, qk_scale, DOT)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT)
            dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT)

        kmask = key_ok[:, None] & d_ok[None, :]
        dk_base = dk_ptr + split * sdk_s + g * sdk_g + h * sdk_h
        dv_base = dv_ptr + split * sdv_s + g * sdv_g + h * sdv_h
        tl.store(dk_base + (c_k * sdk_c + i_k * sdk_n)[:, None] + dcol[None, :],
                 cast_for_store(dk * scale, dk_ptr, RTNE_BF16), mask=kmask)
        tl.store(dv_base + (c_k * sdv_c + i_k * sdv_n)[:, None] + dcol[None, :],
                 cast_for_store(dv, dv_ptr, RTNE_BF16), mask=kmask)


def _check(q, k, v, k_prefix, v_prefix):
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (G, C, S, H, d) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    G, C, S, H, d = q.shape
    if k_prefix.dim() != 4 or k_prefix.shape[0] not in (1, G) or k_prefix.shape[2:] != (H, d):
        raise ValueError(f"k_prefix must be (G, P, H, d) with G={G}, H={H}, d={d}, got {tuple(k_prefix.shape)}")
    if v_prefix.shape != k_prefix.shape:
        raise ValueError(f"v_prefix {tuple(v_prefix.shape)} differs from k_prefix {tuple(k_prefix.shape)}")


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
    _check(q, k, v, k_prefix, v_prefix)
    G, C, S, H, d = q.shape
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


# ----------------------------------------------------------------------------------------------
# host launchers

SUPPORTED_HEAD_DIMS = (64, 128)  # head dims up to 64 run in 64-wide tiles, up to 128 in 128-wide ones
SPLIT_ROWS = 256  # query rows per partial of the prefix grads, a multiple of every BLOCK_M (stage 2 sums them)


def _as_kernel_input(t: torch.Tensor) -> torch.Tensor:
    """Keep strided views (fused qkv) as they are; copy only stride-0 or non-unit-stride head dims."""
    t = no_zero_strides(t)
    return t if t.stride(-1) == 1 else t.contiguous()


# Autotune configs per (kernel, fp32, vector-aligned inputs, head dim <= 64): ((BLOCK_M query rows, BLOCK_N
# keys), warps, stages), the first the default (and the interpreter's). Every config passes the resource gate
# (python -m promptcore.kernels.resources: no spill, >= 1 CTA per SM on sm_80 and sm_90, Triton 3.8 and 3.9).
# fp32 tiles hold twice the bytes of fp16/bf16 ones and unaligned inputs load element by element (a 64-bit
# address each): those classes fit one tile size only, so they are not tuned; the backward keeps more tiles
# live than the forward.
_LOW_ALIGNED = {
    ("fwd", True): [((64, 32), 4, 2), ((128, 32), 8, 2)],
    ("fwd", False): [((64, 16), 4, 2), ((64, 32), 8, 2)],
    ("dq", True): [((64, 16), 4, 2), ((64, 32), 8, 2)],
    ("dq", False): [((64, 32), 4, 2), ((64, 32), 8, 2)],
    ("dkdv", True): [((32, 32), 4, 2), ((32, 64), 8, 2)],
    ("dkdv", False): [((32, 32), 4, 2), ((32, 64), 8, 2)],
    ("dkdv_prefix", True): [((32, 32), 4, 2)],  # the prefix is one or two key blocks: little to tune
    ("dkdv_prefix", False): [((32, 32), 4, 2)],
}
_CONFIGS = {(kernel, False, True, small): cfgs for (kernel, small), cfgs in _LOW_ALIGNED.items()}
_CONFIGS.update({
    ("fwd", False, False, True): [((32, 32), 8, 2)], ("fwd", False, False, False): [((16, 16), 8, 2)],
    ("fwd", True, True, True): [((32, 32), 4, 1)], ("fwd", True, True, False): [((16, 16), 4, 1)],
    ("fwd", True, False, True): [((16, 16), 4, 1)], ("fwd", True, False, False): [((16, 16), 8, 1)],
    ("dq", False, False, True): [((32, 32), 8, 2)], ("dq", False, False, False): [((16, 16), 8, 2)],
    ("dkdv", False, False, True): [((16, 32), 8, 2)], ("dkdv", False, False, False): [((16, 16), 8, 2)],
    ("dkdv_prefix", False, False, True): [((16, 32), 8, 2)], ("dkdv_prefix", False, False, False): [((16, 16), 8, 2)],
})
# fp32 backward: 16 x 16 tiles. IEEE fp32 dots (FMA units) fit without spilling at head dim <= 64 over 4 warps
# (and cost less than 3xTF32, whose hi/lo operand splits double the live tiles), and over 8 warps for unaligned
# inputs at head dim 128; aligned head dim 128 (and aligned prefix keys at 64) run 3xTF32 over 8 warps
_IEEE_FP32 = {("dq", True, True), ("dq", False, True), ("dkdv", True, True), ("dkdv", False, True),
              ("dkdv_prefix", False, True), ("dq", False, False), ("dkdv", False, False),
              ("dkdv_prefix", False, False)}  # (kernel, aligned, head dim <= 64)
_CONFIGS.update({(kind, True, aligned, small): [((16, 16), 4 if small and (kind, aligned, small) in _IEEE_FP32 else 8,
                                                  1)]
                 for kind in ("dq", "dkdv", "dkdv_prefix") for aligned in (True, False) for small in (True, False)})
_TUNE_KEYS = {"fwd": ["R", "S", "P", "D"], "dq": ["R", "S", "P", "D"], "dkdv": ["R", "S", "NK", "D"],
              "dkdv_prefix": ["R", "S", "NK", "D"]}  # rows (classes x suffix), suffix length, prefix, head dim


def configs(kernel: str, d: int, dtype: torch.dtype, aligned: bool) -> list[dict]:
    """Autotune configs of ``kernel`` ("fwd", "dq", "dkdv" or "dkdv_prefix"): tiles, warps, stages, fp32 dots."""
    fp32 = dtype == torch.float32
    dot = "ieee" if fp32 and (kernel, aligned, d <= 64) in _IEEE_FP32 else dot_precision(dtype)
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, DOT=dot)
            for (m, n), w, s in _CONFIGS[(kernel, fp32, aligned, d <= 64)]]


def _tuned(kernel_fn, kernel: str, d: int, dtype: torch.dtype, aligned: bool):
    """``kernel_fn`` under the autotuner of its config class, and the fixed meta-parameters (BLOCK_D, DOT)."""
    cfgs = configs(kernel, d, dtype, aligned)
    name = f"prefix_attention.{kernel}.{'fp32' if dtype == torch.float32 else 'low'}.{aligned}.{d <= 64}"
    tuner = autotuned(kernel_fn, name, [({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, c["num_warps"],
                                         c["num_stages"]) for c in cfgs], _TUNE_KEYS[kernel])
    return tuner, dict(BLOCK_D=64 if d <= 64 else 128, DOT=cfgs[0]["DOT"])


def _prefix_strides(t: torch.Tensor, groups: int):
    """(group, position, head) strides of a (G or 1, P, H, d) tensor; group stride 0 to broadcast."""
    sg = t.stride(0) if t.shape[0] == groups else 0
    return sg, t.stride(1), t.stride(2)


def _prefix_attention_fwd(q, k, v, k_prefix, v_prefix, lens, scale):
    G, C, S, H, d = q.shape
    P = k_prefix.shape[1]
    R = C * S
    out = torch.empty((G, C, S, H, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((G, H, R), dtype=torch.float32, device=q.device)
    kernel, meta = _tuned(_prefix_attention_fwd_kernel, "fwd", d, q.dtype,
                          vector_aligned(out, q, k, v, k_prefix, v_prefix))
    kernel[lambda cfg: (triton.cdiv(R, cfg["BLOCK_M"]), G * H)](
        out, *out.stride()[:4],
        lse,
        q, *q.stride()[:4],
        k, *k.stride()[:4],
        v, *v.stride()[:4],
        k_prefix, *_prefix_strides(k_prefix, G),
        v_prefix, *_prefix_strides(v_prefix, G),
        lens,
        R, S, H, P, d, scale * math.log2(math.e),
        UPCAST=not dot_in_input_dtype(q), RTNE_BF16=needs_bf16_rounding(out), **meta,
    )
    return out, lse


def _prefix_attention_bwd(dout, q, k, v, k_prefix, v_prefix, out, lse, lens, scale, need_dkdv=True):
    G, C, S, H, d = q.shape
    Gp, P = k_prefix.shape[:2]
    R = C * S
    aligned = vector_aligned(dout, q, k, v, k_prefix, v_prefix, out)
    upcast = not dot_in_input_dtype(q)
    qk_scale = scale * math.log2(math.e)
    dq = torch.empty((G, C, S, H, d), dtype=q.dtype, device=q.device)
    delta = torch.empty((G, H, R), dtype=torch.float32, device=q.device)
    kernel, meta = _tuned(_prefix_attention_bwd_dq_kernel, "dq", d, q.dtype, aligned)
    kernel[lambda cfg: (triton.cdiv(R, cfg["BLOCK_M"]), G * H)](
        dq, *dq.stride()[:4],
        delta,
        q, *q.stride()[:4],
        k, *k.stride()[:4],
        v, *v.stride()[:4],
        k_prefix, *_prefix_strides(k_prefix, G),
        v_prefix, *_prefix_strides(v_prefix, G),
        out, *out.stride()[:4],
        dout, *dout.stride()[:4],
        lse, lens,
        R, S, H, P, d, qk_scale, scale,
        UPCAST=upcast, RTNE_BF16=needs_bf16_rounding(dq), **meta,
    )
    dk = dv = None
    if need_dkdv:  # walks query blocks (BLOCK_M) per key block (BLOCK_N)
        dk = torch.empty((G, C, S, H, d), dtype=k.dtype, device=q.device)
        dv = torch.empty((G, C, S, H, d), dtype=v.dtype, device=q.device)
        kernel, meta = _tuned(_prefix_attention_bwd_dkdv_kernel, "dkdv", d, q.dtype, aligned)
        kernel[lambda cfg: (triton.cdiv(R, cfg["BLOCK_N"]), G * H, 1)](
            dk, 0, dk.stride(1), dk.stride(0), dk.stride(2), dk.stride(3),
            dv, 0, dv.stride(1), dv.stride(0), dv.stride(2), dv.stride(3),
            q, *q.stride()[:4],
            k, *k.stride()[:4],
            v, *v.stride()[:4],
            dout, *dout.stride()[:4],
            lse, delta, lens,
            R, S, H, R, d, R, qk_scale, scale,
            PREFIX_KEYS=False, UPCAST=upcast, RTNE_BF16=needs_bf16_rounding(dk), **meta,
        )
    # prefix grads, stage 1: one fp32 partial per (split of SPLIT_ROWS query rows, group), whatever the tiles;
    # stage 2: a fixed-order sum
    dkp = torch.zeros(k_prefix.shape, dtype=torch.float32, device=q.device)
    dvp = torch.zeros(v_prefix.shape, dtype=torch.float32, device=q.device)
    if P > 0:
        splits = triton.cdiv(R, SPLIT_ROWS)
        dkp_part = torch.empty((splits, G, P, H, d), dtype=torch.float32, device=q.device)
        dvp_part = torch.empty_like(dkp_part)
        kp_sg, kp_sp, kp_sh = _prefix_strides(k_prefix, G)
        vp_sg, vp_sp, vp_sh = _prefix_strides(v_prefix, G)
        kernel, meta = _tuned(_prefix_attention_bwd_dkdv_kernel, "dkdv_prefix", d, q.dtype, aligned)
        kernel[lambda cfg: (triton.cdiv(P, cfg["BLOCK_N"]), G * H, splits)](
            dkp_part, dkp_part.stride(0), 0, dkp_part.stride(1), dkp_part.stride(2), dkp_part.stride(3),
            dvp_part, dvp_part.stride(0), 0, dvp_part.stride(1), dvp_part.stride(2), dvp_part.stride(3),
            q, *q.stride()[:4],
            k_prefix, kp_sg, 0, kp_sp, kp_sh,
            v_prefix, vp_sg, 0, vp_sp, vp_sh,
            dout, *dout.stride()[:4],
            lse, delta, lens,
            R, S, H, P, d, SPLIT_ROWS, qk_scale, scale,
            PREFIX_KEYS=True, UPCAST=upcast, RTNE_BF16=False, **meta,
        )
        dims = (0,) if Gp == G else (0, 1)  # a prefix broadcast over groups gets the sum over groups too
        dkp = dkp_part.sum(dims).reshape(k_prefix.shape)
        dvp = dvp_part.sum(dims).reshape(v_prefix.shape)
    return dq, dk, dv, dkp.to(k_prefix.dtype), dvp.to(v_prefix.dtype)


# ----------------------------------------------------------------------------------------------
# custom ops: torch.compile and CUDA graphs capture the kernels as opaque ops; the fakes give
# shapes and dtypes only, and the backward is an op of its own so compiled training graphs hold it.
# Schemas are spelled out: inferring them from annotations under `from __future__ import annotations`
# depends on the torch version.

_PREFIX_ATTENTION_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor k_prefix, Tensor v_prefix, Tensor lens, float scale)"
                            " -> (Tensor, Tensor)")
_PREFIX_ATTENTION_BACKWARD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor k_prefix, Tensor v_prefix, "
                                     "Tensor out, Tensor lse, Tensor lens, float scale, bool need_dkdv) "
                                     "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("promptcore::prefix_attention", mutates_args=(), schema=_PREFIX_ATTENTION_SCHEMA)
def _prefix_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor,
                         v_prefix: torch.Tensor, lens: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, row log-sum-exp); the log-sum-exp is the backward's residual, not differentiable."""
    q, k, v, k_prefix, v_prefix = (_as_kernel_input(t) for t in (q, k, v, k_prefix, v_prefix))
    return _prefix_attention_fwd(q, k, v, k_prefix, v_prefix, lens, scale)


@_prefix_attention_op.register_fake
def _prefix_attention_fake(q, k, v, k_prefix, v_prefix, lens, scale):
    G, C, S, H, d = q.shape
    return q.new_empty((G, C, S, H, d)), q.new_empty((G, H, C * S), dtype=torch.float32)


@torch.library.custom_op("promptcore::prefix_attention_backward", mutates_args=(),
                         schema=_PREFIX_ATTENTION_BACKWARD_SCHEMA)
def _prefix_attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor,
    v_prefix: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, lens: torch.Tensor, scale: float, need_dkdv: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d k_prefix, d v_prefix); dk and dv are empty tensors unless ``need_dkdv``."""
    q, k, v, k_prefix, v_prefix, out, dout = (
        _as_kernel_input(t) for t in (q, k, v, k_prefix, v_prefix, out, dout))
    dq, dk, dv, dkp, dvp = _prefix_attention_bwd(dout, q, k, v, k_prefix, v_prefix, out, lse, lens, scale,
                                                 need_dkdv=need_dkdv)
    if not need_dkdv:
        dk, dv = k.new_empty((0,)), v.new_empty((0,))
    return dq, dk, dv, dkp, dvp


@_prefix_attention_backward_op.register_fake
def _prefix_attention_backward_fake(dout, q, k, v, k_prefix, v_prefix, out, lse, lens, scale, need_dkdv):
    shape = q.shape if need_dkdv else (0,)
    return (q.new_empty(q.shape), k.new_empty(shape), v.new_empty(shape), k_prefix.new_empty(k_prefix.shape),
            v_prefix.new_empty(v_prefix.shape))


def _prefix_attention_setup(ctx, inputs, output):
    q, k, v, k_prefix, v_prefix, lens, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, k_prefix, v_prefix, out, lse, lens)
    ctx.scale = scale


def _prefix_attention_grad(ctx, dout, _dlse):
    q, k, v, k_prefix, v_prefix, out, lse, lens = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dkdv = need[1] or need[2]
    dq, dk, dv, dkp, dvp = torch.ops.promptcore.prefix_attention_backward(
        dout, q, k, v, k_prefix, v_prefix, out, lse, lens, ctx.scale, need_dkdv)
    if not need_dkdv:
        dk = dv = None
    return dq, dk, dv, dkp, dvp, None, None


_prefix_attention_op.register_autograd(_prefix_attention_grad, setup_context=_prefix_attention_setup)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    suffix_lens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Suffix queries over [group prefix K/V ; own causal suffix K/V]; returns (G, C, S, H, d).

    Runs the fused Triton kernels, as the custom op ``torch.ops.promptcore.prefix_attention`` (which
    torch.compile captures), when :func:`use_triton` says so; mixed input dtypes, empty tensors and
    head dims above 128 take the PyTorch reference.
    """
    tensors = (q, k, v, k_prefix, v_prefix)
    same_dtype = all(t.dtype == q.dtype for t in tensors)
    small_head = q.dim() == 5 and q.shape[-1] <= SUPPORTED_HEAD_DIMS[-1]
    if not (use_triton(*tensors) and same_dtype and small_head and q.numel() > 0):
        return prefix_attention_ref(q, k, v, k_prefix, v_prefix, suffix_lens, scale)
    _check(q, k, v, k_prefix, v_prefix)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    C, S = q.shape[1], q.shape[2]
    if suffix_lens is None:  # every row live: one kernel variant serves both cases
        lens = torch.full((C,), S, dtype=torch.int32, device=q.device)
    else:
        if suffix_lens.numel() == 1:  # broadcasts over classes, as in the reference
            suffix_lens = suffix_lens.reshape(1).expand(C)
        if suffix_lens.shape != (C,):
            raise ValueError(f"suffix_lens must be (C,) = ({C},), got {tuple(suffix_lens.shape)}")
        lens = suffix_lens.to(device=q.device, dtype=torch.int32).contiguous()
    return torch.ops.promptcore.prefix_attention(q, k, v, k_prefix, v_prefix, lens, scale)[0]
