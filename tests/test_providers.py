"""onnxruntime execution providers for export and verify: auto, explicit choices, IO binding."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import MIXED_NAMES, make_model

import promptcore
from promptcore.export import ExportError, onnx_export, to_onnx
from promptcore.export.onnx_export import open_session, ort_runner, provider_list


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("providers")
    coop = promptcore.CoOp(make_model(), MIXED_NAMES[:4], n_ctx=4, seed=0).eval()
    report = to_onnx(coop, root / "coop.onnx", provider="cpu")
    return root / "coop.onnx", coop, report


def test_auto_picks_best_available_and_says_so(exported):
    path, _, report = exported
    assert report.provider == "CPUExecutionProvider"
    session, used, note = open_session(path, "auto")
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available or "TensorrtExecutionProvider" in available:
        assert used != "CPUExecutionProvider" and f"provider auto: {used}" in note
    else:
        assert used == "CPUExecutionProvider" and "fell back to CPUExecutionProvider" in note


def test_explicit_gpu_provider_missing_or_failing_is_an_error(exported, monkeypatch):
    path = exported[0]
    with pytest.raises(ExportError, match="unknown provider 'rocm'"):
        provider_list("rocm")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ExportError, match=r"not in this onnxruntime build .*promptcore\[gpu\]"):
            open_session(path, "cuda")
    # a GPU provider that is installed but cannot start: onnxruntime silently runs on CPU; we refuse
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda p, providers: real(p, providers=["CPUExecutionProvider"]))
    assert provider_list("auto") == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ExportError, match="CUDAExecutionProvider is installed but failed to start"):
        open_session(path, "cuda")


def test_io_binding_runner_matches_plain_run(exported):
    path, coop, _ = exported
    session, used, _ = open_session(path, "cpu")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    run = ort_runner(session, {"images": images}, used)
    bound = run().copy_outputs_to_cpu()[0]
    plain = session.run(None, {"images": images})[0]
    np.testing.assert_array_equal(bound, plain)
    with torch.no_grad():
        expected = coop(torch.from_numpy(images)).numpy()
    assert np.abs(bound - expected).max() / np.abs(expected).max() < 1e-5


def test_export_with_missing_provider_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    coop = promptcore.CoOp(make_model(), MIXED_NAMES[:2], n_ctx=4, seed=0).eval()
    with pytest.raises(ExportError, match="provider tensorrt"):
        to_onnx(coop, tmp_path / "m.onnx", provider="tensorrt")
    assert list(tmp_path.iterdir()) == []
    assert onnx_export.PROVIDERS["tensorrt"] == "TensorrtExecutionProvider"
