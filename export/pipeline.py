"""From a checkpoint to a verified export folder, and back (``promptcore export`` / ``verify``).

An export folder holds ``model.onnx`` (metadata: method, options, class names, model name,
pretrained weights), ``prompts.safetensors`` (the prompts, so ``verify`` can rebuild the PyTorch
side), ``export_report.json`` (written last, with every file's sha256) and, on request, a Triton
Inference Server repository. Everything is staged in a hidden sibling folder and swapped in whole at the
end: a failure or SIGTERM leaves the earlier folder (or none) as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .graphs import EXPORTABLE, ExportError, build_graph, check_classnames, check_exportable
from .onnx_export import (
    _stage,
    check_batch_sizes,
    compare_with_onnxruntime,
    judge,
    provider_list,
    read_metadata,
    to_onnx,
    tolerance,
)
from .serving import write_triton_repository

SERVING = ("triton-server",)


def register_model_config(path) -> str:
    """Register an open_clip model config JSON file; returns the model name (the file stem)."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model config file at {path}")
    open_clip.add_model_config(path)
    return path.stem


def classes_disagreement(module, suffix: Optional[torch.Tensor]) -> Optional[str]:
    """Compare the class list with the training classes an official checkpoint records.

    Official prompt learners save ``token_suffix`` (:attr:`promptcore.official.OfficialCheckpoint.token_suffix`):
    the token embeddings of the training prompts after SOS and the context. Returns a reason when they
    differ, None when they match or the checkpoint records none.
    """
    from promptcore.prompts import clean_classnames, context_prompts

    if suffix is None:
        return None
    names = clean_classnames(module.classnames)
    if suffix.shape[0] != len(names):
        return f"the class file has {len(names)} names, the checkpoint was trained on {suffix.shape[0]} classes"
    tower = module.engine.tower
    n_ctx = module.n_ctx
    # the official learners save the suffix of the class-at-the-end prompts, whatever the class position
    ids = context_prompts(module.tokenizer, names, n_ctx, module.prompt_prefix, tower.context_length, "end").ids
    with torch.no_grad():
        ours = tower.token_embedding(ids.to(tower.device))[:, 1 + n_ctx:].float().cpu()
    theirs = suffix.float()
    if ours.shape != theirs.shape:
        return (f"the checkpoint's class tokens have shape {tuple(theirs.shape)}, "
                f"the class file gives {tuple(ours.shape)}")
    row_err = (ours - theirs).abs().amax(dim=(1, 2))
    scale = theirs.abs().amax().clamp_min(1e-6)
    bad = (row_err > 1e-2 * scale).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        return f"class {i} ({module.classnames[i]!r}) is not the class the checkpoint was trained with at that row"
    return None


def build_from_checkpoint(method: str, model, tokenizer, checkpoint, classnames: Optional[List[str]],
                          options: Optional[Dict[str, object]] = None, allow_new_classes: bool = False):
    """A promptcore module with the prompts of ``checkpoint`` (official Dassl file/folder or promptcore file)."""
    from promptcore.methods import get_method
    from promptcore.official import read_official

    cls = get_method(method)
    if method == "tpt" or method not in EXPORTABLE:
        raise ExportError(f"{cls.__name__} cannot be exported: TPT tunes a context per test image and has nothing "
                          "frozen to export; export the CoOp/CoCoOp prompts it starts from instead")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    accepted = inspect.signature(cls.__init__).parameters
    for key in options:
        if key not in accepted:
            raise ExportError(f"option {key!r} does not apply to {cls.__name__}")
    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        module = cls.from_file(path, model, tokenizer=tokenizer, **options)
        if classnames is not None and list(classnames) != list(module.classnames):
            if not allow_new_classes:
                raise ExportError(f"the class file disagrees with {path}: it lists {len(classnames)} names, the "
                                  f"prompt file {len(module.classnames)} (first difference at "
                                  f"{_first_difference(classnames, module.classnames)})")
            module.set_classnames(classnames)
        return module
    if classnames is None:
        raise ExportError("an official checkpoint records no class names: pass a class-name file")
    ckpt = read_official(path, method)
    implied = ckpt.options()
    for key, value in options.items():
        if key in implied and key != "ctx_init" and implied[key] != value:
            raise ExportError(f"{key}={value} disagrees with {ckpt.file}, whose prompts have {key}={implied[key]}")
    module = cls(model, classnames, tokenizer=tokenizer, **{**implied, **options})
    if not allow_new_classes:
        reason = classes_disagreement(module, ckpt.token_suffix)
        if reason is not None:
            raise ExportError(f"the class file disagrees with {ckpt.file}: {reason} (pass --allow-new-classes for "
                              "base-to-new evaluation)")
    module.load_official(ckpt)  # the file is read once
    return module


