"""promptcore.official on its own: each method's file, written as the official trainer writes it, adapted to
a learner state; one description of each learned tensor behind every message."""

from collections import OrderedDict

import pytest
import torch
from helpers import MIXED_NAMES, make_model
from test_checkpoints import _coop_state, write_dassl_checkpoint
from test_cocoop import _official_state as official_cocoop_state
from test_maple import NAMES, _trained_state, official_maple_state, vit_model

import promptcore
from promptcore.checkpoints import CheckpointError
from promptcore.cocoop import CoCoOp
from promptcore.maple import MaPLe
from promptcore.official import (
    LearnerSpec,
    OfficialCheckpoint,
    check_clip_tensors,
    describe_shape,
    read_context_source,
    read_official,
)
from promptcore.tpt import TPT


def _same(a, b):
    return a.dtype == b.dtype and torch.equal(a, b)


def test_coop_file_adapts_to_ctx(tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    trained = torch.randn(4, 64).half()  # the official trainer runs CLIP (and ctx) in fp16
    saved = _coop_state(coop, trained)
    write_dassl_checkpoint(tmp_path, _coop_state(coop, torch.zeros(4, 64)), epoch=3)
    path = write_dassl_checkpoint(tmp_path, saved, epoch=50)
    ckpt = read_official(tmp_path)  # the folder: its newest epoch
    assert ckpt.method == "coop" and ckpt.file == path and ckpt.epoch == 50 and ckpt.val_result is None
    assert list(ckpt.learner) == ["ctx"] and _same(ckpt.learner["ctx"], trained)
    assert _same(ckpt.token_prefix, saved["token_prefix"]) and _same(ckpt.token_suffix, saved["token_suffix"])
    assert ckpt.clip == {} and ckpt.strict and ckpt.ignored == ()
    assert ckpt.options() == {"n_ctx": 4, "csc": False}
    assert ckpt.info() == {"file": str(path), "epoch": 50}
    csc = read_official(write_dassl_checkpoint(tmp_path / "csc", {"ctx": torch.randn(7, 16, 64)}), "coop")
    assert csc.options() == {"n_ctx": 16, "csc": True} and csc.token_suffix is None


def test_cocoop_file_adapts_to_ctx_and_meta_net(tmp_path):
    cocoop = CoCoOp(make_model(), MIXED_NAMES, seed=0)
    saved = official_cocoop_state(cocoop)
    saved["meta_net.linear3.weight"] = torch.randn(2, 2)  # another layer: ignored, as officially (strict=False)
    ckpt = read_official(write_dassl_checkpoint(tmp_path, saved, epoch=10), "cocoop")
    learner_keys = list(cocoop.prompt_learner.state_dict())
    assert ckpt.method == "cocoop" and ckpt.epoch == 10 and not ckpt.strict
    assert sorted(ckpt.learner) == sorted(learner_keys + ["meta_net.linear3.weight"])
    assert all(_same(ckpt.learner[k], saved[k]) for k in learner_keys)
    assert _same(ckpt.token_suffix, saved["token_suffix"]) and ckpt.clip == {}
    assert ckpt.options() == {"n_ctx": 4, "ctx_init": "a photo of a"}
    # the learner's description keeps exactly its own tensors
    checked = LearnerSpec.of(cocoop).check(ckpt.learner, ckpt.file, strict=False)
    assert list(checked) == learner_keys
    with pytest.raises(CheckpointError, match="holds tensors this CoCoOp does not have: meta_net.linear3.weight"):
        LearnerSpec.of(cocoop).check(ckpt.learner, ckpt.file, strict=True)


@pytest.mark.parametrize("data_parallel", [False, True])
def test_maple_whole_model_file_splits_prompts_and_clip(tmp_path, data_parallel):
    maple = MaPLe(vit_model(), NAMES, depth=3, seed=0)
    trained = _trained_state(maple)
    saved = official_maple_state(maple, trained)
    if data_parallel:  # a model wrapped in DataParallel saves every key under "module."
        saved = OrderedDict((f"module.{k}", v) for k, v in saved.items())
    ckpt = read_official(write_dassl_checkpoint(tmp_path, saved, epoch=5, name="MultiModalPromptLearner"))
    assert ckpt.method == "maple" and ckpt.epoch == 5 and ckpt.strict
    assert list(ckpt.learner) == list(maple.prompt_learner.state_dict())
    assert all(_same(ckpt.learner[k], v) for k, v in trained.items())
    own_clip = maple._official_clip_tensors()
    assert sorted(ckpt.clip) == sorted(own_clip)
    assert ckpt.token_prefix.shape == (len(NAMES), 1, 64) and ckpt.layout() == {"n_ctx": 2, "depth": 3}
    sos = maple.engine.tower.token_embedding.weight[maple.tokenized_prompts[0, 0]]
    assert check_clip_tensors(ckpt, own_clip, sos) == len(own_clip)
    # the start-of-text embedding is checked too: a wrong one is named
    with pytest.raises(CheckpointError, match="first at prompt_learner.token_prefix"):
        check_clip_tensors(ckpt, own_clip, sos + 1.0)
    other = {k: v + 1 if k == "logit_scale" else v for k, v in own_clip.items()}
    with pytest.raises(CheckpointError, match="first at logit_scale"):
        check_clip_tensors(ckpt, other, sos)


def test_another_methods_file_is_named(tmp_path):
    path = write_dassl_checkpoint(tmp_path, {"ctx": torch.randn(4, 64)})
    with pytest.raises(CheckpointError, match=f"{path} holds CoOp prompts, not MaPLe; load it with promptcore.CoOp"):
        read_official(path, "maple")
    maple = MaPLe(vit_model(), NAMES, depth=2, seed=0)
    maple_path = write_dassl_checkpoint(tmp_path / "m", official_maple_state(maple), name="MultiModalPromptLearner")
    with pytest.raises(CheckpointError, match="holds MaPLe prompts, not CoOp or CoCoOp"):
        read_official(maple_path, ("coop", "cocoop"))
    with pytest.raises(CheckpointError, match="holds MaPLe prompts, not CoOp or CoCoOp"):
        TPT(make_model(), MIXED_NAMES, n_views=4, selection=0.25).load_official(maple_path)
    ckpt = read_official(path)
    with pytest.raises(CheckpointError, match="holds CoOp prompts, not CoCoOp"):
        read_official(ckpt, "cocoop")  # a file already read is checked the same way


def test_a_file_read_once_loads_without_rereading(tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    trained = torch.randn(4, 64)
    path = write_dassl_checkpoint(tmp_path, _coop_state(coop, trained))
    ckpt = read_official(path, "coop")
    path.unlink()
    assert coop.load_official(ckpt) == {"file": str(path), "epoch": 50}
    assert torch.equal(coop.prompt_learner.ctx.detach(), trained)


def test_context_source_reads_promptcore_files_too(tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=1)
    file = coop.save(tmp_path / "coop.safetensors")
    ckpt = read_context_source(file, ("coop", "cocoop"))
    assert ckpt.method == "coop" and ckpt.epoch is None and torch.equal(ckpt.learner["ctx"], coop.prompt_learner.ctx)
    cocoop_file = CoCoOp(make_model(), MIXED_NAMES, seed=0).save(tmp_path / "cocoop.safetensors")
    with pytest.raises(CheckpointError, match="holds CoCoOp prompts, not CoOp"):
        read_context_source(cocoop_file, "coop")


@pytest.mark.parametrize("key,shape,words", [
    ("ctx", (4, 512), "n_ctx=4, width=512"),
    ("ctx", (7, 4, 512), "class-specific for 7 classes, n_ctx=4, width=512"),
    ("compound_prompts_text.3", (2, 512), "n_ctx=2, width=512"),
    ("meta_net.linear1.weight", (32, 512), "image feature dim 512 -> hidden 32"),
    ("meta_net.linear1.bias", (32,), "hidden 32"),
    ("meta_net.linear2.weight", (512, 32), "hidden 32 -> width 512"),
    ("meta_net.linear2.bias", (512,), "width 512"),
    ("proj.weight", (768, 512), "text width 512 -> vision width 768"),
    ("proj.bias", (768,), "vision width 768"),
    ("compound_prompt_projections.0.weight", (768, 512), "text width 512 -> vision width 768"),
    ("compound_prompt_projections.7.bias", (768,), "vision width 768"),
    ("proj.weight", (768,), "shape (768,)"),
    ("something", (3, 2), "shape (3, 2)"),
])
def test_each_kind_of_tensor_is_described_once(key, shape, words):
    assert describe_shape(key, shape) == words


def test_every_message_comes_from_the_learner_description(tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, ctx_init=None, seed=0)
    spec = LearnerSpec.of(coop)
    assert spec.shapes == {"ctx": (4, 64)} and spec.layout == {"n_ctx": 4, "csc": False} and spec.owner == "CoOp"
    source = tmp_path / "f"
    with pytest.raises(CheckpointError) as err:
        spec.check({"ctx": torch.randn(16, 64)}, source)
    assert str(err.value) == (f"{source}: checkpoint ctx is generic, n_ctx=16, width=64, this CoOp has generic, "
                              "n_ctx=4, width=64 (the checkpoint has n_ctx=16, this CoOp has n_ctx=4: build it with "
                              "n_ctx=16)")
    with pytest.raises(CheckpointError) as err:
        spec.check({"ctx": torch.randn(7, 4, 64)}, source)
    assert str(err.value).endswith("this CoOp has generic, n_ctx=4, width=64 (the checkpoint has csc=True, this CoOp "
                                   "has csc=False: build it with csc=True)")
    with pytest.raises(CheckpointError, match=r"ctx is generic, n_ctx=4, width=32, this CoOp has generic, n_ctx=4, "
                                              r"width=64$"):
        spec.check({"ctx": torch.randn(4, 32)}, source)  # same layout, another CLIP: no build hint
    with pytest.raises(CheckpointError, match=f"^{source} lacks ctx$"):
        spec.check({}, source)
    with pytest.raises(CheckpointError, match="does not have: a, b, c, d, e, f, g, h and 2 more$"):
        spec.check({"ctx": torch.randn(4, 64), **{k: torch.zeros(1) for k in "abcdefghij"}}, source)
    # an init phrase fixes n_ctx, so the hint turns it off
    phrase = LearnerSpec.of(promptcore.CoOp(make_model(), MIXED_NAMES, ctx_init="a photo of a"))
    with pytest.raises(CheckpointError, match=r"build it with n_ctx=16, ctx_init=None\)$"):
        phrase.check({"ctx": torch.randn(16, 64)}, source)
    # the same description serves a method with more tensors: MaPLe names the depth it would need
    maple = MaPLe(vit_model(), NAMES, depth=2, seed=0)
    deeper = MaPLe(vit_model(), NAMES, depth=3, seed=0).prompt_learner.state_dict()
    with pytest.raises(CheckpointError, match=r"does not have: compound_prompt_projections.1.bias, "
                                              r"compound_prompt_projections.1.weight, compound_prompts_text.1 "
                                              r"\(the checkpoint has depth=3, this MaPLe has depth=2"):
        LearnerSpec.of(maple).check(deeper, source)
    assert isinstance(read_official(write_dassl_checkpoint(tmp_path, {"ctx": torch.randn(4, 64)})),
                      OfficialCheckpoint)


@pytest.mark.parametrize("key", [0, ("ctx",), None], ids=["int", "tuple", "none"])
def test_state_dict_with_a_non_string_key_is_refused(key, tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    before = coop.prompt_learner.ctx.detach().clone()
    for nested in (True, False):  # a Dassl file, and a bare state dict
        state = {"ctx": torch.randn(4, 64), key: torch.zeros(1)}
        path = tmp_path / f"model.pth.tar-{int(nested)}"
        torch.save({"state_dict": state, "epoch": 1} if nested else state, path)
        with pytest.raises(CheckpointError, match="has a key that is not a string") as err:
            coop.load_official(path)
        assert str(path) in str(err.value)
    assert torch.equal(coop.prompt_learner.ctx.detach(), before)


def test_folder_with_several_runs_is_refused_listing_them(tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    state = _coop_state(coop, torch.randn(4, 64))
    write_dassl_checkpoint(tmp_path / "seed1", state, epoch=50)
    write_dassl_checkpoint(tmp_path / "seed2", state, epoch=10)
    with pytest.raises(CheckpointError, match="holds checkpoints of 2 runs") as err:
        read_official(tmp_path)
    assert str(tmp_path / "seed1" / "prompt_learner") in str(err.value)
    assert str(tmp_path / "seed2" / "prompt_learner") in str(err.value)
    # another method's output beside one run, and a model-best file in a run of its own, count as runs too
    other = tmp_path / "other"
    write_dassl_checkpoint(other, state, epoch=5)
    maple = other / "MultiModalPromptLearner"
    maple.mkdir()
    (maple / "model-best.pth.tar").write_bytes((other / "prompt_learner" / "model.pth.tar-5").read_bytes())
    with pytest.raises(CheckpointError, match="holds checkpoints of 2 runs"):
        coop.load_official(other)
    # one run: its newest epoch, as before
    assert read_official(tmp_path / "seed1").epoch == 50
    assert read_official(tmp_path / "seed2" / "prompt_learner").file.name == "model.pth.tar-10"
