"""Checkpoint files: official Dassl archives (read without executing pickled code) and promptcore files.

Dassl's ``model.pth.tar-N`` is a ``torch.save`` zip archive holding ``{"state_dict", "epoch",
"optimizer", "scheduler", "val_result"}``; its scheduler entry pickles LR-scheduler and optimizer
objects, so ``torch.load(weights_only=True)`` refuses it. :func:`read_torch_checkpoint` reads the
archive itself: tensors and plain containers are rebuilt; objects of known training libraries
(Dassl, torch.optim, yacs, numpy) become inert placeholders that are never constructed; any other
global (``os.system``, ``builtins.eval``, ...) stops the load with :class:`UnsafeCheckpointError`.

promptcore's own prompt files are safetensors with JSON metadata (method, options, class
names, model name), written atomically. Adapting an official file to a method's prompt learner is
:mod:`promptcore.official`'s job.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be used here (wrong method, shape, format...)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asks for code promptcore will not run."""


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_DTYPE_NAMES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                "complex64", "complex128", "float", "double", "half", "long", "int"}
# Objects of these libraries appear in training checkpoints (schedulers, optimizers, configs);
# they are replaced by inert placeholders, never imported or called.
_INERT_PREFIXES = ("dassl.", "torch.optim.", "yacs.", "numpy.", "trainers.")
_PLAIN_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
                   "bytearray", "slice", "range"}


class Inert:
    """Placeholder for an object of a training library; it keeps only its class name."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<inert {self.qualname}>"


def _inert_class(module: str, name: str):
    return type(name, (Inert,), {"qualname": f"{module}.{name}", "__module__": "promptcore.checkpoints"})


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _CorruptTensor:
    """Stands in for a tensor whose record does not fit its storage; the load names its key and fails."""

    def __init__(self, problem: str):
        self.problem = problem


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    size, stride = tuple(size), tuple(stride)
    if isinstance(storage, _CorruptTensor):
        return storage
    if any(n < 0 for n in size) or any(s < 0 for s in stride) or offset < 0:
        return _CorruptTensor(f"has a negative size, stride or offset (size {size}, stride {stride})")
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if needed > storage.numel():
        return _CorruptTensor(f"needs {needed} elements of shape {size} but its storage holds {storage.numel()} "
                              "(the file is truncated or corrupt)")
    return storage.as_strided(size, stride, offset).clone()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _find_corrupt(obj, where: str = ""):
    """(key path, problem) of the first corrupt tensor in a loaded structure, or None."""
    if isinstance(obj, _CorruptTensor):
        return where or "<root>", obj.problem
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _find_corrupt(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._storages: Dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "collections" and name == "defaultdict":
            return collections.defaultdict
        if module in ("builtins", "__builtin__") and name in _PLAIN_BUILTINS:
            return getattr(__import__("builtins"), name)
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        if module == "torch" and name in ("Size", "device"):
            return getattr(torch, name)
        if module == "_codecs" and name == "encode":
            return lambda text, encoding="latin1": text.encode(encoding)
        if any(f"{module}.".startswith(p) for p in _INERT_PREFIXES):
            return _inert_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load {self._path}: it references {module}.{name}, which is neither a tensor nor a "
            "known training object; promptcore does not execute code from checkpoints"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafeCheckpointError(f"refusing to load {self._path}: unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"refusing to load {self._path}: storage of unknown type {storage_type!r}")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError as exc:
                raise CheckpointError(f"{self._path} is truncated: storage {key} is missing") from exc
            itemsize = torch.empty(0, dtype=storage_type.dtype).element_size()
            if len(raw) % itemsize:
                self._storages[key] = _CorruptTensor(f"lies in storage {key} of {len(raw)} bytes, not a whole "
                                                     f"number of {storage_type.dtype} elements")
            else:
                self._storages[key] = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype) if raw else \
                    torch.empty(0, dtype=storage_type.dtype)
        return self._storages[key]


def read_torch_checkpoint(path) -> Any:
    """Load a ``torch.save`` zip archive without executing arbitrary pickled code (CPU tensors)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch zip archive (files from torch < 1.6 must be re-saved)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} holds {len(pickles)} data.pkl records, expected one")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).decode() != "little":
            raise CheckpointError(f"{path} was written on a big-endian machine; re-save it on little-endian")
        try:
            data = archive.read(pickles[0])
            loaded = _RestrictedUnpickler(io.BytesIO(data), archive, prefix, path).load()
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError,
                IndexError, KeyError, AttributeError, OSError) as exc:
            raise CheckpointError(f"{path} is corrupt: reading its records failed ({type(exc).__name__}: {exc})") \
                from exc
    corrupt = _find_corrupt(loaded)
    if corrupt:
        raise CheckpointError(f"{path}: tensor {corrupt[0]} {corrupt[1]}")
    return loaded


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or the newest ``model.pth.tar-N`` / ``model-best.pth.tar`` under a folder."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint file or folder at {p}")
    candidates = [q for q in p.rglob("model.pth.tar-*") if re.fullmatch(r"model\.pth\.tar-\d+", q.name)]
    if candidates:
        return max(candidates, key=lambda q: int(q.name.rsplit("-", 1)[1]))
    best = sorted(p.rglob("model-best.pth.tar"))
    if best:
        return best[0]
    raise FileNotFoundError(f"no model.pth.tar-N or model-best.pth.tar under {p}")


def check_learned_tensor(key: str, value: Any, source) -> None:
    """Refuse a learned tensor that is not a finite real floating-point tensor, naming file, key and problem.

    Casting an integer or complex tensor to the learner's dtype would silently change it, and one
    NaN or Inf makes every text feature non-finite; fp16/bf16 (the official files) are fine.
    """
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
    if value.is_complex() or not value.is_floating_point():
        raise CheckpointError(f"{source}: {key} has dtype {str(value.dtype).replace('torch.', '')}; learned "
                              "prompts must be floating point (fp32, fp16 or bf16)")
    if value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        kinds = " and ".join(k for k, m in (("NaN", torch.isnan(value)), ("Inf", torch.isinf(value))) if bool(m.any()))
        raise CheckpointError(f"{source}: {key} holds {bad} non-finite value(s) ({kinds}) of {value.numel()}")


# -- promptcore's own files -------------------------------------------------------------------

FORMAT = "promptcore-prompts"
FORMAT_VERSION = "1"


def save_prompt_file(path, tensors: Dict[str, torch.Tensor], method: str, options: Dict[str, Any],
                     classnames, model_name: Optional[str] = None) -> Path:
    """Write ``tensors`` and metadata as safetensors, atomically (no partial file on failure)."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "options": json.dumps(options, sort_keys=True),
        "classnames": json.dumps(list(classnames)),
        "model_name": model_name or "",
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_prompt_file(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Tensors and decoded metadata (method, options, classnames, model_name) of a promptcore file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a safetensors file: {exc}") from exc
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a promptcore prompt file (format={raw.get('format')!r})")
    try:
        meta = {
            "method": raw["method"],
            "options": json.loads(raw["options"]),
            "classnames": json.loads(raw["classnames"]),
            "model_name": raw.get("model_name") or None,
            "format_version": raw.get("format_version"),
        }
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: the promptcore metadata is incomplete or corrupt ({type(exc).__name__}: "
                              f"{exc})") from exc
    if not isinstance(meta["options"], dict) or not isinstance(meta["classnames"], list):
        raise CheckpointError(f"{path}: the promptcore metadata is corrupt (options must be a mapping, "
                              "classnames a list)")
    return tensors, meta
