"""Whole-data-set runs over an ImageFolder tree, for every method: evaluation (CoOp, CoCoOp, MaPLe,
zero-shot), TPT and ZERO.

* **Data**: ``root/<class folder>/<image>``; class folders sorted by name, files sorted by name within a
  folder; an image's *index* is its position in that sorted list. A folder's label is the index of its
  class name, matched by name, or the folder's sorted position when the names are declared to be in
  that order (:func:`class_labels`; never silently by position). A ``DataLoader`` with worker processes
  decodes the files with torchvision.io (PIL for the formats it lacks); on CUDA, JPEGs are decoded on the device
  (``decode_jpeg(device="cuda")``) from pinned host bytes. Views are made on the device
  (:mod:`promptcore.views`).
* **Exact and order-independent**: image i's TPT/ZERO views come from a generator seeded by
  :func:`image_seed` ``(seed, i)``, and every compute batch is padded to the full batch size (with
  copies of its last image, whose results are dropped), so each image is computed with the same
  tensor shapes wherever it lands: rows do not depend on the world size, the shard or the order.
  Changing ``batch_size`` changes the shapes, and on CPU the number of intra-op threads changes how
  GEMMs split their work (``torchrun`` sets one thread per process): both may round differently in
  the last bits, so across them predictions, views and top-5 agree and losses agree to rounding.
* **Scale-out**: under ``torchrun`` (``torch.distributed`` initialised: gloo on CPU, NCCL on GPU) the
  images still to do are dealt round-robin to the ranks; each rank appends its rows to its own part
  file; rank 0 merges.
* **Nothing lost**: rows are appended per batch with flush + fsync to
  ``<out>.parts/rank-<r>.jsonl``; a rerun with the same ``out`` skips every image already in a part
  file or in ``out`` (a half-written last line left by a kill is cut off), so it never duplicates a
  row; the merge writes ``out`` and ``<stem>.summary.json`` through a temporary file and a rename.
  A corrupt image is skipped and named in the summary (``strict=True`` stops the run instead);
  a failure stops the rank with an error naming the rank and the image.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch

from .models import square_image_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MODES = ("eval", "tpt", "zero")
TOP_K = 5


class RunError(RuntimeError):
    """A folder run stopped: a rank failed on an image, a corrupt image under ``strict``, an
    ``out`` file that belongs to another run."""


# -- the data set -------------------------------------------------------------------------------------


@dataclass
class ImageFolder:
    """The sorted listing of an ImageFolder tree: ``paths[i]`` (relative to ``root``) has label ``labels[i]``."""

    root: Path
    classes: List[str]
    paths: List[str]
    labels: List[int]

    def __len__(self) -> int:
        return len(self.paths)

    def relabeled(self, class_of_folder: Sequence[int]) -> "ImageFolder":
        """The same listing with folder k's images labelled ``class_of_folder[k]``."""
        folder_of = {name: k for k, name in enumerate(self.classes)}
        labels = [class_of_folder[folder_of[path.split("/", 1)[0]]] for path in self.paths]
        return ImageFolder(self.root, self.classes, self.paths, labels)

    def fingerprint(self) -> str:
        """SHA-256 of the (path, label) list: an image's index, hence its seed, is valid only for this listing."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels):
            digest.update(f"{label}\t{path}\n".encode())
        return digest.hexdigest()


def scan_image_folder(root) -> ImageFolder:
    """List ``root/<class folder>/<image>`` (sorted); raise ValueError for a folder without classes or images."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(f"{folder.name}/{f.name}")
                labels.append(label)
    if not paths:
        raise ValueError(f"no images under {root} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return ImageFolder(root, [p.name for p in folders], paths, labels)


def folder_classnames(folder: ImageFolder, classnames: Optional[Union[str, Path, Sequence[str]]] = None,
                      in_folder_order: bool = False) -> List[str]:
    """Class names in label order: a file (one per line), a list, or the folder names; checked against the
    number of class folders and matched to them (see :func:`class_labels`)."""
    from .models import read_classnames

    if classnames is None:
        names = list(folder.classes)
    elif isinstance(classnames, (str, Path)):
        names = read_classnames(classnames)
    else:
        names = list(classnames)
    if len(names) != len(folder.classes):
        raise ValueError(f"{len(names)} class names for {len(folder.classes)} class folders in {folder.root}")
    class_labels(folder.classes, names, in_folder_order)
    return names


def _name_key(name: str) -> str:
    # folder names often spell spaces as "_" and differ in case from the class-name lists
    return " ".join(str(name).replace("_", " ").split()).casefold()


def class_labels(folders: Sequence[str], names: Sequence[str], in_folder_order: bool = False) -> List[int]:
    """The label (index into ``names``) of each sorted class folder.

    Where every folder name is one of the class names (``_`` read as a space, case ignored), folders map by
    name, whatever the order of ``names``. Otherwise ``names`` must be declared to be in the sorted folder
    order (``in_folder_order``): folder i gets ``names[i]``. Anything else is a ValueError listing the
    mismatch, as is a name in folder order that names another folder.
    """
    if len(names) != len(folders):
        raise ValueError(f"{len(names)} class names for {len(folders)} class folders")
    folder_keys = [_name_key(f) for f in folders]
    name_keys = [_name_key(n) for n in names]
    unique = len(set(name_keys)) == len(name_keys) and len(set(folder_keys)) == len(folder_keys)
    if unique and set(folder_keys) == set(name_keys):
        where = {key: i for i, key in enumerate(name_keys)}
        return [where[key] for key in folder_keys]
    if in_folder_order:
        folder_of = {key: i for i, key in enumerate(folder_keys) if folder_keys.count(key) == 1}
        clashes = [f"name {i + 1} {names[i]!r} is folder {folders[folder_of[key]]!r} (label {folder_of[key]})"
                   for i, key in enumerate(name_keys) if folder_of.get(key, i) != i]
        if clashes:
            raise ValueError("the class names are not in the sorted folder order: " + "; ".join(clashes[:5])
                             + (f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""))
        return list(range(len(folders)))
    unnamed = [f for f, key in zip(folders, folder_keys) if key not in set(name_keys)]
    unused = [n for n, key in zip(names, name_keys) if key not in set(folder_keys)]
    detail = []
    if unnamed:
        detail.append(f"folders without a class name: {_some(unnamed)}")
    if unused:
        detail.append(f"class names without a folder: {_some(unused)}")
    if not detail:
        detail.append("names repeat once '_' is read as a space and case is ignored")
    raise ValueError("the class names do not match the class folder names (" + "; ".join(detail) + "); if the "
                     "names are in the sorted folder order, say so with --classnames-in-folder-order "
                     "(run_folder(..., classnames_in_folder_order=True))")


def _some(items: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(x) for x in items[:k])
    return shown + (f" and {len(items) - k} more" if len(items) > k else "")


def error_text(exc: BaseException) -> str:
    """One line of an exception's message without the C++ source locations and stack frames that torch and
    torchvision append ("decode_jpeg, /pytorch/vision/torchvision/csrc/...cpp:171, ...")."""
    text = str(exc)
    cut = text.find("Exception raised from ")
    if cut >= 0:
        text = text[:cut]
    text = _SOURCE_LOCATION.sub("", text)
    text = " ".join(text.split()).strip(" ,:")
    return text or type(exc).__name__


_SOURCE_LOCATION = re.compile(r"(?:\b\w+, )?[^\s,]*[/\\][^\s,]*\.(?:cpp|cc|cxx|c|h|hpp|cu|cuh):\d+(?:,\s*)?")


def decode_image_file(path) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor (3, H, W): torchvision.io, or PIL for formats it lacks (BMP,
    TIFF). Raises ValueError naming the file when neither can decode it."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        with _quiet_torchvision_io():
            return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except Exception as first:  # torchvision raises RuntimeError for unknown formats and corrupt data alike
        try:
            import numpy as np
            from PIL import Image

            with Image.open(path) as img:
                arr = np.array(img.convert("RGB"))
            return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        except Exception:
            raise ValueError(f"cannot decode image {path}: {error_text(first)}") from first


@contextlib.contextmanager
def _quiet_torchvision_io():
    # torchvision >= 0.29 warns on every decode call that TorchCodec will take over image decoding; the
    # decoders still work, and one warning per image would bury the progress bar
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        yield


def load_image(path, device="cpu") -> torch.Tensor:
    """A uint8 RGB tensor (3, H, W) of an image file on ``device`` (see :func:`decode_image_file`)."""
    return decode_image_file(path).to(device)


@dataclass
class Sample:
    """One loaded image: ``image`` is a uint8 (3, H, W) tensor, or the file's bytes when ``encoded``
    (JPEGs decoded on the GPU); ``error`` says why it could not be read (``image`` is then None)."""

    index: int
    image: Optional[torch.Tensor]
    encoded: bool = False
    error: Optional[str] = None

    def pin_memory(self) -> "Sample":
        """Called by the DataLoader's pinning thread (``pin_memory=True``) on CUDA runs."""
        if self.image is not None:
            self.image = self.image.pin_memory()
        return self


class FolderImages(torch.utils.data.Dataset):
    """The images at ``indices`` of an :class:`ImageFolder`, decoded in DataLoader workers.

    With ``jpeg_bytes=True`` JPEG files are returned undecoded (for the GPU decoder); other formats and
    all images on CPU are decoded here. Unreadable files become a :class:`Sample` with ``error`` set.
    """

    def __init__(self, folder: ImageFolder, indices: Sequence[int], jpeg_bytes: bool = False):
        self.folder, self.indices, self.jpeg_bytes = folder, list(indices), jpeg_bytes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Sample:
        from torchvision.io import read_file

        index = self.indices[k]
        path = self.folder.root / self.folder.paths[index]
        try:
            if self.jpeg_bytes:
                with _quiet_torchvision_io():
                    data = read_file(str(path))
                if data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8:
                    return Sample(index, data, encoded=True)
            return Sample(index, decode_image_file(path))
        except Exception as exc:
            return Sample(index, None, error=error_text(exc))


def _collate(samples: List[Sample]) -> List[Sample]:
    return samples


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s view generator: a hash of (seed, index), so views do not depend on
    which images share a batch, a rank or a run."""
    digest = hashlib.blake2b(f"promptcore-views:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# -- what one batch computes, per mode ------------------------------------------------------------------------


def _pad(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Pad dim 0 to ``size`` with copies of the last entry, so every batch has the same shapes."""
    if batch.shape[0] >= size:
        return batch
    return torch.cat([batch, batch[-1:].expand(size - batch.shape[0], *batch.shape[1:])])


def _top_k(scores: torch.Tensor, k: int) -> List[List[int]]:
    # a stable descending sort: ties go to the lower class index, identically on every run
    order = torch.argsort(scores.float().cpu(), dim=-1, descending=True, stable=True)
    return order[:, :k].tolist()


class _Predictor:
    """Rows of a batch of decoded images (uint8 (3, H, W) on the module's device) for one mode."""

    def __init__(self, module, mode: str, batch_size: int, seed: int, zero_selection: float):
        self.module, self.mode, self.batch_size, self.seed = module, mode, batch_size, seed
        self.zero_selection = zero_selection
        self.size = square_image_size(module.model)

    def __call__(self, images: List[torch.Tensor], indices: List[int]) -> List[Dict[str, Any]]:
        from .views import make_views

        n = len(images)
        if self.mode == "eval":
            # the official test transform: bicubic resize of the shorter side, center crop, CLIP normalisation
            x = _pad(make_views(images, 1, self.size)[:, 0], self.batch_size)
            with torch.no_grad():
                logits = self.module(x)[:n]
            preds = logits.argmax(dim=-1).tolist()
            return [{"pred": p, "top5": t} for p, t in zip(preds, _top_k(logits, TOP_K))]
        tpt = self.module
        views = torch.cat([make_views([img], tpt.n_views, self.size, augmix=tpt.augmix,
                                      generator=torch.Generator().manual_seed(image_seed(self.seed, i)))
                           for img, i in zip(images, indices)])
        views = _pad(views, self.batch_size)
        if self.mode == "tpt":
            out = tpt.adapt(views)
            logits, selected = out.logits[:n], out.selected[:n].tolist()
            losses = out.losses[:, :n].t().tolist()
            return [{"pred": int(p), "top5": t, "selected": s, "loss": loss}
                    for p, t, s, loss in zip(logits.argmax(-1).tolist(), _top_k(logits, TOP_K), selected, losses)]
        out = tpt.zero(views, self.zero_selection)
        preds, votes, selected = out.preds[:n].tolist(), out.votes[:n], out.selected[:n].tolist()
        rows = []
        for p, v, s in zip(preds, votes, selected):
            # the winner first (ties broken by ZERO's rule), then the other classes by votes
            rest = [c for c in _top_k(v[None], v.numel())[0] if c != p]
            rows.append({"pred": p, "top5": [p] + rest[:TOP_K - 1], "selected": s, "votes": int(v[p])})
        return rows


# -- files ---------------------------------------------------------------------------------------------------


def summary_path(out) -> Path:
    """``preds.jsonl`` -> ``preds.summary.json`` (beside ``out``)."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")


def parts_dir(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


ROW_FIELDS = {"index": int, "path": str, "label": int, "pred": int, "top5": list}


def read_rows(path, folder: Optional[ImageFolder] = None) -> List[Dict[str, Any]]:
    """Rows of a JSON-lines file; a last line without its newline (a write cut short by a kill) is ignored.

    Every row must be a JSON object with the fields a run writes (``index``, ``path``, ``label``, ``pred``,
    ``top5``); with ``folder``, its index, path and label must be that listing's. A RunError names the file
    and line of the first row that is not.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RunError(f"{path} is not a UTF-8 JSON-lines file ({exc.reason} at byte {exc.start}); remove it "
                       "to start over") from exc
    lines = text.split("\n")
    complete = lines[:-1]  # the text after the last newline is incomplete (or empty)
    rows = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunError(f"{path}:{number} is not a JSON row ({exc}); remove the file to start over") from exc
        problem = _row_problem(row, folder)
        if problem:
            raise RunError(f"{path}:{number}: {problem}; fix or remove that line (or remove the file to start "
                           "over)")
        rows.append(row)
    return rows


def _row_problem(row: Any, folder: Optional[ImageFolder]) -> Optional[str]:
    """Why ``row`` is not a row a run wrote (None when it is one)."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    for key, kind in ROW_FIELDS.items():
        value = row.get(key)
        if key not in row:
            return f"the row has no {key!r}"
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key!r} must be a JSON {'integer' if kind is int else kind.__name__}, got {value!r}"
    index = row["index"]
    if folder is None:
        return None
    if not 0 <= index < len(folder):
        return f"index {index} is outside the folder's {len(folder)} images"
    if row["path"] != folder.paths[index] or row["label"] != folder.labels[index]:
        return (f"index {index} is {folder.paths[index]} (label {folder.labels[index]}) in {folder.root}, the row "
                f"says {row['path']} (label {row['label']})")
    return None


def _cut_partial_line(path: Path) -> None:
    """Truncate a part file after its last newline, so appended rows start on a line of their own."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


def check_out_folder(out) -> Path:
    """Raise when ``out`` is a folder or its folder is missing or not writable; returns it as a Path."""
    out = Path(out)
    parent = out.parent
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'preds.jsonl'}")
    if not parent.is_dir():
        raise ValueError(f"folder {parent} of --out does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"folder {parent} of --out is not writable")
    try:  # permission bits do not tell for root or read-only mounts; an unnamed temporary file leaves nothing
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ValueError(f"folder {parent} of --out is not writable ({exc.strerror or exc})") from exc
    return out


def check_out_path(out, config: Dict[str, Any]) -> None:
    """Raise before anything is written when ``out`` cannot be written or holds another run's results."""
    out = check_out_folder(out)
    parts = parts_dir(out)
    if parts.exists() and any(parts.iterdir()):  # an empty one: a run killed before it wrote anything
        _check_same_run(parts / "run.json", config, parts)
    if out.exists():
        _check_same_run(summary_path(out), config, out)


def _check_same_run(record: Path, config: Dict[str, Any], out: Path) -> None:
    if not record.exists():
        raise ValueError(f"{out} exists and was not written by a promptcore folder run (no {record.name}); "
                         "choose another --out or remove it")
    try:
        saved = json.loads(record.read_text(encoding="utf-8")).get("config")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{record} is not a promptcore run record ({exc})") from exc
    if saved != config:
        keys = sorted(k for k in set(saved or {}) | set(config) if (saved or {}).get(k) != config.get(k))
        raise ValueError(f"{out} holds the results of a different run (differs in {', '.join(keys)}); choose "
                         "another --out or remove it and its .parts folder")


# -- building the module of a method -------------------------------------------------------------------------

EVAL_METHODS = ("coop", "cocoop", "maple", "zeroshot")


def check_eval_options(method: str, checkpoint=None, templates=None) -> None:
    """Raise a clear error for a method/option combination ``promptcore eval`` cannot run."""
    if method not in EVAL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(EVAL_METHODS)}")
    if method == "zeroshot":
        import promptcore

        if not hasattr(promptcore, "ZeroShot"):
            raise ValueError("--method zeroshot needs promptcore.ZeroShot, which this build of promptcore lacks")
        if checkpoint is not None:
            raise ValueError("--method zeroshot learns no prompts: drop --checkpoint")
        return
    if templates is not None:
        raise ValueError(f"--templates applies to --method zeroshot, not {method}")
    if checkpoint is None:
        raise ValueError(f"--method {method} needs --checkpoint (an official model.pth.tar-N or a promptcore "
                         ".safetensors file)")


