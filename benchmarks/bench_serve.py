"""``promptcore serve`` (Ray Serve, dynamic batching) vs calling the module in-process, measured in one run.

A CoOp module over one CLIP (random weights, saved to a file so the server and this process hold
the same model) is served by a real ``promptcore serve`` process on loopback. Clients send float
(.npy, preprocessed) or JPEG requests, one image each, from 1, 8 and 32 threads; each level
reports requests/s and p50/p99 latency. The in-process baseline runs the same requests one at a
time in this process (decode + open_clip's eval transform for JPEG, then the module), measured again
right before each server level: the ratio
server/in-process is the server's overhead (below 1) or its batching gain (above 1). The load
generator shares the machine with the server, so on a small CPU both compete for the cores; each row
records the 1-minute load average. On a loaded machine use ``--num-cpus 1``: several torch threads
per process on oversubscribed cores are many times slower than one.
Rows are appended to benchmarks/results/serve.jsonl.

    python benchmarks/bench_serve.py                          # CPU: ViT-B-32, 100 classes, 48 requests/level
    python benchmarks/bench_serve.py --model ViT-B-16 --device cuda --requests 512 --max-batch 64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, environment  # noqa: E402

import promptcore  # noqa: E402
from promptcore.models import builtin_classnames, load_model  # noqa: E402
from promptcore.serve import Classifier, ServeSpec  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, kind, timeout=600):
    request = urllib.request.Request(url, data=body, headers={"content-type": kind})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _latency_stats(latencies, wall):
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else latencies * 99
    return {"requests_per_s": len(latencies) / wall, "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": q[98] * 1e3, "requests": len(latencies)}


def drive(call, bodies, concurrency):
    """Send every body through ``call`` from ``concurrency`` threads; wall time and per-request latency."""
    latencies = []

    def one(body):
        t0 = time.perf_counter()
        call(body)
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, bodies))
    return _latency_stats(latencies, time.perf_counter() - t0)


def run(args) -> list:
    from PIL import Image

    torch.manual_seed(0)
    names = builtin_classnames(args.dataset)[: args.classes]
    device = torch.device(args.device)
    model, tokenizer = load_model(args.model, None, device, "fp32")
    coop = promptcore.CoOp(model, names, tokenizer=tokenizer, n_ctx=16, seed=0).eval()
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    rng = np.random.default_rng(0)
    floats, jpegs = [], []
    for i in range(args.requests):
        floats.append(np.ascontiguousarray(rng.standard_normal((1, 3, size, size), dtype=np.float32)))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size + 32, size + 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
        jpegs.append(buf.getvalue())
    npy = []
    for a in floats:
        buf = io.BytesIO()
        np.save(buf, a)
        npy.append(buf.getvalue())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(model.state_dict(), tmp / "weights.pt")
        coop.save(tmp / "prompts.safetensors", model_name=args.model)
        (tmp / "classes.txt").write_text("\n".join(names) + "\n")
        port = _free_port()
        cmd = [sys.executable, "-m", "promptcore.cli", "serve", "--method", "coop", "--model", args.model,
               "--pretrained", str(tmp / "weights.pt"), "--checkpoint", str(tmp / "prompts.safetensors"),
               "--classnames", str(tmp / "classes.txt"), "--port", str(port), "--device", args.device,
               "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
               "--num-cpus", str(args.num_cpus), "--max-queue", str(4 * args.requests)]
        log = open(tmp / "server.log", "w+")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the server exited with status {proc.returncode}:\n{log.read()[-3000:]}")
                try:
                    with urllib.request.urlopen(url + "/ready", timeout=5):
                        break
                except OSError:
                    time.sleep(1.0)
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError("the server did not become ready in 600 s")
            startup_s = time.perf_counter() - t0
            print(f"server ready in {startup_s:.0f} s", flush=True)

            # the same answers as in-process, or the timing means nothing
            status, out = _post(url + "/classify", npy[0], "application/x-npy")
            with torch.no_grad():
                ref = coop(torch.from_numpy(floats[0]).to(device)).float().cpu().numpy()
            err = float(np.abs(np.array(out["logits"]) - ref).max() / np.abs(ref).max())
            if status != 200 or err > 1e-4:
                raise RuntimeError(f"server answer differs from in-process ({status}, scaled error {err:.1e})")

            torch.set_num_threads(max(1, int(args.num_cpus)))  # the replica's thread count, for a fair baseline
            spec = ServeSpec(method="coop", model=args.model, classnames=names, checkpoint="in-process",
                             max_batch=args.max_batch)
            local = Classifier(coop, spec)

            def in_process(kind):
                def call(body):
                    local.run_batch([local.parse(body, kind)])
                return call

            rows, env = [], environment(device)
            for fmt, bodies, kind in (("float", npy, "application/x-npy"), ("jpeg", jpegs, "image/jpeg")):
                drive(in_process(kind), bodies[:4], 1)  # warm-up
                for concurrency in args.concurrency:
                    # the baseline right before each server level: a shared machine's load drifts
                    base = drive(in_process(kind), bodies, 1)
                    def call(body, kind=kind):
                        status, out = _post(url + "/classify", body, kind)
                        if status != 200:
                            raise RuntimeError(f"request failed ({status}): {out}")
                    drive(call, bodies[: min(8, len(bodies))], min(concurrency, 8))  # warm-up
                    served = drive(call, bodies, concurrency)
                    with urllib.request.urlopen(url + "/stats", timeout=30) as response:
                        stats = json.loads(response.read())
                    row = {"bench": "serve", "format": fmt, "concurrency": concurrency, "model": args.model,
                           "classes": len(names), "max_batch": args.max_batch, "server": served,
                           "in_process": base, "server_vs_in_process": served["requests_per_s"] /
                           base["requests_per_s"], "max_batch_requests_seen": stats["max_batch_requests"],
                           "startup_s": startup_s, "cpu_count": os.cpu_count(), "num_cpus": args.num_cpus,
                           "loadavg_1min": os.getloadavg()[0], **env}
                    rows.append(row)
                    print(f"{fmt:5s} c={concurrency:2d}: server {served['requests_per_s']:6.1f} req/s "
                          f"p50 {served['p50_ms']:7.1f} ms p99 {served['p99_ms']:7.1f} ms | in-process "
                          f"{base['requests_per_s']:6.1f} req/s p50 {base['p50_ms']:6.1f} ms | ratio "
                          f"{row['server_vs_in_process']:.2f}x | largest batch so far {stats['max_batch_requests']}"
                          f" | load {row['loadavg_1min']:.1f}", flush=True)
            return rows
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level and format")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--num-cpus", type=float, default=float(os.cpu_count() or 1),
                        help="CPUs (torch threads) of the server replica and of the in-process baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-save", action="store_true", help="print only, append no rows")
    args = parser.parse_args(argv)
    rows = run(args)
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('serve.jsonl', rows)}")


if __name__ == "__main__":
    main()
