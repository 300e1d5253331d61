"""The shared-prefix, EOT-truncated text path against the full-prompt (official) path."""

import copy
import warnings

import pytest
import torch
from helpers import (
    MIXED_NAMES,
    assert_close_scaled,
    assert_within_naive_error,
    float64_copy,
    make_model,
    read_classnames,
    scaled_error,
)

import promptcore
from promptcore import LayerPrompts, PromptSet, TextEngine


def _features_and_grad(coop, path):
    feats = coop.encode_text(path)
    (grad,) = torch.autograd.grad(feats.double().pow(2).sum(), coop.prompt_learner.ctx)
    return feats, grad


def _fast_and_naive(coop):
    return _features_and_grad(coop, "fast") + _features_and_grad(coop, "naive")


def check_fast_against_naive(coop, reduction=64):
    """Fast-path features and ctx gradient within 2x the naive path's error against a float64 oracle."""
    fast, g_fast, naive, g_naive = _fast_and_naive(coop)
    oracle, g_oracle = _features_and_grad(float64_copy(coop), "naive")
    assert g_naive.abs().max() > 0
    assert_within_naive_error(fast, naive, oracle, reduction=reduction, name="text features")
    # a shared context row's gradient sums one contribution per class
    assert_within_naive_error(g_fast, g_naive, g_oracle, reduction=len(coop.classnames) * reduction,
                              name="ctx gradient")
    return fast, naive


