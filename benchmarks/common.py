"""Shared helpers of the benchmark scripts: timing, environment rows, JSON lines."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.check_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                      stderr=subprocess.DEVNULL, text=True, timeout=10)
        return out.strip().splitlines()[0]
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """What a row needs to be read later: versions, git sha, UTC date, the device (GPU name and driver)."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "git_sha": git_sha(),
           "device": str(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["driver"] = _driver_version()
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
        env["driver"] = None
    return env


def measure(fn, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Median, p20 and p80 seconds of ``fn()`` (CUDA events on GPU), and peak memory on GPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    out = {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3], "min_s": min(times),
           "repeats": repeats}
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def append_rows(name: str, rows) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def measure_peaks(device: torch.device, smoke: bool = False, matmul_dtypes: Optional[Sequence[str]] = None) -> dict:
    """Copy bandwidth and matmul throughput of this device, measured now (the peaks ratios refer to).

    ``peak_gbps`` counts bytes read plus written by a large device-to-device copy. ``peak_tflops`` is
    the first of ``matmul_dtypes`` (default fp16 on CUDA, fp32 on CPU); every dtype measured also
    gets its own ``peak_tflops_<dtype>`` key.
    """
    gpu = device.type == "cuda"
    n_bytes = (1 << 20) if smoke else (1 << 30) if gpu else (1 << 26)
    repeats = 20 if gpu and not smoke else 5
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    n = 256 if smoke else 8192 if gpu else 2048
    names = list(matmul_dtypes or (["fp16"] if gpu else ["fp32"]))
    # a peak is the best the device did: the fastest repeat, not the median (which a busy machine drags down)
    out = {"peak_gbps": 2 * n_bytes / copy["min_s"] / 1e9}
    for name in names:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        mm = measure(lambda: a @ b, device, repeats=repeats, warmup=2)
        out[f"peak_tflops_{name}"] = 2 * n**3 / mm["min_s"] / 1e12
    out["peak_tflops"] = out[f"peak_tflops_{names[0]}"]
    out["peak_matmul_dtype"] = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[names[0]]
    return out


def peak_tflops_for(peaks: dict, precision: Optional[str]) -> float:
    """The matmul peak measured for ``precision`` (amp counts as fp16), else the default one."""
    key = "fp16" if precision == "amp" else precision
    return peaks.get(f"peak_tflops_{key}", peaks["peak_tflops"])


# ----------------------------------------------------------------------------------------------
# models and model FLOPs


TINY_MODEL = "promptcore-tiny"
TINY_CONFIG = {  # a 2-layer, 64-wide CLIP on 32 px images, QuickGELU: the smoke runs' model
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def register_tiny_model() -> str:
    """Register the tiny smoke-run CLIP with open_clip (once per process) and return its model name, so
    every script, and anything that calls ``open_clip.create_model`` or ``load_model``, can build it."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as tmp:  # open_clip reads configs from files, once, when added
            path = Path(tmp) / f"{TINY_MODEL}.json"
            path.write_text(json.dumps(TINY_CONFIG))
            open_clip.add_model_config(path)
    return TINY_MODEL


def bench_model(name: str, device, precision: str = "fp32"):
    """An open_clip model with random weights and its tokenizer (:func:`promptcore.models.load_model`);
    ``"tiny"`` (or ``"promptcore-tiny"``) is the smoke runs' 2-layer CLIP."""
    from promptcore.models import load_model

    if name in ("tiny", TINY_MODEL):
        name = register_tiny_model()
        torch.manual_seed(0)  # random weights, the same ones every run
    return load_model(name, None, device, precision)


def block_flops(width: int, queries_keys) -> float:
    """Model FLOPs of one transformer block: 24 D^2 per token (projections, MLP), 4 D per (query, key) pair."""
    return sum(24 * width * width + 4 * width * keys for keys in queries_keys)


def text_flops(prompts, width: int, layers: int, path: str) -> float:
    """Forward model FLOPs of encoding a prompt set on the naive (full 77-token) or fast path."""
    if path.startswith("naive"):
        length = prompts.ids.shape[1]
        return layers * prompts.num_classes * block_flops(width, range(1, length + 1))
    P = prompts.prefix_len
    total = block_flops(width, range(1, P + 1))
    for bucket in prompts.buckets:
        total += bucket.size * block_flops(width, range(P + 1, P + bucket.length + 1))
    return layers * total


def text_tower_size(model) -> tuple:
    """(width, layers) of an open_clip model's text transformer."""
    transformer = model.transformer if hasattr(model, "transformer") else model.text.transformer
    return transformer.width, len(transformer.resblocks)


def image_flops(model, batch: int, extra_tokens: int = 0) -> float:
    """Forward model FLOPs of an open_clip ViT image tower on ``batch`` images (patch embedding and
    blocks; ``extra_tokens`` for prompt tokens such as MaPLe's). 0 for towers other than a ViT."""
    visual = model.visual
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        return 0.0
    width = visual.transformer.width
    grid = visual.grid_size if hasattr(visual, "grid_size") else None
    n_patches = grid[0] * grid[1]
    tokens = n_patches + 1 + extra_tokens
    patch = visual.conv1.kernel_size[0] * visual.conv1.kernel_size[1] * 3
    per_image = 2 * n_patches * patch * width + len(visual.transformer.resblocks) * (
        24 * width * width * tokens + 4 * width * tokens * tokens)
    return batch * per_image


# ----------------------------------------------------------------------------------------------
# scripts as importable cases


def case_args(parser, resolve, options: dict, extra=("peaks",)):
    """The namespace a script's ``main`` would build, from keyword ``options`` named like its flags
    (``--n-ctx`` is ``n_ctx``); ``resolve`` fills the device-dependent defaults. Unknown names raise."""
    args = parser.parse_args([])
    for key in extra:
        setattr(args, key, None)
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(vars(args)))}")
    for key, value in options.items():
        setattr(args, key, value)
    return resolve(args)


def comparison_fields(times: dict, baseline: str, useful_flops: Optional[float] = None,
                      peak_tflops: Optional[float] = None) -> dict:
    """Uniform fields every method row carries (what run_all's table and plots read): median seconds
    per provider, the baseline provider, each provider's speed-up over it and, given the useful
    model FLOPs of the work and the measured peak, each provider's fraction of that peak."""
    times_s = {name: t["median_s"] for name, t in times.items()}
    out = {"times_s": times_s, "baseline": baseline,
           "ratio_vs_baseline": {name: times_s[baseline] / s for name, s in times_s.items()}}
    if useful_flops and peak_tflops:
        out["useful_flops"] = useful_flops
        out["frac_peak_flops"] = {name: useful_flops / s / 1e12 / peak_tflops for name, s in times_s.items()}
    return out
