"""Serve a trained checkpoint over HTTP: a JSON API and a page to try it in the browser.

Usage:
    python serve.py                                         # models/best_model.pth on http://127.0.0.1:8000/
    python serve.py --checkpoint models/best_model.pth --port 8080
    python serve.py --host 0.0.0.0                          # reachable from other machines: see the README
    python serve.py --runtime onnx-int8                     # the INT8 model export.py --format onnx-int8 wrote
    curl --data-binary @photo.jpg http://127.0.0.1:8000/predict               # one image as the body
    curl -F files=@a.jpg -F files=@b.png http://127.0.0.1:8000/predict        # several, one forward pass

Endpoints: GET / (the page), GET /health, POST /predict (a list with one inference.py --json object per image,
in order), POST /gradcam (one image: the same object plus a Grad-CAM heatmap as a PNG data URL), GET /metrics
(Prometheus: requests by status, latency, batch sizes, queue wait, model load time).
Bad input gets a 4xx answer {"error": "..."} with the reason inference.py gives; the server keeps serving.
Requests that arrive together are decoded in parallel and their images scored in one forward pass (--max-batch,
--max-wait-ms); each answer is the one its request would get alone (the same label; confidence and novelty
score to float rounding, 1e-4). A request not answered within --timeout-s gets a 503. The network runs in
onnxruntime (--runtime onnx, the default: exported at start and checked against PyTorch within 1e-4, PyTorch
when that fails), PyTorch (--runtime torch), or onnxruntime on the INT8 model export.py --format onnx-int8 wrote
(--runtime onnx-int8). Predictions come from prediction.Classifier, as inference.py's and your own code's do.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import io
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from matplotlib import colormaps
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from core.common import UserError, reports_user_errors
from loading.decode import BadImage, decode_bytes
from prediction.checkpoint import (DEFAULT_PATH, load_checkpoint, tag_thresholds_of, temperature_of, val_accuracy_of,
                                   val_map_of)
from prediction.classifier import Classifier, add_runtime_flags, default_int8_path
from prediction.predict import PredictionFacts, explain, normalize, pick_cam_layer

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
MAX_IMAGES = 64  # images in one request: bounds the decoded batch whatever their file size
UPLOAD_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


class ApiError(Exception):
    """A request the server answers with `status` and {"error": message, **extra}."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class UploadLimit:
    """ASGI middleware: refuse a body over max_bytes with 413, by its Content-Length before reading any of it,
    or, for a body of unannounced length (chunked), as soon as the bytes read pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> ApiError:
        return ApiError(413, f"upload larger than the server's limit of {self.max_bytes / 2**20:g} MB "
                             f"(--max-upload-mb)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            error = self.too_large() if length.isdigit() else ApiError(400, "invalid Content-Length header")
            return await error_response(error)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self.too_large()  # answered by the app's ApiError handler
            return message

        await self.app(scope, limited_receive, send)


class Batcher:
    """Micro-batching: the images of requests that arrive together go through the model in one forward pass.

    Requests wait in a queue with their decoded images. Whenever one of `workers` model threads is free, a batch
    takes the waiting requests in order, up to `max_batch` images (a larger request goes alone), after waiting
    up to `max_wait_s` for more to arrive; `score` (images -> one answer per image, run in `pool`) answers them
    and each request gets its own images' answers back. A lone client never waits with max_wait_s 0: its request
    is scored as soon as a thread is free, and under load the batches grow by themselves with the queue.
    A request whose caller gave up (timed out) before its batch formed is dropped unscored. `observe` is
    called with each batch's size and its requests' seconds in the queue."""

    def __init__(self, score, pool: ThreadPoolExecutor, workers: int, max_batch: int, max_wait_s: float,
                 observe=lambda batch_size, waits: None):
        self.score, self.pool, self.workers = score, pool, workers
        self.max_batch, self.max_wait_s, self.observe = max_batch, max_wait_s, observe
        self.waiting: deque = deque()  # (images, future, time queued)
        self.loop_task: asyncio.Task | None = None
        self.running: set[asyncio.Task] = set()

    async def submit(self, images: list) -> list[dict]:
        """The answers to these images, scored in a batch with whatever else is waiting."""
        if self.loop_task is None:  # started on the server's event loop, by its first request
            self.arrived, self.free = asyncio.Event(), asyncio.Semaphore(self.workers)
            self.loop_task = asyncio.get_running_loop().create_task(self.run())
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((images, future, time.perf_counter()))
        self.arrived.set()
        return await future

    async def run(self) -> None:
        while True:
            await self.free.acquire()
            while not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            if self.max_wait_s > 0 and sum(len(r[0]) for r in self.waiting) < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            batch = self.take()
            if not batch:
                self.free.release()
                continue
            task = asyncio.get_running_loop().create_task(self.answer(batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    def take(self) -> list[tuple]:
        """The next batch: waiting requests in order, skipping those already given up, up to max_batch images."""
        batch, count = [], 0
        while self.waiting:
            images, future, _ = self.waiting[0]
            if future.done():
                self.waiting.popleft()
                continue
            if batch and count + len(images) > self.max_batch:
                break
            batch.append(self.waiting.popleft())
            count += len(images)
        return batch

    async def answer(self, batch: list[tuple]) -> None:
        try:
            now = time.perf_counter()
            images = [image for request in batch for image in request[0]]
            self.observe(len(images), [now - queued for _, _, queued in batch])
            answers = await asyncio.get_running_loop().run_in_executor(self.pool, self.score, images)
            start = 0
            for request_images, future, _ in batch:
                if not future.done():
                    future.set_result(answers[start:start + len(request_images)])
                start += len(request_images)
        except Exception as e:  # the model failed: every request of the batch hears it
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(e)
        finally:
            self.free.release()

    def stop(self) -> None:
        for task in [self.loop_task, *self.running]:
            if task is not None:
                task.cancel()


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message, **e.extra}, status_code=e.status)


def heatmap_png(cam: torch.Tensor) -> str:
    """A Grad-CAM map (H, W) in [0, 1] as a 'jet' coloured PNG data URL, to lay over the image."""
    rgb = (colormaps["jet"](cam.numpy())[..., :3] * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def read_uploads(request: Request) -> list[tuple[str | None, bytes]]:
    """(file name or None, bytes) per image: the multipart field 'files', or the whole body as one image."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return [(None, await request.body())]
    async with request.form(max_files=MAX_IMAGES) as form:
        items = form.getlist("files")
        if not items:
            fields = ", ".join(dict.fromkeys(form.keys())) or "none"
            raise ApiError(422, f"no field 'files' in the form (its fields: {fields}); send each image as a "
                                f"file in the field 'files', or one image as the raw body")
        if not all(isinstance(f, UploadFile) for f in items):
            raise ApiError(422, "the field 'files' must hold file uploads, not text")
        return [(f.filename, await f.read()) for f in items]


