"""Serve a trained checkpoint over HTTP: a JSON API and a page to try it in the browser.

Usage:
    python serve.py                                         # models/best_model.pth on http://127.0.0.1:8000/
    python serve.py --checkpoint models/best_model.pth --port 8080
    python serve.py --host 0.0.0.0                          # reachable from other machines: see the README
    curl --data-binary @photo.jpg http://127.0.0.1:8000/predict               # one image as the body
    curl -F files=@a.jpg -F files=@b.png http://127.0.0.1:8000/predict        # several, one forward pass

Endpoints: GET / (the page), GET /health, POST /predict (a list with one inference.py --json object per image,
in order), POST /gradcam (one image: the same object plus a Grad-CAM heatmap as a PNG data URL).
Bad input gets a 4xx answer {"error": "..."} with the reason inference.py gives; the server keeps serving.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import io
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from matplotlib import colormaps
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from checkpoint import (DEFAULT_PATH, load_checkpoint, model_from_checkpoint, normalization_of, temperature_of,
                        tta_of, val_accuracy_of)
from common import UserError, reports_user_errors
from dataset import BadImage, decode_bytes
from predict import explain, normalize, pick_cam_layer, predict_images

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


def create_app(ckpt: dict, name: str = "checkpoint", max_upload_mb: float = 10.0, threshold: float = 0.0,
               tta: bool | None = None, threads: int = 2) -> FastAPI:
    """The ASGI app for one loaded checkpoint; `name` is what /health reports as its checkpoint."""
    model = model_from_checkpoint(ckpt)
    size, channels, classes = ckpt["image_size"], ckpt["channels"], ckpt["classes"]
    # Grad-CAM hooks a layer and runs backward: on its own copy of the model, one request at a time, so the
    # hooks never see another request's forward pass. Its layer is chosen once, for the checkpoint's image size;
    # mirror averaging and temperature are the predictions' own, so the map explains the prediction returned.
    cam_model = copy.deepcopy(model)
    cam_layer = pick_cam_layer(cam_model, torch.zeros(1, channels, size, size))[0]
    cam_tta, temperature, cam_lock = tta_of(ckpt) if tta is None else tta, temperature_of(ckpt), threading.Lock()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="model")
    page = PAGE.read_text()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="image classifier", lifespan=lifespan, docs_url=None, redoc_url=None)  # docs need a CDN
    app.add_middleware(UploadLimit, max_bytes=int(max_upload_mb * 2**20))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # 404, 405, a malformed multipart body...
        return error_response(ApiError(e.status_code, str(e.detail)))

    async def in_pool(fn, *args):
        """Run fn in the model's thread pool, so the event loop keeps answering while the model works."""
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))

    def predict_uploads(uploads: list[tuple[str | None, bytes]]) -> list[dict]:
        """Decode every upload and predict the readable ones in one batch. Any unreadable one makes it a 400 whose
        'results' (when there are several images) still answer the readable ones."""
        results, images, good = [], [], []
        for filename, data in uploads:
            results.append({} if filename is None else {"file": filename})
            try:
                images.append(decode_bytes(data, size, channels))
                good.append(len(results) - 1)
            except BadImage as e:
                results[-1]["error"] = str(e)
        for i, prediction in zip(good, predict_images(model, ckpt, images, threshold, tta)):
            results[i].update(prediction)
        bad = [r for r in results if "error" in r]
        if bad:
            message = "; ".join(f"{r['file']}: {r['error']}" if "file" in r else r["error"] for r in bad)
            raise ApiError(400, message, **({"results": results} if len(results) > 1 else {}))
        return results

    def predict_and_explain(upload: tuple[str | None, bytes]) -> dict:
        """The prediction of one upload and the Grad-CAM heatmap of the class it predicts (predict.explain, with
        the same mirror averaging and temperature as the prediction)."""
        result = predict_uploads([upload])[0]  # a 400 if unreadable; else decoding it again costs a millisecond
        image = torch.as_tensor(decode_bytes(upload[1], size, channels))
        probs = result["probabilities"]
        k = classes.index(result["label"] if result["label"] in classes else max(probs, key=probs.get))
        x = normalize(image[None], normalization_of(ckpt))
        with cam_lock:
            cam = explain(cam_model, x, cam_layer, cam_tta, temperature, class_idx=k).cam
        return {**result, "heatmap_class": classes[k], "heatmap": heatmap_png(cam)}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    val_acc = val_accuracy_of(ckpt)
    health_answer = {"ok": True, "checkpoint": name, "classes": classes, "epoch": ckpt.get("epoch"),
                     "val_acc": None if val_acc is None else round(val_acc, 4), "arch": ckpt["arch"],
                     "image_size": size, "channels": channels, "temperature": temperature_of(ckpt),
                     "threshold": threshold, "max_upload_mb": max_upload_mb, "max_images": MAX_IMAGES}

    @app.get("/health")
    async def health():
        return health_answer

    @app.post("/predict", openapi_extra=UPLOAD_DOC)
    async def predict(request: Request):
        """One object per image, in order: label, confidence, probabilities (as inference.py --json)."""
        return await in_pool(predict_uploads, await read_uploads(request))

    @app.post("/gradcam", openapi_extra=UPLOAD_DOC)
    async def explain_one(request: Request):
        """One image: its prediction, plus 'heatmap' (PNG data URL) of the class in 'heatmap_class'."""
        uploads = await read_uploads(request)
        if len(uploads) != 1:
            raise ApiError(400, f"/gradcam takes one image, not {len(uploads)}")
        return await in_pool(predict_and_explain, uploads[0])

    return app


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
    parser.add_argument("--log-level", default="info", help="uvicorn's: info logs each request (default), warning")
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be between 0 and 1, not {args.threshold}")
    if args.max_upload_mb <= 0 or min(args.threads, args.torch_threads) < 1 or not 0 <= args.port < 65536:
        raise UserError("--max-upload-mb must be above 0, --threads and --torch-threads at least 1, "
                        "and --port in 0-65535")
    ckpt = load_checkpoint(args.checkpoint)
    app = create_app(ckpt, Path(args.checkpoint).name, args.max_upload_mb, args.threshold, args.tta, args.threads)
    torch.set_num_threads(args.torch_threads)
    where = "this machine only" if args.host in ("127.0.0.1", "localhost", "::1") else "reachable from the network"
    print(f"serving {args.checkpoint} ({', '.join(ckpt['classes'])}) at http://{args.host}:{args.port}/ "
          f"({where}); Ctrl+C stops", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