@pytest.mark.parametrize("kind", ["quickgelu", "gelu_ls", "custom_text"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
@pytest.mark.parametrize("n_ctx", [1, 4, 16])
def test_fast_equals_naive_fp32(kind, position, csc, n_ctx):
    coop = promptcore.CoOp(make_model(kind), MIXED_NAMES, n_ctx=n_ctx, csc=csc, class_token_position=position, seed=3)
    fast, naive = check_fast_against_naive(coop)
    assert fast.shape == naive.shape == (len(MIXED_NAMES), 32)


def test_prefix_and_suffix_split():
    coop = promptcore.CoOp(make_model(), ["dog", "great white shark"], n_ctx=4)
    prompts = coop.prompt_learner.prompts
    assert prompts.prefix_len == 5  # SOS + 4 context tokens
    # "great white shark ." + EOT: 3 + 1 + 1 positions after the prefix
    assert prompts.suffix_len == 5
    assert prompts.eot.tolist() == [7, 9]
    csc = promptcore.CoOp(make_model(), ["dog", "great white shark"], n_ctx=4, csc=True)
    assert csc.prompt_learner.prompts.prefix_len == 1  # class-specific context cannot be shared


def test_init_phrase_and_one_class():
    coop = promptcore.CoOp(make_model(), ["goldfish"], ctx_init="a photo of a")
    assert coop.n_ctx == 4 and coop.prompt_learner.ctx.shape == (4, 64)
    fast, _ = check_fast_against_naive(coop)
    assert fast.shape == (1, 32)


def test_hundreds_of_real_classes():
    names = read_classnames("imagenet")[:300] + read_classnames("stanford_cars")[:60]
    coop = promptcore.CoOp(make_model("gelu_ls"), names, n_ctx=16, seed=0)
    check_fast_against_naive(coop)
    live_fast, live_naive = coop.prompt_learner.prompts.live_tokens
    assert live_fast * 2 < live_naive


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("position", ["end", "front"])
def test_low_precision_error_within_naive_error(dtype, atol, position):
    """In fp16/bf16 the fast path's error against an fp32 oracle is at most ~2x the official path's."""
    kw = dict(n_ctx=4, class_token_position=position, seed=5)
    ref = promptcore.CoOp(make_model("quickgelu"), MIXED_NAMES, **kw)
    low = promptcore.CoOp(make_model("quickgelu", dtype), MIXED_NAMES, **kw)
    assert low.prompt_learner.ctx.dtype == dtype
    with torch.no_grad():  # same context values in both precisions
        ref.prompt_learner.ctx.copy_(low.prompt_learner.ctx.float())
    fast, g_fast, naive, g_naive = _fast_and_naive(low)
    oracle, g_oracle = _features_and_grad(ref, "naive")
    assert fast.dtype == dtype
    assert_within_naive_error(fast, naive, oracle, atol=atol, name="text features")
    assert_within_naive_error(g_fast, g_naive, g_oracle, atol=atol, name="ctx gradient")


def test_vit_b16_random_weights():
    model = make_model("vit_b16")
    names = read_classnames("imagenet")[:40]
    coop = promptcore.CoOp(model, names, n_ctx=16, seed=0)
    fast, naive = check_fast_against_naive(coop, reduction=512)
    assert fast.shape == (40, 512)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = coop(images)
        img = model.encode_image(images)
        expected = model.logit_scale.exp() * torch.nn.functional.normalize(img, dim=-1) @ \
            torch.nn.functional.normalize(naive.detach(), dim=-1).t()
    assert logits.shape == (2, 40)
    assert_close_scaled(logits, expected, reduction=512, name="logits")


@pytest.mark.parametrize("kind,reason", [("bidirectional", "bidirectional"), ("cls_token", "CLS"),
                                         ("pool_last", "'last'")])
def test_non_causal_towers_fall_back(kind, reason):
    from promptcore import engine as engine_mod

    engine_mod._reported_fallbacks.clear()
    model = make_model(kind)
    with pytest.raises(ValueError, match="not exact"):
        promptcore.CoOp(model, MIXED_NAMES, n_ctx=4, text_path="fast")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coop = promptcore.CoOp(model, MIXED_NAMES, n_ctx=4, seed=0)
        auto = coop.encode_text("auto")
        coop.encode_text("auto")
    said = [w for w in caught if "full-prompt text path" in str(w.message)]
    assert len(said) == 1 and reason in str(said[0].message)
    torch.testing.assert_close(auto, coop.encode_text("naive"), rtol=0, atol=0)
    # the shortcut would be wrong here: this is what the fallback protects against
    assert scaled_error(coop.engine.encode_fast(coop.prompt_learner.prompts, coop.prompt_learner.ctx)[0], auto) > 1e-3


def _group_setup(G=3, ctx_layout="group"):
    model = make_model("gelu_ls")
    engine = TextEngine(model)
    tok = promptcore.prompts.default_tokenizer()
    built = promptcore.prompts.context_prompts(tok, MIXED_NAMES, 4, "X X X X", 77)
    prompts = PromptSet(engine.tower, built.ids, built.slots, ctx_layout)
    gen = torch.Generator().manual_seed(0)
    shape = (G, 4, 64) if ctx_layout == "group" else (4, 64)
    ctx = (0.02 * torch.randn(*shape, generator=gen)).requires_grad_()
    return engine, prompts, ctx, gen


def _naive64(engine, prompts, inputs, **kwargs):
    """The float64 oracle: the naive path of a float64 copy of the engine, and its gradients w.r.t. ``inputs``.

    ``kwargs`` are the encode arguments; tensors among them that appear in ``inputs`` are replaced by
    float64 leaves so gradients flow to them.
    """
    engine64 = TextEngine(copy.deepcopy(engine.tower.src).double())
    prompts64 = copy.deepcopy(prompts).double()
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    swap = {id(t): leaf for t, leaf in zip(inputs, leaves)}

    def conv(v):
        if isinstance(v, LayerPrompts):
            return LayerPrompts(v.positions, {k: conv(x) for k, x in v.values.items()})
        if isinstance(v, torch.Tensor):
            return swap.get(id(v), v.detach().double())
        return v

    out = engine64.encode(prompts64, **{k: conv(v) for k, v in kwargs.items()}, path="naive")
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    grads = torch.autograd.grad(out.pow(2).sum(), wanted) if wanted else ()
    return out, grads


def _check_groups(engine, prompts, inputs, **kwargs):
    """Fast vs naive features (and gradients w.r.t. ``inputs``) against the float64 oracle."""
    fast = engine.encode(prompts, **kwargs, path="fast")
    naive = engine.encode(prompts, **kwargs, path="naive")
    oracle, g_oracle = _naive64(engine, prompts, inputs, **kwargs)
    assert_within_naive_error(fast, naive, oracle, name="text features")
    wanted = [t for t in inputs if t.requires_grad]
    if wanted:
        g_fast = torch.autograd.grad(fast.double().pow(2).sum(), wanted)
        g_naive = torch.autograd.grad(naive.double().pow(2).sum(), wanted)
        for i, (a, b, o) in enumerate(zip(g_fast, g_naive, g_oracle)):
            assert b.abs().max() > 0
            assert_within_naive_error(a, b, o, reduction=prompts.num_classes * 64, name=f"gradient {i}")
    return fast, naive


def test_groups_with_own_context_and_bias():
    engine, prompts, ctx, gen = _group_setup(G=3)
    bias = (0.05 * torch.randn(3, 64, generator=gen)).requires_grad_()
    fast, naive = _check_groups(engine, prompts, [ctx, bias], ctx=ctx, bias=bias)
    assert fast.shape == (3, len(MIXED_NAMES), 32)
    # each group is the same as encoding it alone
    alone = engine.encode(prompts, ctx[1:2], bias[1:2], path="fast")
    assert_close_scaled(alone[0], fast[1], name="group encoded alone")


def test_shared_context_with_per_group_bias():
    engine, prompts, ctx, gen = _group_setup(ctx_layout="shared")
    bias = 0.05 * torch.randn(2, 64, generator=gen)
    fast, _ = _check_groups(engine, prompts, [ctx], ctx=ctx, bias=bias)
    assert fast.shape[0] == 2


def test_layer_prompts_overwrite_prefix_positions():
    engine, prompts, ctx, gen = _group_setup(ctx_layout="shared")
    deep = {1: (0.02 * torch.randn(4, 64, generator=gen)).requires_grad_(),
            2: (0.02 * torch.randn(4, 64, generator=gen)).requires_grad_()}
    layer_prompts = LayerPrompts(positions=[1, 2, 3, 4], values=deep)
    _, naive = _check_groups(engine, prompts, list(deep.values()), ctx=ctx, layer_prompts=layer_prompts)
    plain = engine.encode(prompts, ctx, path="naive")
    assert scaled_error(plain, naive) > 1e-4


def _padded_tokens(buckets):
    return sum(len(members) * length for members, length in buckets)


def test_length_buckets_are_optimal_and_cover_every_class():
    import itertools
    import random

    from promptcore.engine import length_buckets

    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 15))]
        for k in (1, 2, 3):
            buckets = length_buckets(lengths, k)
            assert len(buckets) <= k
            assert sorted(c for members, _ in buckets for c in members) == list(range(len(lengths)))
            assert all(lengths[c] <= length for members, length in buckets for c in members)
            distinct = sorted(set(lengths))
            best = min(  # brute force: every split of the sorted distinct lengths into at most k runs
                _split_cost(lengths, distinct, cuts)
                for n in range(0, min(k, len(distinct)))
                for cuts in itertools.combinations(range(1, len(distinct)), n)
            )
            assert _padded_tokens(buckets) == best


