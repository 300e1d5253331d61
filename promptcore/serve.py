"""``promptcore serve``: a promptcore module behind Ray Serve, with dynamic batching.

Why Ray Serve and not PyTriton: PyTriton (nvidia-pytriton 0.5.x-0.7.0) pins ``numpy<2``, which has
no wheels for Python >= 3.13 and would hold the whole project back on numpy 1.x; its bundled
Python-backend stub is also built only up to 3.13 and links ``libpython3.X.so.1.0`` by name, so it
loads whatever libpython the dynamic loader finds first. That is the
``'_thread.RLock' object has no attribute '_recursion_count'`` failure: on a host whose Python
(e.g. pyenv 3.11.7) is not the system's, the stub loads the system libpython (Debian's 3.11.2)
and then imports the host's 3.11.7 standard library, whose ``multiprocessing.resource_tracker``
calls an RLock method that 3.11.2's C code lacks. Putting the host's
``sysconfig.get_config_var("LIBDIR")`` first on ``LD_LIBRARY_PATH`` fixes that one, but not the
numpy pin, nor interpreters built without a shared libpython. Ray Serve installs from PyPI on
every Python promptcore supports and scales to replicas and clusters.

Data path: HTTP request -> Ray's proxy -> a replica's ``__call__``, which parses and validates
the request (bad requests are answered there and never reach a batch) -> :class:`Batcher` takes
every queued request up to ``max_batch`` images -> one forward pass of the module on the replica's
model thread -> responses split per request.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .models import image_size

APP_NAME = "promptcore"
METHODS = ("coop", "cocoop", "maple", "zeroshot", "tpt")
NEEDS_CHECKPOINT = ("coop", "cocoop", "maple")
ENCODED_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "application/octet-stream")


class RequestError(Exception):
    """A request the server refuses, with its HTTP status (400 bad input, 413 too large, 503 overloaded)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServeSpec:
    """Everything a replica needs to build its module and answer requests (plain data: it travels to
    Ray workers)."""

    method: str
    model: str
    classnames: List[str]
    pretrained: Optional[str] = None
    model_config: Optional[str] = None
    checkpoint: Optional[str] = None
    templates: Optional[str] = None
    device: str = "cpu"
    precision: str = "fp32"
    options: Dict[str, Any] = field(default_factory=dict)
    top_k: int = 5
    max_batch: int = 32
    batch_wait_s: float = 0.005
    max_queue: int = 256
    max_image_pixels: int = 40_000_000
    max_body_bytes: int = 64 << 20
    seed: int = 0
    num_cpus: float = 1.0
    num_gpus: Optional[float] = None  # None: 1 for a cuda device (Ray hides GPUs from actors that ask for none)
    allow_new_classes: bool = False

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method in NEEDS_CHECKPOINT and not self.checkpoint:
            raise ValueError(f"serving {self.method} needs --checkpoint (its learned prompts: an official checkpoint "
                             "or a promptcore .safetensors file)")
        if not self.classnames:
            raise ValueError("no class names: pass --classnames FILE or --dataset NAME")
        for name, value, low in (("top_k", self.top_k, 1), ("max_batch", self.max_batch, 1),
                                 ("max_queue", self.max_queue, 1), ("max_image_pixels", self.max_image_pixels, 1),
                                 ("max_body_bytes", self.max_body_bytes, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.batch_wait_s >= 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {self.batch_wait_s!r}")
        if str(self.device).startswith("cuda") and self.num_gpus is not None and self.num_gpus <= 0:
            raise ValueError("a cuda device needs --num-gpus > 0 per replica (Ray hides GPUs from other actors)")

    def gpus_per_replica(self) -> float:
        if self.num_gpus is not None:
            return float(self.num_gpus)
        return 1.0 if str(self.device).startswith("cuda") else 0.0


def build_module(spec: ServeSpec):
    """The promptcore module a spec describes, in eval mode on its device."""
    from promptcore.export.pipeline import build_from_checkpoint, register_model_config
    from promptcore.methods import get_method
    from promptcore.models import load_model

    spec.check()
    if spec.model_config:
        register_model_config(spec.model_config)
    model, tokenizer = load_model(spec.model, spec.pretrained, spec.device, spec.precision)
    options = {k: v for k, v in spec.options.items() if v is not None}
    if spec.method == "zeroshot":
        cls = get_method("zeroshot")
        templates = spec.templates or "openai"
        if templates not in ("openai", "simple"):
            from .models import read_classnames

            templates = read_classnames(templates)  # a file of format strings, one per line
        module = cls(model, spec.classnames, templates=templates, tokenizer=tokenizer, **options)
    elif spec.method == "tpt":
        cls = get_method("tpt")
        module = cls(model, spec.classnames, tokenizer=tokenizer, seed=spec.seed, **options)
        if spec.checkpoint:
            if str(spec.checkpoint).endswith(".safetensors"):
                module.load(spec.checkpoint)
            else:
                module.load_official(spec.checkpoint)
    else:
        module = build_from_checkpoint(spec.method, model, tokenizer, spec.checkpoint, spec.classnames, options,
                                       allow_new_classes=spec.allow_new_classes)
    return module.eval()


@dataclass
class Item:
    """One parsed request: its images ready for the module, and its answer options."""

    images: torch.Tensor  # (n, 3, S, S) preprocessed, or TPT's views (n, V, 3, S, S)
    top_k: int
    count: int


class Classifier:
    """Request parsing, validation and batched inference around one module (no engine code: the Ray
    deployment and the tests drive it alike)."""

    def __init__(self, module, spec: ServeSpec):
        import open_clip

        self.module, self.spec = module, spec
        self.classnames = list(module.classnames)
        self.is_tpt = spec.method == "tpt"
        size = image_size(module.model)
        if size is None:
            raise ValueError("the model's image encoder names no image_size")
        self.image_size = size
        cfg = open_clip.get_model_preprocess_cfg(module.model)
        # open_clip's own eval transform: resize, center crop, to tensor, normalise with the model's mean/std
        self.preprocess = open_clip.image_transform(
            self.image_size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
            resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
            fill_color=cfg.get("fill_color", 0))
        self.device = next(module.model.parameters()).device
        self.pending = 0
        self.draining = False  # set once at shutdown: admit() refuses, requests already admitted finish
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "images": 0, "batches": 0, "max_batch_requests": 0, "max_batch_images": 0,
                      "batch_requests_histogram": {}, "rejected": 0, "overloaded": 0}

    # -- admission ----------------------------------------------------------------------------

    def admit(self) -> None:
        """Count a request in, or refuse it when ``max_queue`` requests are already waiting or running, or
        once the server is shutting down."""
        with self._lock:
            if self.draining:
                raise RequestError(503, "the server is shutting down: no new requests (those in flight finish)")
            if self.pending >= self.spec.max_queue:
                self.stats["overloaded"] += 1
                raise RequestError(503, f"overloaded: {self.pending} requests are queued or running on this "
                                        f"replica (limit {self.spec.max_queue}); retry later")
            self.pending += 1

    def release(self) -> None:
        with self._lock:
            self.pending -= 1

    def stop_admitting(self) -> int:
        """Refuse every later request (503); the number of requests still queued or running."""
        with self._lock:
            self.draining = True
            return self.pending

    # -- parsing ------------------------------------------------------------------------------

    def parse(self, body: bytes, content_type: str, query: Optional[Dict[str, str]] = None) -> Item:
        """Validate one request and turn it into module-ready images; raise :class:`RequestError`."""
        try:
            return self._parse(body, content_type, query or {})
        except RequestError:
            with self._lock:
                self.stats["rejected"] += 1
            raise

    def _parse(self, body: bytes, content_type: str, query: Dict[str, str]) -> Item:
        if len(body) > self.spec.max_body_bytes:
            raise RequestError(413, f"request body is {len(body)} bytes, the limit is {self.spec.max_body_bytes}")
        if not body:
            raise RequestError(400, "empty request body: send a JSON object, an .npy array or an encoded image")
        kind = (content_type or "").split(";")[0].strip().lower()
        top_k, seed = query.get("top_k"), query.get("seed")
        if kind == "application/json":
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise RequestError(400, f"request body is not valid JSON: {exc}") from exc
            except RecursionError:
                raise RequestError(400, "the JSON body is nested too deeply") from None
            if not isinstance(payload, dict):
                raise RequestError(400, 'the JSON body must be an object with "images" or "encoded"')
            top_k = payload.get("top_k", top_k)
            seed = payload.get("seed", seed)
            if ("images" in payload) == ("encoded" in payload):
                raise RequestError(400, 'the JSON body needs exactly one of "images" (float array (N, 3, H, W)) '
                                        'and "encoded" (list of base64 JPEG/PNG strings)')
            if "images" in payload:
                images = self._float_images(self._json_array(payload["images"]))
            else:
                images = self._encoded_list(payload["encoded"])
        elif kind in ("application/x-npy", "application/npy"):
            images = self._float_images(self._npy_array(body))
        elif kind in ENCODED_TYPES or kind.startswith("image/"):
            images = self._encoded_list([body], raw=True)
        else:
            raise RequestError(400, f"unsupported content type {content_type!r}: use application/json, "
                                    "application/x-npy or an image type (image/jpeg, image/png)")
        top_k = self._int_option("top_k", top_k, self.spec.top_k, 1)
        seed = self._int_option("seed", seed, self.spec.seed, 0)
        count = len(images)
        if self.is_tpt:
            images = self._tpt_views(images, seed)
        else:
            images = torch.stack(images) if isinstance(images, list) else images
        return Item(images=images, top_k=min(top_k, len(self.classnames)), count=count)

    @staticmethod
    def _int_option(name, value, default, low) -> int:
        if value is None:
            return default
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise RequestError(400, f"{name} must be an integer, got {value!r}") from None
        if isinstance(value, float) and value != number or number < low:
            raise RequestError(400, f"{name} must be an integer >= {low}, got {value!r}")
        return number

    def _npy_array(self, body: bytes):
        """The array of an .npy body, its header checked against the limits and the body's size before any
        allocation (``np.load`` would allocate whatever shape a 200-byte header declares)."""
        import numpy as np
        from numpy.lib import format as npy_format

        stream = io.BytesIO(body)
        try:
            version = npy_format.read_magic(stream)
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(stream)
        except (ValueError, OSError, EOFError, SyntaxError) as exc:
            raise RequestError(400, f"request body is not a readable .npy array: {exc}") from exc
        if dtype != np.float32:
            raise RequestError(400, f"images must be float32, got {dtype}")
        if len(shape) != 4 or shape[1] != 3:
            raise RequestError(400, f"images must be (N, 3, H, W), got shape {tuple(shape)}")
        self._check_count(shape[0])
        self._check_pixels(shape[2], shape[3])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data = body[stream.tell():]
        if len(data) != expected:
            raise RequestError(400, f"the .npy header declares shape {tuple(shape)} ({expected} bytes of data) but the "
                                    f"body carries {len(data)} bytes")
        array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")
        return np.array(array, order="C")  # a writable copy: torch shares its memory

    def _check_pixels(self, height: int, width: int) -> None:
        if height * width > self.spec.max_image_pixels:
            raise RequestError(413, f"images of {height}x{width} pixels exceed the limit of "
                                    f"{self.spec.max_image_pixels} pixels")

    @staticmethod
    def _json_array(value):
        import numpy as np

        try:
            array = np.asarray(value)
        except (ValueError, RecursionError) as exc:  # ragged or too deep nesting
            raise RequestError(400, f'"images" is not a rectangular array: {exc}') from exc
        if array.dtype.kind not in "fiu" or array.dtype == bool:
            raise RequestError(400, f'"images" must hold numbers, got {array.dtype} values')
        return array.astype(np.float32)

    def _check_count(self, n: int) -> None:
        if n == 0:
            raise RequestError(400, "empty batch: the request holds no images")
        if n > self.spec.max_batch:
            raise RequestError(413, f"the request holds {n} images, more than --max-batch ({self.spec.max_batch})")

    def _float_images(self, array):
        """(N, 3, H, W) float32: preprocessed images (H, W = the model's size), or raw 0..1 pixels for TPT."""
        import numpy as np

        if array.dtype != np.float32:
            raise RequestError(400, f"images must be float32, got {array.dtype}")
        if array.ndim != 4 or array.shape[1] != 3:
            raise RequestError(400, f"images must be (N, 3, H, W), got shape {tuple(array.shape)}")
        self._check_count(array.shape[0])
        if not self.is_tpt and tuple(array.shape[2:]) != self.image_size:
            raise RequestError(400, f"images are {tuple(array.shape[2:])} pixels, the model expects "
                                    f"{self.image_size} (send preprocessed images, or JPEG/PNG bytes)")
        self._check_pixels(array.shape[2], array.shape[3])
        if not np.isfinite(array).all():
            raise RequestError(400, "images hold NaN or infinite values")
        if self.is_tpt and (array.min() < 0 or array.max() > 1):
            raise RequestError(400, "TPT takes raw images with values in 0..1 (it makes its own views)")
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _encoded_list(self, values, raw: bool = False) -> List[torch.Tensor]:
        if not isinstance(values, list):
            raise RequestError(400, '"encoded" must be a list of base64 strings')
        self._check_count(len(values))
        images = []
        for i, value in enumerate(values):
            if raw:
                data = value
            else:
                if not isinstance(value, str):
                    raise RequestError(400, f"encoded image {i} is not a base64 string")
                try:
                    data = base64.b64decode(value, validate=True)
                except ValueError as exc:
                    raise RequestError(400, f"encoded image {i} is not valid base64: {exc}") from exc
            images.append(self.decode(data, i))
        return images

    def decode(self, data: bytes, index: int = 0) -> torch.Tensor:
        """Decode JPEG/PNG bytes: open_clip's eval transform (3, S, S), or uint8 RGB (3, H, W) for TPT."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        except Image.DecompressionBombError as exc:  # PIL's own bound, checked in open() before ours
            raise RequestError(413, f"image {index} is larger than the limit of {self.spec.max_image_pixels} "
                                    f"pixels ({exc})") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise RequestError(400, f"image {index} is not a decodable image (JPEG, PNG, ...): {exc}") from exc
        width, height = img.size
        if width * height > self.spec.max_image_pixels:
            raise RequestError(413, f"image {index} is {width}x{height} pixels, more than the limit of "
                                    f"{self.spec.max_image_pixels} pixels")
        try:
            img.load()
            rgb = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise RequestError(400, f"image {index} cannot be decoded: {exc}") from exc
        if self.is_tpt:
            return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous().to(self.device)
        return self.preprocess(rgb).to(self.device)

    def _tpt_views(self, images, seed: int) -> torch.Tensor:
        images = list(images.unbind(0)) if isinstance(images, torch.Tensor) else images
        generator = torch.Generator().manual_seed(seed)  # per request: batching never changes its views
        try:
            return self.module.make_views(images, generator)
        except (ValueError, TypeError) as exc:
            raise RequestError(400, str(exc)) from exc

    # -- inference ----------------------------------------------------------------------------

    def run_batch(self, items: List[Item]) -> List[Dict[str, Any]]:
        """One forward pass over the images of many requests; one response per request."""
        images = torch.cat([item.images for item in items])
        if self.is_tpt:
            logits = self.module.adapt(images).logits  # each image its own context and optimizer state
        else:
            with torch.no_grad():
                logits = self.module(images)
        logits = logits.float().cpu()
        with self._lock:
            self.stats["batches"] += 1
            self.stats["requests"] += len(items)
            self.stats["images"] += len(images)
            self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], len(items))
            self.stats["max_batch_images"] = max(self.stats["max_batch_images"], len(images))
            hist = self.stats["batch_requests_histogram"]
            hist[str(len(items))] = hist.get(str(len(items)), 0) + 1
        out, start = [], 0
        for item in items:
            part = logits[start:start + item.count]
            start += item.count
            out.append(self.response(part, item.top_k))
        return out

    def stats_snapshot(self) -> Dict[str, Any]:
        """The counters, requests in flight and the mean requests per forward pass (how well batching works)."""
        with self._lock:
            stats = json.loads(json.dumps(self.stats))
            stats["pending"] = self.pending
        stats["mean_batch_requests"] = stats["requests"] / stats["batches"] if stats["batches"] else 0.0
        return stats

    def response(self, logits: torch.Tensor, top_k: int) -> Dict[str, Any]:
        """Logits and the top-k labels with their softmax probabilities."""
        probs = logits.softmax(dim=-1)
        scores, index = probs.topk(top_k, dim=-1)
        predictions = [[{"label": self.classnames[j], "index": int(j), "score": float(s)}
                        for s, j in zip(row_s.tolist(), row_i.tolist())] for row_s, row_i in zip(scores, index)]
        return {"logits": logits.tolist(), "predictions": predictions}

    def info(self) -> Dict[str, Any]:
        return {"status": "ready", "method": self.spec.method, "model": self.spec.model,
                "num_classes": len(self.classnames), "image_size": list(self.image_size),
                "max_batch": self.spec.max_batch, "max_queue": self.spec.max_queue, "device": str(self.device)}


async def read_body(headers, chunks, limit: int) -> bytes:
    """A request body of at most ``limit`` bytes: a larger ``Content-Length`` is refused before reading,
    and a body without one (chunked) is cut off as soon as it passes the limit."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise RequestError(400, f"Content-Length is not a number: {declared!r}") from None
        if length > limit:
            raise RequestError(413, f"request body is {length} bytes (Content-Length), the limit is {limit}")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over {limit} bytes, the limit")
        parts.append(chunk)
    return b"".join(parts)


class Batcher:
    """Dynamic batching on one replica's event loop: whenever the model is free, one forward pass takes
    every request already queued (up to ``max_batch`` images). It waits (at most ``max_wait_s``) only while
    other requests are still being read or decoded, so a lone request never waits. The forward passes run
    on one model thread of their own; decoding stays on the event loop's default thread pool."""

    def __init__(self, classifier: Classifier, max_wait_s: float):
        from concurrent.futures import ThreadPoolExecutor

        self.classifier, self.max_wait_s = classifier, max_wait_s
        self.arriving = 0  # admitted requests still being read or parsed: worth waiting for
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="promptcore-model")
        self._queue = None
        self._task = None

    async def submit(self, item: Item) -> Dict[str, Any]:
        """The response to ``item``, computed in some batch."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run())
        future = loop.create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _run(self) -> None:
        import asyncio

        loop, carry, limit = asyncio.get_running_loop(), None, self.classifier.spec.max_batch
        while True:
            batch = [carry or await self._queue.get()]
            carry, images, deadline = None, batch[0][0].count, loop.time() + self.max_wait_s
            while images < limit:
                if not self._queue.empty():
                    entry = self._queue.get_nowait()
                elif self.arriving > 0 and loop.time() < deadline:
                    try:
                        entry = await asyncio.wait_for(self._queue.get(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        break
                else:
                    break
                if images + entry[0].count > limit:
                    carry = entry  # first in the next batch
                    break
                batch.append(entry)
                images += entry[0].count
            batch = [(item, future) for item, future in batch if not future.done()]  # cancelled: client gone
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.classifier.run_batch,
                                                     [item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every request of the batch learns why
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


def make_app(spec: ServeSpec, replicas: int = 1, gate=None):
    """The Ray Serve application serving ``spec`` (a deployment with ``replicas`` replicas); closing
    ``gate`` (a :class:`Gate` actor) makes its replicas stop admitting requests."""
    import asyncio

    from ray import serve
    from starlette.responses import JSONResponse

    spec.check()

    @serve.deployment(name=f"{APP_NAME}_{spec.method}", num_replicas=replicas,
                      max_ongoing_requests=spec.max_queue + spec.max_batch,
                      max_queued_requests=spec.max_queue,
                      ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.gpus_per_replica()},
                      graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=60,
                      logging_config={"enable_access_log": False},  # a log line per request costs the replica
                      max_constructor_retry_count=1)
    class PromptcoreDeployment:
        def __init__(self, spec_fields: Dict[str, Any], gate=None):
            replica_spec = ServeSpec(**spec_fields)
            if replica_spec.device == "cpu":
                torch.set_num_threads(max(1, int(replica_spec.num_cpus)))
            self.classifier = Classifier(build_module(replica_spec), replica_spec)
            self.batcher = Batcher(self.classifier, replica_spec.batch_wait_s)
            if gate is not None:
                threading.Thread(target=self._watch_gate, args=(gate,), daemon=True).start()

        def _watch_gate(self, gate) -> None:
            import ray

            me, clf = f"{os.getpid()}:{id(self)}", self.classifier
            while True:
                try:
                    if ray.get(gate.poll.remote(me, clf.draining, clf.pending), timeout=10):
                        clf.stop_admitting()
                except Exception:  # noqa: BLE001 - the driver is gone or busy: keep serving, ask again
                    pass
                time.sleep(0.1)

        async def __call__(self, request):
            path = request.url.path.rstrip("/") or "/"
            if request.method == "GET":
                if path in ("/health", "/ready"):
                    return JSONResponse(self.classifier.info())
                if path == "/stats":
                    return JSONResponse(self.classifier.stats_snapshot())
                return JSONResponse({"error": f"no GET route {path}; use /health, /ready or /stats"}, status_code=404)
            if request.method != "POST" or path not in ("/", "/classify"):
                return JSONResponse({"error": f"use POST /classify (got {request.method} {path})"}, status_code=404)
            try:
                self.classifier.admit()
            except RequestError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)
            try:
                self.batcher.arriving += 1
                try:
                    body = await read_body(request.headers, request.stream(), self.classifier.spec.max_body_bytes)
                    # decoding and preprocessing off the event loop and the model's thread
                    item = await asyncio.get_running_loop().run_in_executor(
                        None, self.classifier.parse, body, request.headers.get("content-type", ""),
                        dict(request.query_params))
                finally:
                    self.batcher.arriving -= 1
                result = await self.batcher.submit(item)
                return JSONResponse({"method": self.classifier.spec.method, **result})
            except RequestError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)
            except Exception as exc:  # noqa: BLE001 - the server keeps serving; the client learns why
                return JSONResponse({"error": f"inference failed: {type(exc).__name__}: {exc}"}, status_code=500)
            finally:
                self.classifier.release()

    return PromptcoreDeployment.bind(asdict(spec), gate)


@contextlib.contextmanager
def _ray_keeps_our_sigterm_handler():
    """``ray.init`` replaces the SIGTERM handler with ``sys.exit`` (exit 15 mid-start, Ray processes left
    behind): keep ours, which only asks for a stop, while it runs."""
    from ray._private import utils

    original = getattr(utils, "set_sigterm_handler", None)
    if original is None:
        yield
        return
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = original


def _check_joined_cluster(name: str, host: str, port: int) -> None:
    """Refuse to touch a joined cluster's Serve: HTTP options are cluster-wide (Serve would ignore ours and
    we would print a port nobody answers on), and an app of our name would be replaced."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return
    http = client.http_config
    if http.port != port or (http.host or "127.0.0.1") != host:
        raise RuntimeError(f"Ray Serve already runs on this cluster with HTTP on {http.host}:{http.port}, not "
                           f"{host}:{port}; pass --host {http.host} --port {http.port} to add an application there")
    if name in serve.status().applications:
        raise RuntimeError(f"an application named {name!r} already runs on this cluster; pass another --name")


