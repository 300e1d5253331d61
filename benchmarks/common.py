"""Shared helpers of the benchmark scripts: timing, environment rows, JSON lines."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "git_sha": git_sha(),
           "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
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
    out = {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3], "repeats": repeats}
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


def measure_peaks(device: torch.device, smoke: bool = False) -> dict:
    """Copy bandwidth and matmul throughput of this device, measured now (the peaks ratios refer to)."""
    gpu = device.type == "cuda"
    n_bytes = (1 << 20) if smoke else (1 << 30) if gpu else (1 << 26)
    repeats = 20 if gpu and not smoke else 5
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    n = 256 if smoke else 8192 if gpu else 2048
    mm_dtype = torch.float16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    mm = measure(lambda: a @ b, device, repeats=repeats, warmup=2)
    return {"peak_gbps": 2 * n_bytes / copy["median_s"] / 1e9, "peak_tflops": 2 * n**3 / mm["median_s"] / 1e12,
            "peak_matmul_dtype": str(mm_dtype).replace("torch.", "")}
