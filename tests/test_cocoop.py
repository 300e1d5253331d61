"""CoCoOp: the batched shared-prefix path against the official per-image loop, the official code
written out, initialisation, training, Dassl checkpoints, prompt files and bad input."""

import warnings
from collections import OrderedDict

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    MIXED_NAMES,
    assert_close_scaled,
    assert_within_naive_error,
    float64_copy,
    make_model,
    read_classnames,
    scaled_error,
)
from test_checkpoints import write_dassl_checkpoint

import promptcore
from promptcore import TextEngine
from promptcore.checkpoints import CheckpointError, read_prompt_file
from promptcore.cocoop import CoCoOp


def _features(model, batch, seed=0):
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.encode_image(images)


def _logits_and_grads(cocoop, image_features, path):
    """Logits through ``path`` and the gradients of a cross-entropy loss w.r.t. every learned tensor."""
    params = [p for p in cocoop.prompt_learner.parameters()]
    logits = cocoop.logits_from_image_features(image_features, path)
    labels = torch.arange(len(image_features)) % logits.shape[1]
    loss = F.cross_entropy(logits.double() if logits.dtype == torch.float64 else logits.float(), labels)
    return logits, torch.autograd.grad(loss, params)


def _check_fast_against_naive(cocoop, feats, reduction=64):
    """Fast logits and every gradient within 2x the official loop's error against a float64 oracle."""
    fast, g_fast = _logits_and_grads(cocoop, feats, "fast")
    naive, g_naive = _logits_and_grads(cocoop, feats, "naive")
    oracle, g_oracle = _logits_and_grads(float64_copy(cocoop), feats.double(), "naive")
    assert_within_naive_error(fast, naive, oracle, reduction=reduction, name="logits")
    # Each gradient entry sums a contribution from every class and context token of every image: that
    # is the reduction its rounding error grows with (and the meta-net's gradients cancel heavily).
    grad_reduction = len(cocoop.classnames) * cocoop.n_ctx * reduction
    names = [n for n, _ in cocoop.prompt_learner.named_parameters()]
    for name, a, b, o in zip(names, g_fast, g_naive, g_oracle):
        assert b.abs().max() > 0, name
        assert_within_naive_error(a, b, o, reduction=grad_reduction, name=name)
    return fast, naive