class Gate:
    """Shutdown's switch, a small Ray actor: the driver closes it, every replica polls it (and reports its
    requests in flight). Ray core only: a Serve handle in the driver leaves a router thread polling the
    stopped controller, and the process aborts at exit."""

    def __init__(self):
        self.closed = False
        self.replicas: Dict[str, List] = {}  # replica -> [stopped admitting, requests in flight]

    def poll(self, replica: str, stopped: bool, pending: int) -> bool:
        self.replicas[replica] = [stopped, pending]
        return self.closed

    def close(self) -> None:
        self.closed = True

    def report(self) -> Dict[str, List]:
        return dict(self.replicas)


def _start_gate():
    import ray

    return ray.remote(num_cpus=0)(Gate).remote()


def _drain(gate, replicas: int, log, timeout_s: float = 60.0) -> int:
    """Close the gate (replicas stop admitting: 503), then wait until every replica has stopped admitting and
    holds no request for 0.5 s, so requests in flight get their answers; the number of replicas drained."""
    import ray

    ray.get(gate.close.remote())
    quiet_since, drained = None, 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = ray.get(gate.report.remote()).values()
        drained = sum(1 for stopped, pending in states if stopped and not pending)
        if drained >= replicas and not any(stopped and pending for stopped, pending in states):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 0.5:  # the last answers on their way back through the proxy
                return drained
        else:
            quiet_since = None
        time.sleep(0.05)
    log(f"promptcore serve: requests still in flight after {timeout_s:.0f} s; stopping anyway", flush=True)
    return drained


