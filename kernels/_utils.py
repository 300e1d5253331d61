"""Shared helpers of the Triton kernels: the guarded Triton import and small host utilities.

Triton is optional (absent on macOS and Windows): ``triton`` and ``tl`` are ``None`` there and
the kernel files define no kernels; :func:`promptcore.kernels.use_triton` then always picks
the PyTorch reference. Nothing here touches a device at import time.
"""

from __future__ import annotations

import os

import torch

try:  # guarded: `import promptcore.kernels` must work without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on platforms without Triton
    triton = None
    tl = None

HAS_TRITON = triton is not None
# Triton decides at decoration time whether ``@triton.jit`` kernels are interpreted; so do the launchers
# (block sizes, operand precision), which is what lets the resource gate capture the compiled variants
# on a machine without a GPU.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def next_pow2(n: int, floor: int = 1) -> int:
    """Smallest power of two >= max(n, floor) (Triton block sizes must be powers of two)."""
    n = max(int(n), int(floor), 1)
    return 1 << (n - 1).bit_length()


def no_zero_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself unless some dimension of size > 1 has stride 0 (an expanded view), then a copy.

    Expanded views alias memory (and read garbage under the Triton interpreter); every other
    layout is passed to the kernels as is, with its strides.
    """
    if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
        return t.contiguous()
    return t


def vector_aligned(*tensors: torch.Tensor) -> bool:
    """Whether the JIT can specialise every tensor for 16-byte vector access along its last dim.

    That is: data pointers 16-byte aligned, every non-unit stride and the last dim divisible by 16
    (the ``tt.divisibility`` the JIT applies). Launchers pick larger tiles then; unaligned views
    (odd offsets, odd feature sizes) get smaller tiles, which fit the registers with scalar loads.
    """
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % 16 or t.shape[-1] % 16:
            return False
        if any(st % 16 for st, sz in zip(t.stride()[:-1], t.shape[:-1]) if sz > 1):
            return False
    return True


def dot_in_input_dtype(t: torch.Tensor) -> bool:
    """Whether ``tl.dot`` may take fp16/bf16 tiles as they are (tensor cores, fp32 accumulation).

    Only compiled kernels: under the interpreter bf16 ``tl.dot`` is silently wrong, so there
    (and for fp32 inputs) tiles are upcast to fp32 and multiplied in IEEE fp32.
    """
    return not INTERPRETED and t.dtype in _LOW_PRECISION


if HAS_TRITON:

    @triton.jit
    def cast_for_store(x, ptr, RTNE_BF16: tl.constexpr):
        """``x`` (fp32) cast to the element type of ``ptr``, rounding to nearest even.

        The Triton interpreter truncates fp32 -> bf16; with ``RTNE_BF16`` (set only for
        interpreted bf16 outputs, see :func:`needs_bf16_rounding`) the rounding is done on
        the bits first, so CPU results match the compiled kernels (and ``Tensor.to``).
        """
        if RTNE_BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(ptr.dtype.element_ty)


else:  # the kernel files import these names; without Triton they are never called
    cast_for_store = None


_TUNERS: dict = {}


def autotuned(kernel, name: str, configs: list, key: list, prune=None):
    """The ``triton.autotune`` wrapper of ``kernel`` for one config class ``name``, built on first use.

    ``configs`` are ``(meta-parameters, num_warps, num_stages)`` triples, every one checked by the resource
    gate on sm_80 and sm_90; the first is the default. Under the interpreter only that one is kept (nothing
    to time there, and tests stay fast). ``key`` names the kernel arguments whose values re-tune (the
    autotuner adds the tensors' dtypes itself); ``prune`` is an ``early_config_prune``. One tuner per class
    (kernel, dtype, alignment, head dim...) keeps the classes' timings apart and their config lists small.
    """
    tuner = _TUNERS.get(name)
    if tuner is None:
        chosen = [triton.Config(dict(meta), num_warps=w, num_stages=s) for meta, w, s in configs]
        if INTERPRETED:
            chosen = chosen[:1]
        prune_by = {"early_config_prune": prune} if prune is not None else None
        tuner = _TUNERS[name] = triton.autotune(chosen, key=key, prune_configs_by=prune_by)(kernel)
    return tuner


def fit_tiles(dims):
    """An ``early_config_prune`` that, for each ``(tile meta-parameter, size argument)`` of ``dims`` in turn,
    drops configs whose tile is wider than the size needs (its next power of two, at least 16) when a
    narrower one remains, else keeps the narrowest: no program spends most of its tile on masked lanes."""

    def prune(configs, named_args, **kwargs):
        for block, size in dims:
            need = next_pow2(named_args[size], 16)
            fits = [c for c in configs if c.kwargs[block] <= need]
            narrowest = min(c.kwargs[block] for c in configs)
            configs = fits or [c for c in configs if c.kwargs[block] == narrowest]
        return configs

    return prune


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for tiles of ``dtype``.

    Compiled fp32 uses 3xTF32 (tensor cores, error near IEEE fp32): IEEE fp32 dots run on the FMA
    units with each operand row replicated per thread, which spills at any useful tile size. fp16/bf16
    ignore the setting; the interpreter multiplies in IEEE fp32 whatever it says.
    """
    return "tf32x3" if not INTERPRETED and dtype == torch.float32 else "ieee"


def needs_bf16_rounding(out: torch.Tensor) -> bool:
    """Whether a kernel writing ``out`` runs interpreted with a bf16 output (see ``cast_for_store``)."""
    return INTERPRETED and out.dtype == torch.bfloat16