def build_zeroshot(model, tokenizer, classnames: Optional[List[str]], templates: Optional[str] = None,
                   options: Optional[Dict[str, object]] = None, progress: bool = True):
    """A ZeroShot classifier for ``promptcore export --method zeroshot`` (no checkpoint).

    ``templates`` is "openai" (the default), "simple" or a file with one template per line.
    """
    from promptcore.zeroshot import ZeroShot, read_templates

    for key, value in (options or {}).items():
        if value is not None:
            raise ExportError(f"option {key!r} does not apply to ZeroShot")
    if classnames is None:
        raise ExportError("a zero-shot classifier needs class names: pass --classnames FILE or --dataset NAME")
    return ZeroShot(model, classnames, templates=read_templates(templates or "openai"), tokenizer=tokenizer,
                    progress=progress)


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"row {i}: {x!r} vs {y!r}"
    return f"row {min(len(a), len(b))}"


# What an export folder may hold: replacing a folder holding anything else would delete files promptcore did not write.
EXPORT_ENTRIES = ("model.onnx", "model.onnx.data", "prompts.safetensors", "export_report.json", "triton-server")
REPORT_NAME = "export_report.json"


class _Terminated(BaseException):
    """SIGTERM during an export; a BaseException so that no ``except Exception`` on the way swallows it."""


class _SigtermGuard:
    """While active, SIGTERM raises :class:`_Terminated` so every ``finally`` cleanup runs; inside
    :meth:`deferred` it only takes note (the folder swap then completes the export). On exit the previous
    handler is restored and a caught SIGTERM is handed on to it (by default: the process ends by SIGTERM)."""

    def __init__(self):
        self.caught = False
        self.deferring = False
        self.previous = None
        self.active = threading.current_thread() is threading.main_thread()

    def _handler(self, signum, frame):
        if self.caught:
            return  # cleanup is already under way
        self.caught = True
        if not self.deferring:
            raise _Terminated()

    def __enter__(self):
        if self.active:
            self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.active:
            return False
        # None: a handler installed outside Python, which cannot be put back; the default is the nearest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)
        if self.caught:
            signal.raise_signal(signal.SIGTERM)  # the previous handler's turn
            if exc_type is not None:  # else it came during the swap, which completed the export
                raise ExportError("the export was interrupted by SIGTERM; the export folder was left as it "
                                  "was") from None
        return False

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False


