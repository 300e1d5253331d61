"""The method registry: names used on the command line and in files -> module classes."""

from __future__ import annotations

import importlib

METHODS = {
    "coop": ("promptcore.coop", "CoOp"),
    "cocoop": ("promptcore.cocoop", "CoCoOp"),
    "maple": ("promptcore.maple", "MaPLe"),
    "tpt": ("promptcore.tpt", "TPT"),
    "zeroshot": ("promptcore.zeroshot", "ZeroShot"),
}


def get_method(name: str):
    """The module class of a method name ("coop", "cocoop", "maple", "tpt", "zeroshot")."""
    key = str(name).lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module_name, class_name = METHODS[key]
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"method {name!r} is not available in this build of promptcore ({exc})") from exc