def build_eval_module(method: str, model, tokenizer, classnames: Optional[Sequence[str]], checkpoint=None,
                      templates=None, options: Optional[Dict[str, Any]] = None, allow_new_classes: bool = False):
    """The module ``promptcore eval`` runs: learned prompts from a checkpoint (official Dassl file/folder or
    promptcore ``.safetensors``, through :func:`promptcore.export.pipeline.build_from_checkpoint`), or
    ``promptcore.ZeroShot`` with ``templates`` where this build has it."""
    check_eval_options(method, checkpoint, templates)
    if method == "zeroshot":
        import promptcore

        if classnames is None:
            raise ValueError("--method zeroshot needs class names")
        return promptcore.ZeroShot(model, list(classnames), templates=templates if templates is not None else "openai",
                                   tokenizer=tokenizer)
    from promptcore.export.pipeline import build_from_checkpoint

    return build_from_checkpoint(method, model, tokenizer, checkpoint, classnames, options,
                                 allow_new_classes=allow_new_classes)


# -- torch.distributed --------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the run: rank, world size and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_dist(device=None) -> Dist:
    """The rank and world size of an initialised process group (else a single process)."""
    import torch.distributed as td

    device = torch.device(device) if device is not None else torch.device("cpu")
    if td.is_available() and td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size(), device)
    return Dist(0, 1, device)


