"""Method options and prompt text: init phrases with odd whitespace, control characters in class names,
numeric options (types, NaN/inf, the token budget), and TPT loads that fail. Each bad input raises a
clear error naming the option (or class) and changes nothing."""

import time

import pytest
import torch
from helpers import MIXED_NAMES, make_model, scaled_error
from test_maple import NAMES, vit_model

import promptcore
from promptcore import ZeroShot
from promptcore.checkpoints import CheckpointError, save_prompt_file
from promptcore.cocoop import CoCoOp
from promptcore.maple import MaPLe
from promptcore.tpt import TPT

TPT_OPTS = dict(n_views=8, selection=0.25, precision="native")

BUILD = {
    "coop": lambda model, names, **kw: promptcore.CoOp(model, names, **{"seed": 0, **kw}),
    "cocoop": lambda model, names, **kw: CoCoOp(model, names, **{"seed": 0, **kw}),
    "maple": lambda model, names, **kw: MaPLe(model, names, **{"depth": 2, "seed": 0, **kw}),
    "tpt": lambda model, names, **kw: TPT(model, names, **{**TPT_OPTS, "seed": 0, **kw}),
}


def _model(method):
    return vit_model() if method == "maple" else make_model()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


def _assert_unchanged(model, snapshot):
    state, flags = snapshot
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags  # nothing frozen


# -- init phrases ----------------------------------------------------------------------------------

ODD_PHRASES = ["a  photo of a", " a photo of a", "a photo of a ", "a photo\tof  a", "a_photo of_a"]


@pytest.mark.parametrize("phrase", ODD_PHRASES)
@pytest.mark.parametrize("method", ["coop", "cocoop", "tpt", "maple"])
def test_init_phrase_whitespace_is_normalised(method, phrase):
    names = ["dog", "cat"]
    kw = {"n_ctx": 4} if method == "maple" else {}
    odd = BUILD[method](_model(method), names, ctx_init=phrase, **kw).eval()
    plain = BUILD[method](_model(method), names, ctx_init="a photo of a", **kw).eval()
    assert odd.n_ctx == plain.n_ctx == 4 and odd.prompt_prefix == "a photo of a"
    assert torch.equal(odd.prompt_learner.prompts.slots, plain.prompt_learner.prompts.slots)
    assert torch.equal(odd.prompt_learner.ctx, plain.prompt_learner.ctx)
    if method in ("coop", "maple"):
        with torch.no_grad():
            feats = odd.encode_text("naive")
        assert scaled_error(feats[0], feats[1]) > 1e-2, "dog and cat got the same features"


@pytest.mark.parametrize("phrase", [" ", "   ", "\t", " _ "])
@pytest.mark.parametrize("method", list(BUILD))
def test_init_phrase_without_words_is_refused(method, phrase):
    model = _model(method)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="ctx_init .* holds no word"):
        BUILD[method](model, ["dog", "cat"], ctx_init=phrase)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("method", ["coop", "cocoop", "tpt"])
def test_init_phrase_word_without_token_is_refused(method):
    """A byte-order mark is no whitespace to str.split and no token to the BPE: five words, four tokens."""
    model = _model(method)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="ctx_init=.* has 5 words but only 4 tokens"):
        BUILD[method](model, ["dog", "cat"], ctx_init="a photo of a \ufeff")
    _assert_unchanged(model, snapshot)


# -- control characters in class names -----------------------------------------------------------------

@pytest.mark.parametrize("bad", ["dog\n", "great\twhite shark", "x\x00", "cat\r", "e\x1b[31m"])
@pytest.mark.parametrize("method", [*BUILD, "zeroshot"])
def test_control_characters_in_class_names_are_refused(method, bad):
    model = _model(method)
    snapshot = _snapshot(model)
    names = ["dog", bad, "cat"] if bad != "dog\n" else [bad, "cat"]
    index = names.index(bad)
    with pytest.raises(ValueError, match=rf"class {index} name .* control character"):
        if method == "zeroshot":
            ZeroShot(model, names, templates="simple", progress=False)
        else:
            BUILD[method](model, names)
    _assert_unchanged(model, snapshot)


def test_set_classnames_refuses_control_characters_and_keeps_the_classes():
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    ids = coop.tokenized_prompts.clone()
    with pytest.raises(ValueError, match=r"class 1 name 'a\\nb'"):
        coop.set_classnames(["dog", "a\nb"])
    assert coop.classnames == MIXED_NAMES and torch.equal(coop.tokenized_prompts, ids)


# -- numeric options ------------------------------------------------------------------------------------

