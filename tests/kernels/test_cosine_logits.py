"""cosine_logits: Triton kernels against cosine_logits_ref (logits, entropy, argmax, all gradients)."""

import importlib
import math

import pytest
import torch
from kernel_checks import ATOL, assert_lowp_close, check_op

from promptcore.kernels import ScoredLogits, cosine_logits, cosine_logits_ref

cl = importlib.import_module("promptcore.kernels.cosine_logits")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ["image_features", "text_features", "logit_scale"]
# (B, N, E): 1s, primes, non-powers of two, several tiles along B and N, E past one block
SHAPES = [(1, 1, 1), (7, 131, 67), (65, 97, 40), (3, 200, 160)]


def make_inputs(B, N, E, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(B, E, generator=gen).to(device, dtype)
    txt = torch.randn(N, E, generator=gen).to(device, dtype)
    return img, txt, torch.tensor(math.log(30.0), device=device)


def scored(with_entropy):
    return lambda fn: (lambda a, b, s: fn(a, b, s, with_entropy))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_grads(shape, dtype, device):
    args = make_inputs(*shape, dtype, device)
    fn = scored(True)
    out, out_ref = check_op(fn(cosine_logits), fn(cosine_logits_ref), args, [True, True, True], dtype, NAMES)
    assert isinstance(out, ScoredLogits) and out.logits.dtype == dtype
    # entropy from fp32 statistics: compare with the fp32 reference on the same (rounded) inputs
    hi = cosine_logits_ref(args[0].float(), args[1].float(), args[2], with_entropy=True)
    torch.testing.assert_close(out.entropy, hi.entropy, atol=1e-4, rtol=1e-4)
    assert out.entropy.dtype == torch.float32 and out.argmax.dtype == torch.int64
    # argmax: the kernel's pick must be a maximum of the exact logits (near-ties may pick either)
    picked = hi.logits.gather(1, out.argmax[:, None])[:, 0]
    assert (picked >= hi.logits.max(dim=1).values - 1e-4).all()
    assert not out.entropy.requires_grad and not out.argmax.requires_grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_logits(dtype, device):
    args = make_inputs(33, 70, 24, dtype, device, seed=2)
    fn = scored(False)
    out, _ = check_op(fn(cosine_logits), fn(cosine_logits_ref), args, [True, True, False], dtype, NAMES)
    assert isinstance(out, torch.Tensor) and out.shape == (33, 70)


@pytest.mark.parametrize("tiles_per_step", [64, 2, 1])
def test_argmax_ties_take_the_first_index_and_uniform_entropy(tiles_per_step, monkeypatch, device):
    """Ties within a tile, across tiles and across steps of the combining pass go to the first index."""
    monkeypatch.setattr(cl, "STATS_TILES_PER_STEP", tiles_per_step)
    # +-1 entries over 16 dims: every norm is 4 and every cosine a multiple of 1/16, exact in any
    # summation order, so the tied logits are bit-equal whatever the tiling (random values tie only
    # up to rounding, which differs between BLAS builds under the interpreter).
    gen = torch.Generator().manual_seed(4)
    txt = torch.randint(0, 2, (200, 16), generator=gen).float() * 2 - 1
    txt[[4, 70, 150, 199]] = txt[3].clone()  # same tile, next tile, a later step of the combining pass
    img = txt[3].repeat(5, 1)
    img[torch.arange(5), torch.arange(5)] *= -1  # distinct images, each closest to class 3 and its copies
    img, txt, scale = img.to(device), txt.to(device), torch.tensor(math.log(30.0), device=device)
    out = cosine_logits(img, txt, scale, with_entropy=True)
    assert (out.logits[:, [4, 70, 150, 199]] == out.logits[:, 3:4]).all()  # real ties
    assert (out.argmax == 3).all()
    ref = cosine_logits_ref(img, txt, scale, with_entropy=True)
    torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    uniform = cosine_logits(img, img[:1].expand(40, -1), scale, with_entropy=True)
    torch.testing.assert_close(uniform.entropy, torch.full_like(uniform.entropy, math.log(40)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("logit_scale", [2.5, "0-d", "(1,)"])
def test_logit_scale_forms(logit_scale, device):
    img, txt, _ = make_inputs(4, 9, 8, torch.float32, device)
    if logit_scale == "0-d":
        logit_scale = torch.tensor(1.7, device=device)
    elif logit_scale == "(1,)":
        logit_scale = torch.tensor([1.7], device=device)
    torch.testing.assert_close(cosine_logits(img, txt, logit_scale), cosine_logits_ref(img, txt, logit_scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_and_expanded_inputs(dtype, device):
    B, N, E = 9, 21, 48
    gen = torch.Generator().manual_seed(6)
    img = torch.randn(E, B, generator=gen).to(device, dtype).t()  # column-major
    txt = torch.randn(N, 2 * E, generator=gen).to(device, dtype)[:, ::2]  # element stride 2
    assert img.stride() == (1, B) and txt.stride() == (2 * E, 2)
    scale = torch.tensor(2.0, device=device)
    check_op(scored(True)(cosine_logits), scored(True)(cosine_logits_ref), (img, txt, scale), [True, True, True],
             dtype, NAMES)
    rep = txt[:1].expand(N, E)  # stride 0 (copied before the kernel)
    check_op(scored(False)(cosine_logits), scored(False)(cosine_logits_ref), (img, rep, scale), [True, True, True],
             dtype, NAMES)


def test_grad_of_noncontiguous_upstream(device):
    """The gradient arriving from a transpose is strided too."""
    img, txt, scale = make_inputs(6, 11, 20, torch.float32, device)
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    cosine_logits(a, b, scale).t().pow(2).sum().backward()
    ra, rb = img.clone().requires_grad_(), txt.clone().requires_grad_()
    cosine_logits_ref(ra, rb, scale).t().pow(2).sum().backward()
    assert_lowp_close(a.grad, ra.grad, ra.grad, torch.float32, "image grad")
    assert_lowp_close(b.grad, rb.grad, rb.grad, torch.float32, "text grad")


@pytest.mark.filterwarnings("ignore:Input #.*double precision")
def test_gradcheck_fp32(device):
    """fp32, not fp64: the kernels (like the reference) compute in fp32, so loose eps and tolerances."""
    img, txt, _ = make_inputs(3, 5, 4, torch.float32, device)
    scale = torch.tensor(0.5, device=device)
    inputs = tuple(t.detach().requires_grad_() for t in (img, txt, scale))
    torch.autograd.gradcheck(cosine_logits, inputs, eps=1e-2, atol=5e-3, rtol=3e-2, nondet_tol=1e-5)


def test_backend_switch(monkeypatch, device):
    calls = []
    launcher = cl._cosine_logits_fwd
    monkeypatch.setattr(cl, "_cosine_logits_fwd", lambda *a: calls.append(1) or launcher(*a))
    img, txt, scale = make_inputs(4, 5, 8, torch.float32, device)
    want = cosine_logits_ref(img, txt, scale)
    torch.testing.assert_close(cosine_logits(img, txt, scale), want, atol=ATOL[torch.float32], rtol=1e-4)
    assert calls == [1]
    monkeypatch.setenv("PROMPTCORE_BACKEND", "torch")
    torch.testing.assert_close(cosine_logits(img, txt, scale), want, atol=0, rtol=0)
    assert calls == [1], "PROMPTCORE_BACKEND=torch must run the reference"


# -- per-group form: image (G, B, E) against text (G, N, E) ------------------------------------------------

# (G, B, N, E): all 1s; CoCoOp's one image per group; several B and N tiles per group; primes and odd E
GROUP_SHAPES = [(1, 1, 1, 1), (3, 1, 131, 67), (2, 65, 97, 40), (1, 7, 70, 24), (5, 3, 1, 33)]


def make_group_inputs(G, B, N, E, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(G, B, E, generator=gen).to(device, dtype)
    txt = torch.randn(G, N, E, generator=gen).to(device, dtype)
    return img, txt, torch.tensor(math.log(30.0), device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GROUP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_grouped_forward_and_grads(shape, dtype, device):
    G, B, N, _ = shape
    args = make_group_inputs(*shape, dtype, device, seed=sum(shape))
    fn = scored(True)
    out, _ = check_op(fn(cosine_logits), fn(cosine_logits_ref), args, [True, True, True], dtype, NAMES)
    assert isinstance(out, ScoredLogits) and out.logits.shape == (G, B, N) and out.logits.dtype == dtype
    assert out.entropy.shape == out.argmax.shape == (G, B)
    hi = cosine_logits_ref(args[0].float(), args[1].float(), args[2], with_entropy=True)
    torch.testing.assert_close(out.entropy, hi.entropy, atol=1e-4, rtol=1e-4)
    picked = hi.logits.gather(2, out.argmax[..., None])[..., 0]
    assert (picked >= hi.logits.max(dim=2).values - 1e-4).all()
    assert not out.entropy.requires_grad and not out.argmax.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_equals_each_group_alone(dtype, device):
    """Group g of a grouped call is the 2-D call on group g: same tiles, same arithmetic, same bits."""
    img, txt, scale = make_group_inputs(3, 5, 70, 24, dtype, device, seed=3)
    out = cosine_logits(img, txt, scale, with_entropy=True)
    for g in range(3):
        alone = cosine_logits(img[g], txt[g], scale, with_entropy=True)
        assert torch.equal(out.logits[g], alone.logits)
        assert torch.equal(out.entropy[g], alone.entropy) and torch.equal(out.argmax[g], alone.argmax)


@pytest.mark.parametrize("which", ["text", "image", "both"])
def test_grouped_stride0_group_dim(which, device):
    """One tensor expanded over the groups (stride 0) is read in place; its gradient sums over the groups."""
    img, txt, scale = make_group_inputs(4, 6, 37, 20, torch.float32, device, seed=5)
    if which in ("text", "both"):
        txt = txt[:1].expand(4, -1, -1)
    if which in ("image", "both"):
        img = img[:1].expand(4, -1, -1)
    assert (txt.stride(0) == 0) == (which != "image") and (img.stride(0) == 0) == (which != "text")
    fn = scored(True)
    out, ref = check_op(fn(cosine_logits), fn(cosine_logits_ref), (img, txt, scale), [True, True, True],
                        torch.float32, NAMES)
    assert torch.equal(out.argmax, ref.argmax)
    # gradients reach the unexpanded leaves (1, R, E) through expand's backward: a sum over the groups
    w = torch.randn(4, 6, 37, generator=torch.Generator().manual_seed(1)).to(device)
    grads = {}
    for fn in (cosine_logits, cosine_logits_ref):
        leaves = [t[:1].detach().clone().requires_grad_() if t.stride(0) == 0 else t for t in (img, txt)]
        (fn(*[t.expand(4, -1, -1) for t in leaves], scale) * w).sum().backward()
        grads[fn] = [t.grad for t in leaves if t.requires_grad]
    assert len(grads[cosine_logits]) == (2 if which == "both" else 1)
    for got, want in zip(grads[cosine_logits], grads[cosine_logits_ref]):
        assert got.shape[0] == 1
        assert_lowp_close(got, want, want, torch.float32, "grad summed over the groups")


def test_grouped_argmax_ties_and_uniform_entropy(device):
    """Exact ties in each group go to the group's first tied class; a group of equal classes has entropy log N."""
    gen = torch.Generator().manual_seed(8)
    G, N = 3, 150
    txt = torch.randint(0, 2, (G, N, 16), generator=gen).float() * 2 - 1  # +-1 entries: exact cosines
    img = torch.empty(G, 4, 16)
    tied = [(0, [1, 149]), (70, [63, 140]), (149, [])]  # first tied class: 0, 63 (a copy before it), 149
    for g, (first, copies) in enumerate(tied):
        txt[g, copies] = txt[g, first].clone()
        img[g] = txt[g, first]
        img[g, torch.arange(4), torch.arange(4)] *= -1  # distinct images, each closest to the tied classes
    img, txt, scale = img.to(device), txt.to(device), torch.tensor(math.log(30.0), device=device)
    out = cosine_logits(img, txt, scale, with_entropy=True)
    ref = cosine_logits_ref(img, txt, scale, with_entropy=True)
    for g, (first, copies) in enumerate(tied):
        assert (out.logits[g][:, copies] == out.logits[g][:, first:first + 1]).all()  # real ties
    assert out.argmax.tolist() == [[0] * 4, [63] * 4, [149] * 4] == ref.argmax.tolist()
    torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    same = img[:, :1].expand(-1, 40, -1).contiguous()
    uniform = cosine_logits(img, same, scale, with_entropy=True)
    torch.testing.assert_close(uniform.entropy, torch.full_like(uniform.entropy, math.log(40)), atol=1e-5, rtol=0)
    assert (uniform.argmax == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_out_dtype_fp32_from_low_precision_features(dtype, device):
    """``out_dtype=torch.float32``: fp32 logits of fp16/bf16 features (TPT's logits), gradients in the inputs' dtype."""
    img, txt, scale = make_group_inputs(2, 5, 33, 24, dtype, device, seed=9)
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    out = cosine_logits(a, b, scale, out_dtype=torch.float32)
    ref = cosine_logits_ref(img.float(), txt.float(), scale)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    out.pow(2).sum().backward()
    assert a.grad.dtype == b.grad.dtype == dtype
    ra, rb = img.float().requires_grad_(), txt.float().requires_grad_()
    cosine_logits_ref(ra, rb, scale).pow(2).sum().backward()
    lo_a, lo_b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    cosine_logits_ref(lo_a, lo_b, scale, out_dtype=torch.float32).pow(2).sum().backward()
    assert_lowp_close(a.grad, lo_a.grad, ra.grad, dtype, "image grad")
    assert_lowp_close(b.grad, lo_b.grad, rb.grad, dtype, "text grad")


@pytest.mark.filterwarnings("ignore:Input #.*double precision")
def test_grouped_gradcheck_fp32(device):
    img, txt, _ = make_group_inputs(2, 2, 3, 4, torch.float32, device)
    scale = torch.tensor(0.5, device=device)
    inputs = tuple(t.detach().requires_grad_() for t in (img, txt, scale))
    torch.autograd.gradcheck(cosine_logits, inputs, eps=1e-2, atol=5e-3, rtol=3e-2, nondet_tol=1e-5)


@pytest.mark.parametrize("img_shape,txt_shape,msg", [
    ((2, 3, 8), (5, 8), "per group"),
    ((3, 8), (2, 5, 8), "per group"),
    ((3, 8), (5, 7), "feature size E"),
    ((2, 3, 8), (3, 5, 8), "number of groups G"),
    ((1, 2, 3, 8), (1, 2, 5, 8), "per group"),
])
def test_shape_errors_are_named(img_shape, txt_shape, msg, device):
    for fn in (cosine_logits, cosine_logits_ref):
        with pytest.raises(ValueError, match=msg):
            fn(torch.randn(img_shape, device=device), torch.randn(txt_shape, device=device), 1.0)
    with pytest.raises(ValueError, match="out_dtype"):
        cosine_logits(torch.randn(3, 8, device=device), torch.randn(5, 8, device=device), 1.0, out_dtype=torch.int32)


# -- torch.library registration ------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_text", [False, True], ids=["per-group", "stride-0 text"])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_opcheck_registered_ops(with_entropy, shared_text, device):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of promptcore::cosine_logits."""
    img, txt, scale = make_group_inputs(2, 3, 9, 8, torch.float32, device, seed=11)
    if shared_text:  # one class matrix for every group: its norms come back (1, N)
        txt = txt[:1].expand(2, -1, -1)
    img, txt, scale = img.requires_grad_(), txt.detach().requires_grad_(), scale.requires_grad_()
    torch.library.opcheck(torch.ops.promptcore.cosine_logits.default, (img, txt, scale, with_entropy, torch.float32))
    *_, img_norm, txt_norm = torch.ops.promptcore.cosine_logits(img.detach(), txt.detach(), scale.detach(),
                                                                with_entropy, torch.float32)
    assert img_norm.shape == (2, 3) and txt_norm.shape == ((1, 9) if shared_text else (2, 9))
    d = torch.randn(2, 3, 9, device=device)
    for needs in ((True, True, True), (False, True, False)):
        torch.library.opcheck(torch.ops.promptcore.cosine_logits_backward.default,
                              (d, img.detach(), txt.detach(), scale.detach(), img_norm, txt_norm, *needs))


def test_backward_reuses_the_forward_norms(monkeypatch, device):
    """The row norms are computed once, by the forward, and saved for the backward."""
    calls = []
    real = cl._row_norms
    monkeypatch.setattr(cl, "_row_norms", lambda x, s: calls.append(tuple(x.shape)) or real(x, s))
    img, txt, scale = make_group_inputs(2, 3, 9, 8, torch.float32, device, seed=13)
    img, txt = img.requires_grad_(), txt.requires_grad_()
    cosine_logits(img, txt, scale).sum().backward()
    assert calls == [(2, 3, 8), (2, 9, 8)] and img.grad is not None and txt.grad is not None


def test_public_function_calls_the_registered_op(monkeypatch, device):
    calls = []
    real = cl._cosine_logits_fwd
    monkeypatch.setattr(cl, "_cosine_logits_fwd", lambda *a: calls.append(a[0].shape) or real(*a))
    img, txt, scale = make_group_inputs(2, 3, 9, 8, torch.float32, device, seed=12)
    out = cosine_logits(img[0], txt[0], scale)
    assert calls == [(1, 3, 8)] and out.shape == (3, 9)  # the 2-D call went through the op as G = 1
    fake_mode = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake_mode:
        fi, ft, fs = (fake_mode.from_tensor(t) for t in (img, txt, scale))
        logits, entropy, argmax, img_norm, txt_norm = torch.ops.promptcore.cosine_logits(fi, ft, fs, True,
                                                                                          torch.float16)
    assert logits.shape == (2, 3, 9) and logits.dtype == torch.float16
    assert img_norm.shape == (2, 3) and txt_norm.shape == (2, 9) and img_norm.dtype == torch.float32
    assert entropy.shape == argmax.shape == (2, 3) and argmax.dtype == torch.int64
    assert calls == [(1, 3, 8)]  # the fake kernel launched nothing


# -- autotuned tiles: one tuner per (kernel, fp32 or fp16/bf16, aligned) class; the interpreter runs INTERPRETER --

CLASSES = [(fp32, aligned) for fp32 in (False, True) for aligned in (True, False)]


def test_launches_go_through_the_autotuner(monkeypatch, device):
    """Forward (with and without stats) and backward launch through one tuner per class, keyed on the shape."""
    from triton.runtime.autotuner import Autotuner

    utils = importlib.import_module("promptcore.kernels._utils")
    monkeypatch.setattr(utils, "_TUNERS", {})
    img, txt, scale = make_group_inputs(2, 5, 48, 32, torch.float16, device, seed=13)
    img.requires_grad_()
    cosine_logits(img, txt, scale).float().sum().backward()
    cosine_logits(img.detach(), txt, scale, with_entropy=True)
    tuners = {k: v for k, v in utils._TUNERS.items() if k.startswith("cosine_logits.")}
    assert set(tuners) == {"cosine_logits.fwd.low.True", "cosine_logits.fwd.low.True.stats",
                           "cosine_logits.bwd.low.True"}
    for name, tuner in tuners.items():
        kind = name.split(".")[1]
        assert isinstance(tuner, Autotuner) and tuner.keys == cl._TUNE_KEYS[kind]
        assert tuner.fn is (cl._cosine_logits_fwd_kernel if kind == "fwd" else cl._cosine_logits_bwd_kernel)
        (block_rows, block_n, block_e), warps, stages = cl.INTERPRETER[kind]
        assert [(c.kwargs, c.num_warps, c.num_stages) for c in tuner.configs] == [
            (dict(zip(cl._NAMES[kind], (block_rows, block_n, block_e))), warps, stages)]


@pytest.mark.parametrize("fp32,aligned", CLASSES)
def test_autotune_config_lists(fp32, aligned, monkeypatch):
    """Aligned classes tune between a few configs; unaligned ones (scalar loads) keep one small tile."""
    monkeypatch.setattr(cl, "INTERPRETED", False)
    for kind in ("fwd", "bwd"):
        cfgs = cl.configs(kind, fp32, aligned)
        assert (len(cfgs) > 1) == aligned and len(cfgs) <= 4
        assert len({(tuple(m.values()), w, s) for m, w, s in cfgs}) == len(cfgs)  # no duplicates
        for meta, warps, stages in cfgs:
            assert set(meta) == set(cl._NAMES[kind]) and warps in (4, 8) and stages >= 1
            assert all(v >= 16 and v & (v - 1) == 0 for v in meta.values())
            if not aligned:
                assert max(meta.values()) <= 64
        # the with-stats class: the configs of the default's BLOCK_N (one partial per N tile, allocated up front)
        if kind == "fwd":
            stats = cl.configs(kind, fp32, aligned, with_stats=True)
            assert stats[0] == cfgs[0] and (len(stats) > 1) == aligned
            assert stats == [c for c in cfgs if c[0]["BLOCK_N"] == cfgs[0][0]["BLOCK_N"]]
            # a 16-row tile of the default's width exists: groups of <= 16 images tune too
            assert any(m["BLOCK_B"] == 16 for m, _, _ in stats) == aligned
    monkeypatch.setattr(cl, "INTERPRETED", True)
    assert cl.configs("fwd", fp32, aligned, True) == [({"BLOCK_B": 64, "BLOCK_N": 64, "BLOCK_E": 32}, 4, 3)]


def test_tile_prune():
    """early_config_prune: 16-row tiles only (of the listed ones) for <= 16 rows, nothing wider than N (bwd: M, E)
    needs when a narrower tile remains; the reduction dim is never pruned."""
    import triton

    def pruned(kind, tiles, **sizes):
        cfgs = [triton.Config(dict(zip(cl._NAMES[kind], t))) for t in tiles]
        return [tuple(c.kwargs[n] for n in cl._NAMES[kind]) for c in cl._fit_tiles(kind)(cfgs, sizes)]

    fwd = [(64, 128, 64), (16, 128, 64), (32, 128, 64), (64, 64, 64), (16, 64, 32)]
    assert pruned("fwd", fwd, B=64, N=1000, E=512) == fwd
    assert pruned("fwd", fwd, B=1, N=1000, E=512) == [(16, 128, 64), (16, 64, 32)]
    assert pruned("fwd", fwd, B=17, N=1000, E=512) == [(16, 128, 64), (32, 128, 64), (16, 64, 32)]
    assert pruned("fwd", fwd, B=16, N=40, E=8) == [(16, 64, 32)]  # BLOCK_E (the reduction) stays
    assert pruned("fwd", fwd[:1], B=1, N=1, E=1) == fwd[:1]  # nothing narrower: the narrowest stays
    bwd = [(64, 32, 64), (32, 64, 64), (32, 32, 32)]
    assert pruned("bwd", bwd, M=1000, N=5, E=512) == bwd
    assert pruned("bwd", bwd, M=20, N=5000, E=512) == [(32, 64, 64), (32, 32, 32)]
    assert pruned("bwd", bwd, M=20, N=5, E=24) == [(32, 32, 32)]


def _all_configs(kind):
    table = cl.FWD_CONFIGS if kind == "fwd" else cl.BWD_CONFIGS
    seen = {cl.INTERPRETER[kind][0]}  # tiles: warps and stages change nothing under the interpreter
    out = []
    for (fp32, _aligned), cfgs in table.items():
        for cfg in cfgs:
            if cfg[0] not in seen:
                seen.add(cfg[0])
                out.append((cfg, torch.float32 if fp32 else torch.bfloat16))
    return out


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_every_autotune_config_is_right(kind, monkeypatch, device):
    """The interpreter runs one config: force each other config of every class (forward with entropy/argmax,
    gradients) and compare with the reference; grouped inputs over several B, N and E tiles."""
    utils = importlib.import_module("promptcore.kernels._utils")
    forced = _all_configs(kind)
    assert len(forced) >= 4
    for i, (cfg, dtype) in enumerate(forced):
        monkeypatch.setitem(cl.INTERPRETER, kind, cfg)
        monkeypatch.setattr(utils, "_TUNERS", {})
        args = make_group_inputs(2, 19, 150, 80, dtype, device, seed=20 + i)
        out, _ = check_op(scored(True)(cosine_logits), scored(True)(cosine_logits_ref), args, [True, True, True],
                          dtype, NAMES)
        hi = cosine_logits_ref(args[0].float(), args[1].float(), args[2], with_entropy=True)
        torch.testing.assert_close(out.entropy, hi.entropy, atol=1e-4, rtol=1e-4)
        picked = hi.logits.gather(2, out.argmax[..., None])[..., 0]
        assert (picked >= hi.logits.max(dim=2).values - 1e-4).all(), cfg
        tuners = [t for name, t in utils._TUNERS.items() if name.startswith(f"cosine_logits.{kind}.")]
        assert tuners and all([c.kwargs for c in t.configs] == [dict(zip(cl._NAMES[kind], cfg[0]))] for t in tuners)
