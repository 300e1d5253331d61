"""TPT and ZERO: batched == sequential, fast == naive, official rules against direct implementations,
views, checkpoints, precision and bad input (folder runs: test_runner.py)."""

import contextlib
import importlib
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import MIXED_NAMES, assert_close_scaled, make_model, scaled_error
from test_checkpoints import write_dassl_checkpoint

import promptcore
from promptcore.checkpoints import CheckpointError
from promptcore.kernels import triton_available
from promptcore.optim import BatchedAdamW
from promptcore.selection import avg_entropy, select_confident, view_entropy, zero_vote
from promptcore.tpt import TPT
from promptcore.views import _apply_op, make_views, random_resized_crop_boxes

LR = 5e-3


def _views(n=3, v=8, seed=0, size=32):
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, 40 + 7 * i, 48 - 3 * i), dtype=torch.uint8, generator=gen) for i in range(n)]
    return make_views(images, v, size, generator=gen)


def _tpt(kind="quickgelu", dtype=torch.float32, **kw):
    opts = dict(n_views=8, selection=0.25, steps=1, precision="native" if dtype == torch.float32 else None)
    opts.update(kw)
    return TPT(make_model(kind, dtype), MIXED_NAMES, **opts)


def assert_ctx_close(got, want, lr=LR, steps=1, tight=1e-5, max_fraction=0.01):
    """FIDELITY's allowance: an AdamW first step moves an element by ~lr * sign(grad), so a rounding-level
    difference in a near-zero gradient flips it by 2 * lr; allow a tiny fraction of such elements."""
    diff = (got.double() - want.double()).abs()
    assert diff.max() <= 2 * lr * steps * 1.01 + tight, diff.max()
    assert (diff > tight).double().mean() <= max_fraction, (diff > tight).double().mean()


# -- the optimizer ---------------------------------------------------------------------------------


def test_batched_adamw_is_torch_adamw_per_row():
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, 8, generator=gen)
    grads = [torch.randn(3, 4, 8, generator=gen) * 10 ** -i for i in range(4)]
    batched = BatchedAdamW(start.clone(), lr=LR, weight_decay=0.01)
    for g in grads:
        batched.step(g)
    for n in range(3):
        p = torch.nn.Parameter(start[n].clone())
        opt = torch.optim.AdamW([p], lr=LR, weight_decay=0.01, foreach=False)
        for g in grads:
            p.grad = g[n].clone()
            opt.step()
        torch.testing.assert_close(batched.param[n], p.detach(), rtol=0, atol=0)
        torch.testing.assert_close(batched.exp_avg_sq[n], opt.state[p]["exp_avg_sq"], rtol=0, atol=0)


def test_batched_adamw_skips_rows_with_non_finite_grads():
    start = torch.randn(2, 3)
    opt = BatchedAdamW(start.clone(), lr=LR)
    grad = torch.tensor([[1.0, float("inf"), 0.5], [1.0, -2.0, 0.5]])
    opt.step(grad, torch.isfinite(grad).all(dim=1))
    assert torch.equal(opt.param[0], start[0]) and torch.equal(opt.exp_avg[0], torch.zeros(3))
    assert not torch.equal(opt.param[1], start[1])


# -- batched == sequential, fast == naive, direct implementation --------------------------------------


