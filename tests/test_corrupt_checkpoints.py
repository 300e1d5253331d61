"""Corrupt checkpoints and prompt files are refused with a CheckpointError naming the file, the key and
the problem, and the module is left exactly as it was (state dict, class names, text cache)."""

import zipfile

import pytest
import torch
from helpers import MIXED_NAMES, make_model
from test_checkpoints import _coop_state, write_dassl_checkpoint
from test_maple import NAMES, official_maple_state, vit_model

import promptcore
from promptcore.checkpoints import CheckpointError, read_torch_checkpoint, save_prompt_file
from promptcore.cocoop import CoCoOp
from promptcore.maple import MaPLe
from promptcore.tpt import TPT

BAD_VALUES = {
    "nan": lambda t: t.float().index_fill(0, torch.tensor([0]), float("nan")),
    "inf": lambda t: t.float().index_fill(0, torch.tensor([0]), float("inf")),
    "int": lambda t: t.round().long(),
    "complex": lambda t: torch.complex(t.float(), torch.zeros_like(t.float())),
}
PROBLEMS = {"nan": "non-finite.*NaN", "inf": "non-finite.*Inf", "int": "dtype int64", "complex": "dtype complex64"}


def _coop():
    return promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0).eval()


def _cocoop():
    return CoCoOp(make_model(), MIXED_NAMES, seed=0)


def _maple():
    return MaPLe(vit_model(), NAMES, depth=3, seed=0).eval()


def _tpt():
    return TPT(make_model(), MIXED_NAMES, n_views=8, selection=0.25, ctx_init=None, seed=0)


def _official(module, tmp_path, key, bad):
    """An official (Dassl) file of ``module``'s own prompts with ``key`` replaced by a bad value."""
    if isinstance(module, MaPLe):
        state = official_maple_state(module)
        key = f"prompt_learner.{key}"
    elif isinstance(module, promptcore.CoOp):
        state = _coop_state(module, module.prompt_learner.ctx.detach().clone())
    elif isinstance(module, TPT):  # an official CoOp file to initialise from
        state = {"ctx": module.prompt_learner.ctx.detach().clone(), "token_prefix": torch.zeros(7, 1, 64)}
    else:
        state = {k: v.detach().clone() for k, v in module.prompt_learner.state_dict().items()}
    state[key] = BAD_VALUES[bad](state[key])
    return write_dassl_checkpoint(tmp_path, state, name=f"bad_{bad}")


def _snapshot(module):
    return ({k: v.clone() for k, v in module.state_dict().items()}, list(module.classnames), module._text_cache)


def _unchanged(module, snap):
    state, names, cache = snap
    now = module.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], v) if not v.is_floating_point() or not v.isnan().any() else
               torch.equal(now[k].isnan(), v.isnan()) for k, v in state.items())
    assert module.classnames == names and module._text_cache is cache


CASES = [(_coop, "ctx"), (_cocoop, "meta_net.linear1.weight"), (_cocoop, "ctx"), (_maple, "compound_prompts_text.0"),
         (_maple, "proj.weight"), (_tpt, "ctx")]


@pytest.mark.parametrize("bad", list(BAD_VALUES))
@pytest.mark.parametrize("build,key", CASES, ids=lambda v: getattr(v, "__name__", v))
def test_bad_official_tensor_is_refused(build, key, bad, tmp_path):
    module = build()
    if isinstance(module, promptcore.CoOp):
        module.text_features()  # a warm cache must survive the failed load
    path = _official(module, tmp_path, key, bad)
    snap = _snapshot(module)
    with pytest.raises(CheckpointError, match=PROBLEMS[bad]) as err:
        module.load_official(path)
    assert str(path) in str(err.value) and key.split(".")[-1] in str(err.value)
    _unchanged(module, snap)


@pytest.mark.parametrize("bad", ["nan", "inf", "int"])
@pytest.mark.parametrize("build,key", [(_coop, "ctx"), (_cocoop, "meta_net.linear2.bias"), (_maple, "ctx"),
                                       (_tpt, "ctx")], ids=lambda v: getattr(v, "__name__", v))
def test_bad_prompt_file_is_refused_by_load_and_from_file(build, key, bad, tmp_path):
    module = build()
    state = {k: v.detach().clone() for k, v in module.prompt_learner.state_dict().items()}
    state[key] = BAD_VALUES[bad](state[key])
    path = save_prompt_file(tmp_path / "bad.safetensors", state, module.method, module.options(), module.classnames)
    snap = _snapshot(module)
    with pytest.raises(CheckpointError, match=PROBLEMS[bad]) as err:
        module.load(path)
    assert str(path) in str(err.value) and key in str(err.value)
    _unchanged(module, snap)
    with pytest.raises(CheckpointError, match=PROBLEMS[bad]):
        type(module).from_file(path, module.model)


