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
