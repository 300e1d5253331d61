"""Official Dassl checkpoints (read without running pickled code) and promptcore's own files."""

import os
import stat
import sys
import types
from collections import OrderedDict

import pytest
import torch
from helpers import MIXED_NAMES, make_model

import promptcore
from promptcore.checkpoints import CheckpointError, UnsafeCheckpointError, read_prompt_file


def _install_fake_dassl():
    """A module named like Dassl's scheduler module, so pickles reference dassl.optim.lr_scheduler."""
    if "dassl.optim.lr_scheduler" in sys.modules:
        return sys.modules["dassl.optim.lr_scheduler"]
    from torch.optim.lr_scheduler import LRScheduler

    mod = types.ModuleType("dassl.optim.lr_scheduler")

    class ConstantWarmupScheduler(LRScheduler):  # the structure of Dassl's warmup wrapper
        def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
            self.successor = successor
            self.warmup_epoch = warmup_epoch
            self.cons_lr = cons_lr
            super().__init__(optimizer, last_epoch)

        def get_lr(self):
            return [self.cons_lr for _ in self.base_lrs]

    ConstantWarmupScheduler.__module__ = "dassl.optim.lr_scheduler"
    mod.ConstantWarmupScheduler = ConstantWarmupScheduler
    for name in ("dassl", "dassl.optim"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["dassl.optim.lr_scheduler"] = mod
    return mod


def write_dassl_checkpoint(folder, state_dict, epoch=50, name="prompt_learner"):
    """Write ``state_dict`` exactly as Dassl's save_model/save_checkpoint do (scheduler object included)."""
    lr_mod = _install_fake_dassl()
    params = [torch.nn.Parameter(v.clone().float()) for v in state_dict.values() if v.is_floating_point()]
    optim = torch.optim.SGD(params, lr=0.002, momentum=0.9)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optim, float(epoch))
    sched = lr_mod.ConstantWarmupScheduler(optim, successor, 1, 1e-5)
    params[0].grad = torch.ones_like(params[0])
    optim.step()
    sched.step()
    state = {
        "state_dict": OrderedDict(state_dict),
        "epoch": epoch,
        "optimizer": optim.state_dict(),
        "scheduler": sched.state_dict(),
        "val_result": None,
    }
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model.pth.tar-{epoch}"
    torch.save(state, path)
    return path


def _coop_state(coop, ctx):
    prompts = coop.prompt_learner.prompts
    with torch.no_grad():
        emb = coop.model.token_embedding(prompts.ids)
    n = coop.n_ctx
    return {"ctx": ctx, "token_prefix": emb[:, :1], "token_suffix": emb[:, 1 + n:]}