def test_tpt_cocoop_init_with_non_finite_meta_net_is_refused(tmp_path):
    tpt = _tpt()
    gen = torch.Generator().manual_seed(4)
    state = {"ctx": torch.randn(4, 64, generator=gen) * 0.02,
             "meta_net.linear1.weight": torch.randn(2, 32, generator=gen), "meta_net.linear1.bias": torch.randn(2),
             "meta_net.linear2.weight": torch.full((64, 2), float("nan")), "meta_net.linear2.bias": torch.zeros(64)}
    path = write_dassl_checkpoint(tmp_path, state)
    snap = _snapshot(tpt)
    with pytest.raises(CheckpointError, match="meta_net.linear2.weight holds 128 non-finite"):
        tpt.init_from_cocoop(path)
    assert tpt.prompt_learner.meta_net is None
    _unchanged(tpt, snap)


def _rewrite_member(path, member_suffix, transform):
    """Rewrite one record of a torch zip archive (the rest byte for byte)."""
    with zipfile.ZipFile(path) as src:
        records = [(info, src.read(info.filename)) for info in src.infolist()]
    hit = False
    with zipfile.ZipFile(path, "w") as dst:
        for info, data in records:
            if info.filename.endswith(member_suffix):
                data, hit = transform(data), True
            dst.writestr(info, data)
    assert hit, member_suffix


def test_truncated_storage_is_a_checkpoint_error_naming_file_and_tensor(tmp_path):
    coop = _coop()
    path = write_dassl_checkpoint(tmp_path, {"ctx": torch.randn(4, 64)})
    with zipfile.ZipFile(path) as z:  # the ctx storage is the first one pickled: data/0
        assert len(z.read(next(n for n in z.namelist() if n.endswith("data/0")))) == 4 * 64 * 4
    _rewrite_member(path, "data/0", lambda data: data[:16])
    snap = _snapshot(coop)
    with pytest.raises(CheckpointError, match=r"tensor state_dict\.ctx needs 256 elements.*holds 4") as err:
        coop.load_official(path)
    assert str(path) in str(err.value)
    _unchanged(coop, snap)


def test_storage_of_partial_elements_and_garbled_pickle_are_checkpoint_errors(tmp_path):
    path = write_dassl_checkpoint(tmp_path, {"ctx": torch.randn(4, 64)})
    _rewrite_member(path, "data/0", lambda data: data[:15])
    with pytest.raises(CheckpointError, match="not a whole number"):
        read_torch_checkpoint(path)
    path = write_dassl_checkpoint(tmp_path / "garbled", {"ctx": torch.randn(4, 64)})
    _rewrite_member(path, "data.pkl", lambda data: data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is corrupt"):
        read_torch_checkpoint(path)


def test_fp16_official_files_still_load(tmp_path):
    coop = _coop()
    ctx = torch.randn(4, 64).half()
    coop.load_official(write_dassl_checkpoint(tmp_path, _coop_state(coop, ctx)))
    assert torch.equal(coop.prompt_learner.ctx, ctx.float())


def test_prompt_file_with_incomplete_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    coop = _coop()
    path = tmp_path / "incomplete.safetensors"
    save_file({"ctx": torch.zeros(4, 64)}, str(path), metadata={"format": "promptcore-prompts", "method": "coop"})
    snap = _snapshot(coop)
    with pytest.raises(CheckpointError, match="metadata is incomplete or corrupt .*options"):
        coop.load(path)
    _unchanged(coop, snap)


@pytest.mark.parametrize("bad", ["nan", "int"])
def test_zeroshot_file_with_a_bad_classifier_is_refused(bad, tmp_path):
    from promptcore.zeroshot import ZeroShot

    zs = ZeroShot(make_model(), MIXED_NAMES[:3], templates=["a photo of a {}."], progress=False)
    path = zs.save(tmp_path / "zs.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["classifier"] = BAD_VALUES[bad](tensors["classifier"])
    save_file(tensors, str(path), metadata=metadata)
    before = zs._text_cache
    with pytest.raises(CheckpointError, match=PROBLEMS[bad]) as err:
        zs.load(path)
    assert "classifier" in str(err.value) and zs._text_cache is before
