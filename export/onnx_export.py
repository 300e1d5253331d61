"""Export a promptcore module to ONNX, verified in onnxruntime before it is reported as written.

The export runs torch.onnx's dynamo exporter with a dynamic batch axis; Triton kernels are never
traced (the backend switch picks the PyTorch references during export, and ``to_onnx`` forces
them). Files are written to a temporary name beside the target and moved into place only after
``onnx.checker`` and the onnxruntime comparison pass: on any failure no file is left.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from promptcore.models import image_size as model_image_size

from .graphs import DTYPES, EXPORTABLE, ExportError, build_graph, check_classnames, check_exportable

TWO_GB = 2 * 1024**3
METADATA_PREFIX = "promptcore."


@dataclass
class ExportReport:
    """What was written and how onnxruntime compared with PyTorch on the same inputs."""

    path: str
    method: str
    dtype: str
    num_classes: int
    image_size: int
    outputs: List[str]
    external_data: bool
    batch_sizes: List[int]
    max_abs_diff: float
    max_abs_logit: float
    top1_agreement: float
    torch_ms: float
    onnxruntime_ms: float
    files: List[str] = field(default_factory=list)
    provider: str = "CPUExecutionProvider"
    provider_note: str = ""
    max_disagreement_gap: float = 0.0
    nonfinite: str = ""
    sha256: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"wrote {self.path} ({self.method}, {self.dtype}, {self.num_classes} classes, "
                f"{self.image_size}px): onnxruntime ({self.provider}) vs PyTorch max |diff| {self.max_abs_diff:.2e} "
                f"(max |logit| {self.max_abs_logit:.2f}), top-1 agreement {self.top1_agreement * 100:.1f}% "
                f"over batches {self.batch_sizes}; batch {self.batch_sizes[-1]}: PyTorch {self.torch_ms:.1f} ms, "
                f"onnxruntime {self.onnxruntime_ms:.1f} ms" + (f"; {self.provider_note}" if self.provider_note else ""))

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _stage(what: str):
    """Re-raise an error from torch, onnx or onnxruntime as an ExportError saying what promptcore was doing."""
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def torch_backend():
    """Force the PyTorch reference ops (Triton kernels are never exported)."""
    old = os.environ.get("PROMPTCORE_BACKEND")
    os.environ["PROMPTCORE_BACKEND"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PROMPTCORE_BACKEND", None)
        else:
            os.environ["PROMPTCORE_BACKEND"] = old


def _image_size(module: nn.Module, image_size: Optional[int]) -> int:
    size = model_image_size(module.model)
    native = None if size is None else size[0]
    if image_size is None:
        if native is None:
            raise ExportError("the model does not say its image size; pass image_size")
        return int(native)
    if native is not None and int(image_size) != int(native):
        raise ExportError(f"image_size {image_size} differs from the model's {native}")
    return int(image_size)


def metadata_for(module: nn.Module, dtype: str, image_size: int, outputs: Sequence[str],
                 extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The metadata_props promptcore writes into an exported model."""
    import promptcore

    meta = {
        "method": module.method,
        "classnames": json.dumps(list(module.classnames)),
        "options": json.dumps(module.options(), sort_keys=True),
        "model_name": module.model_name or "",
        "dtype": dtype,
        "image_size": str(image_size),
        "outputs": json.dumps(list(outputs)),
        "version": promptcore.__version__,
    }
    meta.update(extra or {})
    return {METADATA_PREFIX + k: v for k, v in meta.items()}