@contextlib.contextmanager
def _export_lock(out: Path):
    """An exclusive lock on exporting into ``out`` (a lock file beside it); a second export gets an error."""
    lock = out.parent / f".{out.name}.promptcore-lock"
    for _ in range(5):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ExportError(f"another export into {out} is running (it holds the lock {lock}); wait for it to "
                              "finish") from None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: lock the new one
    else:
        raise ExportError(f"could not take the export lock {lock}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # unlinked while held, so whoever opens it next gets a fresh file
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # an old kernel or a file system without exchange
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(stage: Path, out: Path) -> None:
    """Put the complete folder ``stage`` at ``out``; an earlier ``out`` is replaced whole, never merged.

    At every point ``out`` is the old or the new complete folder (with exchange), or, on systems without it,
    the old folder is renamed aside and renamed back if the second rename fails; what may be left after a
    crash is a sibling named ``.<out>.promptcore-*``.
    """
    if not os.path.lexists(out):
        os.rename(stage, out)
        return
    if _exchange(stage, out):
        shutil.rmtree(stage, ignore_errors=True)  # it holds the old folder now
        return
    aside = stage.with_name(stage.name + ".old")
    os.rename(out, aside)
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def file_sha256(path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_hashes(folder: Path) -> Dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_target(out: Path) -> None:
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link; give the export folder itself")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_ENTRIES)
    if foreign:
        raise ExportError(f"{out} holds {foreign[0]!r}, which promptcore export does not write; an export replaces "
                          "the whole folder, so give a new, empty or earlier export folder")


def _pretrained_metadata(pretrained: Optional[str]) -> Dict[str, str]:
    """A local weights file as its absolute path, size and sha256 (verify runs from any folder and notices a
    changed file); an open_clip tag as given."""
    if not pretrained:
        return {"pretrained": ""}
    path = Path(pretrained).expanduser()
    if not path.is_file():
        return {"pretrained": pretrained}
    return {"pretrained": str(path.resolve()), "pretrained_size": str(path.stat().st_size),
            "pretrained_sha256": file_sha256(path)}


def export_folder(module, out, dtype: str = "fp32", with_features: bool = False, serving: Optional[str] = None,
                  pretrained: Optional[str] = None, model_config: Optional[str] = None,
                  progress: Optional[Callable[[str], None]] = None, provider: str = "auto"):
    """Write a verified export folder for ``module`` (verified on onnxruntime ``provider``); returns the report.

    The folder is built in a hidden sibling and swapped in whole, so ``out`` is at every moment absent, the
    earlier complete export or the new one; a concurrent export into the same folder is refused, and
    SIGTERM during the export cleans up before the process ends. The report, written last, records the
    sha256 of every file, which ``verify`` checks.
    """
    if serving is not None and serving not in SERVING:
        raise ExportError(f"unknown serving layout {serving!r}; choose one of {', '.join(SERVING)}")
    check_exportable(module)
    check_classnames(module.classnames)
    out = Path(os.path.abspath(out))
    parent = out.parent
    if not parent.is_dir():
        raise ExportError(f"folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"folder {parent} is not writable")
    _check_target(out)
    with _SigtermGuard() as guard, _export_lock(out):
        _check_target(out)  # again, now that no other export can change it
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.promptcore-staging.", dir=parent))
        try:
            extra = {"prompts_file": "prompts.safetensors", **_pretrained_metadata(pretrained),
                     "model_config": str(Path(model_config).resolve()) if model_config else ""}
            module.save(stage / "prompts.safetensors")
            report = to_onnx(module, stage / "model.onnx", dtype=dtype, with_features=with_features,
                             extra_metadata=extra, progress=progress, provider=provider)
            if serving == "triton-server":
                if progress:
                    progress("writing the Triton Inference Server repository")
                write_triton_repository(stage / "triton-server", stage / "model.onnx", f"promptcore_{module.method}",
                                        module.classnames)
            report.path = str(out / "model.onnx")
            report.sha256 = _folder_hashes(stage)
            report.files = [str(out / name) for name in report.sha256] + [str(out / REPORT_NAME)]
            (stage / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            with guard.deferred():
                _swap_in(stage, out)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
    return report


def check_folder_files(folder) -> Dict[str, str]:
    """Check every file of an export folder against the sha256 its report records; returns those hashes.

    A missing report, a file missing or changed since the export, or a recorded path outside the folder
    raises :class:`ExportError` naming it.
    """
    folder = Path(folder)
    report_path = folder / REPORT_NAME
    if not report_path.is_file():
        raise ExportError(f"{report_path} is missing: {folder} is not a complete promptcore export folder")
    try:
        hashes = json.loads(report_path.read_text()).get("sha256")
    except (ValueError, AttributeError) as exc:
        raise ExportError(f"{report_path} is not a promptcore export report: {exc}") from None
    if not isinstance(hashes, dict) or not hashes:
        raise ExportError(f"{report_path} records no file hashes (written by an older promptcore?); export again")
    for name, digest in hashes.items():
        rel = PurePosixPath(str(name))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ExportError(f"{report_path} lists {name!r}, which is not a path inside the export folder")
        path = folder.joinpath(*rel.parts)
        if not path.is_file():
            raise ExportError(f"{path} is missing: {report_path} lists it")
        if file_sha256(path) != digest:
            raise ExportError(f"{path} changed after the export: its sha256 differs from the one {report_path} "
                              "records")
    return hashes


def _bare_file_name(meta: Dict[str, object], key: str, onnx_path: Path) -> str:
    name = str(meta.get(key) or "")
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != Path(name).name:
        raise ExportError(f"{onnx_path}: metadata field promptcore.{key} is {name!r}; it must be a bare file name "
                          "in the export folder")
    return name


def _check_pretrained(meta: Dict[str, object], onnx_path: Path) -> Optional[str]:
    pretrained = str(meta.get("pretrained") or "")
    if not meta.get("pretrained_sha256"):
        return pretrained or None
    path = Path(pretrained)
    if not path.is_absolute() or not path.is_file():
        raise ExportError(f"the pretrained weights file {pretrained} that {onnx_path} was exported with is missing")
    if str(path.stat().st_size) != str(meta.get("pretrained_size")) or file_sha256(path) != meta["pretrained_sha256"]:
        raise ExportError(f"the pretrained weights file {pretrained} changed since {onnx_path} was exported "
                          "(its size or sha256 differs from the recorded one)")
    return pretrained


def verify_folder_model(onnx_path, batch_sizes: Sequence[int] = (1, 3), provider: str = "auto") -> Dict[str, object]:
    """Rebuild the PyTorch module of an exported model and compare onnxruntime (on ``provider``) with it.

    The folder's files are first checked against the report's sha256; ``ok`` needs finite logits on both
    sides, max |diff| within tolerance and top-1 agreement (up to ties); ``failure`` says why not.
    """
    from promptcore.methods import get_method
    from promptcore.models import load_model

    batch_sizes = check_batch_sizes(batch_sizes)
    provider_list(provider)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    if (onnx_path.parent / REPORT_NAME).is_file():
        hashes = check_folder_files(onnx_path.parent)  # a changed file is named before anything parses it
        meta = read_metadata(onnx_path)
    else:
        meta = read_metadata(onnx_path)  # what the file is, then that its folder is incomplete
        hashes = check_folder_files(onnx_path.parent)
    prompts_name = _bare_file_name(meta, "prompts_file", onnx_path)
    for name in (onnx_path.name, prompts_name):
        if name not in hashes:
            raise ExportError(f"{onnx_path.parent / REPORT_NAME} does not list {name}")
    prompts = onnx_path.parent / prompts_name
    pretrained = _check_pretrained(meta, onnx_path)
    if meta.get("model_config"):
        register_model_config(meta["model_config"])
    model_name = str(meta.get("model_name") or "")
    if not model_name:
        raise ExportError(f"{onnx_path} does not name its open_clip model")
    model, tokenizer = load_model(model_name, pretrained)
    # a zero-shot classifier is rebuilt from its templates, so the check covers the text side too
    rebuild = {"use_saved": False} if meta["method"] == "zeroshot" else {}
    module = get_method(str(meta["method"])).from_file(prompts, model, tokenizer=tokenizer, **rebuild)
    dtype = str(meta["dtype"])
    graph = build_graph(module, dtype, "image_features" in meta["outputs"])
    with _stage(f"running {onnx_path} in onnxruntime against PyTorch"):
        result = compare_with_onnxruntime(graph, onnx_path, int(meta["image_size"]), dtype, batch_sizes,
                                          provider=provider)
    result["tolerance"] = tolerance(dtype, result["max_abs_logit"])
    result["failure"] = judge(result, dtype)
    result["ok"] = not result["failure"]
    result["method"] = meta["method"]
    result["num_classes"] = len(meta["classnames"])
    return result