async def in_time(work, timeout_s: float) -> object:
    """The answer of `work` (an awaitable), or a 503 once timeout_s have passed without one."""
    try:
        return await asyncio.wait_for(work, timeout_s)
    except TimeoutError:
        raise ApiError(503, f"no answer within {timeout_s:g} s: the server is too busy (--timeout-s); "
                            f"try again later") from None


def decode_uploads(uploads: list[tuple[str | None, bytes]], size: int, channels: int
                   ) -> tuple[list[dict], list, list[int]]:
    """Every upload decoded as the model takes it: the answers so far ({'file'} and the 'error' of unreadable
    ones), the readable images, and the answers those belong to."""
    results, images, good = [], [], []
    for filename, data in uploads:
        results.append({} if filename is None else {"file": filename})
        try:
            images.append(decode_bytes(data, size, channels))
            good.append(len(results) - 1)
        except BadImage as e:
            results[-1]["error"] = str(e)
    return results, images, good


def merged(results: list[dict], good: list[int], predictions: list[dict]) -> list[dict]:
    """The predictions put into their uploads' answers (decode_uploads). Any unreadable upload makes it a 400
    whose 'results' (when there are several images) still answer the readable ones."""
    for i, prediction in zip(good, predictions):
        results[i].update(prediction)
    bad = [r for r in results if "error" in r]
    if bad:
        message = "; ".join(f"{r['file']}: {r['error']}" if "file" in r else r["error"] for r in bad)
        raise ApiError(400, message, **({"results": results} if len(results) > 1 else {}))
    return results


