"""promptcore serve: request parsing and batching in-process, then the real Ray Serve server on loopback."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import open_clip
import pytest
import torch
from helpers import MIXED_NAMES, make_model, scaled_error
from PIL import Image

import promptcore
from promptcore.serve import Classifier, RequestError, ServeSpec, build_module

TINY_CONFIG = {"embed_dim": 32, "quick_gelu": True,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}




def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def random_rgb(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def eval_transform(data: bytes) -> torch.Tensor:
    """open_clip's eval transform of encoded bytes, the reference the server must match."""
    with Image.open(io.BytesIO(data)) as img:
        return open_clip.image_transform(32, is_train=False)(img.convert("RGB"))


@pytest.fixture(scope="module")
def coop_classifier():
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0).eval()
    spec = ServeSpec(method="coop", model="tiny", classnames=MIXED_NAMES, checkpoint="unused", max_batch=8,
                     max_image_pixels=64 * 64, top_k=3)
    return Classifier(coop, spec)


def test_float_and_encoded_requests_equal_pytorch(coop_classifier):
    clf, coop = coop_classifier, coop_classifier.module
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = coop(images)
    as_json = json.dumps({"images": images.tolist(), "top_k": 2}).encode()
    for body, kind in ((as_json, "application/json"), (npy(images.numpy()), "application/x-npy")):
        (out,) = clf.run_batch([clf.parse(body, kind)])
        assert scaled_error(out["logits"], expected) < 1e-5
        assert len(out["predictions"]) == 3
        for row, logits in zip(out["predictions"], expected):
            best = int(logits.argmax())
            assert row[0]["index"] == best and row[0]["label"] == MIXED_NAMES[best]
            assert row[0]["score"] >= row[-1]["score"]
            assert abs(row[0]["score"] - float(logits.softmax(-1).max())) < 1e-5
    assert len(clf.run_batch([clf.parse(as_json, "application/json")])[0]["predictions"][0]) == 2  # top_k=2
    png, jpeg = encode(random_rgb(40, 52, 1), "PNG"), encode(random_rgb(50, 37, 2), "JPEG")
    b64 = json.dumps({"encoded": [base64.b64encode(png).decode(), base64.b64encode(jpeg).decode()]}).encode()
    with torch.no_grad():
        expected = coop(torch.stack([eval_transform(png), eval_transform(jpeg)]))
    (out,) = clf.run_batch([clf.parse(b64, "application/json")])
    assert scaled_error(out["logits"], expected) < 1e-5
    (out,) = clf.run_batch([clf.parse(jpeg, "image/jpeg", {"top_k": "1"})])
    assert scaled_error(out["logits"], expected[1:]) < 1e-5 and len(out["predictions"][0]) == 1


