"""Shared-prefix causal attention.

Each (group g, class c) suffix of S rows attends to its group's P prefix keys/values and to
its own suffix keys/values under the causal mask:

    out[g, c, i] = softmax_j([q_i . k_prefix[g, j] for j < P] ++ [q_i . k[g, c, j] for j <= i]) * scale
                   @ [v_prefix[g] ; v[g, c]]

Shapes: ``q, k, v`` (G, C, S, H, d); ``k_prefix, v_prefix`` (G, P, H, d); ``suffix_lens``
(C,) optional: rows i >= suffix_lens[c] are dead (after the EOT) and come out as zeros.
The prefix is read per group, never expanded over classes. Statistics in fp32; output in
the dtype of ``q``.

Triton path (fp16, bf16, fp32; any d, padded to a power of two with masks; any P >= 0):

* forward: one program per (block of BLOCK_M flattened suffix rows (c, i), group, head).
  It streams the group's prefix K/V in BLOCK_N chunks, then the suffix keys of the classes
  its rows belong to (block-diagonal causal mask), with an online base-2 softmax in fp32;
  it writes the output and the row log-sum-exp (fp32, for the backward).
* backward, two kernels: (1) per query block: dq, and the prefix grads dk_prefix/dv_prefix,
  accumulated over classes with fp32 ``tl.atomic_add`` into a (G, P, H, d) buffer (so their
  summation order, and their last bits, are not deterministic); (2) per suffix-key block:
  dk, dv of the suffix (no atomics: a key is only seen by queries of its own class).
* q/k/v may be strided views of a fused qkv projection: strides are passed as they are
  (the head dim must have stride 1, and expanded stride-0 views are copied).
* on CUDA, fp16/bf16 tiles go to ``tl.dot`` as they are (fp32 accumulation, probabilities
  rounded to the input dtype before P @ V, as FlashAttention does); under the interpreter
  and for fp32 every tile is upcast and multiplied in IEEE fp32.
* ``k_prefix`` with a group dim of 1 is broadcast over groups (stride 0, not copied); its
  grads are then summed over groups too.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._utils import (
    HAS_TRITON,
    cast_for_store,
    dot_in_input_dtype,
    needs_bf16_rounding,
    next_pow2,
    no_zero_strides,
    tl,
    triton,
)
from .backend import use_triton

if HAS_TRITON:

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
        HAS_LENS: tl.constexpr, UPCAST: tl.constexpr, RTNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        pid_gh = tl.program_id(1).to(tl.int64)
        g = pid_gh // H
        h = pid_gh % H
        # R = C * S suffix rows per (group, head), flattened as c * S + i (int64 on the host when large)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        c_q = rows // S
        i_q = rows % S
        dcol = tl.arange(0, BLOCK_D)
        d_ok = dcol < D

        q_ptrs = q_ptr + g * sq_g + h * sq_h + c_q[:, None] * sq_c + i_q[:, None] * sq_s + dcol[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # 1) the group's prefix, shared by every row of the block
        kp_base = kp_ptr + g * skp_g + h * skp_h
        vp_base = vp_ptr + g * svp_g + h * svp_h
        for start in range(0, P, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < P
            kt = tl.load(kp_base + n[None, :].to(tl.int64) * skp_p + dcol[:, None],
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            vv = tl.load(vp_base + n[:, None].to(tl.int64) * svp_p + dcol[None, :],
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
                vv = vv.to(tl.float32)
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no live key yet
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
            m_i = m_new

        # 2) the suffix keys of the classes in this block: same class, key position <= query position
        lo = (pid_m * BLOCK_M // S) * S
        hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, R)
        k_base = k_ptr + g * sk_g + h * sk_h
        v_base = v_ptr + g * sv_g + h * sv_h
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < R
            c_k = n // S
            i_k = n % S
            kt = tl.load(k_base + c_k[None, :] * sk_c + i_k[None, :] * sk_s + dcol[:, None],
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            vv = tl.load(v_base + c_k[:, None] * sv_c + i_k[:, None] * sv_s + dcol[None, :],
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
                vv = vv.to(tl.float32)
            live = (c_k[None, :] == c_q[:, None]) & (n[None, :] <= rows[:, None]) & n_ok[None, :]
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
            s = tl.where(live, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past R, which are never stored
        out = acc / l_safe[:, None]
        if HAS_LENS:
            n_live = tl.load(lens_ptr + c_q, mask=row_ok, other=0)
            out = tl.where((i_q < n_live)[:, None], out, 0.0)
        o_ptrs = out_ptr + g * so_g + h * so_h + c_q[:, None] * so_c + i_q[:, None] * so_s + dcol[None, :]
        tl.store(o_ptrs, cast_for_store(out, out_ptr, RTNE_BF16), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + pid_gh * R + rows, m_i + tl.log2(l_safe), mask=row_ok)

    @triton.jit
    def _prefix_attention_bwd_kernel(
        dq_ptr, sdq_g, sdq_c, sdq_s, sdq_h,
        dkp_ptr, sdkp_g, sdkp_p, sdkp_h,
        dvp_ptr, sdvp_g, sdvp_p, sdvp_h,
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
        HAS_LENS: tl.constexpr, UPCAST: tl.constexpr, RTNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Per query block: dq over all its keys, and the prefix grads (atomically, fp32)."""
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
        qmask = row_ok[:, None] & d_ok[None, :]

        q = tl.load(q_ptr + g * sq_g + h * sq_h + c_q[:, None] * sq_c + i_q[:, None] * sq_s + dcol[None, :],
                    mask=qmask, other=0.0)
        o = tl.load(o_ptr + g * so_g + h * so_h + c_q[:, None] * so_c + i_q[:, None] * so_s + dcol[None, :],
                    mask=qmask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + g * sdo_g + h * sdo_h + c_q[:, None] * sdo_c + i_q[:, None] * sdo_s + dcol[None, :],
                     mask=qmask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        if HAS_LENS:  # dead rows were multiplied by zero: no gradient flows through them
            n_live = tl.load(lens_ptr + c_q, mask=row_ok, other=0)
            do = tl.where((i_q < n_live)[:, None], do, 0.0).to(do.dtype)
        delta = tl.sum(do.to(tl.float32) * o, axis=1)
        tl.store(delta_ptr + pid_gh * R + rows, delta, mask=row_ok)
        lse = tl.load(lse_ptr + pid_gh * R + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        kp_base = kp_ptr + g * skp_g + h * skp_h
        vp_base = vp_ptr + g * svp_g + h * svp_h
        dkp_base = dkp_ptr + g * sdkp_g + h * sdkp_h
        dvp_base = dvp_ptr + g * sdvp_g + h * sdvp_h
        for start in range(0, P, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < P
            kmask = n_ok[:, None] & d_ok[None, :]
            kk = tl.load(kp_base + n[:, None].to(tl.int64) * skp_p + dcol[None, :], mask=kmask, other=0.0)
            vv = tl.load(vp_base + n[:, None].to(tl.int64) * svp_p + dcol[None, :], mask=kmask, other=0.0)
            if UPCAST:
                kk = kk.to(tl.float32)
                vv = vv.to(tl.float32)
            s = tl.dot(q, tl.trans(kk), input_precision="ieee") * qk_scale
            p = tl.where(n_ok[None, :] & row_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vv), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kk.dtype), kk, input_precision="ieee")
            dvp = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
            dkp = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee") * scale
            tl.atomic_add(dvp_base + n[:, None].to(tl.int64) * sdvp_p + dcol[None, :], dvp, mask=kmask)
            tl.atomic_add(dkp_base + n[:, None].to(tl.int64) * sdkp_p + dcol[None, :], dkp, mask=kmask)

        lo = (pid_m * BLOCK_M // S) * S
        hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, R)
        k_base = k_ptr + g * sk_g + h * sk_h
        v_base = v_ptr + g * sv_g + h * sv_h
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < R
            c_k = n // S
            i_k = n % S
            kmask = n_ok[:, None] & d_ok[None, :]
            kk = tl.load(k_base + c_k[:, None] * sk_c + i_k[:, None] * sk_s + dcol[None, :], mask=kmask, other=0.0)
            vv = tl.load(v_base + c_k[:, None] * sv_c + i_k[:, None] * sv_s + dcol[None, :], mask=kmask, other=0.0)
            if UPCAST:
                kk = kk.to(tl.float32)
                vv = vv.to(tl.float32)
            live = (c_k[None, :] == c_q[:, None]) & (n[None, :] <= rows[:, None]) & n_ok[None, :] & row_ok[:, None]
            s = tl.dot(q, tl.trans(kk), input_precision="ieee") * qk_scale
            p = tl.where(live, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vv), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kk.dtype), kk, input_precision="ieee")

        dq = dq * scale
        tl.store(dq_ptr + g * sdq_g + h * sdq_h + c_q[:, None] * sdq_c + i_q[:, None] * sdq_s + dcol[None, :],
                 cast_for_store(dq, dq_ptr, RTNE_BF16), mask=qmask)

    @triton.jit
    def _prefix_attention_bwd_dkdv_kernel(
        dk_ptr, sdk_g, sdk_c, sdk_s, sdk_h,
        dv_ptr, sdv_g, sdv_c, sdv_s, sdv_h,
        q_ptr, sq_g, sq_c, sq_s, sq_h,
        k_ptr, sk_g, sk_c, sk_s, sk_h,
        v_ptr, sv_g, sv_c, sv_s, sv_h,
        do_ptr, sdo_g, sdo_c, sdo_s, sdo_h,
        lse_ptr, delta_ptr, lens_ptr,
        R, S, H, D, qk_scale, scale,
        HAS_LENS: tl.constexpr, UPCAST: tl.constexpr, RTNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Per suffix-key block: dk, dv from the queries of the same class at or after each key."""
        pid_n = tl.program_id(0).to(tl.int64)
        pid_gh = tl.program_id(1).to(tl.int64)
        g = pid_gh // H
        h = pid_gh % H

        keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = keys < R
        c_k = keys // S
        i_k = keys % S
        dcol = tl.arange(0, BLOCK_D)
        d_ok = dcol < D
        kmask = key_ok[:, None] & d_ok[None, :]
        kk = tl.load(k_ptr + g * sk_g + h * sk_h + c_k[:, None] * sk_c + i_k[:, None] * sk_s + dcol[None, :],
                     mask=kmask, other=0.0)
        vv = tl.load(v_ptr + g * sv_g + h * sv_h + c_k[:, None] * sv_c + i_k[:, None] * sv_s + dcol[None, :],
                     mask=kmask, other=0.0)
        if UPCAST:
            kk = kk.to(tl.float32)
            vv = vv.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

        lo = pid_n * BLOCK_N
        last_key = tl.minimum(lo + BLOCK_N, R) - 1
        hi = tl.minimum((last_key // S + 1) * S, R)  # end of the last class seen by this block
        q_base = q_ptr + g * sq_g + h * sq_h
        do_base = do_ptr + g * sdo_g + h * sdo_h
        for start in range(lo, hi, BLOCK_M):
            m = start + tl.arange(0, BLOCK_M)
            m_ok = m < R
            c_q = m // S
            i_q = m % S
            qmask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + c_q[:, None] * sq_c + i_q[:, None] * sq_s + dcol[None, :], mask=qmask, other=0.0)
            do = tl.load(do_base + c_q[:, None] * sdo_c + i_q[:, None] * sdo_s + dcol[None, :], mask=qmask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            if HAS_LENS:
                n_live = tl.load(lens_ptr + c_q, mask=m_ok, other=0)
                do = tl.where((i_q < n_live)[:, None], do, 0.0).to(do.dtype)
            lse = tl.load(lse_ptr + pid_gh * R + m, mask=m_ok, other=0.0)
            delta = tl.load(delta_ptr + pid_gh * R + m, mask=m_ok, other=0.0)
            live = (c_q[None, :] == c_k[:, None]) & (m[None, :] >= keys[:, None]) & m_ok[None, :] & key_ok[:, None]
            st = tl.dot(kk, tl.trans(q), input_precision="ieee") * qk_scale  # (keys, queries)
            pt = tl.where(live, tl.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
            dpt = tl.dot(vv, tl.trans(do), input_precision="ieee")
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")

        dk = dk * scale
        tl.store(dk_ptr + g * sdk_g + h * sdk_h + c_k[:, None] * sdk_c + i_k[:, None] * sdk_s + dcol[None, :],
                 cast_for_store(dk, dk_ptr, RTNE_BF16), mask=kmask)
        tl.store(dv_ptr + g * sdv_g + h * sdv_h + c_k[:, None] * sdv_c + i_k[:, None] * sdv_s + dcol[None, :],
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


def _as_kernel_input(t: torch.Tensor) -> torch.Tensor:
    """Keep strided views (fused qkv) as they are; copy only stride-0 or non-unit-stride head dims."""
    t = no_zero_strides(t)
    return t if t.stride(-1) == 1 else t.contiguous()


def _blocks(d: int):
    block_d = next_pow2(d, 16)
    block_m = 64 if block_d <= 128 else 32
    return block_m, 32, block_d


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
    block_m, block_n, block_d = _blocks(d)
    grid = (triton.cdiv(R, block_m), G * H)
    _prefix_attention_fwd_kernel[grid](
        out, *out.stride()[:4],
        lse,
        q, *q.stride()[:4],
        k, *k.stride()[:4],
        v, *v.stride()[:4],
        k_prefix, *_prefix_strides(k_prefix, G),
        v_prefix, *_prefix_strides(v_prefix, G),
        lens if lens is not None else lse,
        R, S, H, P, d, scale * math.log2(math.e),
        HAS_LENS=lens is not None, UPCAST=not dot_in_input_dtype(q), RTNE_BF16=needs_bf16_rounding(out),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out, lse


def _prefix_attention_bwd(dout, q, k, v, k_prefix, v_prefix, out, lse, lens, scale, need_dkdv=True):
    G, C, S, H, d = q.shape
    P = k_prefix.shape[1]
    R = C * S
    dq = torch.empty((G, C, S, H, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((G, C, S, H, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((G, C, S, H, d), dtype=v.dtype, device=q.device)
    # fp32 accumulators of the prefix grads (atomics); shaped like the prefix itself (G or 1 groups)
    dkp = torch.zeros(k_prefix.shape, dtype=torch.float32, device=q.device)
    dvp = torch.zeros(v_prefix.shape, dtype=torch.float32, device=q.device)
    delta = torch.empty((G, H, R), dtype=torch.float32, device=q.device)
    block_m, block_n, block_d = _blocks(d)
    lens_arg = lens if lens is not None else lse
    upcast = not dot_in_input_dtype(q)
    _prefix_attention_bwd_kernel[(triton.cdiv(R, block_m), G * H)](
        dq, *dq.stride()[:4],
        dkp, *_prefix_strides(dkp, G),
        dvp, *_prefix_strides(dvp, G),
        delta,
        q, *q.stride()[:4],
        k, *k.stride()[:4],
        v, *v.stride()[:4],
        k_prefix, *_prefix_strides(k_prefix, G),
        v_prefix, *_prefix_strides(v_prefix, G),
        out, *out.stride()[:4],
        dout, *dout.stride()[:4],
        lse, lens_arg,
        R, S, H, P, d, scale * math.log2(math.e), scale,
        HAS_LENS=lens is not None, UPCAST=upcast, RTNE_BF16=needs_bf16_rounding(dq),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    if need_dkdv:
        _prefix_attention_bwd_dkdv_kernel[(triton.cdiv(R, block_n), G * H)](
            dk, *dk.stride()[:4],
            dv, *dv.stride()[:4],
            q, *q.stride()[:4],
            k, *k.stride()[:4],
            v, *v.stride()[:4],
            dout, *dout.stride()[:4],
            lse, delta, lens_arg,
            R, S, H, d, scale * math.log2(math.e), scale,
            HAS_LENS=lens is not None, UPCAST=upcast, RTNE_BF16=needs_bf16_rounding(dk),
            BLOCK_M=block_n, BLOCK_N=block_m, BLOCK_D=block_d,
        )
    else:
        dk = dv = None
    return dq, dk, dv, dkp.to(k_prefix.dtype), dvp.to(v_prefix.dtype)


class PrefixAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_prefix, v_prefix, lens, scale):
        q, k, v, k_prefix, v_prefix = (_as_kernel_input(t) for t in (q, k, v, k_prefix, v_prefix))
        out, lse = _prefix_attention_fwd(q, k, v, k_prefix, v_prefix, lens, scale)
        ctx.save_for_backward(q, k, v, k_prefix, v_prefix, out, lse, lens)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, k_prefix, v_prefix, out, lse, lens = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dk, dv, dkp, dvp = _prefix_attention_bwd(
            _as_kernel_input(dout), q, k, v, k_prefix, v_prefix, out, lse, lens, ctx.scale,
            need_dkdv=need[1] or need[2],
        )
        return dq, dk, dv, dkp, dvp, None, None


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

    Runs the fused Triton kernels when :func:`use_triton` says so (mixed input dtypes and empty
    tensors always take the reference), the PyTorch reference otherwise.
    """
    tensors = (q, k, v, k_prefix, v_prefix)
    same_dtype = all(t.dtype == q.dtype for t in tensors)
    if not (use_triton(*tensors) and same_dtype and q.numel() > 0):
        return prefix_attention_ref(q, k, v, k_prefix, v_prefix, suffix_lens, scale)
    _check(q, k, v, k_prefix, v_prefix)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    lens = None
    if suffix_lens is not None:
        if suffix_lens.numel() == 1:  # broadcasts over classes, as in the reference
            suffix_lens = suffix_lens.reshape(1).expand(q.shape[1])
        if suffix_lens.shape != (q.shape[1],):
            raise ValueError(f"suffix_lens must be (C,) = ({q.shape[1]},), got {tuple(suffix_lens.shape)}")
        lens = suffix_lens.to(device=q.device, dtype=torch.int32).contiguous()
    return PrefixAttentionFunction.apply(q, k, v, k_prefix, v_prefix, lens, scale)
