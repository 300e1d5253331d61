"""Shared checks of the kernel tests: run an op and its reference, compare outputs and grads.

Tolerance rule (flash-attention's): the kernel's error against a high-precision reference may
be at most twice the error of PyTorch's reference run in the same low precision, plus a small
atol scaled by the magnitude of the values compared.
"""

from __future__ import annotations

import torch

# extra absolute tolerance, relative to max(1, |reference|.max())
ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-6}


def _clone(x, grad):
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach().clone()
    return x.requires_grad_() if grad else x


def run_with_grads(fn, args, grad_mask, dout=None, high=False):
    """Run ``fn(*args)`` on fresh leaves (upcast to fp32 when ``high``), backprop ``dout``."""
    leaves = []
    for a, g in zip(args, grad_mask):
        if isinstance(a, torch.Tensor) and high and a.is_floating_point():
            a = a.float()
        leaves.append(_clone(a, g))
    out = fn(*leaves)
    first = out[0] if isinstance(out, tuple) else out
    if dout is None:
        # rounded once to the op's output dtype, so every run backpropagates the same values
        dout = torch.randn(first.shape, generator=torch.Generator().manual_seed(7)).to(first.device, first.dtype)
    if any(grad_mask):
        first.backward(dout.to(first.dtype))
    grads = [leaf.grad if (g and isinstance(leaf, torch.Tensor)) else None for leaf, g in zip(leaves, grad_mask)]
    return out, grads, dout


def assert_lowp_close(actual, lowp_ref, high_ref, dtype, name):
    """|actual - high| <= 2 |lowp_ref - high| + ATOL[dtype] * max(1, |high|)  (max over elements)."""
    assert actual.shape == high_ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(high_ref.shape)}"
    assert actual.dtype == lowp_ref.dtype, f"{name}: dtype {actual.dtype} != {lowp_ref.dtype}"
    if actual.numel() == 0:
        return
    a, lo, hi = actual.double().cpu(), lowp_ref.double().cpu(), high_ref.double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = (a - hi).abs().max().item()
    base = (lo - hi).abs().max().item()
    atol = ATOL[dtype] * max(1.0, hi.abs().max().item())
    assert err <= 2 * base + atol, f"{name}: kernel error {err:.3e} > 2 x torch's {base:.3e} + {atol:.1e}"


def check_op(op, ref, args, grad_mask, dtype, names):
    """Compare op and every requested gradient with the reference (low precision and fp32)."""
    out, grads, dout = run_with_grads(op, args, grad_mask)
    out_lo, grads_lo, _ = run_with_grads(ref, args, grad_mask, dout)
    out_hi, grads_hi, _ = run_with_grads(ref, args, grad_mask, dout, high=True)
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    assert_lowp_close(first(out), first(out_lo), first(out_hi), dtype, "output")
    for g, g_lo, g_hi, flag, name in zip(grads, grads_lo, grads_hi, grad_mask, names):
        if not flag:
            continue
        if g_lo is None:  # the reference does not use this input: no gradient either
            assert g is None or not g.any(), f"grad {name}: expected none"
            continue
        assert g is not None, f"grad {name}: missing"
        assert_lowp_close(g, g_lo, g_hi, dtype, f"grad {name}")
    return out, out_lo
