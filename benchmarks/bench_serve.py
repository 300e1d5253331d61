"""``promptcore serve`` (Ray Serve, dynamic batching) vs a plain FastAPI server and the module in-process.

A CoOp module over one CLIP (random weights, saved to a file so every server and this process hold
the same model) is served by a real ``promptcore serve`` process on loopback, and by a plain
FastAPI/uvicorn server (``baseline_app`` below: the same parsing, one forward pass per request, no
batching). Clients send float (.npy, preprocessed) or JPEG requests, one image each, from 1, 8 and
64 threads; each level reports images/s, p50/p99 latency and the Ray server's mean requests per
forward pass (from ``/stats``). Two in-process references run right before each level (a shared
machine's load drifts): one request at a time, and the module on batches of ``min(concurrency,
max_batch)`` images (what perfect batching reaches). Goals: the Ray server >= the FastAPI baseline
at every concurrency, and >= 80% of the batched in-process images/s at concurrency 64. The load
generator shares the machine with the servers; each row records the 1-minute load average. On a
loaded machine use ``--num-cpus 1``. Rows are appended to benchmarks/results/serve.jsonl.

    python benchmarks/bench_serve.py --tiny --num-cpus 1 --requests 128   # tiny model, seconds per level
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


TINY_CONFIG = {"embed_dim": 32, "quick_gelu": True,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}


def baseline_app(spec_fields: dict):
    """The plain FastAPI server the Ray server is measured against: the same module and request parsing,
    one forward pass per request (one at a time, like one replica), no batching."""
    import asyncio
    import threading

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from promptcore.serve import RequestError, build_module

    spec = ServeSpec(**spec_fields)
    torch.set_num_threads(max(1, int(spec.num_cpus)))
    classifier = Classifier(build_module(spec), spec)
    model_lock = threading.Lock()
    app = FastAPI()

    def forward(item):
        with model_lock:
            return classifier.run_batch([item])[0]

    # plain request handlers (add_route): FastAPI cannot resolve a local Request annotation under
    # ``from __future__ import annotations``
    async def ready(request):
        return JSONResponse(classifier.info())

    async def classify(request):
        try:
            item = await asyncio.to_thread(classifier.parse, await request.body(),
                                           request.headers.get("content-type", ""), dict(request.query_params))
            return JSONResponse(await asyncio.to_thread(forward, item))
        except RequestError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)

    app.add_route("/ready", ready, methods=["GET"])
    app.add_route("/classify", classify, methods=["POST"])
    return app


def _start(cmd, url, log, env=None):
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{cmd[2]} exited with status {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5):
                return proc, time.perf_counter() - t0
        except OSError:
            time.sleep(1.0)
        if time.perf_counter() - t0 > 600:
            raise RuntimeError(f"{url} did not become ready in 600 s")


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stats(url):
    with urllib.request.urlopen(url + "/stats", timeout=30) as response:
        return json.loads(response.read())


def run(args) -> list:
    from PIL import Image

    torch.manual_seed(0)
    names = builtin_classnames(args.dataset)[: args.classes]
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_config = args.model_config
        if args.tiny:
            import open_clip

            model_config = str(tmp / "bench-serve-tiny.json")
            Path(model_config).write_text(json.dumps(TINY_CONFIG))
            args.model = "bench-serve-tiny"
        if model_config:
            import open_clip

            open_clip.add_model_config(model_config)
        model, tokenizer = load_model(args.model, None, device, "fp32")
        coop = promptcore.CoOp(model, names, tokenizer=tokenizer, n_ctx=16, seed=0).eval()
        size = model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        rng = np.random.default_rng(0)
        floats, jpegs, npy = [], [], []
        for i in range(args.requests):
            floats.append(np.ascontiguousarray(rng.standard_normal((1, 3, size, size), dtype=np.float32)))
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size + 32, size + 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
            jpegs.append(buf.getvalue())
            buf = io.BytesIO()
            np.save(buf, floats[-1])
            npy.append(buf.getvalue())

        torch.save(model.state_dict(), tmp / "weights.pt")
        coop.save(tmp / "prompts.safetensors", model_name=args.model)
        (tmp / "classes.txt").write_text("\n".join(names) + "\n")
        spec_fields = {"method": "coop", "model": args.model, "classnames": names,
                       "pretrained": str(tmp / "weights.pt"),
                       "model_config": model_config, "checkpoint": str(tmp / "prompts.safetensors"),
                       "device": args.device, "max_batch": args.max_batch, "max_queue": 4 * args.requests,
                       "num_cpus": args.num_cpus}
        ray_port, fastapi_port = _free_port(), _free_port()
        cmd = [sys.executable, "-m", "promptcore.cli", "serve", "--method", "coop", "--model", args.model,
               "--pretrained", str(tmp / "weights.pt"), "--checkpoint", str(tmp / "prompts.safetensors"),
               "--classnames", str(tmp / "classes.txt"), "--port", str(ray_port), "--device", args.device,
               "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
               "--num-cpus", str(args.num_cpus), "--max-queue", str(4 * args.requests)]
        cmd += ["--model-config", model_config] if model_config else []
        ray_url, fastapi_url = f"http://127.0.0.1:{ray_port}", f"http://127.0.0.1:{fastapi_port}"
        ray_log, fastapi_log = open(tmp / "ray.log", "w+"), open(tmp / "fastapi.log", "w+")
        procs = []
        try:
            proc, startup_s = _start(cmd, ray_url, ray_log)
            procs.append(proc)
            print(f"ray server ready in {startup_s:.0f} s", flush=True)
            proc, _ = _start([sys.executable, __file__, "--baseline-server", json.dumps(spec_fields), "--port",
                              str(fastapi_port)], fastapi_url, fastapi_log)
            procs.append(proc)

            # the same answers as in-process, or the timing means nothing
            with torch.no_grad():
                ref = coop(torch.from_numpy(floats[0]).to(device)).float().cpu().numpy()
            for url in (ray_url, fastapi_url):
                status, out = _post(url + "/classify", npy[0], "application/x-npy")
                if status != 200:
                    raise RuntimeError(f"{url} answered {status}: {out}")
                err = float(np.abs(np.array(out["logits"]) - ref).max() / np.abs(ref).max())
                if status != 200 or err > 1e-4:
                    raise RuntimeError(f"{url} answer differs from in-process ({status}, scaled error {err:.1e})")

            torch.set_num_threads(max(1, int(args.num_cpus)))  # the replica's thread count, for a fair reference
            spec = ServeSpec(method="coop", model=args.model, classnames=names, checkpoint="in-process",
                             max_batch=args.max_batch)
            local = Classifier(coop, spec)

            def in_process(kind):
                def call(body):
                    local.run_batch([local.parse(body, kind)])
                return call

            def in_process_batched(bodies, kind, batch):
                t0 = time.perf_counter()
                for i in range(0, len(bodies), batch):
                    local.run_batch([local.parse(b, kind) for b in bodies[i:i + batch]])
                return len(bodies) / (time.perf_counter() - t0)

            def post(url, kind):
                def call(body):
                    status, out = _post(url + "/classify", body, kind)
                    if status != 200:
                        raise RuntimeError(f"request failed ({status}): {out}")
                return call

            rows, env = [], environment(device)
            formats = [f for f in (("float", npy, "application/x-npy"), ("jpeg", jpegs, "image/jpeg"))
                       if f[0] in args.formats]
            for fmt, bodies, kind in formats:
                drive(in_process(kind), bodies[:4], 1)  # warm-up
                for concurrency in args.concurrency:
                    # the references right before each level: a shared machine's load drifts
                    base = drive(in_process(kind), bodies, 1)
                    batched = in_process_batched(bodies, kind, min(concurrency, args.max_batch))
                    for url in (ray_url, fastapi_url):
                        drive(post(url, kind), bodies[: min(8, len(bodies))], min(concurrency, 8))  # warm-up
                    before = _stats(ray_url)
                    served = drive(post(ray_url, kind), bodies, concurrency)
                    after = _stats(ray_url)
                    plain = drive(post(fastapi_url, kind), bodies, concurrency)
                    forwards = max(1, after["batches"] - before["batches"])
                    per_forward = (after["requests"] - before["requests"]) / forwards
                    row = {"bench": "serve", "format": fmt, "concurrency": concurrency, "model": args.model,
                           "classes": len(names), "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
                           "server": served, "fastapi": plain, "in_process": base,
                           "in_process_batched_images_per_s": batched,
                           "server_vs_fastapi": served["requests_per_s"] / plain["requests_per_s"],
                           "server_vs_in_process": served["requests_per_s"] / base["requests_per_s"],
                           "server_vs_in_process_batched": served["requests_per_s"] / batched,
                           "mean_requests_per_forward": per_forward, "startup_s": startup_s,
                           "cpu_count": os.cpu_count(), "num_cpus": args.num_cpus,
                           "loadavg_1min": os.getloadavg()[0], **env}
                    rows.append(row)
                    print(f"{fmt:5s} c={concurrency:2d}: ray {served['requests_per_s']:6.1f} img/s p50 "
                          f"{served['p50_ms']:6.1f} ms p99 {served['p99_ms']:6.1f} ms | fastapi "
                          f"{plain['requests_per_s']:6.1f} img/s | in-process 1-by-1 {base['requests_per_s']:6.1f}, "
                          f"batched {batched:6.1f} img/s | ray/fastapi {row['server_vs_fastapi']:.2f} "
                          f"ray/batched {row['server_vs_in_process_batched']:.2f} | requests per forward "
                          f"{per_forward:.2f} | load {row['loadavg_1min']:.1f}", flush=True)
            return rows
        finally:
            for proc in procs:
                _stop(proc)
            ray_log.close()
            fastapi_log.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--model-config", default=None, help="an open_clip model config JSON for --model")
    parser.add_argument("--tiny", action="store_true", help="a tiny random CLIP (32 px, 2 layers): quick runs")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level and format")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--formats", nargs="+", default=["float", "jpeg"], choices=["float", "jpeg"])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--num-cpus", type=float, default=float(os.cpu_count() or 1),
                        help="CPUs (torch threads) of the server replica and of the in-process baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-save", action="store_true", help="print only, append no rows")
    parser.add_argument("--baseline-server", default=None, help=argparse.SUPPRESS)  # internal: spec JSON
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server:
        import uvicorn

        uvicorn.run(baseline_app(json.loads(args.baseline_server)), host="127.0.0.1", port=args.port,
                    log_level="warning")
        return
    rows = run(args)
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('serve.jsonl', rows)}")


if __name__ == "__main__":
    main()