def test_batched_requests_equal_one_at_a_time(coop_classifier):
    clf = coop_classifier
    bodies = [npy(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)).numpy()) for n in (1, 3, 2)]
    together = clf.run_batch([clf.parse(b, "application/x-npy") for b in bodies])
    for body, out in zip(bodies, together):
        (alone,) = clf.run_batch([clf.parse(body, "application/x-npy")])
        assert scaled_error(out["logits"], alone["logits"]) < 1e-5
    assert clf.stats["max_batch_requests"] >= 3 and clf.stats["max_batch_images"] >= 6


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds no pixel data (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def npy_header(shape, descr="<f4", data=b"") -> bytes:
    """An .npy header declaring ``shape`` followed by ``data`` (which need not match it)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + data


BAD_REQUESTS = [
    ("decompression bomb", png_header(20000, 20000), "image/png", 413, "larger than the limit of 4096 pixels"),
    ("deep JSON", b'{"images": ' + b"[" * 100000 + b"]" * 100000 + b"}", "application/json", 400,
     "nested too deeply"),
    ("npy declares 4e12 images", npy_header((4_000_000_000_000, 3, 32, 32)), "application/x-npy", 413,
     "--max-batch (8)"),
    ("npy declares huge images", npy_header((1, 3, 10**6, 10**6)), "application/x-npy", 413,
     "exceed the limit of 4096 pixels"),
    ("npy data shorter than its header", npy_header((2, 3, 32, 32), data=bytes(3 * 32 * 32 * 4)), "application/x-npy",
     400, "declares shape (2, 3, 32, 32) (24576 bytes of data) but the body carries 12288 bytes"),
    ("npy object dtype", npy_header((1, 3, 32, 32), descr="|O"), "application/x-npy", 400, "must be float32"),
    ("wrong shape", npy(np.zeros((1, 3, 16, 16), np.float32)), "application/x-npy", 400, "the model expects (32, 32)"),
    ("no channel axis", npy(np.zeros((3, 32, 32), np.float32)), "application/x-npy", 400, "(N, 3, H, W)"),
    ("wrong dtype", npy(np.zeros((1, 3, 32, 32), np.int64)), "application/x-npy", 400, "float32, got int64"),
    ("strings", json.dumps({"images": [[["a"]]]}).encode(), "application/json", 400, "must hold numbers"),
    ("not an image", b"this is not a JPEG", "image/jpeg", 400, "not a decodable image"),
    ("bad base64", json.dumps({"encoded": ["***"]}).encode(), "application/json", 400, "not valid base64"),
    ("oversized image", encode(random_rgb(80, 80, 3), "PNG"), "image/png", 413, "more than the limit of 4096"),
    ("empty batch", npy(np.zeros((0, 3, 32, 32), np.float32)), "application/x-npy", 400, "empty batch"),
    ("empty list", json.dumps({"encoded": []}).encode(), "application/json", 400, "empty batch"),
    ("too many images", npy(np.zeros((9, 3, 32, 32), np.float32)), "application/x-npy", 413, "--max-batch (8)"),
    ("NaN", npy(np.full((1, 3, 32, 32), np.nan, np.float32)), "application/x-npy", 400, "NaN"),
    ("bad JSON", b"{", "application/json", 400, "not valid JSON"),
    ("no key", json.dumps({"pixels": []}).encode(), "application/json", 400, 'exactly one of "images"'),
    ("empty body", b"", "image/png", 400, "empty request body"),
    ("content type", b"abc", "text/plain", 400, "unsupported content type"),
]


@pytest.mark.parametrize("name, body, kind, status, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_clear_errors(coop_classifier, name, body, kind, status, message):
    with pytest.raises(RequestError) as info:
        coop_classifier.parse(body, kind)
    assert info.value.status == status and message in info.value.message


def test_bad_options_and_overload():
    coop = promptcore.CoOp(make_model(), MIXED_NAMES[:3], n_ctx=4, seed=0).eval()
    clf = Classifier(coop, ServeSpec(method="coop", model="tiny", classnames=MIXED_NAMES[:3], checkpoint="x",
                                     max_queue=2))
    body = json.dumps({"images": torch.zeros(1, 3, 32, 32).tolist(), "top_k": 0}).encode()
    with pytest.raises(RequestError, match="top_k must be an integer >= 1"):
        clf.parse(body, "application/json")
    (out,) = clf.run_batch([clf.parse(body.replace(b'"top_k": 0', b'"top_k": 9'), "application/json")])
    assert len(out["predictions"][0]) == 3  # top_k is capped at the class count
    clf.admit()
    clf.admit()
    with pytest.raises(RequestError, match="overloaded: 2 requests are queued or running") as info:
        clf.admit()
    assert info.value.status == 503 and clf.stats["overloaded"] == 1
    clf.release()
    clf.admit()  # room again


def test_body_size_checked_before_reading():
    import asyncio

    read = []

    async def chunks(parts):
        for part in parts:
            read.append(len(part))
            yield part

    def body(headers, parts, limit=100):
        return asyncio.run(promptcore.serve.read_body(headers, chunks(parts), limit))

    with pytest.raises(RequestError, match=r"is 10000000 bytes \(Content-Length\), the limit is 100") as info:
        body({"content-length": "10000000"}, [b"x" * 60] * 3)
    assert info.value.status == 413 and read == []  # refused on the header: nothing read
    with pytest.raises(RequestError, match="over 100 bytes") as info:
        body({}, [b"x" * 60] * 5)  # chunked, no Content-Length: cut off at the limit
    assert info.value.status == 413 and read == [60, 60]
    with pytest.raises(RequestError, match="Content-Length is not a number: 'lots'"):
        body({"content-length": "lots"}, [b"x"])
    assert body({"content-length": "6"}, [b"abc", b"def"]) == b"abcdef"


def test_shutdown_stops_admitting_but_keeps_admitted_requests():
    coop = promptcore.CoOp(make_model(), MIXED_NAMES[:3], n_ctx=4, seed=0).eval()
    clf = Classifier(coop, ServeSpec(method="coop", model="tiny", classnames=MIXED_NAMES[:3], checkpoint="x"))
    clf.admit()
    item = clf.parse(npy(np.zeros((1, 3, 32, 32), np.float32)), "application/x-npy")
    assert clf.stop_admitting() == 1  # one request still in flight
    with pytest.raises(RequestError, match="shutting down") as info:
        clf.admit()
    assert info.value.status == 503
    (out,) = clf.run_batch([item])  # the admitted request still gets its answer
    assert len(out["logits"][0]) == 3
    clf.release()
    assert clf.pending == 0


def test_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs --checkpoint"):
        build_module(ServeSpec(method="coop", model="ViT-B-16", classnames=["a"]))
    with pytest.raises(ValueError, match="unknown method 'clip'"):
        ServeSpec(method="clip", model="ViT-B-16", classnames=["a"]).check()
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        ServeSpec(method="tpt", model="ViT-B-16", classnames=["a"], max_batch=0).check()
    with pytest.raises(ValueError, match="no class names"):
        ServeSpec(method="tpt", model="ViT-B-16", classnames=[]).check()


def test_tpt_requests_tuned_together_equal_tuned_alone():
    tpt = promptcore.TPT(make_model(), MIXED_NAMES, n_ctx=4, ctx_init=None, n_views=4, selection=0.5, seed=0,
                         batch_size=8)
    clf = Classifier(tpt, ServeSpec(method="tpt", model="tiny", classnames=MIXED_NAMES, max_batch=8))
    png = encode(random_rgb(40, 52, 5), "PNG")
    floats = torch.rand(2, 3, 36, 44, generator=torch.Generator().manual_seed(6))
    requests = [(png, "image/png", {"seed": "3"}), (npy(floats.numpy()), "application/x-npy", {"seed": "5"})]
    together = clf.run_batch([clf.parse(*r) for r in requests])
    raw_png = torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB"))).permute(2, 0, 1)
    for (body, kind, query), images, out in zip(requests, ([raw_png], floats), together):
        (alone,) = clf.run_batch([clf.parse(body, kind, query)])
        assert scaled_error(out["logits"], alone["logits"]) < 1e-5
        direct = tpt.predict_logits(images, generator=torch.Generator().manual_seed(int(query["seed"])))
        assert scaled_error(out["logits"], direct) < 1e-5
    with pytest.raises(RequestError, match="values in 0..1"):
        clf.parse(npy(floats.numpy() * 2), "application/x-npy")


# -- the real server on loopback ----------------------------------------------------------------

def _engine_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None:
        return True
    if sys.platform.startswith("linux"):  # CI installs ray[serve] from the dev extra: the test must run there
        raise ImportError("ray[serve] is not installed: pip install -e '.[dev]'")
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url, body=None, kind=None, timeout=60):
    request = urllib.request.Request(url, data=body, headers={"content-type": kind} if kind else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _group_alive(pgid: int) -> list:
    """The processes still in process group ``pgid`` (zombies excluded)."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry))
    return alive


def _stop_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, one process group (a cluster this test started), and wait until it is gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _group_alive(pgid):
            return


@pytest.fixture(scope="module")
def foreign_cluster():
    """Somebody else's ``ray start --head`` cluster on this machine (private temp dir and ports), which the
    server must neither join nor touch; stopped by its own process group, never by a bare ``ray stop``."""
    if not _engine_available():
        pytest.skip(f"Ray Serve does not install on {sys.platform}")
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="pc-foreign-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--temp-dir", tmp,
           "--port", str(port), "--num-cpus", "1", "--include-dashboard=false", "--disable-usage-stats"]
    for flag in ("--ray-client-server-port", "--dashboard-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
        cmd += [flag, str(_free_port())]
    # no token auth: the test's own client (_named_actors) connects without one
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    log = open(os.path.join(tmp, "start.log"), "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not os.path.exists(os.path.join(tmp, "session_latest", "sockets", "raylet")):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the foreign cluster did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "pgid": proc.pid, "tmp": tmp}
    finally:
        _stop_group(proc.pid)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
        assert not _group_alive(proc.pid), "the foreign cluster's processes outlived the test"


def _named_actors(address: str) -> list:
    """Every named actor on the cluster at ``address`` (Serve's controller and apps are named actors)."""
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False, configure_logging=False); "
            "print(json.dumps(ray.util.list_named_actors(all_namespaces=True)))" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tiny_server_files(root):
    config = root / "promptcore-serve-tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("promptcore-serve-tiny").eval()
    torch.save(model.state_dict(), root / "weights.pt")
    coop = promptcore.CoOp(model, MIXED_NAMES, n_ctx=4, seed=0).eval()
    with torch.no_grad():
        coop.prompt_learner.ctx.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    coop.save(root / "prompts.safetensors", model_name="promptcore-serve-tiny")
    (root / "classes.txt").write_text("\n".join(MIXED_NAMES) + "\n")
    cmd = [sys.executable, "-m", "promptcore.cli", "serve", "--method", "coop", "--model", "promptcore-serve-tiny",
           "--model-config", str(config), "--pretrained", str(root / "weights.pt"), "--checkpoint",
           str(root / "prompts.safetensors"), "--classnames", str(root / "classes.txt")]
    return coop, cmd


@pytest.fixture(scope="module")
def server(tmp_path_factory, foreign_cluster):
    root = tmp_path_factory.mktemp("serve")
    coop, cmd = _tiny_server_files(root)
    port = _free_port()
    cmd += ["--port", str(port), "--max-batch", "16", "--batch-wait-ms", "20", "--max-image-pixels", "4096",
            "--top-k", "3"]
    log = open(root / "server.log", "w+")
    # RAY_ADDRESS names the foreign cluster, as after `ray start` in a user's shell: the server must ignore it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PROMPTCORE_BACKEND": "torch",
                                 "RAY_ADDRESS": foreign_cluster["address"]})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # generous: Ray starts several processes on a loaded 2-core machine
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the server exited with status {proc.returncode}:\n{log.read()[-3000:]}")
            log.seek(0)
            try:  # the log line comes right after Serve answers /ready
                if "ready on" in log.read() and _http(url + "/ready", timeout=5)[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not become ready within 300 s")
            time.sleep(1.0)
        yield {"url": url, "port": port, "proc": proc, "coop": coop, "log": log, "foreign": foreign_cluster}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the server's own process group: Ray's processes included
            proc.wait(timeout=30)
        _stop_group(proc.pid, grace_s=0)
        log.close()
        assert not _group_alive(proc.pid), "the server's Ray processes outlived it"


def _load_during_sigterm(url, proc, body, expected, threads=16):
    """Clients sending ``body`` without pause while the server gets SIGTERM; each outcome with its times."""
    import threading

    outcomes, stop_sending = [], threading.Event()

    def client():
        while not stop_sending.is_set():
            t0 = time.monotonic()
            try:
                status, out = _http(url + "/classify", body, "application/x-npy", timeout=120)
                if status == 200:
                    outcome = "ok" if scaled_error(out["logits"], expected) < 1e-5 else f"wrong logits {out}"
                elif status == 503 and "shutting down" in out.get("error", ""):
                    outcome = "refused"
                else:
                    outcome = f"{status} {out}"
            except urllib.error.URLError as err:
                outcome = "port closed" if isinstance(err.reason, ConnectionRefusedError) else repr(err)
            except ConnectionRefusedError:
                outcome = "port closed"
            except Exception as exc:  # noqa: BLE001 - a dropped request: the test reports it
                outcome = repr(exc)
            outcomes.append((t0, time.monotonic(), outcome))

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    time.sleep(2.0)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # requests still arriving after the signal: answered or refused cleanly, never dropped
    stop_sending.set()
    for w in workers:
        w.join(timeout=180)
    return signalled, outcomes


def test_server_end_to_end(server):
    url, coop = server["url"], server["coop"]
    status, info = _http(url + "/ready")
    assert status == 200 and info["method"] == "coop" and info["num_classes"] == len(MIXED_NAMES)
    server["log"].seek(0)
    assert f"ready on http://127.0.0.1:{server['port']}/classify" in server["log"].read()
    # RAY_ADDRESS named the foreign cluster: the server started its own, and left the foreign one untouched
    assert _named_actors(server["foreign"]["address"]) == []

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = coop(images)
    status, out = _http(url + "/classify", json.dumps({"images": images.tolist()}).encode(), "application/json")
    assert status == 200, out
    assert scaled_error(out["logits"], expected) < 1e-5
    assert out["predictions"][0][0]["label"] == MIXED_NAMES[int(expected[0].argmax())]

    jpeg = encode(random_rgb(48, 40, 8), "JPEG")
    status, out = _http(url + "/classify", jpeg, "image/jpeg")
    with torch.no_grad():
        expected = coop(eval_transform(jpeg)[None])
    assert status == 200 and scaled_error(out["logits"], expected) < 1e-5

    # 64 concurrent requests (a bounded pool that ends by itself): all correct, and batched by the engine
    batches = [torch.randn(1 + i % 3, 3, 32, 32, generator=torch.Generator().manual_seed(100 + i)) for i in range(64)]
    with torch.no_grad():
        wanted = [coop(b) for b in batches]
    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(lambda b: _http(url + "/classify", npy(b.numpy()), "application/x-npy",
                                                timeout=240), batches))
    for (status, out), want in zip(results, wanted):
        assert status == 200, out
        assert scaled_error(out["logits"], want) < 1e-5
    status, stats = _http(url + "/stats")
    assert stats["max_batch_requests"] > 1, stats
    assert stats["max_batch_images"] <= 16  # --max-batch bounds the images of one forward pass

    for body, kind, code, message in [
        (npy(np.zeros((1, 3, 16, 16), np.float32)), "application/x-npy", 400, "the model expects (32, 32)"),
        (npy(np.zeros((1, 3, 32, 32), np.float64)), "application/x-npy", 400, "float32, got float64"),
        (b"\x00not an image", "image/png", 400, "not a decodable image"),
        (encode(random_rgb(100, 100, 9), "PNG"), "image/png", 413, "more than the limit of 4096"),
        (npy(np.zeros((0, 3, 32, 32), np.float32)), "application/x-npy", 400, "empty batch"),
        (png_header(20000, 20000), "image/png", 413, "larger than the limit of 4096 pixels"),
        (b'{"images": ' + b"[" * 100000 + b"]" * 100000 + b"}", "application/json", 400, "nested too deeply"),
        (npy_header((4_000_000_000_000, 3, 32, 32)), "application/x-npy", 413, "--max-batch (16)"),
    ]:
        status, out = _http(url + "/classify", body, kind)
        assert status == code and message in out["error"], out
        status, out = _http(url + "/classify", jpeg, "image/jpeg")  # still serving
        assert status == 200

    # SIGTERM under load: requests in flight finish, later ones are refused cleanly (503) or find the port
    # closed; none is cut off, and the server exits 0
    body = npy(images.numpy())
    with torch.no_grad():
        expected = coop(images)
    signalled, outcomes = _load_during_sigterm(url, server["proc"], body, expected)
    returncode = server["proc"].wait(timeout=180)
    server["log"].seek(0)
    text = server["log"].read()
    bad = [o for o in outcomes if o[2] not in ("ok", "refused", "port closed")]
    assert not bad, f"{len(bad)} of {len(outcomes)} requests dropped, e.g. {bad[:3]}"
    assert all(o[0] > signalled for o in outcomes if o[2] == "port closed")  # only requests sent after SIGTERM
    in_flight = [o for o in outcomes if o[0] < signalled < o[1]]
    # in flight at the signal: answered (or refused if still in Ray's proxy when admission stopped)
    assert all(o[2] in ("ok", "refused") for o in in_flight) and any(o[2] == "ok" for o in in_flight), in_flight
    assert returncode == 0, text[-4000:]
    assert "shutting down" in text and "drained 1 replica(s)" in text and "stopped in" in text, text[-3000:]


