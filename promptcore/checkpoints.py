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
import math
import os
import pickle
import pickletools
import re
import stat
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
# Called through _Constructor, whose budget keeps a small pickle from building large objects.
_PLAIN_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
                   "bytearray", "slice", "range"}
# bytes(n) / bytearray(n) allocate n zero bytes: only their (text, encoding) and (bytes,) forms are pickled.
_SIZE_TAKING = {"bytes", "bytearray"}


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
    if math.prod(size) > storage.numel():
        # An expanded (stride-0) or overlapping view: any use of it would materialise more than the file holds.
        return _CorruptTensor(f"has shape {size} ({math.prod(size)} elements) over a storage of {storage.numel()} "
                              f"(stride {stride}); promptcore refuses views larger than their storage")
    # A view, not a copy, as torch.load returns: each rebuild of one storage must not allocate it again.
    return storage.as_strided(size, stride, offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _find_corrupt(obj):
    """(key path, problem) of the first corrupt tensor in a loaded structure, or None (cycles and depth are fine)."""
    stack, seen = [("", obj)], set()
    while stack:
        where, value = stack.pop()
        if isinstance(value, _CorruptTensor):
            return where or "<root>", value.problem
        if not isinstance(value, (dict, list, tuple)) or id(value) in seen:
            continue
        seen.add(id(value))
        items = list(value.items() if isinstance(value, dict) else enumerate(value))
        stack.extend((f"{where}.{key}" if where else str(key), item) for key, item in reversed(items))
    return None


class _Constructor:
    """A callable the pickle may call (builtins, OrderedDict, torch.Size...), on a budget.

    Each call is charged the length of its sized arguments; the calls of one load together may build no
    more items than the record has bytes, so a few bytes of pickle cannot copy a large list many times
    or expand a ``range``. ``bytes(n)`` / ``bytearray(n)`` (a size, not data) are refused outright.
    """

    def __init__(self, func, qualname: str, unpickler: "_RestrictedUnpickler"):
        self.func, self.qualname, self._unpickler = func, qualname, unpickler

    def __call__(self, *args, **kwargs):
        if self.func is collections.defaultdict and args and isinstance(args[0], _Constructor):
            args = (args[0].func,) + args[1:]  # the factory itself (list, dict...), not this wrapper
        self._unpickler._charge(self, list(args) + list(kwargs.values()))
        return self.func(*args, **kwargs)

    def __repr__(self):
        return f"<{self.qualname}>"


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._storages: Dict[str, torch.Tensor] = {}
        self._budget = len(data)  # items the pickle's calls may still build
        self._inert: Dict[Tuple[str, str], type] = {}  # one placeholder class per name, however often it is named

    def _charge(self, call: _Constructor, args) -> None:
        name = call.qualname.rsplit(".", 1)[-1]
        if name in _SIZE_TAKING and args and not isinstance(args[0], (str, bytes, bytearray)):
            raise UnsafeCheckpointError(
                f"refusing to load {self._path}: it calls {call.qualname} with a {type(args[0]).__name__}, "
                "which would allocate memory the file does not hold")
        for arg in args:
            if isinstance(arg, (_Constructor, type)):
                continue
            try:
                items = len(arg)
            except OverflowError:  # range(2**100)
                items = self._budget + 1
            except TypeError:
                if hasattr(type(arg), "__iter__"):
                    raise UnsafeCheckpointError(f"refusing to load {self._path}: it calls {call.qualname} with an "
                                                f"unsized {type(arg).__name__}") from None
                continue
            self._budget -= items
            if self._budget < 0:
                raise UnsafeCheckpointError(
                    f"refusing to load {self._path}: its {call.qualname}(...) calls build more items than the "
                    "record has bytes (a small file asking for a large allocation)")

    def find_class(self, module: str, name: str):
        if module == "collections" and name in ("OrderedDict", "defaultdict"):
            return _Constructor(getattr(collections, name), f"collections.{name}", self)
        if module in ("builtins", "__builtin__") and name in _PLAIN_BUILTINS:
            return _Constructor(getattr(__import__("builtins"), name), f"builtins.{name}", self)
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        if module == "torch" and name in ("Size", "device"):
            return _Constructor(getattr(torch, name), f"torch.{name}", self)
        if module == "_codecs" and name == "encode":
            return _Constructor(lambda text, encoding="latin1": text.encode(encoding), "_codecs.encode", self)
        if any(f"{module}.".startswith(p) for p in _INERT_PREFIXES):
            if (module, name) not in self._inert:
                self._inert[module, name] = _inert_class(module, name)
            return self._inert[module, name]
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
                raw = self._archive.read(f"{self._prefix}data/{key}")  # size checked by _check_entries
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


def _check_entries(archive: zipfile.ZipFile, path: str) -> None:
    """Refuse entries that would inflate past the file: torch.save stores every record uncompressed."""
    size = os.path.getsize(path)
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: record {info.filename} is compressed; torch.save stores records "
                                  "uncompressed, and promptcore does not inflate them (re-save the file with torch)")
        if info.file_size > size:
            raise CheckpointError(f"{path} is corrupt: record {info.filename} claims {info.file_size} bytes, "
                                  f"more than the whole file ({size} bytes)")