def _official_style(tpt, views, steps):
    """Official-style TPT of ONE image written directly: torch.optim.AdamW, full 77-token prompts, image
    features recomputed every step, softmax-mean entropy, selection on the first step only."""
    ctx = torch.nn.Parameter(tpt.prompt_learner.ctx.detach().clone().float())
    opt = torch.optim.AdamW([ctx], lr=tpt.lr, weight_decay=0.01, foreach=False)
    scale = tpt.model.logit_scale.exp()
    prompts, idx, losses = tpt.prompt_learner.prompts, None, []

    def logits_of(v):
        with torch.no_grad():
            img = F.normalize(tpt.model.encode_image(v), dim=-1)
        txt = F.normalize(tpt.engine.encode_naive(prompts, ctx.unsqueeze(0))[0], dim=-1)
        return scale * img @ txt.t()

    for _ in range(steps):
        out = logits_of(views)
        if idx is None:
            probs = out.double().softmax(-1)
            ent = -(probs * probs.log()).sum(-1)
            k = int(views.shape[0] * tpt.selection)
            idx = torch.tensor(sorted(range(len(ent)), key=lambda i: (ent[i].item(), i))[:k])
        mean_p = out[idx].softmax(-1).mean(0)
        loss = -(mean_p * mean_p.log()).sum()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = logits_of(views[:1])[0]
    return final, ctx.detach(), idx, losses


@pytest.mark.parametrize("steps", [1, 2])
def test_matches_direct_official_style_implementation(steps):
    tpt = _tpt(steps=steps)
    views = _views()
    out = tpt.adapt(views)
    for n in range(views.shape[0]):
        final, ctx, idx, losses = _official_style(tpt, views[n], steps)
        assert out.selected[n].tolist() == idx.tolist()
        np.testing.assert_allclose(out.losses[:, n].numpy(), losses, rtol=1e-5)
        assert_ctx_close(out.ctx[n], ctx, steps=steps)
        assert out.preds[n].item() == final.argmax().item()
        assert scaled_error(out.logits[n], final) < 2e-3
    assert (out.ctx - tpt.prompt_learner.ctx).abs().max() > LR / 2  # it did tune


def test_batched_equals_sequential():
    tpt = _tpt(steps=2)
    views = _views(n=4)
    together = tpt.adapt(views)
    for n in range(4):
        alone = tpt.adapt(views[n:n + 1])
        assert torch.equal(alone.selected[0], together.selected[n])
        assert_ctx_close(together.ctx[n], alone.ctx[0], steps=2)
        assert scaled_error(together.logits[n], alone.logits[0]) < 2e-3
        assert together.preds[n] == alone.preds[0]


@pytest.mark.parametrize("position", ["end", "front"])
def test_fast_path_equals_naive_path_through_tuning(position):
    views = _views(n=2)
    tpt = _tpt(steps=2, class_token_position=position)
    fast = tpt.adapt(views, text_path="fast")
    naive = tpt.adapt(views, text_path="naive")
    assert torch.equal(fast.selected, naive.selected)
    np.testing.assert_allclose(fast.losses.numpy(), naive.losses.numpy(), rtol=1e-5)
    assert_ctx_close(fast.ctx, naive.ctx, steps=2)
    assert scaled_error(fast.logits, naive.logits) < 2e-3
    assert torch.equal(fast.preds, naive.preds)


def test_selection_and_loss_against_direct_formulas():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 10, 6, generator=gen) * torch.linspace(0.5, 8, 10).view(1, 10, 1)
    idx = select_confident(logits, 0.3)
    assert idx.shape == (3, 3)  # int(10 * 0.3) = 3
    for n in range(3):
        p = logits[n].double().softmax(-1)
        ent = (-(p * p.log()).sum(-1)).tolist()
        assert idx[n].tolist() == sorted(range(10), key=lambda i: (ent[i], i))[:3]
        kept = p[idx[n]]
        mean_p = kept.mean(0)
        assert avg_entropy(logits[n, idx[n]]).item() == pytest.approx(-(mean_p * mean_p.log()).sum().item(), rel=1e-5)
    assert select_confident(logits, 0.1).shape == (3, 1)  # int(10 * 0.1) = 1, floor as the official int()
    assert select_confident(torch.randn(1, 64, 5), 0.1).shape == (1, 6)  # the official 64 views -> 6


