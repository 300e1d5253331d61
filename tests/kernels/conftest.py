"""Kernel tests: run the Triton kernels (interpreted on CPU, compiled on CUDA) against their references.

``TRITON_INTERPRET`` must be set before the kernel modules are imported, hence the module-level
code; ``setdefault`` leaves an explicit choice (``TRITON_INTERPRET=0`` on a GPU runner) alone.
The backend is forced to ``triton`` per test by an autouse fixture rather than globally, so the
method tests collected next to these (which default to ``torch``) are not affected, whatever
the collection order.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PROMPTCORE_BACKEND", "triton")

import functools  # noqa: E402
import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("PROMPTCORE_BACKEND", "triton")
    yield


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# pytest imports every conftest.py under the module name "conftest", so once this one is loaded,
# `from conftest import helper` in tests/*.py finds this module. Forward the names it lacks to
# tests/conftest.py (loaded once, lazily, under a private name) so those imports keep working.
_NOT_FORWARDED = ("__", "pytest_", "collect_ignore")


@functools.lru_cache(maxsize=1)
def _root_conftest():
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("_promptcore_tests_root_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def __getattr__(name):
    if not name.startswith(_NOT_FORWARDED):
        try:
            return getattr(_root_conftest(), name)
        except (AttributeError, FileNotFoundError):
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