def _check_pickle(data: bytes, path: str) -> None:
    """Parse the pickle's opcodes before running it: every declared length must be present, and memo indices
    stay below the record's size (the C unpickler sizes its memo by the largest index it is given)."""
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > len(data):
            raise CheckpointError(f"{path} is corrupt: its pickle stores memo slot {arg} in a record of "
                                  f"{len(data)} bytes")


def read_torch_checkpoint(path) -> Any:
    """Load a ``torch.save`` zip archive without executing arbitrary pickled code (CPU tensors).

    Memory stays within a small multiple of the file's size whatever the file holds.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch zip archive (files from torch < 1.6 must be re-saved)")
    try:
        with zipfile.ZipFile(path) as archive:
            _check_entries(archive, path)
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{path} holds {len(pickles)} data.pkl records, expected one")
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = f"{prefix}byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).decode() != "little":
                raise CheckpointError(f"{path} was written on a big-endian machine; re-save it on little-endian")
            data = archive.read(pickles[0])
            _check_pickle(data, path)
            loaded = _RestrictedUnpickler(data, archive, prefix, path).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            RuntimeError, IndexError, KeyError, AttributeError, OSError, OverflowError) as exc:
        raise CheckpointError(f"{path} is corrupt: reading its records failed ({type(exc).__name__}: {exc})") \
            from exc
    corrupt = _find_corrupt(loaded)
    if corrupt:
        raise CheckpointError(f"{path}: tensor {corrupt[0]} {corrupt[1]}")
    return loaded


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or the newest ``model.pth.tar-N`` (else ``model-best.pth.tar``) of the one run under a folder.

    A run is the folder its checkpoints lie in; a folder holding several (``seed1/``, ``seed2/``, another
    method's output) is refused, listing them, rather than one picked by epoch or file-system order.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint file or folder at {p}")
    epochs = [q for q in p.rglob("model.pth.tar-*") if re.fullmatch(r"model\.pth\.tar-\d+", q.name) and q.is_file()]
    best = [q for q in p.rglob("model-best.pth.tar") if q.is_file()]
    runs = sorted({q.parent for q in epochs + best})
    if len(runs) > 1:
        listed = "; ".join(str(run) for run in runs[:8]) + (f"; and {len(runs) - 8} more" if len(runs) > 8 else "")
        raise CheckpointError(f"{p} holds checkpoints of {len(runs)} runs: {listed}; give the folder (or file) "
                              "of the one to load")
    if epochs:
        return max(epochs, key=lambda q: int(q.name.rsplit("-", 1)[1]))
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


def check_output_file(path, error=ValueError) -> Path:
    """``path`` as a file to (re)write: new, or an existing regular file, in an existing folder.

    A folder, device, FIFO or socket at ``path`` raises ``error`` (writing beside it and renaming would
    replace the node with a regular file).
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise error(f"the output path {path} is {kind}; give the path of a file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    return path


def _new_file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: an existing file's own, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        pass
    try:  # Linux: reading the umask without setting it (os.umask would change it for every thread meanwhile)
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def save_prompt_file(path, tensors: Dict[str, torch.Tensor], method: str, options: Dict[str, Any],
                     classnames, model_name: Optional[str] = None) -> Path:
    """Write ``tensors`` and metadata as safetensors, atomically (no partial file on failure).

    The file gets the mode a plain write would give it (0666 less the umask; an existing file keeps its own).
    """
    from safetensors.torch import save_file

    path = check_output_file(path)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "options": json.dumps(options, sort_keys=True),
        "classnames": json.dumps(list(classnames)),
        "model_name": model_name or "",
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)  # mkstemp creates 0600
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