def test_reset_between_images():
    views = _views(n=2)
    tpt = _tpt(steps=2)
    initial = tpt.prompt_learner.ctx.detach().clone()
    tpt.adapt(views[:1])  # image A
    after_a = tpt.adapt(views[1:])  # then B
    assert torch.equal(tpt.prompt_learner.ctx, initial)  # the module's context never changes
    fresh = _tpt(steps=2).adapt(views[1:])  # B alone, on a fresh module
    assert torch.equal(after_a.ctx, fresh.ctx) and torch.equal(after_a.logits, fresh.logits)


def test_entropy_loss_falls_with_a_small_step():
    tpt = _tpt(steps=3, lr=1e-4)
    out = tpt.adapt(_views(n=2))
    assert (out.losses[-1] < out.losses[0]).all()


# -- views -------------------------------------------------------------------------------------------


def test_views_are_seeded_and_valid():
    image = [torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))]
    a = make_views(image, 6, 32, generator=torch.Generator().manual_seed(5))
    b = make_views(image, 6, 32, generator=torch.Generator().manual_seed(5))
    c = make_views(image, 6, 32, generator=torch.Generator().manual_seed(6))
    assert a.shape == (1, 6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a[:, 1:], c[:, 1:])
    assert torch.equal(a[:, 0], c[:, 0])  # view 0 is not random
    boxes = random_resized_crop_boxes(50, 70, 500, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 50).all() and (left + w <= 70).all()
    area = (h * w).double() / (50 * 70)
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.3 < area.mean() < 0.7
    thin = random_resized_crop_boxes(4, 400, 20, torch.Generator().manual_seed(0))  # fallback: center crop
    assert (thin[:, 2] <= 4).all() and (thin[:, 1] + thin[:, 3] <= 400).all()
    tpt = _tpt(seed=3)
    preds = [tpt.predict(image * 2), tpt.predict(image * 2)]
    assert torch.equal(preds[0], preds[1])


def test_views_match_torchvision_pil_pipeline():
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TVF

    gen = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 6, 8, generator=gen), size=(60, 80), mode="bilinear")[0]
    image = (smooth * 255).round().to(torch.uint8)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    first = TVF.center_crop(TVF.resize(pil, 32, interpolation=InterpolationMode.BICUBIC), 32)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ours = make_views([image], 5, 32, generator=gen_a, mean=(0, 0, 0), std=(1, 1, 1))[0] * 255
    boxes = random_resized_crop_boxes(60, 80, 4, gen_b)
    flips = torch.rand(4, generator=gen_b) < 0.5
    ref = [TVF.pil_to_tensor(first).float()]
    for (top, left, h, w), flip in zip(boxes.tolist(), flips.tolist()):
        crop = TVF.resized_crop(pil, top, left, h, w, [32, 32], interpolation=InterpolationMode.BILINEAR)
        crop = TVF.hflip(crop) if flip else crop
        ref.append(TVF.pil_to_tensor(crop).float())
    ref = torch.stack(ref)
    assert (ours - ref).abs().mean() < 1.5  # grey levels; resampling filters differ slightly from PIL's
    assert (ours[1:] - ref[1:].flip(-1)).abs().mean() > 3 * (ours[1:] - ref[1:]).abs().mean() or not flips.any()


@pytest.mark.parametrize("op", ["autocontrast", "equalize", "posterize", "solarize"])
def test_augmix_point_ops_match_pil(op):
    from PIL import Image, ImageOps

    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 16, 16, generator=gen) * 180 + 30).round()
    level = torch.tensor([0.35, 0.9], dtype=torch.float64)
    got = _apply_op(op, x, level, torch.ones(2, dtype=torch.float64), 16)
    for i in range(2):
        pil = Image.fromarray(x[i].permute(1, 2, 0).byte().numpy())
        if op == "autocontrast":
            want = ImageOps.autocontrast(pil)
        elif op == "equalize":
            want = ImageOps.equalize(pil)
        elif op == "posterize":
            want = ImageOps.posterize(pil, 4 - int(level[i].item() * 4 / 10))
        else:
            want = ImageOps.solarize(pil, 256 - int(level[i].item() * 256 / 10))
        want = torch.from_numpy(np.array(want)).permute(2, 0, 1).float()
        assert torch.equal(got[i], want), (got[i] - want).abs().max()


