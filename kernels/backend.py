"""The one backend switch of promptcore.

Every fused op asks :func:`use_triton` which implementation to run:

* compiled Triton for CUDA tensors;
* the Triton interpreter for CPU tensors when ``TRITON_INTERPRET=1`` was set before the
  kernel modules were imported (how CI exercises the kernels);
* the PyTorch reference otherwise, and always while ``torch.onnx`` exports or
  ``torch.jit`` traces a graph.

``PROMPTCORE_BACKEND=triton|torch|auto`` (default ``auto``) forces a choice. Nothing here
queries a device or imports Triton at import time.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def requested_backend() -> str:
    """The backend asked for through ``PROMPTCORE_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get("PROMPTCORE_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"PROMPTCORE_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton can be imported (it is absent on macOS and Windows)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether the Triton interpreter is on (it must be set before kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tracing_or_compiling() -> bool:
    """Whether torch.onnx export, jit tracing/scripting or torch.compile is capturing the current call."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide whether an op over ``tensors`` runs its Triton kernel (True) or the reference."""
    choice = requested_backend()
    if choice == "torch" or tracing_or_compiling():
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    runnable = triton_available() and (on_cuda or interpreter_enabled())
    if choice == "triton" and not runnable:
        where = "CUDA" if on_cuda else "CPU"
        raise RuntimeError(
            f"PROMPTCORE_BACKEND=triton, but Triton cannot run on these {where} tensors "
            "(install triton; on CPU set TRITON_INTERPRET=1 before importing promptcore)"
        )
    return runnable
