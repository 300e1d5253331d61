"""prefix_attention: Triton kernels against prefix_attention_ref (forward and all five gradients)."""

import importlib
import math

import pytest
import torch
from kernel_checks import ATOL, check_op

from promptcore.kernels import prefix_attention, prefix_attention_ref

# the package re-exports a function of the same name, so fetch the module itself
pa = importlib.import_module("promptcore.kernels.prefix_attention")
utils = importlib.import_module("promptcore.kernels._utils")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ["q", "k", "v", "k_prefix", "v_prefix"]

# (G, C, S, H, d, P, prefix groups): 1s, primes, d not a power of two, one and many groups,
# a prefix broadcast over groups, P = 1, several row blocks per (group, head)
SHAPES = [
    (1, 1, 1, 1, 64, 1, 1),
    (1, 7, 5, 2, 64, 17, 1),
    (3, 5, 8, 2, 24, 1, 3),
    (4, 3, 13, 1, 80, 3, 1),
    (1, 37, 8, 2, 64, 17, 1),
]


def make_inputs(G, C, S, H, d, P, Gp, dtype, device, seed=0):
    """q, k, v as strided views of one fused projection (G, C, S, 3, H, d), as attention layers make them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(G, C, S, 3, H, d, generator=gen).to(device, dtype)
    q, k, v = qkv.unbind(3)
    k_prefix = torch.randn(Gp, P, H, d, generator=gen).to(device, dtype)
    v_prefix = torch.randn(Gp, P, H, d, generator=gen).to(device, dtype)
    return q, k, v, k_prefix, v_prefix


def per_class_lens(C, S, seed=1):
    """Suffix lengths that differ per class, including a dead class (0) and one past S."""
    lens = torch.randint(1, S + 1, (C,), generator=torch.Generator().manual_seed(seed))
    if C >= 3:
        lens[1], lens[2] = 0, S + 3
    return lens


def attention(with_lens, scale=None):
    def op(fn):
        return lambda q, k, v, kp, vp, lens=with_lens: fn(q, k, v, kp, vp, lens, scale)
    return op


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_grads(shape, dtype, device):
    G, C, S, H, d, P, Gp = shape
    args = make_inputs(G, C, S, H, d, P, Gp, dtype, device)
    lens = per_class_lens(C, S).to(device)
    fn = attention(lens)
    out, out_ref = check_op(fn(prefix_attention), fn(prefix_attention_ref), args, [True] * 5, dtype, NAMES)
    assert out.shape == (G, C, S, H, d) and out.dtype == dtype
    dead = torch.arange(S, device=device)[None, :] >= lens[:, None]
    assert not out[:, dead].any(), "rows past the suffix length must be zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_suffix_lens_custom_scale(dtype, device):
    args = make_inputs(2, 6, 7, 3, 32, 5, 2, dtype, device, seed=3)
    fn = attention(None, scale=0.3)
    check_op(fn(prefix_attention), fn(prefix_attention_ref), args, [True] * 5, dtype, NAMES)


def test_empty_prefix(device):
    args = make_inputs(1, 4, 6, 2, 16, 0, 1, torch.float32, device)
    fn = attention(per_class_lens(4, 6).to(device))
    check_op(fn(prefix_attention), fn(prefix_attention_ref), args, [True] * 5, torch.float32, NAMES)


def test_fused_qkv_views_are_not_copied(device):
    q, k, v, kp, vp = make_inputs(2, 3, 4, 2, 16, 3, 2, torch.float16, device)
    assert not q.is_contiguous()
    for t in (q, k, v, kp, vp):
        assert pa._as_kernel_input(t) is t
    expanded = kp[:1].expand(2, -1, -1, -1)
    assert pa._as_kernel_input(expanded).stride(0) != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odd_strides_and_expanded_inputs(dtype, device):
    """Head-major storage (permuted views), queries expanded over classes, prefix expanded over groups."""
    G, C, S, H, d, P = 2, 5, 6, 3, 40, 4
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(G, H, C, S, d, generator=gen).to(device, dtype).permute(0, 2, 3, 1, 4)
    v = torch.randn(G, C, H, S, d + 8, generator=gen).to(device, dtype)[..., :d].transpose(2, 3)
    q = torch.randn(G, 1, S, H, d, generator=gen).to(device, dtype).expand(G, C, S, H, d)
    kp = torch.randn(1, P, H, d, generator=gen).to(device, dtype).expand(G, P, H, d)
    vp = torch.randn(G, P, H, d, generator=gen).to(device, dtype)
    assert q.stride(1) == 0 and kp.stride(0) == 0 and v.stride(-1) == 1 and not v.is_contiguous()
    fn = attention(per_class_lens(C, S).to(device))
    check_op(fn(prefix_attention), fn(prefix_attention_ref), (q, k, v, kp, vp), [True] * 5, dtype, NAMES)


def test_only_prefix_grads(device):
    """Frozen suffix, learned prefix: only dk_prefix / dv_prefix are asked for."""
    args = make_inputs(1, 9, 5, 2, 64, 17, 1, torch.float32, device, seed=9)
    fn = attention(per_class_lens(9, 5).to(device))
    check_op(fn(prefix_attention), fn(prefix_attention_ref), args, [False, False, False, True, True],
             torch.float32, NAMES)


@pytest.mark.filterwarnings("ignore:Input #.*double precision")
def test_gradcheck_fp32(device):
    """fp32, not fp64: the kernels (like the reference) compute in fp32, so loose eps and tolerances."""
    q, k, v, kp, vp = (t.detach().requires_grad_() for t in make_inputs(1, 2, 3, 1, 16, 2, 1, torch.float32, device))
    lens = torch.tensor([3, 2], device=device)
    torch.autograd.gradcheck(lambda *a: prefix_attention(*a, lens), (q, k, v, kp, vp), eps=1e-2, atol=3e-3,
                             rtol=3e-2, nondet_tol=1e-5)


def test_backend_switch(monkeypatch, device):
    calls = []
    launcher = pa._prefix_attention_fwd
    monkeypatch.setattr(pa, "_prefix_attention_fwd", lambda *a: calls.append(1) or launcher(*a))
    args = make_inputs(1, 3, 4, 1, 16, 2, 1, torch.float32, device)
    want = prefix_attention_ref(*args)
    torch.testing.assert_close(prefix_attention(*args), want, atol=ATOL[torch.float32], rtol=1e-4)
    assert calls == [1]
    monkeypatch.setenv("PROMPTCORE_BACKEND", "torch")
    torch.testing.assert_close(prefix_attention(*args), want, atol=0, rtol=0)
    assert calls == [1], "PROMPTCORE_BACKEND=torch must run the reference"


def test_default_scale_is_inverse_sqrt_d(device):
    args = make_inputs(1, 2, 3, 1, 24, 2, 1, torch.float32, device)
    torch.testing.assert_close(prefix_attention(*args), prefix_attention(*args, scale=1 / math.sqrt(24)))


def test_prefix_grads_two_stage_reduction_is_deterministic(device):
    """Enough rows for several partials of the prefix grads: right against the reference, bit-equal twice."""
    G, C, S, H, d, P = 1, 70, 8, 1, 16, 5
    args = make_inputs(G, C, S, H, d, P, 1, torch.float32, device, seed=11)
    assert C * S > pa.SPLIT_ROWS, "the shape must span more than one partial"
    fn = attention(per_class_lens(C, S).to(device))
    mask = [False, False, False, True, True]
    check_op(fn(prefix_attention), fn(prefix_attention_ref), args, mask, torch.float32, NAMES)
    runs = []
    for _ in range(2):
        kp, vp = (t.detach().clone().requires_grad_() for t in args[3:])
        out = fn(prefix_attention)(*args[:3], kp, vp)
        runs.append(torch.autograd.grad(out.square().sum(), (kp, vp)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("d", [16, 64, 100, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv", "dkdv_prefix"])
def test_autotune_configs(kernel, aligned, dtype, d):
    """Every class has configs; tiles fit tl.dot (>= 16), the prefix split is a whole number of query blocks,
    fp32 dots are the same for every config of a class (tuning never changes the numerics' kind)."""
    cfgs = pa.configs(kernel, d, dtype, aligned)
    assert cfgs
    for c in cfgs:
        assert c["BLOCK_M"] >= 16 and c["BLOCK_N"] >= 16 and c["num_warps"] in (4, 8)
        assert pa.SPLIT_ROWS % c["BLOCK_M"] == 0
    assert len({c["DOT"] for c in cfgs}) == 1
    if dtype == torch.float32 or not aligned:
        assert len(cfgs) == 1, "fp32 and unaligned classes fit one tile size (see the resource gate)"
    # fp32 head dim 128 on unaligned views: IEEE dots over 8 warps (3xTF32 spilled there)
    if dtype == torch.float32 and not aligned and d > 64 and kernel != "fwd":
        assert cfgs[0]["DOT"] == "ieee" and cfgs[0]["num_warps"] == 8


def test_launches_go_through_the_autotuner(monkeypatch, device):
    """Each launcher launches through a triton.autotune wrapper; under the interpreter with one config,
    the first (default) one; the prefix-grad partials are split by SPLIT_ROWS, not by the config's tiles."""
    from triton.runtime.autotuner import Autotuner

    seen = []
    run = Autotuner.run

    def spy(self, *args, **kwargs):
        seen.append((self.base_fn.__name__, [c.all_kwargs() for c in self.configs], args[0].shape))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", spy)
    G, C, S, H, d, P = 1, 40, 8, 1, 16, 3
    q, k, v, kp, vp = (t.requires_grad_() for t in make_inputs(G, C, S, H, d, P, 1, torch.float16, device))
    prefix_attention(q, k, v, kp, vp).float().square().sum().backward()
    names = [name for name, _, _ in seen]
    assert names == ["_prefix_attention_fwd_kernel", "_prefix_attention_bwd_dq_kernel",
                     "_prefix_attention_bwd_dkdv_kernel", "_prefix_attention_bwd_dkdv_kernel"]
    aligned = pa.vector_aligned(q, k, v, kp, vp)
    for (name, got, _), kind in zip(seen, ["fwd", "dq", "dkdv", "dkdv_prefix"]):
        want = pa.configs(kind, d, torch.float16, aligned)
        if utils.INTERPRETED:
            assert len(got) == 1
        assert got[0]["BLOCK_M"] == want[0]["BLOCK_M"] and got[0]["num_warps"] == want[0]["num_warps"]
    assert seen[-1][2][0] == -(-C * S // pa.SPLIT_ROWS), "one prefix-grad partial per SPLIT_ROWS query rows"


@pytest.mark.parametrize("d", [48, 80], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_every_autotune_config_is_right(kernel, d, monkeypatch, device):
    """The interpreter runs only a class's first config: run each other one too, forced first, against the
    reference (fp16, aligned fused-qkv views: the classes with more than one config)."""
    key = (kernel, False, True, d <= 64)
    args = make_inputs(1, 11, 6, 1, d, 5, 1, torch.float16, device, seed=4)
    assert pa.vector_aligned(*args) and len(pa._CONFIGS[key]) > 1
    fn = attention(per_class_lens(11, 6).to(device))
    for cfg in pa._CONFIGS[key][1:]:
        monkeypatch.setitem(pa._CONFIGS, key, [cfg])
        monkeypatch.setattr(utils, "_TUNERS", {})
        check_op(fn(prefix_attention), fn(prefix_attention_ref), args, [True] * 5, torch.float16, NAMES)