def test_augmix_views_are_seeded_mixes():
    gen = torch.Generator().manual_seed(0)
    image = [torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=gen)]
    plain = make_views(image, 6, 32, generator=torch.Generator().manual_seed(2))
    mixed = make_views(image, 6, 32, generator=torch.Generator().manual_seed(2), augmix=True)
    again = make_views(image, 6, 32, generator=torch.Generator().manual_seed(2), augmix=True)
    assert torch.equal(mixed, again) and torch.equal(mixed[:, 0], plain[:, 0])
    assert not torch.allclose(mixed[:, 1:], plain[:, 1:])
    tpt = _tpt(augmix=True, seed=0)
    assert tpt.predict(image).shape == (1,)


# -- initialisation --------------------------------------------------------------------------------


def test_init_from_coop_checkpoint(tmp_path):
    tpt = _tpt(ctx_init=None, n_ctx=4)
    trained = torch.randn(4, 64) * 0.02
    path = write_dassl_checkpoint(tmp_path, {"ctx": trained, "token_prefix": torch.zeros(3, 1, 64)})
    info = tpt.init_from_coop(path)
    assert info["epoch"] == 50 and torch.equal(tpt.prompt_learner.ctx, trained)
    out = tpt.adapt(_views(n=1))
    assert (out.ctx[0] - trained).abs().max() > LR / 2
    # a promptcore CoOp file works too
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=1)
    file = coop.save(tmp_path / "coop.safetensors")
    tpt.init_from_coop(file)
    assert torch.equal(tpt.prompt_learner.ctx, coop.prompt_learner.ctx.detach())


def test_init_errors_name_the_problem_and_change_nothing(tmp_path):
    tpt = _tpt()  # "a photo of a": n_ctx 4
    before = tpt.prompt_learner.ctx.detach().clone()
    path16 = write_dassl_checkpoint(tmp_path / "a", {"ctx": torch.randn(16, 64)})
    with pytest.raises(CheckpointError, match="n_ctx=16"):
        tpt.init_from_coop(path16)
    csc = write_dassl_checkpoint(tmp_path / "b", {"ctx": torch.randn(7, 4, 64)})
    with pytest.raises(CheckpointError, match="class-specific"):
        tpt.init_from_coop(csc)
    cocoop = write_dassl_checkpoint(tmp_path / "c", _cocoop_state())
    with pytest.raises(CheckpointError, match="CoCoOp"):
        tpt.init_from_coop(cocoop)
    bad_meta = _cocoop_state()
    bad_meta["meta_net.linear1.weight"] = torch.randn(3, 32)
    with pytest.raises(CheckpointError, match="linear1.weight"):
        tpt.init_from_cocoop(write_dassl_checkpoint(tmp_path / "d", bad_meta))
    assert torch.equal(tpt.prompt_learner.ctx, before) and tpt.prompt_learner.meta_net is None


def _cocoop_state():
    gen = torch.Generator().manual_seed(4)
    return {"ctx": torch.randn(4, 64, generator=gen) * 0.02,
            "meta_net.linear1.weight": torch.randn(2, 32, generator=gen), "meta_net.linear1.bias": torch.randn(2),
            "meta_net.linear2.weight": torch.randn(64, 2, generator=gen) * 0.1,
            "meta_net.linear2.bias": torch.zeros(64)}


