"""MaPLe against independent official-style oracles (sequence-first loops, explicit concatenation)."""

import copy
import functools
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
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
from promptcore.checkpoints import CheckpointError
from promptcore.maple import MaPLe, encode_image_with_prompts
from promptcore.prompts import PromptTooLongError
from promptcore.tower import UnsupportedModelError

NAMES = ["dog", "great white shark", "x", "2012 BMW M3 coupe", "a_very_long class name with many words"]
TEXT_LAYERS = 3


@functools.lru_cache(maxsize=None)
def _build_vit(vision_width: int, vision_layers: int, dtype_name: str, seed: int, extra: tuple = ()):
    import open_clip
    from open_clip.model import convert_weights_to_lp

    dtype = getattr(torch, dtype_name)
    cast = dtype if dtype != torch.float32 else None
    vision = dict(image_size=32, patch_size=16, width=vision_width, layers=vision_layers, head_width=16)
    vision.update(dict(extra))
    text = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=TEXT_LAYERS)
    torch.manual_seed(seed)
    model = open_clip.CLIP(32, vision, text, quick_gelu=True, cast_dtype=cast)
    if dtype != torch.float32:
        convert_weights_to_lp(model, dtype)
    return model.eval()


def vit_model(vision_width=48, vision_layers=4, dtype=torch.float32, seed=0, **extra):
    """A fresh tiny CLIP: text width 64 (3 blocks), ViT of the given width (head width 16)."""
    return copy.deepcopy(_build_vit(vision_width, vision_layers, str(dtype).replace("torch.", ""), seed,
                                    tuple(sorted(extra.items()))))


def _images(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomize(maple, seed=1, scale=0.05):
    """Move every prompt parameter off its init (deep prompts of zero effect would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in maple.prompt_learner.parameters():
            p.add_((scale * torch.randn(p.shape, generator=gen)).to(p.dtype))


# -- independent official-style oracle --------------------------------------------------------------


def _official_block(blk, x, attn_mask=None):
    """OpenAI CLIP's residual block on sequence-first x (L, N, D), written out with F.multi_head_attention_forward."""
    attn = blk.attn
    h = blk.ln_1(x)
    mask = attn_mask.to(h.dtype) if attn_mask is not None else None
    a = F.multi_head_attention_forward(h, h, h, h.shape[-1], attn.num_heads, attn.in_proj_weight, attn.in_proj_bias,
                                       None, None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias,
                                       training=False, need_weights=False, attn_mask=mask)[0]
    x = x + a
    return x + blk.mlp(blk.ln_2(x))


def official_text(maple):
    """MaPLe's TextEncoder: [prefix, ctx, suffix] concatenated, deep prompts concatenated in before blocks 1..J-1."""
    model, learner, n = maple.model, maple.prompt_learner, maple.n_ctx
    dtype = model.transformer.resblocks[0].mlp.c_fc.weight.dtype
    ids = maple.tokenized_prompts
    C, L = ids.shape
    with torch.no_grad():
        emb = model.token_embedding(ids).to(dtype)
    ctx = learner.ctx.to(dtype).unsqueeze(0).expand(C, -1, -1)
    x = torch.cat([emb[:, :1], ctx, emb[:, 1 + n:]], dim=1) + model.positional_embedding.to(dtype)
    x = x.permute(1, 0, 2)
    mask = torch.full((L, L), float("-inf"), dtype=x.dtype).triu(1)
    deep = list(learner.compound_prompts_text)
    counter = 0
    for i, blk in enumerate(model.transformer.resblocks):
        if i > 0 and counter < len(deep):
            textual = deep[counter].expand(C, -1, -1).permute(1, 0, 2).to(dtype)
            x = torch.cat([x[:1], textual, x[1 + n:]], dim=0)
            counter += 1
        x = _official_block(blk, x, mask)
    x = model.ln_final(x.permute(1, 0, 2)).to(dtype)
    return x[torch.arange(C), ids.argmax(dim=-1)] @ model.text_projection


def official_visual_prompts(learner):
    shared = F.linear(learner.ctx, learner.proj.weight, learner.proj.bias)
    deep = [F.linear(p, lin.weight, lin.bias)
            for p, lin in zip(learner.compound_prompts_text, learner.compound_prompt_projections)]
    return shared, deep


def official_image(visual, images, shared=None, deep=()):
    """VisionTransformer_MaPLe.forward: prompts concatenated after [CLS + patches], last n replaced per block."""
    dtype = visual.conv1.weight.dtype
    x = visual.conv1(images.to(dtype))
    B, W = x.shape[:2]
    x = x.reshape(B, W, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.to(dtype) + torch.zeros(B, 1, W, dtype=dtype), x], dim=1)
    x = x + visual.positional_embedding.to(dtype)
    n = 0
    if shared is not None:
        n = shared.shape[0]
        x = torch.cat([x, shared.expand(B, -1, -1).to(dtype)], dim=1)
    x = visual.ln_pre(x).permute(1, 0, 2)
    counter = 0
    for i, blk in enumerate(visual.transformer.resblocks):
        if i > 0 and counter < len(deep):
            x = torch.cat([x[: x.shape[0] - n], deep[counter].expand(B, -1, -1).permute(1, 0, 2).to(dtype)], dim=0)
            counter += 1
        x = _official_block(blk, x)
    x = visual.ln_post(x.permute(1, 0, 2)[:, 0])
    return x @ visual.proj