def read_metadata(path) -> Dict[str, object]:
    """promptcore's metadata of an exported model (JSON fields decoded), every field checked.

    A missing or malformed field raises :class:`ExportError` naming the field and the file.
    """
    import onnx

    with _stage(f"reading {path} as an ONNX model"):
        model = onnx.load(str(path), load_external_data=False)
    raw = {p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}
    if "method" not in raw:
        raise ExportError(f"{path} was not written by promptcore (no promptcore metadata)")

    def bad(key: str, why: str) -> ExportError:
        return ExportError(f"{path}: metadata field {METADATA_PREFIX}{key} {why}")

    for key in ("method", "classnames", "options", "model_name", "dtype", "image_size", "outputs"):
        if key not in raw:
            raise bad(key, "is missing")
    out: Dict[str, object] = dict(raw)
    for key in ("classnames", "options", "outputs"):
        try:
            out[key] = json.loads(raw[key])
        except ValueError as exc:
            raise bad(key, f"is not valid JSON ({exc})") from None
    if out["method"] not in EXPORTABLE:
        raise bad("method", f"is {out['method']!r}, not one of {', '.join(EXPORTABLE)}")
    names = out["classnames"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("classnames", "is not a non-empty JSON list of strings")
    try:
        check_classnames(names)
    except ExportError as exc:
        raise bad("classnames", f"is not valid: {exc}") from None
    if not isinstance(out["options"], dict):
        raise bad("options", "is not a JSON object")
    if out["dtype"] not in DTYPES:
        raise bad("dtype", f"is {out['dtype']!r}, not one of {', '.join(DTYPES)}")
    if not re.fullmatch(r"[1-9][0-9]{0,5}", raw["image_size"]):
        raise bad("image_size", f"is {raw['image_size']!r}, not a positive integer")
    outputs = out["outputs"]
    if outputs not in (["logits"], ["logits", "image_features"]):
        raise bad("outputs", f"is {outputs!r}, not [\"logits\"] or [\"logits\", \"image_features\"]")
    return out


def _sample_images(batch: int, size: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen).to(dtype)


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")  # best first


def provider_list(provider: str = "auto") -> List[str]:
    """The onnxruntime providers to ask for, best first; a clear error for an unknown or missing one."""
    import onnxruntime as ort

    if provider not in ("auto", *PROVIDERS):
        raise ExportError(f"unknown provider {provider!r}; choose one of auto, {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if provider == "auto":
        return [PROVIDERS[p] for p in AUTO_ORDER if PROVIDERS[p] in available]
    if PROVIDERS[provider] not in available:
        hint = " (install promptcore[gpu]: onnxruntime-gpu instead of onnxruntime)" if provider != "cpu" else ""
        raise ExportError(f"provider {provider} ({PROVIDERS[provider]}) is not in this onnxruntime build "
                          f"(available: {', '.join(available)}){hint}")
    return [PROVIDERS[provider]] + ([] if provider == "cpu" else ["CPUExecutionProvider"])


def open_session(path, provider: str = "auto"):
    """An onnxruntime session on ``provider`` (auto|cpu|cuda|tensorrt); returns (session, provider used, note).

    "auto" takes the best provider this onnxruntime build offers and says so in the note (on a
    CPU-only build: CPU, said as a fallback). An explicit GPU provider that is missing from the build,
    or that fails to start (onnxruntime then silently runs on CPU), raises :class:`ExportError`.
    """
    import onnxruntime as ort

    wanted = provider_list(provider)
    available = ort.get_available_providers()
    session = ort.InferenceSession(str(path), providers=wanted)
    used = session.get_providers()[0]
    if provider not in ("auto", "cpu") and used != PROVIDERS[provider]:
        raise ExportError(f"{PROVIDERS[provider]} is installed but failed to start (onnxruntime fell back to {used});"
                          " check the CUDA/cuDNN/TensorRT libraries it needs")
    note = ""
    if provider == "auto":
        note = (f"provider auto: {used} (best of {', '.join(available)})" if used != "CPUExecutionProvider" else
                "provider auto: no GPU execution provider available, fell back to CPUExecutionProvider")
    return session, used, note


def ort_runner(session, feed: Dict[str, np.ndarray], provider: str):
    """A no-argument callable running ``session`` through IO binding: inputs copied to the provider's device
    once, outputs left there (no host round trip per run, as in a serving loop)."""
    import onnxruntime as ort

    device = "cuda" if provider in (PROVIDERS["cuda"], PROVIDERS["tensorrt"]) else "cpu"
    binding = session.io_binding()
    for name, array in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, device)

    def run():
        session.run_with_iobinding(binding)
        return binding

    return run


def check_batch_sizes(batch_sizes: Sequence[int]) -> List[int]:
    """The comparison's batch sizes: at least one, each an integer >= 1."""
    sizes = list(batch_sizes)
    if not sizes:
        raise ExportError("give at least one batch size to compare")
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ExportError(f"batch size {b!r} is not valid: batch sizes must be integers >= 1")
    return [int(b) for b in sizes]


def _nonfinite(array: np.ndarray) -> str:
    nan = int(np.isnan(array).sum())
    inf = int(np.isinf(array).sum())
    parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} infinite"] if inf else [])
    return " and ".join(parts)


