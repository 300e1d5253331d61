"""What the methods derive from the weights follows the weights: the fast path's prompt token embeddings,
the eval text caches, and clear_cache() refreshing all of it."""

import pytest
import torch
from helpers import MIXED_NAMES, assert_close_scaled, make_model, scaled_error
from test_maple import NAMES, vit_model

import promptcore
from promptcore import ZeroShot
from promptcore.cocoop import CoCoOp
from promptcore.maple import MaPLe
from promptcore.tpt import TPT

METHODS = {
    "coop": lambda model: promptcore.CoOp(model, MIXED_NAMES, n_ctx=4, seed=0),
    "coop_csc_middle": lambda model: promptcore.CoOp(model, MIXED_NAMES, n_ctx=4, csc=True,
                                                     class_token_position="middle", seed=0),
    "maple": lambda model: MaPLe(model, NAMES, depth=2, seed=0),
    "tpt": lambda model: TPT(model, MIXED_NAMES, seed=0),
}


def _model(method, seed=0):
    return vit_model(seed=seed) if method == "maple" else make_model(seed=seed)


def _fast_and_naive(module):
    with torch.no_grad():
        if isinstance(module, TPT):
            ctx = module.prompt_learner.ctx.unsqueeze(0)
            return module.encode_text_groups(ctx, "fast")[0], module.encode_text_groups(ctx, "naive")[0]
        return module.encode_text("fast"), module.encode_text("naive")


def _assert_fast_equals_naive(module, what):
    fast, naive = _fast_and_naive(module)
    assert_close_scaled(fast, naive, name=f"fast vs naive {what}")


@pytest.mark.parametrize("method", list(METHODS))
def test_fast_path_follows_load_state_dict(method):
    module = METHODS[method](_model(method)).eval()
    _assert_fast_equals_naive(module, "before")
    module.model.load_state_dict(_model(method, seed=1).state_dict())
    _assert_fast_equals_naive(module, "after load_state_dict")


def test_fast_path_follows_in_place_copies_and_swapped_weights():
    coop = METHODS["coop"](make_model()).eval()
    weight = coop.model.token_embedding.weight
    with torch.no_grad():
        weight.copy_(weight * 3)  # an ordinary in-place write: its version moves
    _assert_fast_equals_naive(coop, "after copy_")
    coop.model.token_embedding.weight = torch.nn.Parameter(weight.detach() * -2, requires_grad=False)
    _assert_fast_equals_naive(coop, "after swapping the weight")


def test_cocoop_fast_path_follows_the_token_embedding():
    cocoop = CoCoOp(make_model(), MIXED_NAMES, seed=0).eval()
    with torch.no_grad():
        cocoop.model.token_embedding.weight.mul_(2.5)
        feats = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
        fast, naive = cocoop.encode_text(feats, "fast"), cocoop.encode_text(feats, "naive")
    assert_close_scaled(fast, naive, name="CoCoOp fast vs naive")


@pytest.mark.parametrize("method", list(METHODS))
def test_clear_cache_refreshes_after_data_writes_to_clip(method):
    """A write through ``.data`` moves no version counter: clear_cache() must refresh every derived tensor."""
    module = METHODS[method](_model(method)).eval()
    with torch.no_grad():
        module.text_features()
    module.model.token_embedding.weight.data.mul_(1.7)
    module.clear_cache()
    _assert_fast_equals_naive(module, "after .data write + clear_cache")
    with torch.no_grad():
        cached = module.text_features()
        fresh = module._compute_text_features()
    assert_close_scaled(cached, fresh, name="text features after clear_cache")


def _copy_model(model):
    import copy

    return copy.deepcopy(model)


def test_eval_cache_follows_load_state_dict():
    coop = METHODS["coop"](make_model()).eval()
    with torch.no_grad():
        before = coop.text_features()
        coop.model.load_state_dict(make_model(seed=1).state_dict())
        after = coop.text_features()
        want = coop.encode_text("naive")
    assert scaled_error(before, want) > 1e-2
    assert_close_scaled(after, want, name="cache after load_state_dict")


def _write_data(module, method):
    learner = module.prompt_learner
    target = learner.compound_prompts_text[0] if method == "maple_deep" else learner.ctx
    # not a constant shift: the layer norms would remove it
    target.data.add_(torch.randn(target.shape, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("method", ["coop", "coop_csc_middle", "maple", "maple_deep", "tpt"])
def test_eval_cache_sees_data_writes_to_learned_tensors(method):
    module = METHODS["maple" if method == "maple_deep" else method](_model(method.split("_")[0])).eval()
    with torch.no_grad():
        stale = module.text_features()
        _write_data(module, method)
        got = module.text_features()
        want = module._compute_text_features()
    assert scaled_error(stale, want) > 1e-3
    assert_close_scaled(got, want, name="cached text features after a .data write")
    with torch.no_grad():
        assert module.text_features() is got  # unchanged content: still served from the cache


def test_zeroshot_clear_cache_refreshes_after_data_writes():
    model = make_model()
    zs = ZeroShot(model, MIXED_NAMES, templates="simple", progress=False)
    first = zs.text_features()
    assert zs.text_features() is first
    model.token_embedding.weight.data.mul_(0.3)
    zs.clear_cache()
    got = zs.text_features()
    want = ZeroShot(_copy_model(model), MIXED_NAMES, templates="simple", progress=False).encode_text("naive")
    assert scaled_error(first, want) > 1e-2
    assert_close_scaled(got, want, name="ZeroShot after .data write + clear_cache")


def test_zeroshot_cache_follows_load_state_dict():
    zs = ZeroShot(make_model(), MIXED_NAMES, templates="simple", progress=False)
    first = zs.text_features()
    zs.model.load_state_dict(make_model(seed=1).state_dict())
    got = zs.text_features()
    want = zs.encode_text("naive")
    assert scaled_error(first, want) > 1e-2
    assert_close_scaled(got, want, name="ZeroShot after load_state_dict")


def test_compiled_fast_path_follows_the_token_embedding():
    """The refresh copies into the same buffer outside the captured function, so a compiled path (and a
    CUDA graph replay, whose static inputs keep their addresses) reads the new embeddings."""
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0, capture="compile").eval()
    coop.engine.fast.compile_options["backend"] = "aot_eager"  # test-only: no C++ compiler needed
    buffer = coop.prompt_learner.prompts.token_embeds
    _assert_fast_equals_naive(coop, "compiled, before")
    coop.model.load_state_dict(make_model(seed=1).state_dict())
    _assert_fast_equals_naive(coop, "compiled, after load_state_dict")
    coop.model.token_embedding.weight.data.mul_(0.5)
    coop.clear_cache()
    _assert_fast_equals_naive(coop, "compiled, after a .data write + clear_cache")
    assert coop.prompt_learner.prompts.token_embeds is buffer
