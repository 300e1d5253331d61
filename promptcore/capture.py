"""Capture of the text engine's fast path: ``torch.compile`` or CUDA graphs, for launch-bound calls.

At small class counts, and in CoCoOp's and TPT's per-image steps, the fast path is a few dozen
small kernels per layer and its time goes to launching them. ``TextEngine(model, capture=...)``
(``capture=`` on the method modules) picks how the path runs:

* ``"none"`` (default): eager PyTorch, each op dispatched on its own;
* ``"compile"``: ``torch.compile`` of the path (inductor by default); the Triton kernels enter the
  graph as the custom ops ``torch.ops.promptcore.*``, the rest is fused by the compiler;
* ``"cudagraphs"``: ``torch.compile(mode="reduce-overhead")``, which also records the compiled
  path into CUDA graphs and replays them; CUDA tensors only.

Each distinct prompt set, dtype and shape compiles (and records) once; later calls replay. While
``torch.onnx`` exports, ``torch.jit`` traces or an outer ``torch.compile`` captures the caller, the path
runs as is, so the outer capture sees the ops themselves.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from promptcore.kernels.backend import tracing_or_compiling

CAPTURE_MODES = ("none", "compile", "cudagraphs")


def check_capture(mode: str) -> str:
    """``mode`` if it is one of :data:`CAPTURE_MODES`, else a ValueError naming the choices."""
    if not isinstance(mode, str) or mode not in CAPTURE_MODES:
        raise ValueError(f"unknown capture mode {mode!r}; choose one of {', '.join(map(repr, CAPTURE_MODES))}")
    return mode


class CapturedPath:
    """``fn`` run eagerly, under ``torch.compile``, or compiled and replayed as CUDA graphs.

    ``compile_options`` go to ``torch.compile`` as keywords (e.g. ``{"backend": "aot_eager"}`` where no
    C++ compiler is at hand, ``{"mode": "max-autotune-no-cudagraphs"}`` for tuned GEMMs); the compiled
    function is built on first use, not here.
    """

    def __init__(self, fn: Callable, mode: str = "none", compile_options: Optional[Dict[str, Any]] = None):
        self.mode = check_capture(mode)
        options = dict(compile_options or {})
        if mode == "none" and options:
            raise ValueError("compile_options need capture='compile' or 'cudagraphs'")
        if mode == "cudagraphs" and options.get("mode", "reduce-overhead") != "reduce-overhead":
            raise ValueError(f"capture='cudagraphs' runs torch.compile mode 'reduce-overhead', not {options['mode']!r}")
        if mode == "cudagraphs":
            options["mode"] = "reduce-overhead"
        self.fn = fn
        self.compile_options = options
        self._compiled: Optional[Callable] = None

    @property
    def compiled(self) -> Callable:
        """The compiled function (built on first access)."""
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, **self.compile_options)
        return self._compiled

    def __getstate__(self):
        # a copy (deepcopy of a module, pickling) compiles its own function: the compiled one calls the original
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state

    def __call__(self, *args):
        if self.mode == "none" or tracing_or_compiling():
            return self.fn(*args)
        if self.mode == "cudagraphs":
            cpu = [t for t in _tensors(args) if not t.is_cuda]
            if cpu:
                raise ValueError(f"capture='cudagraphs' records CUDA graphs and needs CUDA tensors, got a tensor on "
                                 f"{cpu[0].device}; use capture='compile' (or 'none') on CPU")
            # each call is a new step: outputs of the previous replay may be overwritten by this one
            torch.compiler.cudagraph_mark_step_begin()
            # a copy out of the graph's static memory, so the caller may keep it (text caches do)
            return self.compiled(*args).clone()
        return self.compiled(*args)


def _tensors(args):
    """The tensors among ``args``: tensors themselves, and the buffers and parameters of modules."""
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, torch.nn.Module):
            yield from a.parameters()
            yield from a.buffers()