def compare_with_onnxruntime(graph: nn.Module, path, image_size: int, dtype: str,
                             batch_sizes: Sequence[int] = (1, 3), seed: int = 0, timing: bool = True,
                             provider: str = "auto") -> dict:
    """Run the ONNX file in onnxruntime (on ``provider``) and ``graph`` in PyTorch on the same images.

    Besides max |diff| and top-1 agreement the result says ``nonfinite`` (which side returned NaN or
    infinite logits, "" when none) and ``max_disagreement_gap``: over the rows whose top-1 classes differ,
    the largest PyTorch logit gap between the two classes (0 when all agree), so a disagreement can be
    told from a tie within tolerance.
    """
    batch_sizes = check_batch_sizes(batch_sizes)
    session, used, note = open_session(path, provider)
    input_name = session.get_inputs()[0].name
    device = next(graph.parameters()).device
    max_diff, max_logit, agree, total, gap = 0.0, 0.0, 0, 0, 0.0
    nonfinite = []
    images = None
    for i, batch in enumerate(batch_sizes):
        images = _sample_images(batch, image_size, DTYPES[dtype], seed + i)
        with torch.no_grad(), torch_backend():
            expected = graph(images.to(device))
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = session.run(None, {input_name: images.numpy()})[0]
        ref = expected.float().cpu().numpy()
        got = got.astype(np.float32)
        if got.shape != ref.shape:
            raise ExportError(f"onnxruntime returned logits of shape {got.shape}, PyTorch {ref.shape}")
        for side, array in (("onnxruntime", got), ("PyTorch", ref)):
            if not np.isfinite(array).all():
                nonfinite.append(f"{side} returned {_nonfinite(array)} logits at batch {batch}")
        # Python's max() drops a NaN operand (max(0.0, nan) == 0.0): NaN is carried explicitly
        diff = float(np.abs(got - ref).max())
        max_diff = diff if math.isnan(diff) or math.isnan(max_diff) else max(max_diff, diff)
        finite = ref[np.isfinite(ref)]
        max_logit = max(max_logit, float(np.abs(finite).max()) if finite.size else 0.0)
        ours, theirs = got.argmax(-1), ref.argmax(-1)
        agree += int((ours == theirs).sum())
        rows = np.nonzero(ours != theirs)[0]
        if len(rows):
            gaps = ref[rows, theirs[rows]] - ref[rows, ours[rows]]
            gap = max(gap, float(np.max(gaps))) if np.isfinite(gaps).all() else float("inf")
        total += batch
    result = {"max_abs_diff": max_diff, "max_abs_logit": max_logit, "top1_agreement": agree / total,
              "max_disagreement_gap": gap, "nonfinite": "; ".join(nonfinite),
              "torch_ms": float("nan"), "onnxruntime_ms": float("nan"), "provider": used, "provider_note": note}
    if timing and images is not None:
        on_device = images.to(device)
        with torch.no_grad(), torch_backend():
            result["torch_ms"] = _median_ms(lambda: _synchronized(graph(on_device)))
        result["onnxruntime_ms"] = _median_ms(ort_runner(session, {input_name: images.numpy()}, used))
    return result


def judge(result: dict, dtype: str) -> str:
    """Why a comparison from :func:`compare_with_onnxruntime` fails ("" when it passes).

    It passes only when both sides return finite logits, max |diff| is within :func:`tolerance` and
    every top-1 disagreement is a tie: two classes whose logits each moved by at most the tolerance can
    swap only when their PyTorch logits are within twice the tolerance.
    """
    allowed = tolerance(dtype, result["max_abs_logit"])
    if result.get("nonfinite"):
        return f"non-finite logits: {result['nonfinite']}"
    if not result["max_abs_diff"] <= allowed:
        return f"onnxruntime and PyTorch disagree: max |diff| {result['max_abs_diff']:.3e} > {allowed:.3e}"
    gap = result.get("max_disagreement_gap", 0.0)
    if result["top1_agreement"] < 1.0 and not gap <= 2 * allowed:
        return (f"onnxruntime and PyTorch pick different top-1 classes on {(1 - result['top1_agreement']) * 100:.1f}% "
                f"of the images (top-1 agreement {result['top1_agreement'] * 100:.1f}%, PyTorch logit gap "
                f"{gap:.3e} > twice the tolerance {allowed:.3e})")
    return ""