def serve_forever(spec: ServeSpec, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None,
                  replicas: int = 1, name: str = APP_NAME, log=print) -> int:
    """Serve ``spec`` on a private local Ray cluster (or join ``address``) until SIGTERM/SIGINT.

    Without ``address`` the cluster is this process's alone: ``RAY_ADDRESS`` and an earlier ``ray start``
    are ignored. With ``address`` the server refuses a cluster whose Serve listens elsewhere or already
    holds an app called ``name``, and on exit deletes only that app. Shutdown stops admitting (new
    requests get 503), lets the requests in flight finish, and exits 0; a signal during start-up stops
    the server as soon as it can, leaving no Ray process behind.
    """
    spec.check()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports phoned home
    # Ray's proxies keep draining 30 s on shutdown for external load balancers to notice; requests in
    # flight are drained here first, so a short proxy drain is enough.
    for var in ("RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        os.environ.setdefault(var, "2")
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)

    def request_stop(*_):
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in signals}  # before ray.init: see below
    owned = address is None
    if owned:
        os.environ.pop("RAY_ADDRESS", None)  # nothing may redirect our private cluster (Ray's processes included)
    import ray
    from ray import serve

    try:
        with _ray_keeps_our_sigterm_handler():
            ray.init(address=address or "local", include_dashboard=False, namespace=APP_NAME, log_to_driver=False,
                     configure_logging=False)
        for sig in signals:  # again: Ray's core worker put a C-level failure handler over ours, which aborts (-6)
            signal.signal(sig, request_stop)
        try:
            if stop.is_set():
                log("promptcore serve: stopped during start-up", flush=True)
                return 0
            if not owned:
                _check_joined_cluster(name, host, port)
            serve.start(http_options={"host": host, "port": port}, logging_config={"enable_access_log": False})
            deployed, t0 = False, time.perf_counter()
            try:  # from here on, an app called `name` on this cluster is ours (checked above)
                gate = _start_gate()
                serve.run(make_app(spec, replicas, gate), name=name, route_prefix="/")
                deployed = True
                from ray.serve.context import _get_global_client

                http = _get_global_client().http_config
                log(f"promptcore serve: ready on http://{http.host}:{http.port}/classify ({spec.method}, "
                    f"{len(spec.classnames)} classes, {replicas} replica(s), max batch {spec.max_batch} images)",
                    flush=True)
                while not stop.wait(0.2):
                    pass
                log("promptcore serve: shutting down (no new requests; finishing requests in flight)", flush=True)
                t0 = time.perf_counter()
                reached = _drain(gate, replicas, log)
                log(f"promptcore serve: drained {reached} replica(s) in {time.perf_counter() - t0:.1f} s", flush=True)
            finally:
                if owned:
                    serve.shutdown()
                else:
                    serve.delete(name)  # only what this process deployed: the cluster's other apps keep running
            log(f"promptcore serve: stopped in {time.perf_counter() - t0:.1f} s" if deployed else
                "promptcore serve: stopped", flush=True)
        finally:
            ray.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def spec_from_args(args) -> ServeSpec:
    """The serving spec of parsed ``promptcore serve`` arguments."""
    from .models import builtin_classnames, read_classnames

    classnames = read_classnames(args.classnames) if args.classnames else builtin_classnames(args.dataset)
    options = {"n_ctx": args.n_ctx, "ctx_init": args.ctx_init}
    if args.method == "tpt":
        options.update(n_views=args.n_views, steps=args.tpt_steps)
    elif args.n_views is not None or args.tpt_steps is not None:
        raise ValueError("--n-views and --tpt-steps apply to --method tpt only")
    if args.method == "zeroshot":
        options = {}
    elif args.templates:
        raise ValueError("--templates applies to --method zeroshot only")
    return ServeSpec(method=args.method, model=args.model, classnames=classnames, pretrained=args.pretrained,
                     model_config=args.model_config, checkpoint=args.checkpoint, templates=args.templates,
                     device=args.device, precision=args.precision, options=options, top_k=args.top_k,
                     max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000.0, max_queue=args.max_queue,
                     max_image_pixels=args.max_image_pixels, seed=args.seed, num_cpus=args.num_cpus,
                     num_gpus=args.num_gpus, allow_new_classes=args.allow_new_classes)
