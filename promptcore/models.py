"""Loading open_clip models and tokenizers, and the class-name lists shipped with promptcore."""

from __future__ import annotations

from importlib import resources
from typing import List, Optional, Tuple

import torch

DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101", "fgvc_aircraft",
            "sun397", "dtd", "eurosat", "ucf101")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def builtin_classnames(dataset: str = "imagenet") -> List[str]:
    """Class names of one of the eleven prompt-learning data sets, in label order."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    text = resources.files("promptcore").joinpath("data", "classnames", f"{dataset}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_classnames(path) -> List[str]:
    """One class name per line (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"{path} holds no class names")
    return names


def load_model(name: str, pretrained: Optional[str] = None, device="cpu", precision: str = "fp32") -> Tuple:
    """An open_clip model (eval mode) and its tokenizer.

    ``pretrained`` is an open_clip pretrained tag (needs the network or a warm cache) or a local
    checkpoint file; None gives random weights. ``precision`` "fp16"/"bf16" converts the weights
    the way open_clip and the official trainers do (LayerNorms and embeddings stay fp32).
    """
    import open_clip
    from open_clip.model import convert_weights_to_lp

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"unknown open_clip model {name!r}")
    model = open_clip.create_model(name, pretrained=pretrained, device=device)
    if precision != "fp32":
        convert_weights_to_lp(model, PRECISIONS[precision])
    tokenizer = open_clip.get_tokenizer(name)
    return model.eval(), tokenizer


def image_size(model) -> Optional[Tuple[int, int]]:
    """(H, W) of the images the model's image tower takes (``model.visual.image_size``); None if it names none."""
    size = getattr(getattr(model, "visual", None), "image_size", None)
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def square_image_size(model) -> int:
    """The side of the model's square input images (view making needs one); a ValueError otherwise."""
    size = image_size(model)
    if size is None:
        raise ValueError("the model's image encoder names no image_size; pass views to adapt() instead")
    if size[0] != size[1]:
        raise ValueError(f"non-square image size {size} is not supported for view making")
    return size[0]
