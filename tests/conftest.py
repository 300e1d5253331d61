"""Test setup: the Triton interpreter for CPU kernels, small seeded open_clip models."""

import os

# Must happen before any module that defines Triton kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Method tests run the PyTorch path of the ops; kernel tests force "triton" themselves.
os.environ.setdefault("PROMPTCORE_BACKEND", "torch")

import pytest  # noqa: E402
from helpers import make_model  # noqa: E402


@pytest.fixture
def tiny_model():
    return make_model("quickgelu")