nan, inf = float("nan"), float("inf")
COMMON = [
    (dict(n_ctx=1.5, ctx_init=None), "n_ctx must be an integer"),
    (dict(n_ctx=True, ctx_init=None), "n_ctx must be an integer"),
    (dict(n_ctx="4", ctx_init=None), "n_ctx must be an integer"),
    (dict(n_ctx=0, ctx_init=None), "n_ctx must be an integer >= 1"),
    (dict(n_ctx=80, ctx_init=None), r"n_ctx=80 .*leaves no room for class names in the 77-token context"),
    (dict(n_ctx=74, ctx_init=None), r"n_ctx=74 .*leaves no room"),
    (dict(ctx_init=" ".join(["photo"] * 75)), r"ctx_init=.*leaves no room for class names"),
    (dict(ctx_init=4), "ctx_init must be a phrase"),
    (dict(seed=True), "seed must be an integer"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(freeze="no"), "freeze must be True or False"),
    (dict(freeze=1), "freeze must be True or False"),
]
PER_METHOD = {
    "coop": [(dict(csc=1), "csc must be True or False")],
    "cocoop": [],
    "maple": [(dict(depth=True), "depth must be")],
    "tpt": [
        (dict(weight_decay=nan), "weight_decay must be a finite number"),
        (dict(weight_decay=inf), "weight_decay must be a finite number"),
        (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
        (dict(weight_decay=True), "weight_decay must be a finite number"),
        (dict(lr=True), "lr must be a finite number > 0"),
        (dict(lr=nan), "lr must be"),
        (dict(lr=inf), "lr must be"),
        (dict(lr=0), "lr must be a finite number > 0"),
        (dict(steps=True), "steps must be an integer"),
        (dict(steps=1.0), "steps must be an integer"),
        (dict(n_views=8.0), "n_views must be an integer"),
        (dict(n_views=True), "n_views must be an integer"),
        (dict(selection=True), r"selection must be a fraction"),
        (dict(batch_size=True), "batch_size must be an integer"),
        (dict(image_batch=2.0), "image_batch must be an integer"),
        (dict(augmix=1), "augmix must be True or False"),
        (dict(cocoop_meta_net="yes"), "cocoop_meta_net must be True or False"),
    ],
}
CASES = [(m, kw, match) for m in BUILD for kw, match in COMMON + PER_METHOD[m]]


@pytest.mark.parametrize("method,kwargs,match", CASES, ids=[f"{m}-{kw}" for m, kw, _ in CASES])
def test_bad_options_are_named_before_clip_is_touched(method, kwargs, match):
    model = _model(method)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        BUILD[method](model, ["dog", "cat"], **kwargs)
    _assert_unchanged(model, snapshot)


def test_maple_init_phrase_budget_is_named():
    model = vit_model()
    with pytest.raises(ValueError, match=r"ctx_init=.*leaves no room for class names"):
        MaPLe(model, NAMES, depth=2, n_ctx=2, ctx_init=" ".join(["photo"] * 75))


@pytest.mark.parametrize("method", list(BUILD))
def test_huge_n_ctx_is_refused_at_once_with_a_short_message(method):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="n_ctx=1000000 ") as err:
        BUILD[method](_model(method), ["dog"], n_ctx=10 ** 6, ctx_init=None)
    assert len(str(err.value)) < 300
    assert time.perf_counter() - start < 30


def test_tpt_adapt_steps_must_be_an_integer():
    tpt = TPT(make_model(), MIXED_NAMES, **TPT_OPTS)
    feats = torch.randn(1, 8, 32)
    for steps in (True, 1.0, 0):
        with pytest.raises(ValueError, match="steps must be an integer"):
            tpt.adapt_features(feats, steps=steps)


# -- TPT loads that fail -----------------------------------------------------------------------------------

def _cocoop_state(bad=False):
    gen = torch.Generator().manual_seed(4)
    return {"ctx": torch.randn(4, 64, generator=gen) * 0.02,
            "meta_net.linear1.weight": torch.randn(3 if bad else 2, 32, generator=gen),
            "meta_net.linear1.bias": torch.randn(2), "meta_net.linear2.weight": torch.randn(64, 2, generator=gen),
            "meta_net.linear2.bias": torch.zeros(64)}


def _tpt_file(path, tpt, tensors):
    return save_prompt_file(path, tensors, "tpt", tpt.options(), tpt.classnames)


def _learner_snapshot(tpt):
    learner = tpt.prompt_learner
    return learner.meta_net, {k: v.clone() for k, v in learner.state_dict().items()}, dict(vars(tpt)).keys()


def _assert_learner_unchanged(tpt, snapshot):
    meta_net, state, attrs = snapshot
    learner = tpt.prompt_learner
    assert learner.meta_net is meta_net
    now = learner.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert dict(vars(tpt)).keys() == attrs


def test_failed_tpt_load_adds_no_meta_net(tmp_path):
    tpt = TPT(make_model(), MIXED_NAMES, **TPT_OPTS)
    snapshot = _learner_snapshot(tpt)
    path = _tpt_file(tmp_path / "bad.safetensors", tpt, _cocoop_state(bad=True))
    with pytest.raises(CheckpointError, match="linear1.weight"):
        tpt.load(path)
    _assert_learner_unchanged(tpt, snapshot)
    assert tpt.prompt_learner.meta_net is None and not tpt.options()["cocoop_meta_net"]


def test_failed_tpt_load_keeps_its_own_meta_net(tmp_path):
    tpt = TPT(make_model(), MIXED_NAMES, cocoop_meta_net=True, **TPT_OPTS)
    assert tpt.prompt_learner.meta_net is not None
    snapshot = _learner_snapshot(tpt)
    path = _tpt_file(tmp_path / "no_meta.safetensors", tpt, {"ctx": torch.randn(4, 64)})
    with pytest.raises(CheckpointError, match="meta_net"):
        tpt.load(path)
    _assert_learner_unchanged(tpt, snapshot)
    wrong_ctx = {**_cocoop_state(), "ctx": torch.randn(6, 64)}
    with pytest.raises(CheckpointError, match="ctx"):
        tpt.load(_tpt_file(tmp_path / "wrong_ctx.safetensors", tpt, wrong_ctx))
    _assert_learner_unchanged(tpt, snapshot)


def test_tpt_load_with_a_meta_net_adds_it(tmp_path):
    tpt = TPT(make_model(), MIXED_NAMES, **TPT_OPTS)
    state = _cocoop_state()
    tpt.load(_tpt_file(tmp_path / "meta.safetensors", tpt, state))
    got = tpt.prompt_learner.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
