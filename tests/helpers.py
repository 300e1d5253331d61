"""Shared test helpers: small seeded open_clip models and real class-name lists.

An ordinary module (not conftest.py): pytest imports every conftest.py under the one name
"conftest", so helpers imported by name must live elsewhere.
"""

import functools
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "promptcore" / "data" / "classnames"


def read_classnames(name: str):
    return [line.strip() for line in (DATA / f"{name}.txt").read_text().splitlines() if line.strip()]


TINY_VISION = dict(image_size=32, patch_size=16, width=64, layers=2, head_width=32)


def tiny_text_cfg(**overrides):
    cfg = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
    cfg.update(overrides)
    return cfg


@functools.lru_cache(maxsize=None)
def _build(kind: str, dtype_name: str, seed: int):
    import open_clip
    from open_clip.model import convert_weights_to_lp

    dtype = getattr(torch, dtype_name)
    cast = dtype if dtype != torch.float32 else None
    torch.manual_seed(seed)
    if kind == "quickgelu":
        model = open_clip.CLIP(32, TINY_VISION, tiny_text_cfg(), quick_gelu=True, cast_dtype=cast)
    elif kind == "gelu_ls":  # GELU, layer scale, 3 layers
        model = open_clip.CLIP(32, TINY_VISION, tiny_text_cfg(layers=3, ls_init_value=0.5), cast_dtype=cast)
    elif kind == "custom_text":  # CustomTextCLIP, Linear projection with bias, eos pooling
        model = open_clip.CustomTextCLIP(32, TINY_VISION, tiny_text_cfg(proj_bias=True, pool_type="eos", eos_id=49407),
                                         cast_dtype=cast)
    elif kind == "bidirectional":
        model = open_clip.CustomTextCLIP(32, TINY_VISION, tiny_text_cfg(no_causal_mask=True), cast_dtype=cast)
    elif kind == "cls_token":
        model = open_clip.CustomTextCLIP(32, TINY_VISION, tiny_text_cfg(embed_cls=True), cast_dtype=cast)
    elif kind == "pool_last":
        model = open_clip.CustomTextCLIP(32, TINY_VISION, tiny_text_cfg(pool_type="last"), cast_dtype=cast)
    elif kind == "vit_b16":
        model = open_clip.create_model("ViT-B-16", pretrained=None)
    else:
        raise KeyError(kind)
    if dtype != torch.float32:
        convert_weights_to_lp(model, dtype)
    return model.eval()


def make_model(kind: str = "quickgelu", dtype=torch.float32, seed: int = 0):
    """A fresh copy of a seeded model (methods freeze parameters, so tests never share one)."""
    import copy

    return copy.deepcopy(_build(kind, str(dtype).replace("torch.", ""), seed))


MIXED_NAMES = ["dog", "great white shark", "tench", "a_very_long class name with many many words", "x",
               "Egyptian Mau", "2012 BMW M3 coupe"]


# -- tolerances ----------------------------------------------------------------------------------
# One rule for every numerical comparison (flash-attention's): a result computed in ``dtype`` is
# compared with a higher-precision oracle, with the error scaled to the tensor (max abs error over
# max abs value, never elementwise relative error on near-zero values), and may be at most about twice
# the error of the official (naive) path computed in the same dtype against that oracle, plus a small
# atol derived from the dtype and the reduction length: eps(dtype) * sqrt(K), the typical rounding
# error of a length-K dot product.

EPS = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def scaled_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64 (tensors, arrays or nested lists)."""
    got, want = (torch.as_tensor(t).detach().double() for t in (got, want))
    assert got.shape == want.shape, f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = want.abs().max().item()
    assert scale > 0, "the reference is all zeros: a scaled error means nothing here"
    return (got - want).abs().max().item() / scale


def default_atol(dtype: torch.dtype, reduction: int = 64) -> float:
    """eps(dtype) * sqrt(reduction): the typical rounding error of a length-``reduction`` dot product."""
    return EPS[dtype] * reduction ** 0.5


def assert_within_naive_error(got, naive, oracle, *, dtype=None, reduction: int = 64, atol=None, name: str = ""):
    """``got``'s scaled error against ``oracle`` is at most 2x the naive path's own, plus ``atol``.

    ``got`` and ``naive`` are computed in ``dtype`` (default: ``got``'s); ``oracle`` in a higher precision.
    """
    dtype = dtype or got.dtype
    atol = default_atol(dtype, reduction) if atol is None else atol
    err, own = scaled_error(got, oracle), scaled_error(naive, oracle)
    assert err <= 2 * own + atol, f"{name}: error {err:.3e} > 2 x the naive path's {own:.3e} + {atol:.1e}"


def assert_close_scaled(got, want, *, dtype=None, reduction: int = 64, factor: float = 4.0, name: str = ""):
    """Two computations of the same value in ``dtype`` agree to ``factor`` x default_atol (scaled error).

    For results that differ only in summation order where no oracle is at hand; fast-vs-naive
    checks use :func:`assert_within_naive_error` against a float64 oracle instead.
    """
    dtype = dtype or got.dtype
    bound = factor * default_atol(dtype, reduction)
    err = scaled_error(got, want)
    assert err <= bound, f"{name}: scaled error {err:.3e} > {bound:.1e}"


def float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a promptcore module (model and prompts): the naive path run on it is the oracle."""
    import copy

    return copy.deepcopy(module).double()


class GraphRecorder:
    """A torch.compile backend like ``aot_eager`` that keeps every forward and backward FX graph it is
    handed, so a test can check which ops a compiled function really calls."""

    def __init__(self):
        self.graphs = []

    def _keep(self, gm, inputs):
        from functorch.compile import make_boxed_func

        self.graphs.append(gm)
        return make_boxed_func(gm.forward)

    @property
    def backend(self):
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=self._keep, bw_compiler=self._keep)

    def ops(self):
        """Names of every op called in the recorded graphs (e.g. "promptcore.prefix_attention.default")."""
        return {str(n.target) for gm in self.graphs for n in gm.graph.nodes if n.op == "call_function"}