def metrics_registry(load_seconds: float) -> tuple[CollectorRegistry, dict]:
    """The server's Prometheus metrics, in a registry of their own (one per app): requests by endpoint and status,
    request seconds, batch sizes, seconds in the batch queue, and the model's load time."""
    registry = CollectorRegistry()
    metrics = {
        "requests": Counter("serve_requests", "requests answered, by endpoint and HTTP status",
                            ["endpoint", "status"], registry=registry),
        "latency": Histogram("serve_request_seconds", "seconds from a request's arrival to its answer",
                             ["endpoint"], registry=registry,
                             buckets=(.005, .01, .02, .05, .1, .15, .2, .5, 1, 2, 5, 10)),
        "batch": Histogram("serve_batch_images", "images per forward pass of /predict's batches",
                           registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64)),
        "queue": Histogram("serve_queue_wait_seconds", "seconds a /predict request waited for its batch",
                           registry=registry, buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 5)),
    }
    Gauge("serve_model_load_seconds", "seconds to load the checkpoint and build the model",
          registry=registry).set(load_seconds)
    return registry, metrics


class RequestMetrics:
    """ASGI middleware: counts every request by endpoint and status and times it (the outermost layer, so
    refused uploads count too). Paths that are no endpoint count as 'other'."""

    def __init__(self, app, metrics: dict, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics["requests"].labels(endpoint, str(status[0])).inc()
            self.metrics["latency"].labels(endpoint).observe(time.perf_counter() - start)


class HeatMaps:
    """Grad-CAM heatmaps for /gradcam (predict.explain). Grad-CAM hooks a layer and runs backward: on its own copy
    of the model, one request at a time, so the hooks never see another request's forward pass. Its layer is
    chosen once, for the checkpoint's image size; mirror averaging (`served.tta`) and temperature are the
    predictions' own, so the map explains the prediction returned."""

    def __init__(self, model: torch.nn.Module, served: ServedCheckpoint):
        self.model = copy.deepcopy(model)
        size, channels = served.image_size, served.channels
        self.layer = pick_cam_layer(self.model, torch.zeros(1, channels, size, size))[0]
        self.tta, self.temperature = served.tta, served.prediction.temperature
        self.normalization, self.lock = served.prediction.normalization, threading.Lock()

    def png(self, image: np.ndarray, class_idx: int) -> str:
        """The heatmap of class `class_idx` on one decoded image (uint8, C x H x W), as a PNG data URL."""
        x = normalize(torch.as_tensor(image)[None], self.normalization)
        with self.lock:
            cam = explain(self.model, x, self.layer, self.tta, self.temperature, class_idx=class_idx).cam
        return heatmap_png(cam)


def checkpoint_facts(ckpt: dict, name: str) -> dict:
    """What /health says about the loaded checkpoint, `name` being its file name."""
    val_acc, thresholds = val_accuracy_of(ckpt), tag_thresholds_of(ckpt)
    facts = {"ok": True, "checkpoint": name, "classes": ckpt["classes"], "epoch": ckpt.get("epoch"),
             "val_acc": None if val_acc is None else round(val_acc, 4), "arch": ckpt["arch"],
             "image_size": ckpt["image_size"], "channels": ckpt["channels"], "temperature": temperature_of(ckpt)}
    if thresholds is not None:  # several tags per image: the page marks each tag's threshold on its bar
        facts["tag_thresholds"] = {c: round(t, 4) for c, t in zip(ckpt["classes"], thresholds)}
        facts["val_map"] = None if val_map_of(ckpt) is None else round(val_map_of(ckpt), 4)
    return facts


@dataclass(frozen=True)
class ServedCheckpoint:
    """The checkpoint's facts that the handlers use, read once by create_app so that no request reads the
    checkpoint: the input the model takes, its classes, the mirror averaging (the --tta flag, else the
    checkpoint's), predict_images' facts (normalization, temperature, novelty score) and /health's description."""
    image_size: int
    channels: int
    classes: tuple[str, ...]
    tta: bool
    prediction: PredictionFacts
    health: dict  # checkpoint_facts

    @classmethod
    def of(cls, ckpt: dict, name: str, tta: bool | None) -> ServedCheckpoint:
        prediction = PredictionFacts.of(ckpt)
        return cls(ckpt["image_size"], ckpt["channels"], prediction.classes, prediction.tta if tta is None else tta,
                   prediction, checkpoint_facts(ckpt, name))


class Scorer:
    """The model's work for the handlers, on the facts read once (ServedCheckpoint): predictions of decoded images
    (the Classifier's, in its runtime) and /gradcam's prediction with its heatmap."""

    def __init__(self, clf: Classifier, served: ServedCheckpoint):
        self.clf, self.served = clf, served
        self.heatmaps = HeatMaps(clf.model, served)

    def predict(self, images: list) -> list[dict]:
        """One inference.py --json object per decoded image, all in one forward pass."""
        return [p.as_dict() for p in self.clf.predict_decoded(images)]

    def predict_and_explain(self, upload: tuple[str | None, bytes]) -> dict:
        """The prediction of one upload and the Grad-CAM heatmap of the class it predicts (predict.explain, with
        the same mirror averaging and temperature as the prediction)."""
        results, images, good = decode_uploads([upload], self.served.image_size, self.served.channels)
        result = merged(results, good, self.predict(images))[0]
        classes, probs = self.served.classes, result["probabilities"]
        k = classes.index(result["label"] if result["label"] in classes else max(probs, key=probs.get))
        return {**result, "heatmap_class": classes[k], "heatmap": self.heatmaps.png(images[0], k)}


def batch_observer(metrics: dict) -> Callable[[int, list[float]], None]:
    """The Batcher's `observe`: each batch's size and its requests' seconds in the queue, into /metrics."""
    def observe(batch_size: int, waits: list[float]) -> None:
        metrics["batch"].observe(batch_size)
        for wait in waits:
            metrics["queue"].observe(wait)
    return observe


def lifespan_of(batcher: Batcher, pools: list[ThreadPoolExecutor]
                ) -> Callable[[FastAPI], AbstractAsyncContextManager]:
    """The app's lifespan: at shutdown the batcher stops and the pools drop the work not started."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.stop()
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
    return lifespan


def add_middleware_and_errors(app: FastAPI, max_upload_mb: float, metrics: dict) -> None:
    """Upload limit inside request metrics (so refused uploads count too); every error answered as JSON."""
    app.add_middleware(UploadLimit, max_bytes=int(max_upload_mb * 2**20))
    app.add_middleware(RequestMetrics, metrics=metrics,
                       endpoints={"/", "/health", "/predict", "/gradcam", "/metrics", "/openapi.json"})

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # 404, 405, a malformed multipart body...
        return error_response(ApiError(e.status_code, str(e.detail)))


def add_info_routes(app: FastAPI, page: str, health_answer: dict, registry: CollectorRegistry) -> None:
    """GET / (the page), GET /health and GET /metrics."""
    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return health_answer

    @app.get("/metrics")
    async def prometheus_metrics():
        """The Prometheus text format: requests, latency, batch sizes, queue wait, model load time."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def add_scoring_routes(app: FastAPI, scorer: Scorer, batcher: Batcher, pool: ThreadPoolExecutor,
                       decode_pool: ThreadPoolExecutor, timeout_s: float) -> None:
    """POST /predict (decoded in `decode_pool`, scored in the batcher's batches) and POST /gradcam (scored and
    explained in `pool`), each answered within timeout_s or a 503."""
    size, channels = scorer.served.image_size, scorer.served.channels

    @app.post("/predict", openapi_extra=UPLOAD_DOC)
    async def predict(request: Request):
        """One object per image, in order: label, confidence, probabilities (as inference.py --json)."""
        uploads = await read_uploads(request)
        loop = asyncio.get_running_loop()
        results, images, good = await loop.run_in_executor(decode_pool, decode_uploads, uploads, size, channels)
        return merged(results, good, await in_time(batcher.submit(images), timeout_s) if images else [])

    @app.post("/gradcam", openapi_extra=UPLOAD_DOC)
    async def explain_one(request: Request):
        """One image: its prediction, plus 'heatmap' (PNG data URL) of the class in 'heatmap_class'."""
        uploads = await read_uploads(request)
        if len(uploads) != 1:
            raise ApiError(400, f"/gradcam takes one image, not {len(uploads)}")
        return await in_time(asyncio.get_running_loop().run_in_executor(pool, scorer.predict_and_explain,
                                                                        uploads[0]), timeout_s)