def official_logits(maple, images):
    text = official_text(maple)
    shared, deep = official_visual_prompts(maple.prompt_learner)
    img = official_image(maple.model.visual, images, shared, deep)
    img = img / img.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return maple.model.logit_scale.exp() * img @ text.t()


def _grads(out, params):
    grads = torch.autograd.grad(out.double().pow(2).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# -- construction -----------------------------------------------------------------------------------


def test_official_layout_keys_and_init():
    model = vit_model(vision_width=48)
    maple = MaPLe(model, NAMES, depth=3)
    state = maple.prompt_learner.state_dict()
    assert list(state) == ["ctx", "proj.weight", "proj.bias", "compound_prompts_text.0", "compound_prompts_text.1",
                           "compound_prompt_projections.0.weight", "compound_prompt_projections.0.bias",
                           "compound_prompt_projections.1.weight", "compound_prompt_projections.1.bias"]
    assert state["proj.weight"].shape == (48, 64) and state["compound_prompts_text.0"].shape == (2, 64)
    # ctx = embeddings of "a photo" (the first 2 tokens) while the prompt keeps the whole phrase
    tok = maple.tokenizer
    phrase_ids = tok(["a photo of a"])[0]
    torch.testing.assert_close(maple.prompt_learner.ctx.detach(), model.token_embedding.weight[phrase_ids[1:3]],
                               rtol=0, atol=0)
    expected_ids = tok([f"a photo of a {name.replace('_', ' ')}." for name in NAMES])
    assert torch.equal(maple.tokenized_prompts, expected_ids)
    # _get_clones: all deep projections start as copies of one Linear
    p0, p1 = maple.prompt_learner.compound_prompt_projections
    assert torch.equal(p0.weight, p1.weight) and torch.equal(p0.bias, p1.bias)
    assert p0.weight.data_ptr() != p1.weight.data_ptr()
    # CLIP frozen, all prompt parameters trainable
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in maple.prompt_learner.parameters())


def test_seeded_random_init_follows_official_order():
    maple = MaPLe(vit_model(), NAMES, ctx_init=None, n_ctx=3, depth=3, seed=7)
    torch.manual_seed(7)  # the official MultiModalPromptLearner's draws, in order
    ctx = torch.empty(3, 64)
    nn.init.normal_(ctx, std=0.02)
    proj = nn.Linear(64, 48)
    compound = [torch.empty(3, 64) for _ in range(2)]
    for t in compound:
        nn.init.normal_(t, std=0.02)
    single = nn.Linear(64, 48)
    learner = maple.prompt_learner
    assert torch.equal(learner.ctx.detach(), ctx) and torch.equal(learner.proj.weight.detach(), proj.weight)
    for a, b in zip(learner.compound_prompts_text, compound):
        assert torch.equal(a.detach(), b)
    assert torch.equal(learner.compound_prompt_projections[1].weight.detach(), single.weight)
    assert maple.prompt_prefix == "X X X"
    # n_ctx > 4 ignores the init phrase, as officially
    assert MaPLe(vit_model(), NAMES, n_ctx=5, depth=1, seed=0).prompt_prefix == "X X X X X"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameter_dtypes_follow_official(dtype):
    maple = MaPLe(vit_model(dtype=dtype), NAMES, depth=3)
    learner = maple.prompt_learner
    assert learner.ctx.dtype == dtype and learner.proj.weight.dtype == dtype
    assert all(p.dtype == torch.float32 for p in learner.compound_prompts_text)
    assert all(p.dtype == torch.float32 for p in learner.compound_prompt_projections.parameters())


