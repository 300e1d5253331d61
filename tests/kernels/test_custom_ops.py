"""The fused ops as torch.library custom ops: schema/fake/autograd checks, and torch.compile capturing them.

Everything runs on small CPU inputs under the Triton interpreter (or compiled on CUDA). The compile
tests use the ``aot_eager`` backend (no C++ compiler or codegen needed) with ``fullgraph=True``, so a
graph break in the backend switch fails them, and read the forward and backward FX graphs: a switch
that fell back to the PyTorch reference under compile would leave no ``promptcore::`` op there.
"""

import importlib

import pytest
import torch
from helpers import GraphRecorder, assert_close_scaled
from torch.library import opcheck

from promptcore.kernels import assemble_prompts, prefix_attention, prefix_attention_ref

pa = importlib.import_module("promptcore.kernels.prefix_attention")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled code is cached per function: each test traces its own
    yield
    torch._dynamo.reset()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def attention_inputs(device, dtype=torch.float32, G=2, C=3, S=5, H=2, d=16, P=4, prefix_groups=None):
    g = _gen()
    qkv = [torch.randn(G, C, S, H, d, generator=g).to(device, dtype) for _ in range(3)]
    pre = [torch.randn(prefix_groups or G, P, H, d, generator=g).to(device, dtype) for _ in range(2)]
    lens = torch.tensor([S, 2, 1][:C] + [S] * max(0, C - 3), dtype=torch.int32, device=device)
    return (*qkv, *pre, lens)


def assembly_inputs(device, layout, with_bias=True, dtype=torch.float32, C=3, S=6, D=24, K=2, G=2):
    g = _gen(1)
    tok = torch.randn(C, S, D, generator=g).to(device, dtype)
    pos = torch.randn(S, D, generator=g).to(device, dtype)
    slots = torch.full((C, S), -1, dtype=torch.long)
    slots[:, 1:1 + K] = torch.arange(K)
    shape = {"shared": (K, D), "class": (C, K, D), "group": (G, K, D)}[layout]
    ctx = torch.randn(*shape, generator=g).to(device, dtype)
    bias = torch.randn(G, D, generator=g).to(device, dtype) if with_bias else None
    return tok, slots.to(device), pos, ctx, bias


# -- opcheck: schema, fake (meta) kernels, autograd registration, AOT dispatch ---------------------------


@pytest.mark.parametrize("prefix_groups", [None, 1], ids=["per-group-prefix", "broadcast-prefix"])
def test_opcheck_prefix_attention(device, prefix_groups):
    q, k, v, kp, vp, lens = attention_inputs(device, prefix_groups=prefix_groups)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), kp.requires_grad_(), vp.requires_grad_(),
            lens, 0.25)
    opcheck(torch.ops.promptcore.prefix_attention.default, args)
    out, lse = torch.ops.promptcore.prefix_attention(*args)
    dout = torch.randn(out.shape, generator=_gen(2)).to(device)
    for need_dkdv in (True, False):
        bwd_args = (dout, *(t.detach() for t in (q, k, v, kp, vp, out, lse)), lens, 0.25, need_dkdv)
        opcheck(torch.ops.promptcore.prefix_attention_backward.default, bwd_args)


@pytest.mark.parametrize("layout,with_bias", [("shared", True), ("class", False), ("group", True)])
def test_opcheck_assemble_prompts(device, layout, with_bias):
    tok, slots, pos, ctx, bias = assembly_inputs(device, layout, with_bias)
    leaves = [tok.requires_grad_(), pos.requires_grad_(), ctx.requires_grad_()]
    if bias is not None:
        leaves.append(bias.requires_grad_())
    opcheck(torch.ops.promptcore.assemble_prompts.default, (tok, slots, pos, ctx, bias, layout))
    out = torch.ops.promptcore.assemble_prompts(tok, slots, pos, ctx, bias, layout)
    dout = torch.randn(out.shape, generator=_gen(3)).to(device)
    opcheck(torch.ops.promptcore.assemble_prompts_backward.default,
            (dout, slots, ctx.detach(), None if bias is None else bias.detach(), layout))


