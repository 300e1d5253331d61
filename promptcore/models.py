"""Loading open_clip models and tokenizers, and the class-name lists shipped with promptcore."""

from __future__ import annotations

import os
import re
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


RANDOM_WEIGHTS_SEED = 0
"""Seed of the random weights ``load_model`` builds without ``pretrained``: every process (each torchrun
rank) and every run gets the same model."""

WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")


def load_model(name: str, pretrained: Optional[str] = None, device="cpu", precision: str = "fp32",
               seed: int = RANDOM_WEIGHTS_SEED) -> Tuple:
    """An open_clip model (eval mode) and its tokenizer.

    ``pretrained`` is an open_clip pretrained tag (needs the network or a warm cache) or a local
    checkpoint file; a file torch or safetensors cannot read, or whose weights do not fit the model,
    is a ValueError naming it. None gives random weights drawn from ``seed`` (the caller's global RNG
    is left as it was), so they are the same in every process. ``precision`` "fp16"/"bf16" converts the
    weights the way open_clip and the official trainers do (LayerNorms and embeddings stay fp32).
    """
    import open_clip
    from open_clip.model import convert_weights_to_lp

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"unknown open_clip model {name!r}")
    pretrained = None if pretrained is None else str(pretrained)
    if pretrained is None:
        # the init runs on the CPU (open_clip moves the model afterwards), so the CPU generator is all it draws from
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None, device=device)
    elif os.path.isfile(pretrained):
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device=device)
        except Exception as exc:
            raise ValueError(f"cannot load pretrained weights file {pretrained} into {name}: "
                             f"{_load_error(exc)}") from exc
    elif not os.path.exists(pretrained) and (os.sep in pretrained or pretrained.endswith(WEIGHT_FILE_SUFFIXES)):
        raise ValueError(f"no pretrained weights file at {pretrained} (a local file or an open_clip "
                         "pretrained tag)")
    else:
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
    if precision != "fp32":
        convert_weights_to_lp(model, PRECISIONS[precision])
    tokenizer = open_clip.get_tokenizer(name)
    return model.eval(), tokenizer


def _load_error(exc: BaseException, limit: int = 300) -> str:
    """What went wrong reading or applying a weights file, in one short line."""
    import pickle

    from .runner import error_text

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", text, re.S)
        detail = f" ({' '.join(found.group(1).split())})" if found else ""
        return "not a PyTorch checkpoint that loads with weights_only=True" + detail
    text = error_text(exc)
    if type(exc).__name__ == "SafetensorError":
        text = f"not a safetensors file ({text})"
    elif not isinstance(exc, (RuntimeError, ValueError, OSError)):  # e.g. IndexError from unpickling garbage
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[:limit] + " ..."


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