def _split_cost(lengths, distinct, cuts):
    bounds = (0,) + cuts + (len(distinct),)
    total = 0
    for lo, hi in zip(bounds, bounds[1:]):
        run = distinct[lo:hi]
        total += sum(1 for x in lengths if x in run) * run[-1]
    return total


def test_buckets_cut_padding_and_keep_class_order():
    names = read_classnames("stanford_cars")[:50] + ["x", "dog"]
    coop = promptcore.CoOp(make_model(), names, n_ctx=4, seed=0)
    prompts = coop.prompt_learner.prompts
    assert len(prompts.buckets) > 1
    fast_tokens, _ = prompts.live_tokens
    assert fast_tokens < prompts.prefix_len + len(names) * prompts.suffix_len
    check_fast_against_naive(coop)


def test_layer_prompts_outside_the_prefix_use_the_full_path():
    engine, prompts, ctx, gen = _group_setup(ctx_layout="shared")
    deep = {1: 0.02 * torch.randn(2, 64, generator=gen)}
    beyond = prompts.prefix_len  # the first suffix position: not shared, so not shortcut-able
    layer_prompts = LayerPrompts(positions=[1, beyond], values=deep)
    auto = engine.encode(prompts, ctx, layer_prompts=layer_prompts, path="auto")
    naive = engine.encode(prompts, ctx, layer_prompts=layer_prompts, path="naive")
    torch.testing.assert_close(auto, naive, rtol=0, atol=0)
    wrong = engine.encode_fast(prompts, ctx, layer_prompts=LayerPrompts([1], {1: deep[1][:1]}))
    assert scaled_error(wrong, naive) > 1e-4  # the shortcut would have missed the suffix overwrite


def _per_group_ids(templates, names):
    from promptcore.prompts import default_tokenizer

    tok = default_tokenizer()
    return torch.stack([tok([t.format(n) for n in names]) for t in templates])