def test_init_from_cocoop_shifts_each_image_context(tmp_path):
    state = _cocoop_state()
    path = write_dassl_checkpoint(tmp_path, state)
    tpt = _tpt()
    assert tpt.load_official(path)["method"] == "cocoop"
    views = _views(n=2)
    feats = tpt.encode_views(views)
    f0 = feats[:, 0]  # official TPT+CoCoOp: the unnormalised view-0 feature goes into the meta-net
    hidden = torch.relu(f0 @ state["meta_net.linear1.weight"].t() + state["meta_net.linear1.bias"])
    bias = hidden @ state["meta_net.linear2.weight"].t() + state["meta_net.linear2.bias"]
    want = state["ctx"].unsqueeze(0) + bias.unsqueeze(1)
    assert_close_scaled(tpt.initial_context(feats), want, name="initial context")
    out = tpt.adapt(views)
    assert out.ctx.shape == (2, 4, 64) and not torch.equal(out.ctx[0], out.ctx[1])
    file = tpt.save(tmp_path / "tpt.safetensors")
    again = TPT.from_file(file, make_model())
    assert again.prompt_learner.meta_net is not None
    assert torch.equal(again.adapt(views).ctx, out.ctx)


# -- precision ---------------------------------------------------------------------------------------


def test_amp_is_the_official_cuda_autocast(monkeypatch):
    """"amp" is ``torch.cuda.amp.autocast()``: fp16 for CUDA tensors, a no-op elsewhere (fp32 on CPU)."""
    views = _views(n=2)
    amp, native = _tpt(precision="amp"), _tpt(precision="native")
    assert amp.compute_dtype == torch.float32 and amp.loss_scale == 1.0
    a, b = amp.adapt(views), native.adapt(views)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.ctx, b.ctx)  # exactly the fp32 computation
    assert TPT(make_model(), MIXED_NAMES).precision == "amp"  # the default for fp32 weights
    from promptcore.tower import TextTower

    monkeypatch.setattr(TextTower, "device", property(lambda self: torch.device("cuda")))
    assert amp.compute_dtype == torch.float16 and amp.loss_scale == 1000.0
    with warnings.catch_warnings():  # torch warns that CUDA autocast is unavailable on this machine
        warnings.simplefilter("ignore", UserWarning)
        assert amp.autocast().fast_dtype == torch.float16


def test_amp_bf16_opts_into_bf16_autocast_on_cpu():
    views = _views(n=2)
    amp = _tpt(precision="amp_bf16", lr=1e-9)
    exact = _tpt(precision="native", lr=1e-9)
    assert amp.compute_dtype == torch.bfloat16 and amp.loss_scale == 1.0
    a, b = amp.adapt(views), exact.adapt(views)
    assert a.ctx.dtype == torch.float32 and a.logits.dtype == torch.float32
    assert 1e-6 < scaled_error(a.logits, b.logits) < 5e-2  # really ran in bf16, within bf16 error
    tuned = _tpt(precision="amp_bf16").adapt(views)
    assert (tuned.ctx - amp.prompt_learner.ctx).abs().max() > LR / 2
    with pytest.raises(ValueError, match="precision 'amp_bf16'"):
        TPT(make_model(dtype=torch.bfloat16), MIXED_NAMES, precision="amp_bf16")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_low_precision_models(dtype, tol):
    views = _views(n=2)
    low = _tpt(dtype=dtype, lr=1e-9)
    assert low.precision == "native" and low.compute_dtype == dtype
    assert low.loss_scale == (1000.0 if dtype == torch.float16 else 1.0)
    ref = _tpt(lr=1e-9)
    with torch.no_grad():
        ref.prompt_learner.ctx.copy_(low.prompt_learner.ctx.float())
    assert scaled_error(low.adapt(views).logits, ref.adapt(views).logits) < tol
    tuned = _tpt(dtype=dtype).adapt(views)  # gradients reach the fp32 context (no fp16 underflow)
    moved = (tuned.ctx - low.prompt_learner.ctx.float()).abs()
    assert tuned.ctx.dtype == torch.float32 and (moved > LR / 2).double().mean() > 0.5


# -- ZERO --------------------------------------------------------------------------------------------