def test_dassl_checkpoint_loads(tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    trained = torch.randn(4, 64)
    path = write_dassl_checkpoint(tmp_path, _coop_state(coop, trained))
    with pytest.raises(Exception):  # what makes these files hard: the plain safe loader refuses them
        torch.load(path, weights_only=True)
    info = coop.load_official(path)
    assert info["epoch"] == 50
    torch.testing.assert_close(coop.prompt_learner.ctx.detach(), trained, rtol=0, atol=0)


def test_folder_resolves_to_newest_epoch(tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    write_dassl_checkpoint(tmp_path, _coop_state(coop, torch.zeros(4, 64)), epoch=5)
    newest = torch.randn(4, 64)
    write_dassl_checkpoint(tmp_path, _coop_state(coop, newest), epoch=50)
    info = coop.load_official(tmp_path)
    assert info["file"].endswith("model.pth.tar-50")
    torch.testing.assert_close(coop.prompt_learner.ctx.detach(), newest)


def test_fp16_checkpoint_into_fp32_module(tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    trained = torch.randn(4, 64).half()
    coop.load_official(write_dassl_checkpoint(tmp_path, {"ctx": trained}))
    torch.testing.assert_close(coop.prompt_learner.ctx.detach(), trained.float())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": {"ctx": torch.randn(4, 64)}, "epoch": 1, "scheduler": _Evil(marker)}, path)
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    before = coop.prompt_learner.ctx.detach().clone()
    with pytest.raises(UnsafeCheckpointError, match="system"):
        coop.load_official(path)
    assert not marker.exists()
    assert torch.equal(coop.prompt_learner.ctx.detach(), before)


def test_mismatched_checkpoints_are_named(tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    before = coop.prompt_learner.ctx.detach().clone()
    cases = {
        "n_ctx16": ({"ctx": torch.randn(16, 64)}, "n_ctx=16, width=64, this CoOp has generic, n_ctx=4"),
        "width": ({"ctx": torch.randn(4, 512)}, "width=512"),
        "csc": ({"ctx": torch.randn(7, 4, 64)}, "class-specific for 7 classes"),
        "cocoop": ({"ctx": torch.randn(4, 64), "meta_net.linear1.weight": torch.randn(2, 32)}, "CoCoOp"),
        "maple": ({"prompt_learner.ctx": torch.randn(2, 64), "prompt_learner.proj.weight": torch.randn(96, 64),
                   "prompt_learner.compound_prompts_text.0": torch.randn(2, 64),
                   "image_encoder.conv1.weight": torch.randn(1)}, "MaPLe"),
        "empty": ({"something": torch.randn(2)}, "no prompt-learner context"),
    }
    for name, (state, message) in cases.items():
        path = write_dassl_checkpoint(tmp_path / name, state)
        with pytest.raises(CheckpointError, match=message):
            coop.load_official(path)
        assert torch.equal(coop.prompt_learner.ctx.detach(), before), name
    not_zip = tmp_path / "model.pth.tar-3"
    not_zip.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch zip archive"):
        coop.load_official(not_zip)
    with pytest.raises(FileNotFoundError):
        coop.load_official(tmp_path / "missing")


def test_safetensors_round_trip(tmp_path):
    model = make_model()
    coop = promptcore.CoOp(model, MIXED_NAMES, n_ctx=4, class_token_position="middle", seed=0)
    with torch.no_grad():
        coop.prompt_learner.ctx.add_(torch.randn(4, 64))
    path = coop.save(tmp_path / "prompts.safetensors", model_name="tiny-test")
    tensors, meta = read_prompt_file(path)
    assert meta["method"] == "coop" and meta["model_name"] == "tiny-test"
    assert meta["classnames"] == MIXED_NAMES and meta["options"]["class_token_position"] == "middle"
    restored = promptcore.CoOp.from_file(path, make_model())
    assert restored.classnames == MIXED_NAMES and restored.class_token_position == "middle"
    torch.testing.assert_close(restored.prompt_learner.ctx, coop.prompt_learner.ctx, rtol=0, atol=0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), coop(images))


def test_prompt_file_errors_change_nothing(tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        coop.save(tmp_path / "missing" / "p.safetensors")
    assert not (tmp_path / "missing").exists()
    other = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=2, seed=0)
    path = other.save(tmp_path / "p.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left
    before = coop.prompt_learner.ctx.detach().clone()
    with pytest.raises(CheckpointError, match="n_ctx=2"):
        coop.load(path)
    assert torch.equal(coop.prompt_learner.ctx.detach(), before)
    dassl = write_dassl_checkpoint(tmp_path, {"ctx": torch.randn(4, 64)})
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        coop.load(dassl)


def test_prompt_file_with_extra_tensors_is_refused(tmp_path):
    from promptcore.checkpoints import save_prompt_file

    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    path = save_prompt_file(tmp_path / "p.safetensors", {"ctx": torch.randn(4, 64), "extra": torch.zeros(2)},
                            "coop", coop.options(), MIXED_NAMES)
    before = coop.prompt_learner.ctx.detach().clone()
    with pytest.raises(CheckpointError, match="does not have: extra"):
        coop.load(path)
    assert torch.equal(coop.prompt_learner.ctx.detach(), before)


def _char_device(path):
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # the node of /dev/null


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_save_refuses_a_target_that_is_not_a_regular_file(kind, tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    target = tmp_path / "prompts.safetensors"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    else:
        try:
            _char_device(target)
        except PermissionError:
            pytest.skip("creating a device node needs root (the FIFO case covers the same check)")
    before = stat.S_IFMT(os.lstat(target).st_mode)
    with pytest.raises(ValueError, match="is (not a regular file|a folder)") as err:
        coop.save(target)
    assert str(target) in str(err.value)
    assert stat.S_IFMT(os.lstat(target).st_mode) == before  # still the node it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.safetensors"]  # no temporary file left


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=oct)
def test_saved_file_mode_honours_the_umask(umask, tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    old = os.umask(umask)
    try:
        path = coop.save(tmp_path / "new.safetensors")
        existing = tmp_path / "existing.safetensors"
        existing.write_bytes(b"")
        os.chmod(existing, 0o640)
        coop.save(existing)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o640  # a rewrite keeps the file's mode, as open() does
    assert read_prompt_file(existing)[1]["method"] == "coop"