def _perturb(cocoop, scale=0.05, seed=1):
    """Move the learned tensors away from their init so every gradient is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cocoop.prompt_learner.parameters():
            p.add_((scale * torch.randn(p.shape, generator=gen)).to(p.dtype))


@pytest.mark.parametrize("kind", ["quickgelu", "gelu_ls", "custom_text"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_equals_official_loop_fp32(kind, batch):
    model = make_model(kind)
    cocoop = CoCoOp(model, MIXED_NAMES, seed=3)
    _perturb(cocoop)
    feats = _features(model, batch)
    fast, naive = _check_fast_against_naive(cocoop, feats)
    assert fast.shape == naive.shape == (batch, len(MIXED_NAMES))
    names = [n for n, _ in cocoop.prompt_learner.named_parameters()]
    assert names == ["ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                     "meta_net.linear2.bias"]
    text_fast = cocoop.encode_text(feats, "fast")
    text_naive = cocoop.encode_text(feats, "naive")
    assert text_fast.shape == (batch, len(MIXED_NAMES), 32)
    text_oracle = float64_copy(cocoop).encode_text(feats.double(), "naive")
    assert_within_naive_error(text_fast, text_naive, text_oracle, name="text features")
    if batch > 1:  # each image really has its own prompts
        assert scaled_error(text_fast[0], text_fast[1]) > 1e-4


def _official_forward(model, names, ctx, meta_net, images):
    """KaiyangZhou/CoOp CoCoOp CustomCLIP.forward at test time, written out with open_clip modules."""
    names = [n.replace("_", " ") for n in names]
    ids = open_clip.tokenize([f"a photo of a {n}." for n in names])
    with torch.no_grad():
        emb = model.token_embedding(ids)
    prefix, suffix = emb[:, :1], emb[:, 1 + ctx.shape[0]:]
    img = model.encode_image(images)
    img = img / img.norm(dim=-1, keepdim=True)
    bias = meta_net(img).unsqueeze(1)
    ctx_shifted = ctx.unsqueeze(0) + bias
    rows = []
    for ctx_i, img_i in zip(ctx_shifted, img):
        prompts = torch.cat([prefix, ctx_i.unsqueeze(0).expand(len(names), -1, -1), suffix], dim=1)
        x = prompts + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        txt = x[torch.arange(len(names)), ids.argmax(dim=-1)] @ model.text_projection
        txt = txt / txt.norm(dim=-1, keepdim=True)
        rows.append(model.logit_scale.exp() * img_i @ txt.t())
    return torch.stack(rows)


def test_matches_official_code_written_out():
    model = make_model("quickgelu")
    cocoop = CoCoOp(model, MIXED_NAMES, seed=0)
    _perturb(cocoop)
    learner = cocoop.prompt_learner
    assert cocoop.prompt_prefix == "a photo of a" and cocoop.n_ctx == 4
    with torch.no_grad():  # the default init is the embedding of "a photo of a"
        init = model.token_embedding(open_clip.tokenize(["a photo of a"]))[0, 1:5]
    assert not torch.equal(learner.ctx.detach(), init)  # perturbed; the init itself is checked below
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    expected = _official_forward(model, MIXED_NAMES, learner.ctx, learner.meta_net, images)
    learner64 = float64_copy(learner)
    oracle = _official_forward(float64_copy(model), MIXED_NAMES, learner64.ctx, learner64.meta_net, images.double())
    for path in ("fast", "naive"):
        got = cocoop(images, text_path=path)
        assert_within_naive_error(got, expected, oracle, name=path)
    fresh = CoCoOp(make_model("quickgelu"), MIXED_NAMES, seed=0)
    torch.testing.assert_close(fresh.prompt_learner.ctx.detach(), init, rtol=0, atol=0)
    assert torch.equal(fresh.tokenized_prompts, open_clip.tokenize([f"a photo of a {n.replace('_', ' ')}."
                                                                     for n in MIXED_NAMES]))


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_error_within_naive_error(dtype, atol):
    """In fp16/bf16 the fast path's error against an fp32 oracle is at most ~2x the official loop's."""
    ref = CoCoOp(make_model("quickgelu"), MIXED_NAMES, ctx_init=None, seed=5)
    low = CoCoOp(make_model("quickgelu", dtype), MIXED_NAMES, ctx_init=None, seed=5)
    assert low.prompt_learner.ctx.dtype == low.prompt_learner.meta_net.linear1.weight.dtype == dtype
    _perturb(low)
    with torch.no_grad():  # same learned values in both precisions
        for p_ref, p_low in zip(ref.prompt_learner.parameters(), low.prompt_learner.parameters()):
            p_ref.copy_(p_low.float())
    feats = _features(ref.model, 3)  # the same image features: the comparison is about the text side
    fast, g_fast = _logits_and_grads(low, feats.to(dtype), "fast")
    naive, g_naive = _logits_and_grads(low, feats.to(dtype), "naive")
    oracle, g_oracle = _logits_and_grads(ref, feats, "naive")
    assert fast.dtype == naive.dtype == dtype
    assert_within_naive_error(fast, naive, oracle, atol=atol, name="logits")
    # Gradients: the worst error over all learned tensors, each scaled to its oracle's largest entry
    # (the tiny model's meta-net hidden layer has 2 units, too few for a stable per-tensor maximum).
    def worst(grads):
        return max(scaled_error(g, o) for g, o in zip(grads, g_oracle))

    assert worst(g_fast) <= 2 * worst(g_naive) + atol


def test_fast_path_builds_no_full_prompts(monkeypatch):
    """One batched pass: no naive encode, no assembled tensor of 77 positions, one prefix per image."""
    from promptcore import engine as engine_mod

    model = make_model("gelu_ls")
    cocoop = CoCoOp(model, MIXED_NAMES, seed=0).train()
    feats = _features(model, 3)
    naive_calls, shapes = [], []
    original_naive, original_assemble = TextEngine.encode_naive, engine_mod.assemble_prompts

    def counting_naive(self, *args, **kwargs):
        naive_calls.append(1)
        return original_naive(self, *args, **kwargs)

    def recording_assemble(*args, **kwargs):
        out = original_assemble(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(TextEngine, "encode_naive", counting_naive)
    monkeypatch.setattr(engine_mod, "assemble_prompts", recording_assemble)
    logits = cocoop.logits_from_image_features(feats, "fast")
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert naive_calls == []
    prefix, *suffixes = shapes  # the engine may split the classes' suffixes into length buckets
    prompts = cocoop.prompt_learner.prompts
    assert prefix == (3, 1, prompts.prefix_len, 64)  # SOS + ctx + bias, once per image
    assert sum(s[1] for s in suffixes) == len(MIXED_NAMES)  # each class's suffix once, shared by the images
    assert all(s[0] == 1 and s[2] <= prompts.suffix_len and s[3] == 64 for s in suffixes)
    assert prompts.prefix_len + prompts.suffix_len < 77
    # the official loop does build full prompts, once per image: the checks above can fail
    shapes.clear()
    cocoop.logits_from_image_features(feats, "naive")
    assert len(naive_calls) == 3 and all(s[-2] == 77 for s in shapes)


def test_image_chunks_equal_one_pass():
    model = make_model("quickgelu")
    cocoop = CoCoOp(model, MIXED_NAMES, seed=0)
    feats = _features(model, 5)
    with torch.no_grad():
        whole = cocoop.logits_from_image_features(feats, "fast")
        chunked = cocoop.logits_from_image_features(feats, "fast", max_images=2)
    assert_close_scaled(chunked, whole, name="chunked logits")
    with pytest.raises(ValueError, match="max_images must be at least 1"):
        cocoop.encode_text(feats, "fast", max_images=0)


def test_seeded_init_follows_official_order_and_spares_global_rng():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    cocoop = CoCoOp(make_model(), MIXED_NAMES, n_ctx=16, ctx_init=None, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert cocoop.prompt_prefix == " ".join(["X"] * 16)
    torch.manual_seed(7)  # the official PromptLearner: ctx ~ N(0, 0.02), then the meta-net's nn.Linear inits
    ctx = torch.nn.init.normal_(torch.empty(16, 64), std=0.02)
    linear1, linear2 = torch.nn.Linear(32, 2), torch.nn.Linear(2, 64)
    learner = cocoop.prompt_learner
    assert torch.equal(learner.ctx.detach(), ctx)
    assert 0.015 < float(learner.ctx.detach().std()) < 0.025
    assert torch.equal(learner.meta_net.linear1.weight.detach(), linear1.weight.detach())
    assert torch.equal(learner.meta_net.linear2.bias.detach(), linear2.bias.detach())
    assert isinstance(learner.meta_net.relu, torch.nn.ReLU)
    again = CoCoOp(make_model(), MIXED_NAMES, n_ctx=16, ctx_init=None, seed=7)
    for a, b in zip(again.prompt_learner.parameters(), learner.parameters()):
        assert torch.equal(a, b)


def test_vit_b16_sizes_come_from_the_model():
    model = make_model("vit_b16")
    names = read_classnames("imagenet")[:10]
    cocoop = CoCoOp(model, names, seed=0)
    meta = cocoop.prompt_learner.meta_net
    assert meta.linear1.weight.shape == (32, 512) and meta.linear2.weight.shape == (512, 32)
    assert cocoop.prompt_learner.ctx.shape == (4, 512)
    feats = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    fast, _ = _check_fast_against_naive(cocoop, feats, reduction=512)
    assert fast.shape == (2, 10)


def test_eval_never_serves_stale_features_and_class_swap():
    model = make_model()
    cocoop = CoCoOp(model, MIXED_NAMES, seed=0).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = cocoop(images)
        # (a constant shift of every dimension would be invisible: LayerNorm removes it)
        cocoop.prompt_learner.meta_net.linear2.bias.add_(torch.linspace(-0.5, 0.5, 64))
        changed = cocoop(images)
        assert not torch.allclose(changed, first)
        assert_close_scaled(changed, cocoop(images, text_path="naive"), name="eval logits")
    with pytest.raises(TypeError, match="depend on the image"):
        cocoop.text_features()
    cocoop.set_classnames(["cat", "great white shark"])
    fresh = CoCoOp(make_model(), ["cat", "great white shark"], seed=0)
    fresh.load_state_dict(cocoop.state_dict())
    with torch.no_grad():
        swapped = cocoop(images)
        assert swapped.shape == (2, 2)
        torch.testing.assert_close(swapped, fresh(images), rtol=0, atol=0)


def test_non_causal_tower_uses_the_official_loop():
    from promptcore import engine as engine_mod

    engine_mod._reported_fallbacks.clear()
    model = make_model("bidirectional")
    with pytest.raises(ValueError, match="not exact"):
        CoCoOp(model, MIXED_NAMES, text_path="fast")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cocoop = CoCoOp(model, MIXED_NAMES, seed=0)
        feats = _features(model, 2)
        with torch.no_grad():
            auto = cocoop.logits_from_image_features(feats)
    assert any("full-prompt text path" in str(w.message) for w in caught)
    with torch.no_grad():
        torch.testing.assert_close(auto, cocoop.logits_from_image_features(feats, "naive"), rtol=0, atol=0)


# -- checkpoints -------------------------------------------------------------------------------


def _official_state(cocoop, seed=11, dtype=torch.float32):
    """A trained-looking official CoCoOp state dict (with the token_prefix/suffix the trainer saves)."""
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict((k, torch.randn(v.shape, generator=gen).to(dtype))
                        for k, v in cocoop.prompt_learner.state_dict().items())
    with torch.no_grad():
        emb = cocoop.model.token_embedding(cocoop.tokenized_prompts)
    state["token_prefix"] = emb[:, :1].to(dtype)
    state["token_suffix"] = emb[:, 1 + cocoop.n_ctx:].to(dtype)
    return state


def test_dassl_checkpoint_loads(tmp_path):
    cocoop = CoCoOp(make_model(), MIXED_NAMES, seed=0)
    state = _official_state(cocoop)
    path = write_dassl_checkpoint(tmp_path, state, epoch=10)
    info = cocoop.load_official(tmp_path)
    assert info["epoch"] == 10 and info["file"] == str(path)
    for key, value in cocoop.prompt_learner.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    images = torch.randn(2, 3, 32, 32)
    learner = cocoop.prompt_learner
    with torch.no_grad():
        expected = _official_forward(cocoop.model, MIXED_NAMES, learner.ctx, learner.meta_net, images)
        assert_close_scaled(cocoop(images), expected, name="logits")
    half = CoCoOp(make_model(), MIXED_NAMES, seed=0)  # an fp16 (official PREC fp16) file into an fp32 module
    half.load_official(write_dassl_checkpoint(tmp_path / "fp16", _official_state(cocoop, 3, torch.float16)))
    assert half.prompt_learner.meta_net.linear1.weight.dtype == torch.float32


def test_wrong_checkpoints_are_named_and_change_nothing(tmp_path):
    cocoop = CoCoOp(make_model(), MIXED_NAMES, seed=0)
    good = _official_state(cocoop)
    before = {k: v.clone() for k, v in cocoop.prompt_learner.state_dict().items()}

    def with_(**changes):
        state = OrderedDict(good)
        for key, value in changes.items():
            key = key.replace("__", ".")
            if value is None:
                del state[key]
            else:
                state[key] = value
        return state

    cases = {
        "coop": ({"ctx": torch.randn(4, 64)}, "holds CoOp prompts, not CoCoOp"),
        "maple": ({"prompt_learner.ctx": torch.randn(2, 64), "prompt_learner.proj.weight": torch.randn(96, 64),
                   "prompt_learner.compound_prompts_text.0": torch.randn(2, 64),
                   "image_encoder.conv1.weight": torch.randn(1)}, "holds MaPLe prompts"),
        "n_ctx": (with_(ctx=torch.randn(16, 64)), "ctx is n_ctx=16, width=64, this CoCoOp has n_ctx=4, width=64"),
        "width": (with_(ctx=torch.randn(4, 512)), "width=512"),
        "vis_dim": (with_(meta_net__linear1__weight=torch.randn(32, 512)),
                    "image feature dim 512 -> hidden 32, this CoCoOp has image feature dim 32 -> hidden 2"),
        "hidden": (with_(meta_net__linear2__weight=torch.randn(64, 8)), "hidden 8 -> width 64"),
        "missing": (with_(meta_net__linear2__bias=None), "lacks meta_net.linear2.bias"),
    }
    for name, (state, message) in cases.items():
        path = write_dassl_checkpoint(tmp_path / name, state)
        with pytest.raises(CheckpointError, match=message):
            cocoop.load_official(path)
        for key, value in cocoop.prompt_learner.state_dict().items():
            assert torch.equal(value, before[key]), (name, key)


def test_safetensors_round_trip(tmp_path):
    cocoop = CoCoOp(make_model(), MIXED_NAMES, n_ctx=6, ctx_init=None, seed=0)
    _perturb(cocoop)
    path = cocoop.save(tmp_path / "cocoop.safetensors", model_name="tiny-test")
    tensors, meta = read_prompt_file(path)
    assert meta["method"] == "cocoop" and meta["options"] == {"n_ctx": 6, "ctx_init": None}
    assert sorted(tensors) == sorted(cocoop.prompt_learner.state_dict())
    restored = CoCoOp.from_file(path, make_model())
    assert restored.classnames == MIXED_NAMES and restored.n_ctx == 6 and restored.model_name == "tiny-test"
    for a, b in zip(restored.prompt_learner.parameters(), cocoop.prompt_learner.parameters()):
        assert torch.equal(a, b)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), cocoop(images), rtol=0, atol=0)
    # another method's file, or other shapes: named, nothing changed
    coop_file = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4).save(tmp_path / "coop.safetensors")
    before = [p.detach().clone() for p in restored.prompt_learner.parameters()]
    with pytest.raises(CheckpointError, match="holds coop prompts, this module is cocoop"):
        restored.load(coop_file)
    other = CoCoOp(make_model(), MIXED_NAMES, seed=1).save(tmp_path / "n4.safetensors")
    with pytest.raises(CheckpointError, match="n_ctx=4, width=64, this CoCoOp has n_ctx=6"):
        restored.load(other)
    assert all(torch.equal(a, b) for a, b in zip(restored.prompt_learner.parameters(), before))


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_named_and_changes_nothing():
    model = make_model()
    flags = [p.requires_grad for p in model.parameters()]
    long_name = " ".join(["antidisestablishmentarianism"] * 20)
    with pytest.raises(promptcore.PromptTooLongError, match="antidisestablishmentarianism"):
        CoCoOp(model, ["dog", long_name])
    with pytest.raises(ValueError, match="empty"):
        CoCoOp(model, [])
    with pytest.raises(ValueError, match="n_ctx must be an integer >= 1"):
        CoCoOp(model, ["dog"], n_ctx=0, ctx_init=None)
    with pytest.raises(ValueError, match="unknown text path"):
        CoCoOp(model, ["dog"], text_path="quick")
    assert [p.requires_grad for p in model.parameters()] == flags  # nothing frozen by failed constructions
    cocoop = CoCoOp(model, ["dog", "cat"], seed=0)  # bad images: tests/test_bad_input.py, for every method
    with pytest.raises(ValueError, match=r"image features must be \(B, 32\), got \(2, 64\)"):
        cocoop.logits_from_image_features(torch.randn(2, 64))
    with pytest.raises(ValueError, match="B = 0"):
        cocoop.encode_text(torch.randn(0, 32))
    with pytest.raises(ValueError, match="unknown text path"):
        cocoop(torch.randn(1, 3, 32, 32), text_path="quick")
    before = cocoop.tokenized_prompts.clone()
    with pytest.raises(promptcore.PromptTooLongError):
        cocoop.set_classnames(["dog", long_name])
    assert torch.equal(cocoop.tokenized_prompts, before) and cocoop.classnames == ["dog", "cat"]
