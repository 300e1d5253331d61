"""End to end: CoOp through the Triton kernels (interpreter on CPU) equals the PyTorch backend."""

import pytest
import torch
from helpers import make_model

import promptcore
from promptcore.kernels import triton_available

NAMES = ["dog", "great white shark", "x"]


def _logits_and_grad(monkeypatch, backend, dtype=torch.float32, position="end"):
    monkeypatch.setenv("PROMPTCORE_BACKEND", backend)
    kind = "gelu_ls" if dtype == torch.float32 else "quickgelu"  # open_clip keeps layer scale fp32
    coop = promptcore.CoOp(make_model(kind, dtype), NAMES, n_ctx=3, class_token_position=position, seed=0)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = coop(images)
    (grad,) = torch.autograd.grad(logits.float().pow(2).sum(), coop.prompt_learner.ctx)
    return logits.detach(), grad


@pytest.mark.skipif(not triton_available(), reason="triton is not installed on this platform")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize("position", ["end", "front"])
def test_coop_triton_equals_torch(monkeypatch, dtype, tol, position):
    calls = {"n": 0}
    from promptcore.kernels import backend

    real = backend.use_triton

    def counting(*tensors):
        chosen = real(*tensors)
        calls["n"] += int(chosen)
        return chosen

    monkeypatch.setattr(backend, "use_triton", counting)
    for mod in ("prompt_assembly", "prefix_attention", "cosine_logits"):
        module = __import__(f"promptcore.kernels.{mod}", fromlist=["use_triton"])
        if hasattr(module, "use_triton"):
            monkeypatch.setattr(module, "use_triton", counting)
    ref_logits, ref_grad = _logits_and_grad(monkeypatch, "torch", dtype, position)
    assert calls["n"] == 0
    tri_logits, tri_grad = _logits_and_grad(monkeypatch, "triton", dtype, position)
    assert calls["n"] > 0  # the kernels really ran
    scale = ref_logits.float().abs().max()
    assert (tri_logits.float() - ref_logits.float()).abs().max() <= tol * scale
    gscale = ref_grad.float().abs().max()
    assert (tri_grad.float() - ref_grad.float()).abs().max() <= tol * gscale