# -- text ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision_width", [48, 96])
@pytest.mark.parametrize("depth", [1, 2, TEXT_LAYERS])
def test_text_fast_naive_and_official_agree(vision_width, depth):
    maple = MaPLe(vit_model(vision_width=vision_width), MIXED_NAMES, depth=depth, seed=0)
    _randomize(maple)
    learner = maple.prompt_learner
    text_params = [learner.ctx, *learner.compound_prompts_text]
    fast = maple.encode_text("fast")
    naive = maple.encode_text("naive")
    official = official_text(maple)
    maple64 = float64_copy(maple)
    oracle = official_text(maple64)
    assert fast.shape == (len(MIXED_NAMES), 32)
    for name, got in (("fast", fast), ("naive", naive)):
        assert_within_naive_error(got, official, oracle, name=name)
    params64 = [maple64.prompt_learner.ctx, *maple64.prompt_learner.compound_prompts_text]
    g_fast, g_naive, g_official = _grads(fast, text_params), _grads(naive, text_params), _grads(official, text_params)
    for i, (a, b, c, o) in enumerate(zip(g_fast, g_naive, g_official, _grads(oracle, params64))):
        assert o.abs().max() > 0  # every deep text prompt is used
        # a prompt's gradient sums one contribution per class
        assert_within_naive_error(a, c, o, reduction=len(MIXED_NAMES) * 64, name=f"fast gradient {i}")
        assert_within_naive_error(b, c, o, reduction=len(MIXED_NAMES) * 64, name=f"naive gradient {i}")
    live_fast, live_naive = learner.prompts.live_tokens
    assert live_fast < live_naive


def test_deep_text_prompts_change_features():
    maple = MaPLe(vit_model(), NAMES, depth=3, seed=0)
    before = maple.encode_text("fast").detach()
    with torch.no_grad():
        noise = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
        maple.prompt_learner.compound_prompts_text[1].add_(noise)
    after = maple.encode_text("fast").detach()
    assert scaled_error(after, before) > 1e-3


# -- image --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"final_ln_after_pool": True}, {"no_ln_pre": True}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_prompts_equals_open_clip_encode_image(extra, dtype):
    model = vit_model(vision_width=48, dtype=dtype, **extra)
    images = _images(4)
    with torch.no_grad():
        ours = encode_image_with_prompts(model.visual, images)
        theirs = model.encode_image(images.to(dtype))
        oracle = float64_copy(vit_model(vision_width=48, **extra)).encode_image(images.double())  # fp32 twin
    assert ours.dtype == theirs.dtype == dtype
    assert_within_naive_error(ours, theirs, oracle, reduction=48, name="image features")


@pytest.mark.parametrize("vision_width,vision_layers", [(48, 4), (96, 3)])
@pytest.mark.parametrize("depth", [1, 2, "full"])
def test_image_prompts_match_official_forward(vision_width, vision_layers, depth):
    depth = min(TEXT_LAYERS, vision_layers) if depth == "full" else depth
    maple = MaPLe(vit_model(vision_width, vision_layers), NAMES, n_ctx=3 if depth == 2 else 2, depth=depth, seed=1)
    _randomize(maple, seed=2)
    learner = maple.prompt_learner
    images = _images(3)
    ours = maple.encode_images(images)
    shared, deep = official_visual_prompts(learner)
    official = official_image(maple.model.visual, images, shared, deep)
    maple64 = float64_copy(maple)
    oracle = official_image(maple64.model.visual, images.double(), *official_visual_prompts(maple64.prompt_learner))
    assert ours.shape == (3, 32)
    assert_within_naive_error(ours, official, oracle, reduction=vision_width, name="image features")
    with torch.no_grad():
        plain = maple.model.encode_image(images)
    assert scaled_error(plain, official) > 1e-3  # the prompts matter
    params, params64 = list(learner.parameters()), list(maple64.prompt_learner.parameters())
    for a, b, o, p in zip(_grads(ours, params), _grads(official, params), _grads(oracle, params64), params):
        if p is learner.ctx or p is learner.proj.weight or p is learner.proj.bias or depth > 1:
            assert o.abs().max() > 0
        if o.abs().max() > 0:
            assert_within_naive_error(a, b, o, reduction=len(images) * vision_width, name="gradient")
        else:
            assert a.abs().max() == 0


