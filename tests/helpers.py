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