@pytest.mark.parametrize("kind", ["quickgelu", "custom_text"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_groups_with_own_tokens_equal_full_prompts(kind, backend, monkeypatch):
    """Per-group token ids (G, C, L): prefixes of different content and length, tails of different length."""
    monkeypatch.setenv("PROMPTCORE_BACKEND", backend)
    templates = ["a photo of a {}.", "itap of a {}.", "a {} in a video game.", "{}"]
    names = MIXED_NAMES if backend == "torch" else MIXED_NAMES[:3]
    model = make_model(kind)
    ids = _per_group_ids(templates, names)
    engine = TextEngine(model)
    prompts = PromptSet(engine.tower, ids, torch.full_like(ids, -1))
    assert prompts.per_group and prompts.num_groups == 4 and prompts.num_classes == len(names)
    assert prompts.prefix_len == 1  # the "{}" template leaves only SOS in common
    assert prompts.eot.shape == (4, len(names))
    with torch.no_grad():
        ref = model.encode_text(ids.reshape(-1, 77)).reshape(4, len(names), -1)
        oracle = float64_copy(model).encode_text(ids.reshape(-1, 77)).reshape(4, len(names), -1)
    fast = engine.encode(prompts, path="fast")
    assert fast.shape == ref.shape
    assert_within_naive_error(fast, ref, oracle, name="fast")
    assert_within_naive_error(engine.encode(prompts, path="naive"), ref, oracle, name="naive")
    # groups of equal prefix length share all of it: SOS + "a photo of a" / "a bad photo of a"
    same_len = _per_group_ids(["a photo of a {}.", "a bad photo of the {}!"], names)
    shared = PromptSet(engine.tower, same_len, torch.full_like(same_len, -1))
    assert shared.prefix_len == 5
    with torch.no_grad():
        ref2 = model.encode_text(same_len.reshape(-1, 77)).reshape(2, len(names), -1)
        oracle2 = float64_copy(model).encode_text(same_len.reshape(-1, 77)).reshape(2, len(names), -1)
    assert_within_naive_error(engine.encode(shared, path="fast"), ref2, oracle2, name="shared prefix")
    live, full = shared.live_tokens
    suffixes = sum(shared.members(b).numel() * b.length for b in shared.buckets)
    assert full == 2 * len(names) * 77 and live == 2 * (5 + suffixes)


def test_one_group_one_class_and_bad_per_group_sets():
    model = make_model()
    engine = TextEngine(model)
    ids = _per_group_ids(["a photo of a {}."], ["goldfish"])
    prompts = PromptSet(engine.tower, ids, torch.full_like(ids, -1))
    with torch.no_grad():
        ref = model.encode_text(ids[0])
        oracle = float64_copy(model).encode_text(ids[0])
    assert_within_naive_error(engine.encode(prompts, path="fast")[0], ref, oracle, name="one class")
    slots = torch.full_like(ids, -1)
    slots[..., 1] = 0
    with pytest.raises(ValueError, match="fixed tokens only"):
        PromptSet(engine.tower, ids, slots)
    with pytest.raises(ValueError, match="at least one group"):
        PromptSet(engine.tower, ids[:0], slots[:0])
    with pytest.raises(ValueError, match="no context, bias or layer prompts"):
        engine.encode(prompts, torch.zeros(1, 64))


def test_bucket_indices_move_with_the_prompt_set_and_stay_out_of_state_dicts():
    names = ["x", "dog", "great white shark", "a very long class name of many tokens"]
    coop = promptcore.CoOp(make_model(), names, n_ctx=2, seed=0)
    prompts = coop.prompt_learner.prompts
    assert len(prompts.buckets) > 1
    assert sorted(torch.cat([prompts.members(b) for b in prompts.buckets]).tolist()) == list(range(len(names)))
    assert [b.size for b in prompts.buckets] == [prompts.members(b).numel() for b in prompts.buckets]
    assert set(coop.prompt_learner.state_dict()) == {"ctx"}
    moved = prompts.to("meta")
    assert all(moved.members(b).device.type == "meta" for b in moved.buckets)
    assert moved.bucket_order.device.type == "meta"


def test_method_base_classes_state_their_contract():
    from promptcore.base import CachedTextFeatures, ContextPromptModule, PromptModule

    class NoOptions(ContextPromptModule):
        method = "nooptions"

    with pytest.raises(TypeError, match="abstract"):
        NoOptions(make_model())

    class NoMethod(ContextPromptModule):
        def options(self):
            return {}

    with pytest.raises(TypeError, match="must name its method"):
        NoMethod(make_model())

    class NoFeatures(CachedTextFeatures, PromptModule):
        method = "nofeatures"

        def options(self):
            return {}

    with pytest.raises(TypeError, match="_compute_text_features"):
        NoFeatures(make_model())
    # one class matrix per class list where the method has one; CoCoOp's depends on the image
    cached = [promptcore.CoOp, promptcore.MaPLe, promptcore.TPT, promptcore.ZeroShot]
    assert all(issubclass(cls, CachedTextFeatures) for cls in cached)
    assert not issubclass(promptcore.CoCoOp, CachedTextFeatures)
    assert all(issubclass(cls, ContextPromptModule) for cls in cached[:3] + [promptcore.CoCoOp])
    coop = promptcore.CoOp(make_model(), ["dog", "cat"], n_ctx=2, seed=0, class_token_position="front")
    assert (coop.n_ctx, coop.ctx_layout, coop.class_token_position) == (2, "shared", "front")
    assert all(not p.requires_grad for p in coop.model.parameters())
