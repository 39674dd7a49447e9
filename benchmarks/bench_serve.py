"""Benchmark serve.py: requests/s and latency of single-image requests at 1, 8, 32 and 64 concurrent clients and
at 32 with every 4th upload unreadable, the images per forward pass (from the server's /metrics), and the
server's memory before and after 5,000 requests.

Usage:
    python -m benchmarks.bench_serve                                    # first trains the default model 1 epoch on synthetic data
    python -m benchmarks.bench_serve --checkpoint models/best_model.pth --image photo.jpg
    python -m benchmarks.bench_serve --requests 500 --memory-requests 2000 -- --threads 1 --torch-threads 2   # serve.py flags
    python -m benchmarks.bench_serve --checkpoint models/best_model.pth --runtimes onnx onnx-int8   # one after the other
    python -m benchmarks.bench_serve screenshot --checkpoint models/best_model.pth --image photo.jpg --out docs/serve_page.png

The server runs as `python serve.py` in its own process on a free localhost port; the clients are threads of
this process, each with its own keep-alive connection, sending one image as the raw body of POST /predict.
Without --image the image is a generated 200x200 JPEG (the size of the cat/dog photos). Speed depends on the
architecture, width and image size, not on how well the model was trained. With several --runtimes the server is
started with each `--runtime` in turn, in the same run; for onnx-int8 the INT8 model is first written by
`export.py --format onnx-int8` (calibrated on the data the checkpoint trained on) into a temporary folder.
Prints a Markdown table, then one JSON object with the same figures.

`screenshot` starts serve.py the same way, drops the image on its page in headless Chromium (Debian's chromium
and chromium-driver, driven by selenium) at a phone's width, waits for the answer and the heatmap, and saves
the page as a PNG: the picture in README.md.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from core.common import (UserError, markdown_source, markdown_table, provenance, reports_user_errors, run_script,
                         split_at_dashes)
from loading.synthetic import make_synthetic
from prediction.checkpoint import load_checkpoint, width_of
from prediction.classifier import RUNTIMES

ROOT = Path(__file__).resolve().parents[1]  # the project, where serve.py is
CLIENTS = (1, 8, 32, 64)
MIXED = (32, 4)  # the mixed row: 32 clients, every 4th request an unreadable upload (answered 400)
BAD_UPLOAD = b"this is not an image"


def train_default_model(work: Path) -> Path:
    """The default architecture (train.py's defaults) after 1 epoch on a small synthetic set: its checkpoint."""
    data = make_synthetic(work / "data", 32, size=64, seed=0)
    flags = ["--data", str(data), "--epochs", "1", "--workers", "0", "--out-dir", str(work / "models"),
             "--log-dir", str(work / "logs"), "--curves-dir", str(work / "curves"), "--cache-dir",
             str(work / "cache"), "--run-name", "bench_serve"]
    run_script("train.py", flags, stdout=sys.__stderr__)  # stdout keeps only the figures
    return work / "models" / "best_model.pth"


def sample_jpeg(size: int = 200) -> bytes:
    """A photo-sized RGB JPEG: a gradient with noise, so it compresses like a photo rather than a flat colour."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([xx, yy, (xx + yy) // 2], -1) + rng.integers(-40, 40, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux /proc), or None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def start_server(checkpoint: Path, port: int, flags: list[str]) -> subprocess.Popen:
    """serve.py in its own process, returned once /health answers."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(checkpoint), "--port",
                             str(port), "--log-level", "warning", *flags], cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise UserError("serve.py did not start") from None
            time.sleep(0.2)