def _synchronized(out):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return out


def tolerance(dtype: str, max_abs_logit: float) -> float:
    """Allowed max |ONNX - PyTorch| on the logits, relative to their size."""
    rel = 1e-3 if dtype == "fp32" else 2e-2
    return rel * max(1.0, max_abs_logit)


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def check_output_path(path) -> Path:
    """The export's output file: a new or regular file ending in .onnx in a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise ExportError(f"the output path {path} is {kind}; give the path of a .onnx file to write")
    if path.suffix != ".onnx":
        raise ExportError(f"the output file must end in .onnx, got {path.name}")
    if not path.parent.is_dir():
        raise ExportError(f"folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"folder {path.parent} is not writable")
    return path


def to_onnx(module: nn.Module, path, image_size: Optional[int] = None, dtype: str = "fp32",
            with_features: bool = False, batch_sizes: Sequence[int] = (1, 3), opset: Optional[int] = None,
            extra_metadata: Optional[Dict[str, str]] = None, progress=None, provider: str = "auto") -> ExportReport:
    """Export ``module`` (CoOp, CoCoOp, MaPLe or ZeroShot) to ``path`` and verify it in onnxruntime.

    The graph maps ``images`` (batch, 3, H, W) to ``logits`` (batch, n_cls), plus normalised
    ``image_features`` with ``with_features``. ``dtype`` is "fp32" or "fp16" (inputs, weights and
    outputs). Models over 2 GB are saved with external data beside ``path``. Returns the report;
    raises :class:`ExportError` (leaving no file) when the check or the comparison fails.
    ``provider`` (auto|cpu|cuda|tensorrt) is the onnxruntime execution provider of the comparison.
    """
    import onnx

    step = progress or (lambda msg: None)
    method = check_exportable(module)
    if dtype not in DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_classnames(module.classnames)
    batch_sizes = check_batch_sizes(batch_sizes)
    path = check_output_path(path)
    provider_list(provider)  # an unknown or missing provider fails before the export work
    size = _image_size(module, image_size)
    outputs = ["logits", "image_features"] if with_features else ["logits"]

    step("building the export graph")
    graph = build_graph(module, dtype, with_features)
    external = _param_bytes(graph) > TWO_GB * 0.95
    images = _sample_images(2, size, DTYPES[dtype], 0).to(next(graph.parameters()).device)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        step("exporting with torch.onnx (dynamo)")
        batch = torch.export.Dim("batch", min=1, max=65536)
        with _stage(f"exporting the {method} graph with torch.onnx"), torch.no_grad(), torch_backend():
            program = torch.onnx.export(graph, (images,), dynamo=True, input_names=["images"], output_names=outputs,
                                        dynamic_shapes={"images": {0: batch}}, opset_version=opset,
                                        external_data=external, report=False, verbose=False)
        for key, value in metadata_for(module, dtype, size, outputs, extra_metadata).items():
            program.model.metadata_props[key] = value
        tmp_model = tmpdir / path.name
        with _stage(f"writing the ONNX model into {tmpdir}"):
            program.save(str(tmp_model), external_data=external)
        step("checking the graph (onnx.checker)")
        with _stage("checking the exported graph with onnx.checker"):
            onnx.checker.check_model(str(tmp_model), full_check=False)
        step("comparing onnxruntime with PyTorch")
        with _stage("running the exported graph in onnxruntime against PyTorch"):
            result = compare_with_onnxruntime(graph, tmp_model, size, dtype, batch_sizes, provider=provider)
        failure = judge(result, dtype)
        if failure:
            raise ExportError(f"the exported {method} graph fails verification: {failure}")
        files = []
        for produced in sorted(tmpdir.iterdir()):
            target = path.parent / produced.name
            os.replace(produced, target)
            files.append(str(target))
    finally:
        for leftover in tmpdir.glob("*"):
            leftover.unlink()
        tmpdir.rmdir()
    return ExportReport(path=str(path), method=method, dtype=dtype, num_classes=len(module.classnames),
                        image_size=size, outputs=outputs, external_data=external, batch_sizes=list(batch_sizes),
                        files=files, **result)