def create_app(ckpt: dict, name: str = "checkpoint", max_upload_mb: float = 10.0, threshold: float = 0.0,
               tta: bool | None = None, threads: int = 2, max_batch: int = 32, max_wait_ms: float = 0.0,
               timeout_s: float = 10.0, load_seconds: float = 0.0, runtime: str = "torch",
               runtime_threads: int = 1, int8_model: str | Path | None = None) -> FastAPI:
    """The ASGI app for one loaded checkpoint; `name` is what /health reports as its checkpoint. /predict's
    images are scored in micro-batches (Batcher: max_batch, max_wait_ms) on `threads` model threads; a request
    not answered within timeout_s gets a 503. `load_seconds` (reading the checkpoint) goes into /metrics.
    runtime 'onnx' scores with onnxruntime (predict.onnx_runtime, `runtime_threads` each call) when it
    exports and matches PyTorch, else with PyTorch; 'onnx-int8' with the INT8 file `int8_model` (export.py
    --format onnx-int8); app.state.runtime says which was taken and why.
    The checkpoint's facts are read here, once (ServedCheckpoint): no request reads `ckpt`."""
    start = time.perf_counter()
    served = ServedCheckpoint.of(ckpt, name, tta)
    clf = Classifier(ckpt, runtime, threshold, tta=served.tta, threads=runtime_threads, int8_model=int8_model)
    scorer = Scorer(clf, served)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="model")
    decode_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
    page = PAGE.read_text()
    registry, metrics = metrics_registry(load_seconds + time.perf_counter() - start)
    batcher = Batcher(scorer.predict, pool, threads, max_batch, max_wait_ms / 1000, batch_observer(metrics))

    app = FastAPI(title="image classifier", lifespan=lifespan_of(batcher, [pool, decode_pool]), docs_url=None,
                  redoc_url=None)  # docs need a CDN
    app.state.classes, app.state.runtime = list(served.classes), clf.runtime_note
    add_middleware_and_errors(app, max_upload_mb, metrics)
    health_answer = {**served.health, "threshold": threshold, "max_upload_mb": max_upload_mb,
                     "max_images": MAX_IMAGES, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                     "timeout_s": timeout_s, "runtime": clf.runtime}
    add_info_routes(app, page, health_answer, registry)
    add_scoring_routes(app, scorer, batcher, pool, decode_pool, timeout_s)
    return app