# -- whole module -------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 3])
def test_logits_and_gradients_match_official(depth):
    maple = MaPLe(vit_model(96, 4), MIXED_NAMES, depth=depth, seed=0)
    _randomize(maple)
    images = _images(3)
    params = list(maple.prompt_learner.parameters())
    maple.train()
    logits = maple(images)
    official = official_logits(maple, images)
    maple64 = float64_copy(maple)
    oracle = official_logits(maple64, images.double())
    assert logits.shape == (3, len(MIXED_NAMES))
    assert_within_naive_error(logits, official, oracle, reduction=96, name="logits")
    params64 = list(maple64.prompt_learner.parameters())
    for a, b, o in zip(_grads(logits, params), _grads(official, params), _grads(oracle, params64)):
        assert o.abs().max() > 0
        assert_within_naive_error(a, b, o, reduction=len(MIXED_NAMES) * 96, name="gradient")


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_error_within_official_error(dtype, atol):
    """fp16/bf16: promptcore's error against an fp32 oracle is at most ~2x the official path's in that dtype."""
    low = MaPLe(vit_model(48, 4, dtype=dtype), MIXED_NAMES, depth=3, seed=0)
    ref = MaPLe(vit_model(48, 4), MIXED_NAMES, depth=3, seed=0)
    _randomize(low)
    with torch.no_grad():
        for p_ref, p_low in zip(ref.prompt_learner.parameters(), low.prompt_learner.parameters()):
            p_ref.copy_(p_low.float())
    images = _images(3)
    low.train()
    ours = low(images)
    assert ours.dtype == dtype
    official_low = official_logits(low, images)
    oracle = official_logits(ref, images)

    assert_within_naive_error(ours, official_low, oracle, atol=atol, name="logits")
    for a, b, c in zip(_grads(ours, list(low.prompt_learner.parameters())),
                       _grads(official_low, list(low.prompt_learner.parameters())),
                       _grads(oracle, list(ref.prompt_learner.parameters()))):
        assert c.abs().max() > 0
        assert_within_naive_error(a, b, c, atol=atol, name="gradient")
    text_fast, text_naive, text_oracle = low.encode_text("fast"), low.encode_text("naive"), official_text(ref)
    assert_within_naive_error(text_fast, text_naive, text_oracle, atol=atol, name="text features")


def test_vit_b16_official_widths():
    model = make_model("vit_b16")
    maple = MaPLe(model, read_classnames("imagenet")[:10], seed=0)  # defaults: n_ctx 2, depth 9
    assert maple.prompt_learner.proj.weight.shape == (768, 512) and len(maple.prompt_learner.compound_prompts_text) == 8
    _randomize(maple, scale=0.02)
    maple64 = float64_copy(maple)
    with torch.no_grad():
        assert_within_naive_error(maple.encode_text("fast"), official_text(maple), official_text(maple64),
                                  reduction=512, name="text features")
        images = _images(1, size=224)
        ours = maple.encode_images(images)
        official = official_image(model.visual, images, *official_visual_prompts(maple.prompt_learner))
        oracle = official_image(maple64.model.visual, images.double(),
                                *official_visual_prompts(maple64.prompt_learner))
        assert_within_naive_error(ours, official, oracle, reduction=768, name="image features")


def test_eval_cache_follows_every_text_prompt():
    maple = MaPLe(vit_model(), NAMES, depth=3, seed=0).eval()
    images = _images(2)
    with torch.no_grad():
        first = maple(images)
        assert maple.text_features() is maple.text_features()  # cached
        maple.prompt_learner.compound_prompts_text[1].mul_(-3.0)  # not a constant shift, which LayerNorm removes
        second = maple(images)
        assert scaled_error(second, first) > 1e-4
        assert_close_scaled(second, official_logits(maple, images), name="eval logits")
        maple.set_classnames(NAMES[:2])
        assert maple(images).shape == (2, 2)


# -- bad input ----------------------------------------------------------------------------------------


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and \
        all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=0), "depth must be"),
    (dict(depth=2.5), "depth must be"),
    (dict(depth=4), "exceeds the model's blocks.*text tower 3"),
    (dict(n_ctx=0), "n_ctx must be"),
    (dict(ctx_init="a photo", n_ctx=3), "n_ctx=3 does not fit the init phrase"),
    (dict(text_path="fastest"), "unknown text path"),
])
def test_bad_arguments_are_named_and_change_nothing(kwargs, match):
    model = vit_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        MaPLe(model, NAMES, **{"depth": 2, **kwargs})
    assert _unchanged(model, before)


def test_depth_beyond_image_tower_is_named():
    with pytest.raises(ValueError, match="image tower 2"):
        MaPLe(vit_model(48, 2), NAMES, depth=3)