def batch_histogram(port: int) -> dict[str, float] | None:
    """serve.py's /metrics batch-size histogram: {upper bound: cumulative count, 'count', 'sum'}; None when the
    server has no /metrics."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        if line.startswith("serve_batch_images_bucket{"):
            out[line.split('le="')[1].split('"')[0]] = float(line.split()[-1])
        elif line.startswith(("serve_batch_images_count ", "serve_batch_images_sum ")):
            out[line.split()[0].rsplit("_", 1)[1]] = float(line.split()[-1])
    return out


def load(port: int, image: bytes, clients: int, requests: int, bad_every: int = 0) -> dict:
    """`requests` POST /predict of one image from `clients` threads: throughput and latency percentiles; with
    bad_every k, every k-th request of each client is an unreadable upload, which must get a 400. With /metrics,
    also the mean number of images per forward pass."""
    latencies: list[float] = []
    failures = []
    lock = threading.Lock()
    counts = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        try:
            for k in range(n):
                bad = bad_every and k % bad_every == bad_every - 1
                t0 = time.perf_counter()
                conn.request("POST", "/predict", body=BAD_UPLOAD if bad else image,
                             headers={"Content-Type": "image/jpeg"})
                response = conn.getresponse()
                body = response.read()
                mine.append(time.perf_counter() - t0)
                if response.status != (400 if bad else 200):
                    failures.append(f"{response.status} {body[:200]!r}")
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in counts]
    before = batch_histogram(port)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = batch_histogram(port)
    if failures or len(latencies) != requests:
        raise UserError(f"{len(failures)} failed requests, e.g. {failures[:1]}; {len(latencies)} of {requests} done")
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    row = {"clients": clients, "requests": requests, "bad_every": bad_every,
           "requests_per_s": round(requests / wall, 1), "p50_ms": round(q[49] * 1000, 1),
           "p99_ms": round(q[98] * 1000, 1)}
    if before and after and after["count"] > before["count"]:
        row["mean_batch"] = round((after["sum"] - before["sum"]) / (after["count"] - before["count"]), 1)
        row["batches"] = {le: after[le] - before[le] for le in after if le not in ("count", "sum")}
    return row


def headless_chromium(profile: str | Path, size: str = "390,844", *flags: str):
    """Debian's chromium in headless mode, driven through chromium-driver by selenium, with its own profile folder,
    a window of `size` ("width,height", CSS pixels; default a phone's) and any further chromium `flags`."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise UserError("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={size}", *flags):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def screenshot(argv: list[str]) -> int:
    """`bench_serve.py screenshot`: serve.py's page with an image's answer on it, saved as a PNG."""
    from selenium.webdriver.support.ui import WebDriverWait

    parser = argparse.ArgumentParser(prog="bench_serve.py screenshot", description=screenshot.__doc__)
    parser.add_argument("--checkpoint", default="models/best_model.pth", help="checkpoint to serve")
    parser.add_argument("--image", required=True, help="the image to drop on the page")
    parser.add_argument("--out", default="serve_page.png", help="where the PNG goes (default: serve_page.png)")
    parser.add_argument("--size", default="390,760", help="window width,height in CSS pixels (default: a phone)")
    args = parser.parse_args(argv)
    port = free_port()
    server = start_server(Path(args.checkpoint).resolve(), port, [])
    try:
        with tempfile.TemporaryDirectory() as profile:
            browser = headless_chromium(profile, args.size, "--hide-scrollbars")
            try:
                browser.get(f"http://127.0.0.1:{port}/")
                browser.find_element("id", "file").send_keys(str(Path(args.image).resolve()))
                WebDriverWait(browser, 60).until(lambda b: b.execute_script(
                    "const h = document.getElementById('heatmap'); return !h.hidden && h.complete && "
                    "h.naturalWidth > 0;"))
                browser.save_screenshot(args.out)
            finally:
                browser.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")
    return 0


def serve_and_load(checkpoint: Path, image: bytes, serve_flags: list[str], requests: int, memory_requests: int
                   ) -> tuple[list[dict], dict, dict]:
    """serve.py started with `serve_flags` and put under load: a load() row per concurrency level and the mixed
    row, each with the runtime /health says scored ('served_by'); the server's RSS in MiB {"started", "before", "after"}, the last two around `memory_requests` further
    requests; and those requests' load() row."""
    port = free_port()
    server = start_server(checkpoint, port, serve_flags)
    try:
        rss_started = rss_mb(server.pid)
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())
        load(port, image, 8, 100)  # warm-up: first calls allocate the batch-of-one buffers
        rows = [load(port, image, c, requests) for c in CLIENTS]
        rows.append(load(port, image, MIXED[0], requests, bad_every=MIXED[1]))
        rows = [{**r, "served_by": health["runtime"]} for r in rows]  # what scored: onnx falls back to torch
        rss_before = rss_mb(server.pid)
        memory_run = load(port, image, 8, memory_requests)
        rss_after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return rows, {"started": rss_started, "before": rss_before, "after": rss_after}, memory_run


def batch_shares(rows: list[dict]) -> str:
    """The forward passes of all rows by the images in them, as one line ('' without /metrics' batch counts)."""
    counts = [r["batches"] for r in rows if "batches" in r]
    if not counts:
        return ""
    total = {le: sum(c[le] for c in counts) for le in counts[0]}  # cumulative bucket counts, summed over the rows
    bounds = list(total)
    share = [(le, total[le] - (total[bounds[i - 1]] if i else 0)) for i, le in enumerate(bounds)]
    return "forward passes by images in them: " + ", ".join(
        f"{'up to ' if i else ''}{float(le):g}: {n:g}" if le != "+Inf" else f"more: {n:g}"
        for i, (le, n) in enumerate(share) if n)