SETTINGS_VARIABLE = "SERVE_SETTINGS"  # --workers: how main() hands its settings to each worker process


def app_from_settings(settings: dict) -> FastAPI:
    """The app for main()'s settings: the checkpoint loaded (its seconds counted in /metrics), torch's threads
    set."""
    start = time.perf_counter()
    ckpt = load_checkpoint(settings["checkpoint"])
    torch.set_num_threads(settings["torch_threads"])
    return create_app(ckpt, Path(settings["checkpoint"]).name, settings["max_upload_mb"], settings["threshold"],
                      settings["tta"], settings["threads"], settings["max_batch"], settings["max_wait_ms"],
                      settings["timeout_s"], load_seconds=time.perf_counter() - start, runtime=settings["runtime"],
                      runtime_threads=settings["torch_threads"], int8_model=settings["int8_model"])


def app_from_environment() -> FastAPI:
    """uvicorn's app factory in each --workers process: the app for the settings main() left in the
    environment."""
    return app_from_settings(json.loads(os.environ[SETTINGS_VARIABLE]))


def checked_for_workers(settings: dict) -> tuple[list[str], str]:
    """Before --workers processes start, each building its own app: the checkpoint (and the INT8 file for runtime
    onnx-int8) checked here, so that a bad file stops the server before any worker starts; the classes, and what
    each process will score with."""
    ckpt = load_checkpoint(settings["checkpoint"])
    if settings["runtime"] == "onnx-int8":
        Classifier(ckpt, "onnx-int8", int8_model=settings["int8_model"])  # a missing or foreign file: its error
    runtime = {"onnx": "onnxruntime", "onnx-int8": "onnxruntime INT8", "torch": "PyTorch"}[settings["runtime"]]
    return list(ckpt["classes"]), runtime + ", set up by each process"


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_PATH, help="checkpoint written by train.py")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (default: 10)")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="answer 'unknown' when the top probability is below this (0-1)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average with the mirrored image (default: as in training)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="requests the model works on side by side (default: the CPU cores, at most 8)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="cores each model call may use (default 1: requests in parallel use the cores better "
                             "than one request spread over them; raise it for lower latency with few clients)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="most images /predict scores in one forward pass, from requests that arrive together "
                             "(default: 32)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0,
                        help="how long a batch waits for more requests once a model thread is free (default 0: "
                             "batches form from the requests queued while the threads are busy)")
    parser.add_argument("--timeout-s", type=float, default=10.0,
                        help="answer 503 to a request not answered within this (default: 10)")
    add_runtime_flags(parser, "onnx", ": faster on a CPU")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes sharing the port, each with its own copy of the model and of "
                             "the PyTorch libraries (bench_serve prints the memory each takes; default: 1)")
    parser.add_argument("--log-level", default="info", help="uvicorn's: info logs each request (default), warning")
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be between 0 and 1, not {args.threshold}")
    if args.max_upload_mb <= 0 or min(args.threads, args.torch_threads, args.max_batch, args.workers) < 1 \
            or not 0 <= args.port < 65536 or args.max_wait_ms < 0 or args.timeout_s <= 0:
        raise UserError("--max-upload-mb and --timeout-s must be above 0, --max-wait-ms at least 0, --threads, "
                        "--torch-threads, --max-batch and --workers at least 1, and --port in 0-65535")
    settings = {"checkpoint": args.checkpoint, "max_upload_mb": args.max_upload_mb, "threshold": args.threshold,
                "tta": args.tta, "threads": args.threads, "torch_threads": args.torch_threads,
                "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "timeout_s": args.timeout_s,
                "runtime": args.runtime, "int8_model": str(args.int8_model or default_int8_path(args.checkpoint))}
    if args.workers > 1:  # each worker builds its own app (app_from_environment); here only the files' check
        app, (classes, runtime) = None, checked_for_workers(settings)
    else:
        app = app_from_settings(settings)
        classes, runtime = app.state.classes, app.state.runtime
    where = "this machine only" if args.host in ("127.0.0.1", "localhost", "::1") else "reachable from the network"
    print(f"serving {args.checkpoint} ({', '.join(classes)}) at http://{args.host}:{args.port}/ ({where})"
          + (f" in {args.workers} processes" if args.workers > 1 else "")
          + f"; scoring with {runtime}; Ctrl+C stops", flush=True)
    if app is None:
        os.environ[SETTINGS_VARIABLE] = json.dumps(settings)
        uvicorn.run("serve:app_from_environment", factory=True, workers=args.workers, app_dir=str(PAGE.parents[1]),
                    host=args.host, port=args.port, log_level=args.log_level)
    else:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
