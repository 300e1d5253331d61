"""assemble_prompts: Triton kernels against assemble_prompts_ref (output, ctx/bias/token/pos gradients)."""

import importlib

import pytest
import torch
from kernel_checks import check_op

from promptcore.kernels import assemble_prompts, assemble_prompts_ref

asm = importlib.import_module("promptcore.kernels.prompt_assembly")

NAMES = ["token_embeds", "pos", "ctx", "bias"]
# (token dtype, ctx/bias dtype): CLIP in fp16/bf16 with an fp32 learned context is the common case
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float16, torch.float16),
          (torch.bfloat16, torch.bfloat16)]
# (C, S, D, K, G)
SHAPES = [(1, 1, 1, 1, 1), (5, 9, 33, 4, 3), (13, 7, 64, 3, 1), (3, 20, 100, 5, 4)]


def make_slots(C, S, K, where, gen):
    """slots (C, S): -1 = token, k = context row k; ctx after SOS, at the end, or per-class positions."""
    slots = torch.full((C, S), -1, dtype=torch.long)
    n = min(K, max(S - 1, 1))
    for c in range(C):
        if where == "front":
            start = min(1, S - n)
        elif where == "end":
            start = S - n
        else:  # varies by class (CoOp's class-token position "middle"/"front")
            start = int(torch.randint(0, S - n + 1, (1,), generator=gen))
        slots[c, start:start + n] = torch.arange(n)
    return slots


def make_inputs(C, S, D, K, G, layout, dtypes, device, where="front", with_bias=True, seed=0):
    tok_dtype, ctx_dtype = dtypes
    gen = torch.Generator().manual_seed(seed)
    tok = torch.randn(C, S, D, generator=gen).to(device, tok_dtype)
    pos = torch.randn(S, D, generator=gen).to(device, tok_dtype)
    ctx_shape = {"shared": (K, D), "class": (C, K, D), "group": (G, K, D)}[layout]
    ctx = torch.randn(*ctx_shape, generator=gen).to(device, ctx_dtype)
    bias = torch.randn(G, D, generator=gen).to(device, ctx_dtype) if with_bias else None
    slots = make_slots(C, S, K, where, gen).to(device)
    return tok, slots, pos, ctx, bias


