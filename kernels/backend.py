"""The one backend switch of promptcore.

Every fused op asks :func:`use_triton` which implementation to run:

* compiled Triton for CUDA tensors;
* the Triton interpreter for CPU tensors when ``TRITON_INTERPRET=1`` was set before the
  kernel modules were imported (how CI exercises the kernels);
* the PyTorch reference otherwise, and always while ``torch.onnx`` exports or
  ``torch.jit`` traces a graph.

The kernels are registered as custom ops (``torch.ops.promptcore.*``, with fakes and their
backward as ops of their own), so ``torch.compile`` captures them: under compile the switch
answers as in eager mode.

``PROMPTCORE_BACKEND=triton|torch|auto`` (default ``auto``) forces a choice. Nothing here
queries a device or imports Triton at import time.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "torch")


def requested_backend() -> str:
    """The backend asked for through ``PROMPTCORE_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get("PROMPTCORE_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"PROMPTCORE_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


_triton_found: Optional[bool] = None  # looked up once, on first use (not at import time)


def triton_available() -> bool:
    """Whether Triton can be imported (it is absent on macOS and Windows)."""
    # a plain module-level cache rather than functools.lru_cache, which torch.compile warns about
    global _triton_found
    if _triton_found is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:
            _triton_found = False
        else:
            _triton_found = True
    return _triton_found


def interpreter_enabled() -> bool:
    """Whether the Triton interpreter is on (it must be set before kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def exporting() -> bool:
    """Whether torch.onnx export or jit tracing/scripting is capturing the call: ops then take the reference
    (an ONNX graph or a TorchScript program must not hold a promptcore custom op)."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()


def tracing_or_compiling() -> bool:
    """Whether torch.onnx export, jit tracing/scripting or torch.compile is capturing the current call."""
    return exporting() or torch.compiler.is_compiling()


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide whether an op over ``tensors`` runs its Triton kernel (True) or the reference.

    Under ``torch.compile`` the answer is the same as in eager mode (the decision is constant-folded
    at trace time, no graph break), and the kernels enter the graph as ``torch.ops.promptcore`` ops.
    """
    choice = requested_backend()
    if choice == "torch" or exporting():
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