def int8_flags(checkpoint: Path, work: Path) -> list[str]:
    """serve.py's flags for the INT8 runtime: the model written by export.py --format onnx-int8 into `work`."""
    run_script("export.py", ["--checkpoint", str(checkpoint), "--format", "onnx-int8", "--out", str(work / "model"),
                             "--workers", "0"], stdout=sys.__stderr__)
    return ["--int8-model", str(work / "model.int8.onnx")]


def serve_runtimes(checkpoint: Path, image: bytes, serve_flags: list[str], runtimes: list[str], args, work: Path
                   ) -> list[tuple[str, list[dict], dict, dict]]:
    """serve_and_load for each runtime in turn: (runtime, rows, RSS, memory run); rows say their runtime."""
    out = []
    for runtime in runtimes:
        flags = [*serve_flags, *(["--runtime", runtime] if len(runtimes) > 1 or runtime != "onnx" else [])]
        if runtime == "onnx-int8":
            flags += int8_flags(checkpoint, work)
        rows, rss, memory_run = serve_and_load(checkpoint, image, flags, args.requests, args.memory_requests)
        out.append((runtime, [{**r, "runtime": runtime} for r in rows], rss, memory_run))
    return out


def print_tables(measured: list[tuple[str, list[dict], dict, dict]], memory_requests: int) -> None:
    """The load rows of every runtime as one Markdown table, then each runtime's batch sizes and memory."""
    several = len(measured) > 1
    print(markdown_table((["runtime"] if several else []) + ["clients", "requests/s", "p50 latency", "p99 latency",
                                                             "images per forward pass"],
                         [([runtime] if several else [])
                          + [f"{r['clients']}" + (f", 1 in {r['bad_every']} unreadable" if r["bad_every"] else ""),
                             r["requests_per_s"], f"{r['p50_ms']} ms", f"{r['p99_ms']} ms", r.get("mean_batch", "")]
                          for runtime, rows, _, _ in measured for r in rows]))
    for runtime, rows, rss, memory_run in measured:
        name = f"{runtime}: " if several else ""
        shares = batch_shares(rows)
        if shares:
            print(f"\n{name}{shares}")
        print(f"\n{name}server RSS: {rss['started']} MiB started, {rss['before']} MiB before and {rss['after']} MiB "
              f"after {memory_requests} more requests ({memory_run['requests_per_s']} requests/s)")


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["screenshot"]:
        return screenshot(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="", help="checkpoint to serve (default: train the default model "
                        "1 epoch on synthetic data in a temporary folder)")
    parser.add_argument("--image", default="", help="the image every request sends (default: a generated JPEG)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per concurrency level (default: 1000)")
    parser.add_argument("--memory-requests", type=int, default=5000,
                        help="requests between the two memory readings (default: 5000)")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=["onnx"],
                        help="serve.py --runtime of each server measured, one after the other (default: onnx)")
    ours, serve_flags = split_at_dashes(argv)
    args = parser.parse_args(ours)
    try:
        if args.requests < max(CLIENTS) or args.memory_requests < 1:
            raise UserError(f"--requests must be at least {max(CLIENTS)} and --memory-requests at least 1")
        with tempfile.TemporaryDirectory() as work:
            checkpoint = Path(args.checkpoint) if args.checkpoint else train_default_model(Path(work))
            image = Path(args.image).read_bytes() if args.image else sample_jpeg()
            measured = serve_runtimes(checkpoint, image, serve_flags, list(dict.fromkeys(args.runtimes)), args,
                                      Path(work))
            ckpt = load_checkpoint(checkpoint)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = f" width {width_of(ckpt)}" if ckpt["arch"] == "resnet_small" else ""  # the others have no width field
    model = (f"{ckpt['arch']}{width}, {ckpt['image_size']}x{ckpt['image_size']}"
             f" {ckpt['channels']}-channel input, {len(ckpt['classes'])} classes")
    print(f"{model}; {len(image)}-byte image; serve.py flags: {' '.join(serve_flags) or 'the defaults'}\n")
    print_tables(measured, args.memory_requests)
    prov = provenance("benchmarks.bench_serve", argv)
    print("\n" + markdown_source(prov) + "\n")
    first = measured[0]
    result = {**prov, "checkpoint": args.checkpoint or "the default model, 1 epoch on synthetic data", "model": model,
              "image_bytes": len(image), "serve_flags": serve_flags, "runtimes": [m[0] for m in measured],
              "levels": [r for m in measured for r in m[1]],
              "rss_mb": {**first[2], "requests_between": args.memory_requests},
              "rss_mb_by_runtime": {m[0]: m[2] for m in measured}}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