@pytest.mark.parametrize("names,error,match", [
    ([], ValueError, "empty"),
    ("dog", TypeError, "not one string"),
    (["dog", " "], ValueError, "class 1"),
    (["dog", "word " * 80], PromptTooLongError, "needs"),
])
def test_bad_classnames(names, error, match):
    model = vit_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        MaPLe(model, names, depth=2)
    assert _unchanged(model, before)


@pytest.mark.parametrize("vision,match", [
    (dict(image_size=64, layers=(1, 1, 1, 1), width=16, head_width=16), "ModifiedResNet"),
    (dict(image_size=32, patch_size=16, width=48, layers=2, head_width=16, attentional_pool=True,
          attn_pooler_queries=4, attn_pooler_heads=4), "attentional pooling"),
    (dict(image_size=32, patch_size=16, width=48, layers=2, head_width=16, pool_type="avg"), "pools with 'avg'"),
])
def test_unsupported_image_towers(vision, match):
    import open_clip

    model = open_clip.CLIP(32, vision, dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=match):
        MaPLe(model, NAMES, depth=1)
    assert _unchanged(model, before)


# bad images: tests/test_bad_input.py, for every method


# -- checkpoints --------------------------------------------------------------------------------------

_FP16_KEYS = ("conv1.weight", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "c_fc.weight",
              "c_fc.bias", "c_proj.weight", "c_proj.bias")


def _official_fp16(key, value):
    """clip.model.convert_weights: Conv/Linear/MHA weights, proj and text_projection in fp16; the rest fp32."""
    if key.endswith(_FP16_KEYS) or key in ("image_encoder.proj", "text_encoder.text_projection"):
        return value.detach().half()
    return value.detach().clone()


def official_maple_state(maple, learner_state=None):
    """The state dict of the official CustomCLIP (fp16 CLIP) around ``maple``'s prompts."""
    model, n = maple.model, maple.n_ctx
    learner_state = learner_state if learner_state is not None else maple.prompt_learner.state_dict()
    state = OrderedDict()
    for k, v in learner_state.items():
        state[f"prompt_learner.{k}"] = v.detach().clone()
    with torch.no_grad():
        emb = model.token_embedding(maple.tokenized_prompts).half()
    state["prompt_learner.token_prefix"] = emb[:, :1]
    state["prompt_learner.token_suffix"] = emb[:, 1 + n:]
    for k, v in model.visual.state_dict().items():
        state[f"image_encoder.{k}"] = _official_fp16(f"image_encoder.{k}", v)
    for k, v in model.state_dict().items():
        if k.startswith(("transformer.", "positional_embedding", "ln_final.", "text_projection")):
            state[f"text_encoder.{k}"] = _official_fp16(f"text_encoder.{k}", v)
    state["logit_scale"] = model.logit_scale.detach().clone()
    return state


def _trained_state(maple, seed=5):
    """Official fp16-run dtypes: ctx and proj fp16, compound prompts and projections fp32."""
    trained = copy.deepcopy(maple)
    _randomize(trained, seed=seed, scale=0.1)
    state = trained.prompt_learner.state_dict()
    return {k: (v.half() if k.startswith(("ctx", "proj.")) else v.float()) for k, v in state.items()}


def _learner_snapshot(maple):
    return {k: v.clone() for k, v in maple.prompt_learner.state_dict().items()}