def assembled(slots, layout):
    return lambda fn: (lambda tok, pos, ctx, bias: fn(tok, slots, pos, ctx, bias, layout))


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("layout", ["shared", "class", "group"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_grads(shape, layout, dtypes, device):
    C, S, D, K, G = shape
    where = ["front", "end", "mixed"][(C + S) % 3]
    tok, slots, pos, ctx, bias = make_inputs(C, S, D, K, G, layout, dtypes, device, where)
    fn = assembled(slots, layout)
    # ctx/bias grads always; token/pos grads in one layout (a torch reduction, frozen weights in practice)
    mask = [layout == "group", layout == "group", True, True]
    out, out_ref = check_op(fn(assemble_prompts), fn(assemble_prompts_ref), (tok, pos, ctx, bias), mask,
                            dtypes[0], NAMES)
    # fp32 sums rounded once, in the same order as the reference: bit-identical
    torch.testing.assert_close(out, out_ref, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["shared", "group"])
def test_without_bias(layout, device):
    tok, slots, pos, ctx, _ = make_inputs(6, 10, 48, 4, 2, layout, DTYPES[1], device, "mixed", with_bias=False)
    fn = assembled(slots, layout)
    out, out_ref = check_op(fn(assemble_prompts), fn(assemble_prompts_ref), (tok, pos, ctx, None),
                            [True, True, True, False], torch.float16, NAMES)
    torch.testing.assert_close(out, out_ref, atol=0, rtol=0)


def test_without_ctx_bias_is_ignored(device):
    tok, slots, pos, _, bias = make_inputs(4, 6, 24, 2, 3, "shared", DTYPES[0], device)
    fn = assembled(slots, "shared")
    out, out_ref = check_op(fn(assemble_prompts), fn(assemble_prompts_ref), (tok, pos, None, bias),
                            [True, True, False, True], torch.float32, NAMES)
    assert out.shape == (1, 4, 6, 24)


def test_no_context_slots(device):
    tok, _, pos, ctx, bias = make_inputs(3, 5, 16, 2, 2, "shared", DTYPES[0], device)
    slots = torch.full((3, 5), -1, device=device, dtype=torch.int32)
    out = assemble_prompts(tok, slots, pos, ctx.requires_grad_(), bias, "shared")
    torch.testing.assert_close(out, assemble_prompts_ref(tok, slots, pos, ctx, bias, "shared"), atol=0, rtol=0)
    out.sum().backward()
    assert not ctx.grad.any()


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[3]], ids=lambda d: str(d[0]))
def test_strided_and_expanded_inputs(dtypes, device):
    """Token embeddings sliced from full 77-token rows, int32 transposed slots, expanded pos and bias."""
    C, S, D, K, G = 5, 8, 40, 3, 3
    tok_full, _, _, ctx, _ = make_inputs(C, 77, D, K, G, "class", dtypes, device)
    tok = tok_full[:, :S]
    slots = make_slots(C, S, K, "mixed", torch.Generator().manual_seed(3)).to(device, torch.int32).t().contiguous().t()
    pos = torch.randn(1, D).to(device, dtypes[0]).expand(S, D)
    bias = torch.randn(1, D).to(device, dtypes[1]).expand(G, D)
    assert not tok.is_contiguous() and slots.stride() == (1, C) and pos.stride(0) == 0 and bias.stride(0) == 0
    fn = assembled(slots, "class")
    out, out_ref = check_op(fn(assemble_prompts), fn(assemble_prompts_ref), (tok, pos, ctx, bias), [True] * 4,
                            dtypes[0], NAMES)
    torch.testing.assert_close(out, out_ref, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:Input #.*double precision")
@pytest.mark.parametrize("layout", ["shared", "group"])
def test_gradcheck_fp64(layout, device):
    """fp64 in and out: the reference (hence the op) sums in fp32, so eps/atol suit fp32 arithmetic."""
    tok, slots, pos, ctx, bias = make_inputs(2, 4, 3, 2, 2, layout, (torch.float64, torch.float64), device)
    inputs = tuple(t.detach().requires_grad_() for t in (tok, pos, ctx, bias))
    torch.autograd.gradcheck(lambda t, p, c, b: assemble_prompts(t, slots, p, c, b, layout), inputs, eps=1e-3,
                             atol=1e-4, rtol=1e-3, nondet_tol=1e-6)


def test_backend_switch(monkeypatch, device):
    calls = []
    launcher = asm._assemble_prompts_fwd
    monkeypatch.setattr(asm, "_assemble_prompts_fwd", lambda *a: calls.append(1) or launcher(*a))
    tok, slots, pos, ctx, bias = make_inputs(3, 5, 16, 2, 2, "shared", DTYPES[0], device)
    want = assemble_prompts_ref(tok, slots, pos, ctx, bias)
    torch.testing.assert_close(assemble_prompts(tok, slots, pos, ctx, bias), want, atol=0, rtol=0)
    assert calls == [1]
    monkeypatch.setenv("PROMPTCORE_BACKEND", "torch")
    torch.testing.assert_close(assemble_prompts(tok, slots, pos, ctx, bias), want, atol=0, rtol=0)
    assert calls == [1], "PROMPTCORE_BACKEND=torch must run the reference"


def test_bad_layout_raises(device):
    tok, slots, pos, ctx, bias = make_inputs(2, 3, 8, 2, 1, "shared", DTYPES[0], device)
    with pytest.raises(ValueError):
        assemble_prompts(tok, slots, pos, ctx, bias, "per-image")


@pytest.mark.parametrize("layout", ["shared", "group"])
def test_context_grads_are_deterministic(layout, device):
    """Many classes share each context row: two backward runs give bit-equal context and bias grads."""
    tok, slots, pos, ctx, bias = make_inputs(40, 6, 24, 3, 2, layout, DTYPES[1], device, "mixed")
    runs = []
    for _ in range(2):
        c, b = ctx.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
        out = assemble_prompts(tok, slots, pos, c, b, layout)
        runs.append(torch.autograd.grad(out.float().square().sum(), (c, b)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    want = torch.autograd.grad(assemble_prompts_ref(tok, slots, pos, ctx.requires_grad_(), bias, layout)
                               .float().square().sum(), ctx)[0]
    torch.testing.assert_close(runs[0][0], want, atol=1e-4 * want.abs().max().item(), rtol=0)


def test_column_prune():
    """early_config_prune keeps the configs whose column tile D needs, else the narrowest ones."""
    import triton

    cfgs = [triton.Config({"BLOCK_R": r, "BLOCK_D": d}) for r, d in [(32, 128), (64, 64), (32, 32)]]
    widths = lambda kept: [c.kwargs["BLOCK_D"] for c in kept]  # noqa: E731
    assert widths(asm._fit_columns(cfgs, {"D": 512})) == [128, 64, 32]
    assert widths(asm._fit_columns(cfgs, {"D": 33})) == [64, 32]
    assert widths(asm._fit_columns(cfgs, {"D": 1})) == [32]
    assert widths(asm._fit_columns(cfgs[:2], {"D": 1})) == [64]


@pytest.mark.parametrize("aligned", [True, False])
def test_autotune_configs(aligned):
    """Aligned inputs tune between configs; unaligned ones keep small tiles (scalar loads), one config."""
    cfgs = asm.CONFIGS[aligned]
    assert (len(cfgs) > 1) == aligned
    for (block_r, block_d), warps, stages in cfgs:
        assert block_r * block_d <= 4096 and warps in (4, 8) and stages >= 1
        assert block_d <= (128 if aligned else 32)


def test_every_autotune_config_is_right(monkeypatch, device):
    """The interpreter runs only the first config: force each other one and compare, forward and backward."""
    utils = importlib.import_module("promptcore.kernels._utils")
    tok, slots, pos, ctx, bias = make_inputs(5, 9, 80, 4, 3, "group", DTYPES[1], device, "mixed")
    assert asm.vector_aligned(tok, pos, ctx, bias) and len(asm.CONFIGS[True]) > 1
    fn = assembled(slots, "group")

    def grads():
        c, b = ctx.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
        return torch.autograd.grad(fn(assemble_prompts)(tok, pos, c, b).float().square().sum(), (c, b))

    default = grads()
    for cfg in asm.CONFIGS[True][1:]:
        monkeypatch.setitem(asm.CONFIGS, True, [cfg])
        monkeypatch.setattr(utils, "_TUNERS", {})
        out, out_ref = check_op(fn(assemble_prompts), fn(assemble_prompts_ref), (tok, pos, ctx, bias),
                                [False, False, True, True], torch.float16, NAMES)
        torch.testing.assert_close(out, out_ref, atol=0, rtol=0)
        # the tiles never change a sum's order: context and bias grads bit-equal to the default config's
        for a, b in zip(grads(), default):
            assert torch.equal(a, b)
