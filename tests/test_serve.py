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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not _engine_available():
        pytest.skip(f"Ray Serve does not install on {sys.platform}")
    root = tmp_path_factory.mktemp("serve")
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
    port = _free_port()
    cmd = [sys.executable, "-m", "promptcore.cli", "serve", "--method", "coop", "--model", "promptcore-serve-tiny",
           "--model-config", str(config), "--pretrained", str(root / "weights.pt"), "--checkpoint",
           str(root / "prompts.safetensors"), "--classnames", str(root / "classes.txt"), "--port", str(port),
           "--max-batch", "16", "--batch-wait-ms", "20", "--max-image-pixels", "4096", "--top-k", "3"]
    log = open(root / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PROMPTCORE_BACKEND": "torch"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # generous: Ray starts several processes on a loaded 2-core machine
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the server exited with status {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if _http(url + "/ready", timeout=5)[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not become ready within 300 s")
            time.sleep(1.0)
        yield {"url": url, "proc": proc, "coop": coop, "log": log}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the server's own process group: Ray's processes included
            proc.wait(timeout=30)
        log.close()


def test_server_end_to_end(server):
    url, coop = server["url"], server["coop"]
    status, info = _http(url + "/ready")
    assert status == 200 and info["method"] == "coop" and info["num_classes"] == len(MIXED_NAMES)

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
    ]:
        status, out = _http(url + "/classify", body, kind)
        assert status == code and message in out["error"], out
        status, out = _http(url + "/classify", jpeg, "image/jpeg")  # still serving
        assert status == 200

    # graceful shutdown on SIGTERM
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 0
    server["log"].seek(0)
    text = server["log"].read()
    assert "shutting down" in text and "stopped in" in text


def test_cli_serve_refuses_bad_arguments_before_starting(capsys):
    from promptcore.cli import main

    assert main(["serve", "--method", "coop", "--model", "ViT-B-16", "--dataset", "imagenet"]) == 2
    assert "serving coop needs --checkpoint" in capsys.readouterr().err
    assert main(["serve", "--method", "coop", "--model", "ViT-B-16", "--dataset", "imagenet", "--checkpoint", "x",
                 "--n-views", "8"]) == 2
    assert "--n-views and --tpt-steps apply to --method tpt only" in capsys.readouterr().err
    assert main(["serve", "--method", "tpt", "--model", "ViT-B-16", "--dataset", "imagenet", "--max-batch", "0"]) == 2
    assert "max_batch must be an integer >= 1" in capsys.readouterr().err