def _direct_zero(logits, selection):
    V = logits.shape[0]
    p = logits.double().softmax(-1)
    ent = (-(p * p.log()).sum(-1)).tolist()
    order = sorted(range(V), key=lambda i: (ent[i], i))
    k = int(V * selection)
    counts = Counter(logits[i].argmax().item() for i in order[:k])
    top = max(counts.values())
    ties = sorted(c for c, n in counts.items() if n == top)
    if len(ties) == 1:
        return ties[0]
    for i in order[k:]:  # official greedy_break: the first non-kept view voting for a tied class
        if logits[i].argmax().item() in ties:
            return logits[i].argmax().item()
    fallback = order[k] if k < V else order[0]
    return max(ties, key=lambda c: logits[fallback, c].item())


def test_zero_vote_against_direct_implementation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 12, 5, generator=gen) * 3
    logits[:10, :, :] = logits[:10, :, :].round()  # many near-ties
    preds, votes, selected = zero_vote(logits, 0.34)
    assert selected.shape == (40, 4) and (votes.sum(-1) == 4).all()
    assert preds.tolist() == [_direct_zero(x, 0.34) for x in logits]
    # a constructed tie: kept views vote 2 x class 1 and 2 x class 3; the next view votes for 3
    tie = torch.full((1, 6, 4), -5.0)
    for v, (cls, conf) in enumerate([(1, 9), (3, 9), (1, 8), (3, 8), (3, 2), (1, 1)]):
        tie[0, v, cls] = conf
    preds, votes, _ = zero_vote(tie, 4 / 6 + 1e-9)
    assert votes[0].tolist() == [0, 2, 0, 2] and preds.tolist() == [3] == [_direct_zero(tie[0], 4 / 6 + 1e-9)]


def test_zero_mode_on_views():
    tpt = _tpt()
    views = _views(n=3)
    out = tpt.zero(views, selection=0.5)
    feats = tpt.encode_views(views)
    with torch.no_grad():
        text = tpt.engine.encode_naive(tpt.prompt_learner.prompts, tpt.prompt_learner.ctx.unsqueeze(0))[0]
        logits = tpt.model.logit_scale.exp() * F.normalize(feats, dim=-1) @ F.normalize(text, dim=-1).t()
    assert out.preds.tolist() == [_direct_zero(x, 0.5) for x in logits]
    assert tpt.predict(torch.rand(2, 3, 40, 40), mode="zero").shape == (2,)


# -- scoring and selection through the one scoring op ------------------------------------------------