def test_cli_serve_refuses_bad_arguments_before_starting(capsys):
    from promptcore.cli import main

    assert main(["serve", "--method", "coop", "--model", "ViT-B-16", "--dataset", "imagenet"]) == 2
    assert "serving coop needs --checkpoint" in capsys.readouterr().err
    assert main(["serve", "--method", "coop", "--model", "ViT-B-16", "--dataset", "imagenet", "--checkpoint", "x",
                 "--n-views", "8"]) == 2
    assert "--n-views and --tpt-steps apply to --method tpt only" in capsys.readouterr().err
    assert main(["serve", "--method", "tpt", "--model", "ViT-B-16", "--dataset", "imagenet", "--max-batch", "0"]) == 2
    assert "max_batch must be an integer >= 1" in capsys.readouterr().err


class FakeRay:
    """Ray and Serve's entry points as ``serve_forever`` calls them, recorded (the lifecycle without a cluster)."""

    def __init__(self, monkeypatch, on_init=None):
        import ray
        import ray.serve.context as context
        from ray import serve

        self.calls, self.on_init = [], on_init
        fake_client = type("Client", (), {"http_config": type("HTTP", (), {"host": "127.0.0.1", "port": 8123})})
        monkeypatch.setattr(ray, "init", self.init)
        monkeypatch.setattr(ray, "shutdown", lambda: self.calls.append("ray.shutdown"))
        monkeypatch.setattr(context, "_get_global_client", lambda raise_if_no_controller_running=True: fake_client)
        monkeypatch.setattr(serve, "status", lambda: type("Status", (), {"applications": {}}))
        monkeypatch.setattr(serve, "start", lambda **kw: self.calls.append(("serve.start", kw["http_options"])))
        monkeypatch.setattr(serve, "run", lambda app, name, route_prefix: self.calls.append(("serve.run", name)))
        monkeypatch.setattr(serve, "shutdown", lambda: self.calls.append("serve.shutdown"))
        monkeypatch.setattr(serve, "delete", lambda name: self.calls.append(("serve.delete", name)))
        monkeypatch.setattr(ray, "get", lambda value, **_: value)
        monkeypatch.setattr(promptcore.serve, "_start_gate", self.gate)
        monkeypatch.setattr(promptcore.serve, "make_app", lambda spec, replicas, gate: "app")

    def init(self, address=None, **kwargs):
        import ray._private.utils

        self.calls.append(("ray.init", address, os.environ.get("RAY_ADDRESS")))
        ray._private.utils.set_sigterm_handler(lambda *_: sys.exit(15))  # what the real ray.init does first
        if self.on_init:
            self.on_init()

    def gate(self):
        calls = self.calls

        class Method:
            def __init__(self, name, result):
                self.name, self.result = name, result

            def remote(self):
                calls.append(self.name)
                return self.result

        return type("Gate", (), {"close": Method("drain", None), "report": Method("report", {"r0": [True, 0]})})()