@contextlib.contextmanager
def distributed(device: str = "cpu", timeout_s: float = 1800.0) -> Iterator[Dist]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else run as one process.

    The backend is NCCL for CUDA devices (each rank on ``cuda:LOCAL_RANK``) and gloo on CPU; every
    collective times out after ``timeout_s`` seconds, so a rank that dies cannot hang the others.
    """
    import torch.distributed as td

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        yield Dist(0, 1, dev)
        return
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    td.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                          device_id=dev if dev.type == "cuda" else None)
    try:
        yield Dist(td.get_rank(), td.get_world_size(), dev)
    finally:
        td.destroy_process_group()


def _barrier(dist: Dist) -> None:
    if dist.distributed:
        import torch.distributed as td

        td.barrier()


def _gather(dist: Dist, obj: Any) -> List[Any]:
    if not dist.distributed:
        return [obj]
    import torch.distributed as td

    out: List[Any] = [None] * dist.world_size
    td.all_gather_object(out, obj)
    return out


# -- the run ---------------------------------------------------------------------------------------------


def run_folder(module, root, out, mode: str = "eval", classnames=None, batch_size: Optional[int] = None,
               workers: int = 0, seed: int = 0, limit: Optional[int] = None, strict: bool = False,
               progress: bool = True, zero_selection: float = 0.3, config: Optional[Dict[str, Any]] = None,
               device=None, classnames_in_folder_order: bool = False) -> Optional[Dict[str, Any]]:
    """Run ``module`` over an ImageFolder tree and write one JSON row per image to ``out``.

    ``mode``: "eval" (the module's logits: CoOp, CoCoOp, MaPLe, zero-shot), "tpt" or "zero" (a
    :class:`promptcore.TPT`). ``classnames`` (file, list, or None for the module's own) must match the
    class folders: by name (see :func:`class_labels`), or in the sorted folder order when
    ``classnames_in_folder_order``; a row's ``label`` is the index of its folder's class name. Rows:
    ``index``, ``path``, ``label``, ``pred``, ``top5`` (+ ``selected`` views and ``loss`` per step for
    TPT, ``selected`` and the winner's ``votes`` for ZERO). ``config`` (JSON-able) identifies the run:
    resuming into an ``out`` written with another config is refused. Under ``torchrun`` every rank calls
    this; rank 0 merges and gets the summary (other ranks get None). Returns the summary also written to
    ``<stem>.summary.json``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "eval" and getattr(module, "method", None) != "tpt":
        raise ValueError(f"mode {mode!r} needs a promptcore.TPT module, got {type(module).__name__}")
    batch_size = batch_size if batch_size is not None else getattr(module, "batch_size", 8)
    for name, value in (("batch_size", batch_size), ("workers", workers), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "batch_size" else 0):
            raise ValueError(f"{name} must be an integer >= {1 if name == 'batch_size' else 0}, got {value!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    folder = scan_image_folder(root)
    names = folder_classnames(folder, classnames, classnames_in_folder_order) if classnames is not None else None
    if names is None:
        if len(module.classnames) != len(folder.classes):
            raise ValueError(f"the {type(module).__name__} has {len(module.classnames)} classes, {folder.root} has "
                             f"{len(folder.classes)} class folders")
    folder = folder.relabeled(class_labels(folder.classes, names if names is not None else module.classnames,
                                           classnames_in_folder_order))
    out = Path(out)
    run_config = {"mode": mode, "data": folder.fingerprint(), "seed": seed,
                  "classnames": list(names if names is not None else module.classnames), **(config or {})}
    check_out_path(out, run_config)
    if names is not None and list(names) != list(module.classnames):
        module.set_classnames(names)
    module.eval()
    device = torch.device(device) if device is not None else module.engine.tower.device
    dist = current_dist(device)
    todo = list(range(len(folder) if limit is None else min(limit, len(folder))))

    parts = parts_dir(out)
    _barrier(dist)  # every rank has checked ``out`` before rank 0 touches the parts folder
    if dist.rank == 0:
        parts.mkdir(exist_ok=True)
        if not (parts / "run.json").exists():
            _atomic_write(parts / "run.json", json.dumps({"config": run_config}, indent=1) + "\n")
        for part in parts.glob("rank-*.jsonl"):
            _cut_partial_line(part)
    _barrier(dist)  # every rank now reads the same finished rows
    done = {row["index"] for source in _row_sources(out) for row in read_rows(source, folder)}
    pending = [i for i in todo if i not in done]
    mine = pending[dist.rank::dist.world_size]

    status = _run_shard(module, folder, mine, mode, batch_size, workers, seed, strict, progress, zero_selection,
                        parts / f"rank-{dist.rank:05d}.jsonl", dist)
    statuses = _gather(dist, status)
    if dist.rank != 0:
        return None
    return _merge(out, folder, run_config, todo, statuses, dist.world_size, progress)


def _row_sources(out: Path) -> List[Path]:
    return [out] + sorted(parts_dir(out).glob("rank-*.jsonl"))


def _run_shard(module, folder: ImageFolder, indices: List[int], mode: str, batch_size: int, workers: int, seed: int,
               strict: bool, progress: bool, zero_selection: float, part: Path, dist: Dist) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    device = dist.device
    cuda = device.type == "cuda"
    predictor = _Predictor(module, mode, batch_size, seed, zero_selection)
    data = FolderImages(folder, indices, jpeg_bytes=cuda and _cuda_jpeg_available())
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_collate, pin_memory=cuda,
                                         prefetch_factor=4 if workers > 0 else None)
    label = f"{mode.upper()} {folder.root.name}" + (f" (rank 0 of {dist.world_size})" if dist.distributed else "")
    bar = tqdm(total=len(indices), disable=not progress or dist.rank != 0, unit="img", desc=label)
    failed: List[Dict[str, str]] = []
    processed = correct = 0
    start = time.perf_counter()
    with open(part, "a", encoding="utf-8") as sink:
        for samples in loader:
            images, kept = [], []
            for s, image in zip(samples, _to_device(samples, device)):
                if s.error is not None:
                    path = str(folder.root / folder.paths[s.index])
                    if strict:
                        raise RunError(_where(dist) + f"cannot read image {path}: {s.error} (--strict)")
                    failed.append({"path": path, "error": s.error})
                    continue
                images.append(image)
                kept.append(s.index)
            if not images:
                continue
            try:
                results = predictor(images, kept)
            except Exception as exc:
                first = folder.root / folder.paths[kept[0]]
                more = f" (batch of {len(kept)} images starting there)" if len(kept) > 1 else ""
                raise RunError(_where(dist) + f"failed at image {first}{more}: {type(exc).__name__}: "
                               + error_text(exc)) from exc
            lines = []
            for i, res in zip(kept, results):
                row = {"index": i, "path": folder.paths[i], "label": folder.labels[i], **res}
                lines.append(json.dumps(row) + "\n")
                correct += int(res["pred"] == folder.labels[i])
            sink.write("".join(lines))
            sink.flush()
            os.fsync(sink.fileno())
            processed += len(kept)
            bar.update(len(samples))
            bar.set_postfix(acc=f"{100.0 * correct / max(processed, 1):.1f}%")
    bar.close()
    return {"rank": dist.rank, "processed": processed, "failed": failed, "seconds": time.perf_counter() - start}


def _where(dist: Dist) -> str:
    return f"rank {dist.rank} of {dist.world_size}: " if dist.distributed else ""


def _cuda_jpeg_available() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _to_device(samples: List[Sample], device: torch.device) -> List[Optional[torch.Tensor]]:
    """The decoded images of a batch on ``device``: JPEG bytes decoded there in one batched call (one by one
    when the batch fails, to find the corrupt file, whose sample gets ``error`` set)."""
    images: List[Optional[torch.Tensor]] = [None if s.error is not None or s.encoded else
                                            s.image.to(device, non_blocking=True) for s in samples]
    encoded = [k for k, s in enumerate(samples) if s.error is None and s.encoded]
    if not encoded:
        return images
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with _quiet_torchvision_io():
            decoded = decode_jpeg([samples[k].image for k in encoded], mode=ImageReadMode.RGB, device=device)
    except Exception:
        decoded = []
        for k in encoded:
            try:
                with _quiet_torchvision_io():
                    decoded.append(decode_jpeg(samples[k].image, mode=ImageReadMode.RGB, device=device))
            except Exception as exc:
                samples[k].error = "cannot decode JPEG: " + error_text(exc)
                decoded.append(None)
    for k, image in zip(encoded, decoded):
        images[k] = image
    return images


def _merge(out: Path, folder: ImageFolder, config: Dict[str, Any], todo: List[int], statuses: List[Dict[str, Any]],
           world_size: int, progress: bool) -> Dict[str, Any]:
    rows: Dict[int, Dict[str, Any]] = {}
    for source in _row_sources(out):
        for row in read_rows(source, folder):
            rows.setdefault(row["index"], row)
    ordered = [rows[i] for i in sorted(rows)]
    text = "".join(json.dumps(row) + "\n" for row in ordered)
    _atomic_write(out, text)
    summary = summarize(ordered, config["classnames"])
    processed = sum(s["processed"] for s in statuses)
    seconds = max(s["seconds"] for s in statuses)
    failed = sorted((f for s in statuses for f in s["failed"]), key=lambda f: f["path"])
    rate = processed / seconds if seconds > 0 and processed else None
    summary.update({"out": str(out), "mode": config["mode"], "complete": all(i in rows for i in todo),
                    "failed": failed, "images_per_s": rate, "processed_this_run": processed, "seconds": seconds,
                    "world_size": world_size, "config": config})
    _atomic_write(summary_path(out), json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    if progress:
        print(f"{config['mode'].upper()} on {folder.root}: top-1 {100 * summary['top1']:.2f}% top-5 "
              f"{100 * summary['top5']:.2f}% over {summary['images']} images; this run {processed} images"
              + (f", {rate:.2f} images/s" if rate else "") + f" on {world_size} process(es)"
              + (f"; {len(failed)} unreadable (see {summary_path(out)})" if failed else ""))
    return summary


def summarize(rows: Sequence[Dict[str, Any]], classnames: Sequence[str]) -> Dict[str, Any]:
    """Top-1, top-5 and per-class accuracy of prediction rows."""
    n = len(rows)
    per_class = []
    for c, name in enumerate(classnames):
        mine = [r for r in rows if r["label"] == c]
        hits = sum(r["pred"] == c for r in mine)
        per_class.append({"label": c, "name": name, "images": len(mine), "correct": hits,
                          "accuracy": hits / len(mine) if mine else None})
    seen = [p["accuracy"] for p in per_class if p["accuracy"] is not None]
    correct = sum(r["pred"] == r["label"] for r in rows)
    return {"images": n, "correct": correct, "top1": correct / n if n else 0.0,
            "top5": sum(r["label"] in r["top5"] for r in rows) / n if n else 0.0,
            "mean_per_class": sum(seen) / len(seen) if seen else 0.0, "per_class": per_class}