def test_eager_ops_equal_reference_with_grads(device):
    """The public functions route through the custom ops (no reference fallback) and keep their results."""
    q, k, v, kp, vp, lens = attention_inputs(device)
    seen = []
    real = pa._prefix_attention_fwd
    pa._prefix_attention_fwd = lambda *a: seen.append(1) or real(*a)
    try:
        leaves = [t.clone().requires_grad_() for t in (q, k, v, kp, vp)]
        out = prefix_attention(*leaves, lens)
    finally:
        pa._prefix_attention_fwd = real
    assert seen, "the Triton launcher did not run"
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, kp, vp)]
    ref = prefix_attention_ref(*ref_leaves, lens)
    dout = torch.randn(out.shape, generator=_gen(4)).to(device)
    out.backward(dout)
    ref.backward(dout)
    assert_close_scaled(out, ref, reduction=16, name="out")
    for a, b, name in zip(leaves, ref_leaves, ["q", "k", "v", "k_prefix", "v_prefix"]):
        assert_close_scaled(a.grad, b.grad, reduction=16, name=f"grad {name}")


# -- torch.compile captures the ops --------------------------------------------------------------------



def _compiled_matches_eager(fn, args, grad_mask, reduction):
    recorder = GraphRecorder()
    compiled = torch.compile(fn, backend=recorder.backend, fullgraph=True)
    runs = []
    for f in (compiled, fn):
        leaves = [a.clone().requires_grad_(m) if isinstance(a, torch.Tensor) else a for a, m in zip(args, grad_mask)]
        out = f(*leaves)
        dout = torch.randn(out.shape, generator=_gen(5)).to(out.device, out.dtype)
        out.backward(dout)
        runs.append((out.detach(), [leaf.grad for leaf, m in zip(leaves, grad_mask) if m]))
    (out_c, grads_c), (out_e, grads_e) = runs
    assert_close_scaled(out_c, out_e, reduction=reduction, name="compiled output")
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e)):
        assert_close_scaled(gc, ge, reduction=reduction, name=f"compiled grad {i}")
    return recorder


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compile_captures_prefix_attention(device, dtype):
    q, k, v, kp, vp, lens = attention_inputs(device, dtype)
    recorder = _compiled_matches_eager(lambda *a: prefix_attention(*a, lens), (q, k, v, kp, vp), [True] * 5, 16)
    ops = recorder.ops()
    assert "promptcore.prefix_attention.default" in ops, ops
    assert "promptcore.prefix_attention_backward.default" in ops, ops
    assert len(recorder.graphs) == 2  # one forward, one backward graph: no graph break


@pytest.mark.parametrize("layout", ["shared", "group"])
def test_compile_captures_assemble_prompts(device, layout):
    tok, slots, pos, ctx, bias = assembly_inputs(device, layout)

    def fn(ctx, bias):
        return assemble_prompts(tok, slots, pos, ctx, bias, layout)

    recorder = _compiled_matches_eager(fn, (ctx, bias), [True, True], 24)
    ops = recorder.ops()
    assert "promptcore.assemble_prompts.default" in ops, ops
    assert "promptcore.assemble_prompts_backward.default" in ops, ops


def test_forced_torch_backend_under_compile_takes_reference(device, monkeypatch):
    monkeypatch.setenv("PROMPTCORE_BACKEND", "torch")
    q, k, v, kp, vp, lens = attention_inputs(device)
    recorder = GraphRecorder()
    out = torch.compile(lambda *a: prefix_attention(*a, lens), backend=recorder.backend, fullgraph=True)(
        q, k, v, kp, vp)
    assert not any(op.startswith("promptcore.") for op in recorder.ops())
    assert_close_scaled(out, prefix_attention_ref(q, k, v, kp, vp, lens), reduction=16, name="reference")


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_keeps_reference(device):
    """TorchScript (like ONNX export) must not hold a promptcore custom op: tracing takes the reference."""
    q, k, v, kp, vp, lens = attention_inputs(device)
    traced = torch.jit.trace(lambda *a: prefix_attention(*a, lens), (q, k, v, kp, vp), check_trace=False)
    kinds = {n.kind() for n in traced.graph.nodes()}
    assert not any(kind.startswith("promptcore::") for kind in kinds), kinds
    assert_close_scaled(traced(q, k, v, kp, vp), prefix_attention_ref(q, k, v, kp, vp, lens), reduction=16,
                        name="traced")
