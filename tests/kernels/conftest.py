"""Kernel tests: run the Triton kernels (interpreted on CPU, compiled on CUDA) against their references.

``TRITON_INTERPRET`` must be set before the kernel modules are imported, hence the module-level
code; ``setdefault`` leaves an explicit choice (``TRITON_INTERPRET=0`` on a GPU runner) alone.
The backend is forced to ``triton`` per test by an autouse fixture rather than globally, so the
method tests collected next to these (which default to ``torch``) are not affected, whatever
the collection order.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("PROMPTCORE_BACKEND", "triton")
    yield


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
