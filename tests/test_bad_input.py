"""The input surface beyond checkpoints: non-finite images, export targets that are not files, and
errors from torch / onnx / onnxruntime wrapped with what promptcore was doing. Each case: a clear
error, and nothing changed or written."""

import pytest
import torch
from helpers import MIXED_NAMES, make_model
from test_export import _export_args, tiny_release  # noqa: F401  (fixture)
from test_maple import NAMES, vit_model

import promptcore
from promptcore.cli import main
from promptcore.cocoop import CoCoOp
from promptcore.export import ExportError, read_metadata, to_onnx
from promptcore.maple import MaPLe
from promptcore.tpt import TPT


def _images(n=3, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _poisoned(value, image=1):
    images = _images()
    images[image, 2, 5, 7] = value
    return images


MODULES = {
    "coop": lambda: promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0).eval(),
    "cocoop": lambda: CoCoOp(make_model(), MIXED_NAMES, seed=0).eval(),
    "maple": lambda: MaPLe(vit_model(), NAMES, depth=3, seed=0).eval(),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method", list(MODULES))
def test_non_finite_images_are_refused_by_every_method(method, value):
    module = MODULES[method]()
    with torch.no_grad():
        module(_images())  # finite images are fine
        with pytest.raises(ValueError, match="NaN or Inf values in image 1;"):
            module(_poisoned(value))


@pytest.mark.parametrize("method", list(MODULES))
def test_bad_images_are_named_by_every_method(method):
    module = MODULES[method]()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        module(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="pixels"):
        module(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="pixels"):
        module(torch.randn(1, 3, 64, 64))
    with pytest.raises(TypeError, match="floating point"):
        module(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images are on meta"):
        module(torch.empty(1, 3, 32, 32, device="meta"))


def test_tpt_refuses_non_finite_views_and_raw_images():
    tpt = TPT(make_model(), MIXED_NAMES, n_views=4, selection=0.25, seed=0)
    views = _images(8).reshape(2, 4, 3, 32, 32)
    views[1, 3, 0, 0, 0] = float("nan")  # an augmented view, not view 0
    ctx = tpt.prompt_learner.ctx.detach().clone()
    with pytest.raises(ValueError, match="views: NaN or Inf values in image 1;"):
        tpt.adapt(views)
    with pytest.raises(ValueError, match="image 2: NaN or Inf"):
        tpt.predict([_images(1)[0], _images(1)[0], _poisoned(float("inf"), 0)[0]])
    assert torch.equal(tpt.prompt_learner.ctx, ctx)


def test_export_target_that_is_not_a_file(tmp_path):
    coop = MODULES["coop"]()
    with pytest.raises(ExportError, match="/dev/full is not a regular file"):
        to_onnx(coop, "/dev/full")
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    with pytest.raises(ExportError, match="model.onnx is a folder"):
        to_onnx(coop, folder)
    assert list(folder.iterdir()) == []


def test_errors_inside_torch_onnx_are_wrapped_and_leave_nothing(tmp_path, monkeypatch):
    coop = MODULES["coop"]()

    def broken_export(*args, **kwargs):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(ExportError, match="exporting the coop graph with torch.onnx failed: RuntimeError: "
                                          "simulated exporter crash"):
        to_onnx(coop, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_errors_inside_onnxruntime_are_wrapped(tmp_path, monkeypatch):
    from promptcore.export import onnx_export

    def broken_compare(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : simulated")

    monkeypatch.setattr(onnx_export, "compare_with_onnxruntime", broken_compare)
    with pytest.raises(ExportError, match="running the exported graph in onnxruntime against PyTorch failed"):
        to_onnx(MODULES["coop"](), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_onnx(tmp_path, capsys):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x00not a protobuf at all\xff" * 10)
    with pytest.raises(ExportError, match=f"reading {fake} as an ONNX model failed"):
        read_metadata(fake)
    assert main(["verify", str(fake)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptcore verify: error: reading") and len(err.strip().splitlines()) == 1


def test_cli_export_of_a_corrupt_checkpoint(tiny_release, capsys):  # noqa: F811
    r = tiny_release
    bad = r["root"] / "output" / "prompt_learner" / "model.pth.tar-50"
    from test_corrupt_checkpoints import _rewrite_member

    _rewrite_member(bad, "data/0", lambda data: data[:16])
    before = sorted(p.name for p in r["root"].iterdir())
    assert main(_export_args(r, r["root"] / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptcore export: error:") and "state_dict.ctx needs" in err
    assert sorted(p.name for p in r["root"].iterdir()) == before


def test_cli_names_a_missing_optional_dependency(monkeypatch, capsys, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"x")
    assert main(["verify", str(fake)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("promptcore verify: error: onnx is not installed (pip install 'promptcore[export]' "
                           "for export and verify)")