@contextlib.contextmanager
def _triton_scoring(monkeypatch):
    """The scoring op on its Triton path (interpreted on CPU), the rest of TPT on the default backend;
    yields the list of kernel launches it made."""
    cl = importlib.import_module("promptcore.kernels.cosine_logits")
    launches, launcher = [], cl._cosine_logits_fwd
    monkeypatch.setattr(cl, "_cosine_logits_fwd", lambda *a: launches.append(a[3]) or launcher(*a))

    def scoring(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setenv("PROMPTCORE_BACKEND", "triton")
            return cl.cosine_logits(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(promptcore.tpt, "cosine_logits", scoring)
        yield launches


@pytest.mark.skipif(not triton_available(), reason="triton is not installed on this platform")
def test_scoring_op_entropy_and_argmax_are_the_selection_formulas(monkeypatch):
    """The op's fused entropy/argmax (what TPT and ZERO select and vote with) against selection.py's own formula."""
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(4, 12, 16, generator=gen)
    text = torch.randn(4, 7, 16, generator=gen)
    with _triton_scoring(monkeypatch) as launches:
        logits, entropy, argmax = promptcore.tpt.cosine_logits(feats, text, 3.0, with_entropy=True,
                                                               out_dtype=torch.float32)
    assert launches == [True]
    torch.testing.assert_close(entropy, view_entropy(logits), atol=2e-5, rtol=2e-5)
    assert torch.equal(argmax, logits.argmax(dim=-1))
    assert torch.equal(select_confident(logits, 0.25, entropy), select_confident(logits, 0.25))
    for got, want in zip(zero_vote(logits, 0.25, entropy, argmax), zero_vote(logits, 0.25)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="one entropy per view"):
        select_confident(logits, 0.25, entropy[:, :5])


@pytest.mark.skipif(not triton_available(), reason="triton is not installed on this platform")
def test_tpt_and_zero_unchanged_with_the_triton_scoring_op(monkeypatch):
    """TPT's selection, loss, tuned context and prediction and ZERO's vote: the same through the fused op."""
    tpt = _tpt(steps=2)
    views = _views(n=2)
    feats = tpt.encode_views(views)
    want, want_zero = tpt.adapt_features(feats), tpt.zero_features(feats, 0.5)
    with _triton_scoring(monkeypatch) as launches:
        got, got_zero = tpt.adapt_features(feats), tpt.zero_features(feats, 0.5)
    assert launches == [True, False, False, True]  # step 1 with entropy, step 2, the prediction; ZERO
    assert torch.equal(got.selected, want.selected)
    np.testing.assert_allclose(got.losses.numpy(), want.losses.numpy(), rtol=1e-5)
    assert_ctx_close(got.ctx, want.ctx, steps=2)
    assert got.logits.dtype == torch.float32 and scaled_error(got.logits, want.logits) < 2e-3
    assert torch.equal(got.preds, want.preds)
    assert torch.equal(got_zero.selected, want_zero.selected) and torch.equal(got_zero.votes, want_zero.votes)
    assert torch.equal(got_zero.preds, want_zero.preds)
    assert scaled_error(got_zero.logits, want_zero.logits) < 1e-5


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_input_is_named_and_changes_nothing():
    model = make_model()
    flags = [p.requires_grad for p in model.parameters()]
    for kw, msg in [(dict(n_views=1), "n_views must be an integer >= 2"), (dict(selection=0), r"\(0, 1\]"),
                    (dict(selection=1.5), r"\(0, 1\]"), (dict(n_views=5, selection=0.1), "keeps no view"),
                    (dict(steps=0), "steps must be"), (dict(lr=-1.0), "lr must be"),
                    (dict(precision="fp8"), "unknown precision"), (dict(batch_size=0), "batch_size")]:
        with pytest.raises(ValueError, match=msg):
            TPT(model, MIXED_NAMES, **kw)
    assert [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(ValueError, match="precision 'amp'"):
        TPT(make_model(dtype=torch.float16), MIXED_NAMES, precision="amp")
    tpt = _tpt()
    before = tpt.prompt_learner.ctx.detach().clone()
    with pytest.raises(ValueError, match=r"\(N, V, 3, H, W\)"):
        tpt.adapt(torch.randn(8, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 2 views"):
        tpt.adapt(torch.randn(2, 1, 3, 32, 32))
    with pytest.raises(ValueError, match="keeps no view"):
        tpt.adapt(torch.randn(2, 3, 3, 32, 32))  # int(3 * 0.25) = 0
    with pytest.raises(ValueError, match="pixels"):
        tpt.adapt(torch.randn(2, 8, 3, 64, 64))
    with pytest.raises(ValueError, match="steps must be"):
        tpt.adapt(torch.randn(1, 8, 3, 32, 32), steps=0)
    with pytest.raises(ValueError, match="add a batch dimension"):
        tpt.predict(torch.rand(3, 40, 40))
    with pytest.raises(ValueError, match=r"image 1 must be a \(3, H, W\)"):
        tpt.predict([torch.rand(3, 40, 40), torch.rand(1, 40, 40)])
    with pytest.raises(TypeError, match="uint8"):
        tpt.predict(torch.zeros(1, 3, 40, 40, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown mode"):
        tpt.predict(torch.rand(1, 3, 40, 40), mode="fast")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        tpt.zero(torch.randn(1, 8, 3, 32, 32), selection=0.0)
    assert torch.equal(tpt.prompt_learner.ctx, before)