def _same_snapshot(maple, snap):
    return all(torch.equal(v, snap[k]) for k, v in maple.prompt_learner.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_official_checkpoint_loads(tmp_path, dtype):
    maple = MaPLe(vit_model(dtype=dtype), NAMES, depth=3, seed=0)
    trained = _trained_state(maple)
    path = write_dassl_checkpoint(tmp_path, official_maple_state(maple, trained), epoch=5,
                                  name="MultiModalPromptLearner")
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    info = maple.load_official(tmp_path)  # folder: resolves MultiModalPromptLearner/model.pth.tar-5
    assert info["epoch"] == 5 and info["file"].endswith("model.pth.tar-5")
    assert info["clip_tensors_checked"] > 20
    for k, v in maple.prompt_learner.state_dict().items():
        torch.testing.assert_close(v, trained[k].to(v.dtype), rtol=0, atol=0)
    images = _images(2)
    maple.eval()
    with torch.no_grad():
        torch.testing.assert_close(maple(images).float(), official_logits(maple, images).float(),
                                   rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-4)


def test_checkpoint_with_other_clip_weights_is_refused(tmp_path):
    maple = MaPLe(vit_model(), NAMES, depth=3, seed=0)
    state = official_maple_state(maple, _trained_state(maple))
    state["text_encoder.ln_final.weight"] = state["text_encoder.ln_final.weight"] + 0.01
    path = write_dassl_checkpoint(tmp_path / "a", state, name="MultiModalPromptLearner")
    snap = _learner_snapshot(maple)
    with pytest.raises(CheckpointError, match=r"first at text_encoder\.ln_final\.weight"):
        maple.load_official(path)
    assert _same_snapshot(maple, snap)
    other = MaPLe(vit_model(seed=1), NAMES, depth=3, seed=0)  # another CLIP altogether
    path = write_dassl_checkpoint(tmp_path / "b", official_maple_state(other), name="MultiModalPromptLearner")
    with pytest.raises(CheckpointError, match=r"CLIP weights differ from this model, first at image_encoder\."):
        maple.load_official(path)
    wider = MaPLe(vit_model(vision_width=96), NAMES, depth=3, seed=0)
    path = write_dassl_checkpoint(tmp_path / "c", official_maple_state(wider), name="MultiModalPromptLearner")
    with pytest.raises(CheckpointError, match="vision width 48"):
        maple.load_official(path)
    assert _same_snapshot(maple, snap)


@pytest.mark.parametrize("change,match", [
    (dict(depth=2), r"lacks compound_prompts_text.1, .*\(the checkpoint has depth=2, this MaPLe has depth=3: "
                     r"build it with depth=2\)"),
    (dict(n_ctx=3), "n_ctx=3, this MaPLe has n_ctx=2"),
])
def test_checkpoint_layout_mismatch(tmp_path, change, match):
    maple = MaPLe(vit_model(), NAMES, depth=3, seed=0)
    source = MaPLe(vit_model(), NAMES, **{"depth": 3, **change}, seed=0)
    path = write_dassl_checkpoint(tmp_path, official_maple_state(source), name="MultiModalPromptLearner")
    snap = _learner_snapshot(maple)
    with pytest.raises(CheckpointError, match=match):
        maple.load_official(path)
    assert _same_snapshot(maple, snap)


def test_other_methods_checkpoints_are_refused(tmp_path):
    maple = MaPLe(vit_model(), NAMES, depth=2, seed=0)
    snap = _learner_snapshot(maple)
    coop = write_dassl_checkpoint(tmp_path / "coop", {"ctx": torch.randn(4, 64)})
    with pytest.raises(CheckpointError, match="holds CoOp prompts, not MaPLe"):
        maple.load_official(coop)
    cocoop = write_dassl_checkpoint(tmp_path / "cocoop", {
        "ctx": torch.randn(4, 64), "meta_net.linear1.weight": torch.randn(3, 32),
        "meta_net.linear1.bias": torch.randn(3), "meta_net.linear2.weight": torch.randn(64, 3),
        "meta_net.linear2.bias": torch.randn(64)})
    with pytest.raises(CheckpointError, match="holds CoCoOp prompts, not MaPLe"):
        maple.load_official(cocoop)
    assert _same_snapshot(maple, snap)
    coop_module = promptcore.CoOp(vit_model(), NAMES, n_ctx=2)
    path = write_dassl_checkpoint(tmp_path / "maple", official_maple_state(maple), name="MultiModalPromptLearner")
    with pytest.raises(CheckpointError, match="holds MaPLe prompts, not CoOp"):
        coop_module.load_official(path)


def test_safetensors_round_trip(tmp_path):
    maple = MaPLe(vit_model(), NAMES, depth=3, seed=0)
    _randomize(maple)
    path = maple.save(tmp_path / "maple.safetensors", model_name="tiny")
    loaded = MaPLe.from_file(path, vit_model())
    assert loaded.depth == 3 and loaded.n_ctx == 2 and loaded.classnames == NAMES and loaded.model_name == "tiny"
    images = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), maple.eval()(images), rtol=0, atol=0)
    shallow = MaPLe(vit_model(), NAMES, depth=2, seed=0)
    snap = _learner_snapshot(shallow)
    with pytest.raises(CheckpointError):
        shallow.load(path)
    assert _same_snapshot(shallow, snap)
    coop = promptcore.CoOp(vit_model(), NAMES, n_ctx=2)
    coop_path = coop.save(tmp_path / "coop.safetensors")
    with pytest.raises(CheckpointError, match="coop prompts"):
        maple.load(coop_path)