def _sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("address", [None, "10.0.0.1:6379"])
def test_server_lifecycle_owns_only_what_it_started(monkeypatch, address):
    from promptcore.serve import serve_forever

    if not _engine_available():
        pytest.skip(f"Ray Serve does not install on {sys.platform}")
    fake = FakeRay(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # somebody's `ray start`
    before = signal.getsignal(signal.SIGTERM)
    logged = []

    def log(message, **_):
        logged.append(message)
        if "ready on" in message:
            _sigterm_self()

    spec = ServeSpec(method="coop", model="tiny", classnames=["a"], checkpoint="x")
    assert serve_forever(spec, port=8123, address=address, name="mine", log=log) == 0
    if address is None:  # a private cluster: RAY_ADDRESS cannot redirect it, and all of Serve goes at the end
        assert fake.calls[0] == ("ray.init", "local", None) and "serve.shutdown" in fake.calls
        assert ("serve.delete", "mine") not in fake.calls
    else:  # a joined cluster: only this process's app is deleted
        assert fake.calls[0] == ("ray.init", address, "127.0.0.1:6379") and "serve.shutdown" not in fake.calls
        assert ("serve.delete", "mine") in fake.calls
    assert "drain" in fake.calls and fake.calls[-1] == "ray.shutdown"
    stops = [i for i, c in enumerate(fake.calls) if c in ("serve.shutdown", ("serve.delete", "mine"))]
    assert fake.calls.index("drain") < stops[0]  # drained before Serve stops
    assert any("ready on http://127.0.0.1:8123/classify" in m for m in logged)
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handlers restored


def test_refused_joined_cluster_keeps_its_app(monkeypatch):
    from ray import serve

    from promptcore.serve import serve_forever

    if not _engine_available():
        pytest.skip(f"Ray Serve does not install on {sys.platform}")
    fake = FakeRay(monkeypatch)
    monkeypatch.setattr(serve, "status", lambda: type("Status", (), {"applications": {"mine": None}}))
    spec = ServeSpec(method="coop", model="tiny", classnames=["a"], checkpoint="x")
    with pytest.raises(RuntimeError, match="an application named 'mine' already runs"):
        serve_forever(spec, port=8123, address="10.0.0.1:6379", name="mine", log=lambda *a, **k: None)
    assert [c for c in fake.calls if c[0] in ("serve.start", "serve.run", "serve.delete")] == []  # untouched
    assert "serve.shutdown" not in fake.calls and fake.calls[-1] == "ray.shutdown"


def test_sigterm_during_ray_init_stops_cleanly(monkeypatch):
    from promptcore.serve import serve_forever

    if not _engine_available():
        pytest.skip(f"Ray Serve does not install on {sys.platform}")
    fake = FakeRay(monkeypatch, on_init=_sigterm_self)  # the signal lands inside ray.init
    logged = []
    spec = ServeSpec(method="coop", model="tiny", classnames=["a"], checkpoint="x")
    assert serve_forever(spec, log=lambda m, **_: logged.append(m)) == 0  # not SystemExit(15)
    assert [c for c in fake.calls if c[0] in ("serve.start", "serve.run")] == []  # nothing deployed
    assert fake.calls[-1] == "ray.shutdown" and "promptcore serve: stopped during start-up" in logged


def test_joined_cluster_with_serve_elsewhere_or_same_app_is_refused(monkeypatch):
    import ray.serve.context as context
    from ray import serve

    from promptcore.serve import _check_joined_cluster

    if not _engine_available():
        pytest.skip(f"Ray Serve does not install on {sys.platform}")
    client = type("Client", (), {"http_config": type("HTTP", (), {"host": "127.0.0.1", "port": 8000})})
    monkeypatch.setattr(context, "_get_global_client", lambda raise_if_no_controller_running=True: client)
    monkeypatch.setattr(serve, "status", lambda: type("Status", (), {"applications": {"promptcore": None}}))
    with pytest.raises(RuntimeError, match="already runs on this cluster with HTTP on 127.0.0.1:8000, not "
                                           "127.0.0.1:9000; pass --host 127.0.0.1 --port 8000"):
        _check_joined_cluster("promptcore", "127.0.0.1", 9000)
    with pytest.raises(RuntimeError, match="an application named 'promptcore' already runs on this cluster"):
        _check_joined_cluster("promptcore", "127.0.0.1", 8000)
    _check_joined_cluster("other", "127.0.0.1", 8000)  # another app on the cluster's Serve port: allowed
    monkeypatch.setattr(context, "_get_global_client", lambda raise_if_no_controller_running=True: None)
    _check_joined_cluster("promptcore", "127.0.0.1", 9000)  # no Serve there yet: ours starts it on our port


def test_sigterm_while_ray_starts_exits_0_and_leaves_no_process(tmp_path):
    if not _engine_available():
        pytest.skip(f"Ray Serve does not install on {sys.platform}")
    _, cmd = _tiny_server_files(tmp_path)
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(cmd + ["--port", str(_free_port())], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PROMPTCORE_BACKEND": "torch"})
    try:
        deadline = time.monotonic() + 180
        while not any(_comm(pid) == "gcs_server" for pid in _group_alive(proc.pid)):  # ray.init under way
            assert proc.poll() is None and time.monotonic() < deadline, "the server never started Ray"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(proc.pid), [_comm(pid) for pid in _group_alive(proc.pid)]
        log.seek(0)
        assert "stopped" in log.read()
    finally:
        _stop_group(proc.pid, grace_s=0)
        log.close()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_batcher_takes_every_queued_request_and_waits_only_for_arriving_ones():
    import asyncio

    from promptcore.serve import Batcher

    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0).eval()
    clf = Classifier(coop, ServeSpec(method="coop", model="tiny", classnames=MIXED_NAMES, checkpoint="x",
                                     max_batch=8))
    bodies = [npy(torch.randn(1 + i % 3, 3, 32, 32, generator=torch.Generator().manual_seed(i)).numpy())
              for i in range(12)]
    alone = [clf.run_batch([clf.parse(b, "application/x-npy")])[0] for b in bodies]
    clf.stats.update(batches=0, requests=0, max_batch_images=0, max_batch_requests=0)

    async def queued():  # twelve requests queued at once: batches as full as --max-batch allows, none waits
        batcher = Batcher(clf, max_wait_s=30.0)
        t0 = time.monotonic()
        out = await asyncio.gather(*(batcher.submit(clf.parse(b, "application/x-npy")) for b in bodies))
        return out, time.monotonic() - t0

    out, seconds = asyncio.run(queued())
    for got, want in zip(out, alone):
        assert scaled_error(got["logits"], want["logits"]) < 1e-5
    stats = clf.stats_snapshot()
    assert seconds < 10 and stats["max_batch_images"] <= 8 and stats["batches"] <= 4  # 24 images, 8 a batch
    assert stats["mean_batch_requests"] == 12 / stats["batches"] >= 3

    async def arriving():  # a request still being parsed is waited for (up to max_wait_s): one batch
        batcher = Batcher(clf, max_wait_s=30.0)
        batcher.arriving += 1
        first = asyncio.ensure_future(batcher.submit(clf.parse(bodies[0], "application/x-npy")))
        await asyncio.sleep(0.2)
        batcher.arriving -= 1
        await batcher.submit(clf.parse(bodies[1], "application/x-npy"))
        await first

    before = clf.stats_snapshot()["batches"]
    asyncio.run(arriving())
    assert clf.stats_snapshot()["batches"] == before + 1

    async def lone():  # nothing arriving: no wait at all, whatever max_wait_s says
        t0 = time.monotonic()
        await Batcher(clf, max_wait_s=30.0).submit(clf.parse(bodies[0], "application/x-npy"))
        return time.monotonic() - t0

    assert asyncio.run(lone()) < 10
