"""serve.py: the HTTP API through FastAPI's test client, a real server over sockets, and the page in Chromium."""
import asyncio
import base64
import contextlib
import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import dataset
import inference
import serve
from benchmarks import bench_serve
from conftest import NASTY_READABLE, NASTY_UNREADABLE
from loading import decode
from prediction import predict
from prediction.checkpoint import load_checkpoint, model_from_checkpoint, temperature_of, tta_of

NOVELTY = ("novelty_score", "known")  # what predict_images adds when the checkpoint has a novelty score

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(trained) -> dict:
    return load_checkpoint(trained["checkpoint"])


@pytest.fixture(scope="module")
def client(ckpt):
    with TestClient(serve.create_app(ckpt, "best_model.pth")) as c:
        yield c


def sample_images(trained) -> list[Path]:
    return sorted((trained["data"] / "test").rglob("*.png"))


def inference_json(paths: list[Path], checkpoint: Path, capsys, *flags: str) -> list[dict]:
    inference.main(["--image", *map(str, paths), "--json", "--checkpoint", str(checkpoint), *flags])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def as_files(paths: list[Path]) -> list[tuple]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def assert_still_serving(client, image: Path) -> None:
    r = client.post("/predict", content=image.read_bytes())
    assert r.status_code == 200 and r.json()[0]["label"] in ("cat", "dog")


# ---------------------------------------------------------------- the API

def test_predict_answers_what_inference_prints(trained, nasty_data, client, capsys):
    paths = sample_images(trained) + [nasty_data / rel for rel in NASTY_READABLE]  # CMYK, 16-bit, GIF, EXIF...
    expected = inference_json(paths, trained["checkpoint"], capsys)
    r = client.post("/predict", files=as_files(paths))
    assert r.status_code == 200
    got = r.json()
    assert [g["file"] for g in got] == [p.name for p in paths]  # one object per image, in order
    assert len({e["confidence"] for e in expected}) > 5  # the answers differ, so their order is checked
    for g, e in zip(got, expected):
        assert g["label"] == e["label"] and g["probabilities"].keys() == e["probabilities"].keys()
        assert g["probabilities"] == pytest.approx(e["probabilities"], abs=2e-4)
        assert g["confidence"] == pytest.approx(e["confidence"], abs=2e-4)
    # one image as the raw body answers the same
    single = client.post("/predict", content=paths[0].read_bytes(), headers={"content-type": "image/png"})
    assert single.status_code == 200
    assert single.json()[0]["probabilities"] == pytest.approx(expected[0]["probabilities"], abs=2e-4)


def test_threshold_answers_unknown(trained, ckpt, capsys):
    paths = sample_images(trained)[:4]
    expected = inference_json(paths, trained["checkpoint"], capsys, "--threshold", "0.99")
    with TestClient(serve.create_app(ckpt, threshold=0.99)) as c:
        got = c.post("/predict", files=as_files(paths)).json()
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert all((g["label"] == "unknown") == (g["confidence"] < 0.99) for g in got)
    assert any(g["label"] == "unknown" for g in got)


def test_health_reports_the_checkpoint(client, ckpt):
    h = client.get("/health").json()
    assert h["ok"] is True and h["classes"] == ["cat", "dog"] and h["epoch"] == ckpt["epoch"]
    assert h["val_acc"] == round(ckpt["metrics"]["val"]["acc"], 4) and h["checkpoint"] == "best_model.pth"


class CountingCheckpoint(dict):
    """A checkpoint that counts the reads of its fields."""

    reads = 0

    def __getitem__(self, key):
        self.reads += 1
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.reads += 1
        return super().get(key, default)


def test_requests_do_not_read_the_checkpoint(trained, ckpt, monkeypatch):
    """create_app reads the checkpoint's facts once; answering requests reads neither its fields nor its readers."""
    counting = CountingCheckpoint(ckpt)
    app = serve.create_app(counting, "best_model.pth")
    assert counting.reads > 0
    counting.reads, calls = 0, []
    for module, reader in [(predict, "normalization_of"), (predict, "temperature_of"), (predict, "tta_of"),
                           (predict, "novelty_of"), (serve, "temperature_of"), (serve, "val_accuracy_of"),
                           (serve, "checkpoint_facts")]:
        real = getattr(module, reader)
        monkeypatch.setattr(module, reader, lambda *a, real=real, name=reader, **k: calls.append(name) or real(*a, **k))
    images = sample_images(trained)[:3]
    with TestClient(app) as c:
        assert c.post("/predict", files=as_files(images)).status_code == 200
        assert c.post("/predict", content=images[0].read_bytes()).status_code == 200
        assert c.post("/gradcam", content=images[1].read_bytes()).status_code == 200
        assert c.get("/health").json()["classes"] == ["cat", "dog"]
    assert counting.reads == 0 and calls == []


def test_gradcam_gives_the_prediction_and_a_heatmap(trained, ckpt, client):
    image = sample_images(trained)[0]
    r = client.post("/gradcam", content=image.read_bytes())
    assert r.status_code == 200
    g = r.json()
    assert {k: g[k] for k in ("label", "confidence", "probabilities", *NOVELTY)} == \
        client.post("/predict", content=image.read_bytes()).json()[0]
    assert g["heatmap_class"] == g["label"]
    prefix = "data:image/png;base64,"
    assert g["heatmap"].startswith(prefix)
    heat = Image.open(io.BytesIO(base64.b64decode(g["heatmap"][len(prefix):])))
    assert heat.format == "PNG" and heat.size == (ckpt["image_size"],) * 2 and heat.mode == "RGB"
    # The map is predict.explain's for the predicted class, with the predictions' mirror averaging and temperature,
    # on the layer chosen for the checkpoint's image size; its probabilities are the ones returned.
    assert tta_of(ckpt)
    x = dataset.image_tensor(image, ckpt["image_size"], ckpt["channels"])
    cam = predict.explain(model_from_checkpoint(ckpt), x, tta=True, temperature=temperature_of(ckpt))
    assert cam.layer == "layers.0" and ckpt["classes"][cam.class_idx] == g["heatmap_class"]
    assert g["heatmap"] == serve.heatmap_png(cam.cam)
    assert [round(p, 4) for p in cam.probabilities.tolist()] == list(g["probabilities"].values())
    two = client.post("/gradcam", files=as_files(sample_images(trained)[:2]))
    assert two.status_code == 400 and two.json() == {"error": "/gradcam takes one image, not 2"}


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert 'type="file"' in page and "/gradcam" in page and 'name="viewport"' in page
    assert "http://" not in page and "https://" not in page  # no CDN, fonts or scripts from elsewhere


@pytest.mark.parametrize("rel", NASTY_UNREADABLE)  # empty, truncated, text, over PIL's pixel limit (2 kinds)
def test_unreadable_upload_gets_400_with_inference_reason(nasty_data, trained, client, capsys, rel):
    path = nasty_data / rel
    assert inference.main(["--image", str(path), "--checkpoint", str(trained["checkpoint"])]) == 1
    reason = capsys.readouterr().err.strip().split(f"{path}: ", 1)[1]
    raw = client.post("/predict", content=path.read_bytes())
    assert raw.status_code == 400 and raw.json() == {"error": reason}
    form = client.post("/predict", files=as_files([path]))
    assert form.status_code == 400 and form.json() == {"error": f"{path.name}: {reason}"}
    cam = client.post("/gradcam", content=path.read_bytes())
    assert cam.status_code == 400 and cam.json() == {"error": reason}
    assert_still_serving(client, sample_images(trained)[0])


def test_empty_body_gets_400(trained, client):
    r = client.post("/predict")
    assert r.status_code == 400 and "not an image PIL can identify (empty" in r.json()["error"]
    assert_still_serving(client, sample_images(trained)[0])


def test_a_bad_image_among_good_ones_is_named_and_the_good_ones_answered(trained, client, tmp_path):
    good = sample_images(trained)[:2]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    r = client.post("/predict", files=as_files([good[0], bad, good[1]]))
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "notes.jpg: not an image PIL can identify (empty, corrupt or another file type)"
    answered = {"file", "label", "confidence", "probabilities", *NOVELTY}  # the trained checkpoint has a novelty score
    assert [set(x) for x in body["results"]] == [answered, {"file", "error"}, answered]


@pytest.mark.parametrize("fields,message", [
    ({"image": ("a.png", b"x", "image/png")}, "no field 'files' in the form (its fields: image)"),
    ({"files": (None, "hello")}, "the field 'files' must hold file uploads, not text"),
])
def test_wrong_form_field_gets_422(trained, client, fields, message):
    r = client.post("/predict", files=fields)
    assert r.status_code == 422 and message in r.json()["error"]
    assert_still_serving(client, sample_images(trained)[0])


def test_malformed_multipart_and_unknown_path_get_json_errors(client):
    r = client.post("/predict", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and r.json() == {"error": "Invalid multipart data."}
    assert client.get("/nothing").json() == {"error": "Not Found"}
    assert client.get("/predict").status_code == 405


def test_upload_over_the_limit_gets_413(trained, ckpt):
    image = sample_images(trained)[0]
    limit_mb = (len(image.read_bytes()) + 1) / 2**20  # this image fits, one more byte would not
    with TestClient(serve.create_app(ckpt, max_upload_mb=limit_mb)) as c:
        assert c.post("/predict", content=image.read_bytes()).status_code == 200
        r = c.post("/predict", content=image.read_bytes() + b"\0\0")
        assert r.status_code == 413 and "limit of" in r.json()["error"] and "--max-upload-mb" in r.json()["error"]
        assert c.post("/predict", content=image.read_bytes()).status_code == 200


def test_body_of_unannounced_length_is_cut_off_at_the_limit(ckpt):
    """A chunked body (no Content-Length) is refused once the bytes read pass the limit, not read to its end."""
    app = serve.create_app(ckpt, max_upload_mb=1.0)
    chunks, pulled, sent = 50, [0], []

    async def receive():
        pulled[0] += 1
        return {"type": "http.request", "body": b"\0" * 2**18, "more_body": pulled[0] < chunks}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"transfer-encoding", b"chunked")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert pulled[0] == 5  # 4 x 256 KiB fit in 1 MiB; the 5th passes it and nothing more is read
    assert "limit of 1 MB" in json.loads(sent[1]["body"])["error"]


def batches_so_far(client) -> float:
    text = client.get("/metrics").text
    return float(next(line for line in text.splitlines() if line.startswith("serve_batch_images_count ")).split()[1])


def test_100_requests_from_8_threads_answer_consistently(trained, client):
    images = sample_images(trained)[:5]
    reference = {p: client.post("/predict", content=p.read_bytes()).json()[0] for p in images}
    before = batches_so_far(client)

    def one(i: int) -> tuple[Path, int, dict]:
        p = images[i % len(images)]
        if i % 4 == 0:  # some batches too: a request's images share one forward pass
            r = client.post("/predict", files=as_files([p, images[0]]))
            return p, r.status_code, {k: v for k, v in r.json()[0].items() if k != "file"}
        r = client.post("/predict", content=p.read_bytes())
        return p, r.status_code, r.json()[0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(100)))
    assert [code for _, code, _ in answers] == [200] * 100
    for p, _, got in answers:
        assert got["label"] == reference[p]["label"]
        assert got["probabilities"] == pytest.approx(reference[p]["probabilities"], abs=2e-4)
        assert got["novelty_score"] == pytest.approx(reference[p]["novelty_score"], abs=2e-4)
    assert batches_so_far(client) - before < 100  # some were scored together: micro-batches, not one by one

def run_batcher(score, requests: list[list], max_batch: int = 32, workers: int = 1, timeout: float = 10.0):
    """Submit the requests (lists of images) to a Batcher: the first, then the others together 50 ms later, while
    the first is being scored; return what each got (or the exception)."""
    async def go():
        with ThreadPoolExecutor(workers) as pool:
            batcher = serve.Batcher(score, pool, workers, max_batch, 0.0)
            tasks = []
            for i, images in enumerate(requests):
                tasks.append(asyncio.ensure_future(asyncio.wait_for(batcher.submit(images), timeout)))
                if i == 0:
                    await asyncio.sleep(0.05)
            answers = await asyncio.gather(*tasks, return_exceptions=True)
            batcher.stop()
            return answers
    return asyncio.run(go())


def test_requests_that_wait_together_are_scored_in_one_batch_and_answered_each_their_own():
    calls = []

    def score(images):
        calls.append(list(images))
        if len(calls) == 1:
            time.sleep(0.3)  # the first batch keeps the one thread busy while the others queue
        return [f"answer {image}" for image in images]

    answers = run_batcher(score, [[0], [1], [2, 3], [4]])
    assert calls == [[0], [1, 2, 3, 4]]  # the lone first request at once; the three that queued as one batch
    assert answers == [["answer 0"], ["answer 1"], ["answer 2", "answer 3"], ["answer 4"]]


def test_a_batch_holds_at_most_max_batch_images_and_a_bigger_request_goes_alone():
    calls = []

    def score(images):
        calls.append(list(images))
        time.sleep(0.05)
        return list(images)

    answers = run_batcher(score, [[0], [1, 2], [3, 4], [5, 6, 7, 8, 9], [10]], max_batch=4)
    assert calls == [[0], [1, 2, 3, 4], [5, 6, 7, 8, 9], [10]]
    assert answers == [[0], [1, 2], [3, 4], [5, 6, 7, 8, 9], [10]]


def test_a_request_that_timed_out_is_not_scored_and_a_model_error_reaches_its_batch():
    calls = []

    def score(images):
        calls.append(list(images))
        if images == ["boom"]:
            raise RuntimeError("model failed")
        time.sleep(0.4)
        return list(images)

    answers = run_batcher(score, [[0], [1], [2]], timeout=0.2)  # 1 and 2 give up while 0 is scored
    assert calls == [[0]] and all(isinstance(a, TimeoutError) for a in answers)
    answers = run_batcher(score, [["boom"], [3]])
    assert isinstance(answers[0], RuntimeError) and answers[1] == [3]


def test_a_request_not_answered_in_time_gets_503_and_the_server_goes_on(ckpt, trained, monkeypatch):
    image = sample_images(trained)[0].read_bytes()
    real = serve.Classifier.predict_decoded

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    with TestClient(serve.create_app(ckpt, timeout_s=0.3)) as c:
        monkeypatch.setattr(serve.Classifier, "predict_decoded", slow)
        r = c.post("/predict", content=image)
        assert r.status_code == 503 and r.json() == {
            "error": "no answer within 0.3 s: the server is too busy (--timeout-s); try again later"}
        monkeypatch.setattr(serve.Classifier, "predict_decoded", real)
        time.sleep(1.0)  # the slow call ends; the thread is free again
        assert c.post("/predict", content=image).status_code == 200
        metrics = c.get("/metrics").text
    assert 'serve_requests_total{endpoint="/predict",status="503"} 1.0' in metrics
    assert 'serve_requests_total{endpoint="/predict",status="200"} 1.0' in metrics


def test_metrics_count_requests_by_status_and_batches(ckpt, trained):
    images = sample_images(trained)[:3]
    with TestClient(serve.create_app(ckpt)) as c:
        assert c.post("/predict", files=as_files(images)).status_code == 200
        assert c.post("/predict", content=images[0].read_bytes()).status_code == 200
        assert c.post("/predict", content=b"not an image").status_code == 400
        assert c.get("/nowhere").status_code == 404
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in ('serve_requests_total{endpoint="/predict",status="200"} 2.0',
                 'serve_requests_total{endpoint="/predict",status="400"} 1.0',
                 'serve_requests_total{endpoint="other",status="404"} 1.0',
                 'serve_request_seconds_count{endpoint="/predict"} 3.0',
                 "serve_batch_images_count 2.0", "serve_batch_images_sum 4.0",  # 3 images, then 1
                 'serve_batch_images_bucket{le="1.0"} 1.0', "serve_queue_wait_seconds_count 2.0"):
        assert line in text, line
    load = float(next(l for l in text.splitlines() if l.startswith("serve_model_load_seconds ")).split()[1])
    assert 0 < load < 60


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "no/such.pth"], "no checkpoint at no/such.pth"),
    (["--threshold", "1.5"], "--threshold must be between 0 and 1"),
    (["--max-upload-mb", "0"], "--max-upload-mb and --timeout-s must be above 0"),
    (["--timeout-s", "0"], "--max-upload-mb and --timeout-s must be above 0"),
    (["--max-batch", "0"], "--max-batch and --workers at least 1"),
])
def test_command_line_errors_are_one_line(argv, message, capsys):
    assert serve.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---------------------------------------------------------------- a real server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(checkpoint: Path, *flags: str):
    """`python serve.py` in a subprocess on a free localhost port, once /health answers: {'url', 'port',
    'banner' (its first line), 'proc'}; stopped at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(checkpoint), "--port", str(port),
                             "--log-level", "warning", *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        banner = proc.stdout.readline()
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"serve.py did not start: {banner}{proc.stdout.read() if proc.poll() else ''}")
                time.sleep(0.2)
        yield {"url": url, "port": port, "banner": banner, "proc": proc}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trained):
    with serve_process(trained["checkpoint"], "--max-upload-mb", "1") as running:
        yield running


def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send a request's head (and some body, perhaps less than it announces) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = s.recv(65536)
            if not data:
                break
            answer += data
        return answer


@pytest.mark.slow
def test_real_server_prints_its_address_and_refuses_big_uploads_without_reading_them(server):
    assert f"at http://127.0.0.1:{server['port']}/ (this machine only)" in server["banner"]
    # Announces 1 GB, sends 10 bytes: answered at once, without waiting for the rest.
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000000000\r\n\r\n")
    t0 = time.time()
    answer = raw_request(server["port"], head, b"0123456789")
    assert answer.startswith(b"HTTP/1.1 413") and b"limit of 1 MB" in answer
    assert time.time() - t0 < 20  # not the 1 GB it announced
    health = json.loads(urllib.request.urlopen(f"{server['url']}/health", timeout=10).read())
    assert health["ok"] and health["max_upload_mb"] == 1


@pytest.mark.slow
def test_page_in_headless_chromium(server, tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    upload = tmp_path / "upload.png"
    yy, xx = np.mgrid[0:90, 0:120]
    Image.fromarray(np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8), "RGB").save(upload)
    with upload.open("rb") as f:
        request = urllib.request.Request(f"{server['url']}/predict", data=f.read(), method="POST")
    expected = json.loads(urllib.request.urlopen(request, timeout=30).read())[0]

    browser = bench_serve.headless_chromium(tmp_path / "profile", "390,844")
    try:
        browser.get(server["url"] + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "best_model.pth: cat, dog" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(upload))
        wait.until(lambda b: b.execute_script(
            "const h = document.getElementById('heatmap');"
            "return !h.hidden && h.complete && h.naturalWidth > 0 && h.getBoundingClientRect().width > 0;"))
        label = browser.find_element(By.ID, "label").text
        assert label.startswith(expected["label"]) and f"{100 * expected['confidence']:.1f}%" in label
        assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 2
        photo, heat = (browser.find_element(By.ID, i).rect for i in ("photo", "heatmap"))
        assert (heat["width"], heat["height"]) == pytest.approx((photo["width"], photo["height"]), abs=1)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        assert browser.find_element(By.ID, "error").text == ""
        shot = tmp_path / "serve_page.png"
        assert browser.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0
    finally:
        browser.quit()


# The page's camera: Chromium's fake device (a generated moving test pattern) stands in for a webcam, and
# --use-fake-ui-for-media-stream grants the permission; 127.0.0.1 is a secure context, so getUserMedia is there.
FAKE_CAMERA = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
RESULT_SHOWN = ("const h = document.getElementById('heatmap');"
                "return !h.hidden && h.complete && h.naturalWidth > 0 && h.getBoundingClientRect().width > 0;")


def needs_chromium() -> None:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


def gradient_png(path: Path) -> Path:
    yy, xx = np.mgrid[0:90, 0:120]
    Image.fromarray(np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8), "RGB").save(path)
    return path


def predicted(url: str, image: bytes) -> dict:
    request = urllib.request.Request(f"{url}/predict", data=image, method="POST")
    return json.loads(urllib.request.urlopen(request, timeout=30).read())[0]


def shown_photo(browser) -> bytes:
    """The bytes behind the page's #photo (a blob: URL), read back in the page."""
    data_url = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById('photo').src).then((r) => r.blob()).then((b) => {"
        "  const reader = new FileReader(); reader.onload = () => done(reader.result); reader.readAsDataURL(b); });")
    return base64.b64decode(data_url.split(",", 1)[1])


def assert_result_for(browser, expected: dict) -> None:
    """The page shows `expected` (a /predict answer): label and percentage, 2 bars, the heatmap over the photo."""
    label = browser.find_element(By.ID, "label").text
    assert label.split() == [expected["label"], f"{100 * expected['confidence']:.1f}%"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 2
    photo, heat = (browser.find_element(By.ID, i).rect for i in ("photo", "heatmap"))
    assert photo["width"] > 0 and (heat["width"], heat["height"]) == pytest.approx(
        (photo["width"], photo["height"]), abs=1)
    assert browser.find_element(By.ID, "error").text == ""
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


@pytest.mark.slow
def test_camera_snap_in_headless_chromium_is_scored_like_a_dropped_file(server, tmp_path):
    needs_chromium()
    browser = bench_serve.headless_chromium(tmp_path / "profile", "390,844", *FAKE_CAMERA)
    try:
        browser.get(server["url"] + "/")
        wait = WebDriverWait(browser, 60)
        assert browser.find_element(By.ID, "camera").is_displayed() is False
        browser.find_element(By.ID, "webcam").click()
        wait.until(lambda b: b.execute_script(
            "const v = document.getElementById('preview'); return v.videoWidth > 0 && !v.paused;"))
        assert browser.find_element(By.ID, "preview").is_displayed()
        assert not browser.find_element(By.ID, "webcam").is_displayed()  # one stream at a time
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        wait.until(lambda b: b.find_element(By.ID, "snap").is_enabled())
        browser.find_element(By.ID, "snap").click()
        wait.until(lambda b: b.execute_script(RESULT_SHOWN))
        # The photo shown is the snapped frame, a JPEG of the video's size with the test pattern in it (not a
        # blank frame), and the answer shown is the server's for exactly those bytes.
        assert browser.execute_script("return document.getElementById('photo').src").startswith("blob:")
        frame = shown_photo(browser)
        video = browser.execute_script(
            "const v = document.getElementById('preview'); return [v.videoWidth, v.videoHeight];")
        with Image.open(io.BytesIO(frame)) as im:
            assert im.format == "JPEG" and list(im.size) == video
            assert np.asarray(im.convert("L"), dtype=float).std() > 10
        assert browser.execute_script(
            "const p = document.getElementById('photo'); return [p.naturalWidth, p.naturalHeight];") == video
        expected = predicted(server["url"], frame)
        assert expected["label"] in ("cat", "dog")
        assert_result_for(browser, expected)
        # Closing the camera stops the stream's tracks (the camera's light goes off), not just the preview.
        browser.execute_script("window.openStream = document.getElementById('preview').srcObject;")
        browser.find_element(By.ID, "close-camera").click()
        assert browser.execute_script("return window.openStream.getTracks().length > 0 && "
                                      "window.openStream.getTracks().every((t) => t.readyState === 'ended')")
        assert browser.execute_script("return document.getElementById('preview').srcObject === null")
        assert not browser.find_element(By.ID, "camera").is_displayed()
        assert browser.find_element(By.ID, "webcam").is_displayed()
        assert browser.find_element(By.ID, "label").text.split() == [expected["label"],
                                                                     f"{100 * expected['confidence']:.1f}%"]
    finally:
        browser.quit()


@pytest.mark.slow
def test_camera_capture_input_in_headless_chromium_scores_like_the_file_input(server, tmp_path):
    """The "Take a photo" input is what opens a phone's camera (accept and capture); headless, a file sent through
    it must be scored as one chosen with the file input is."""
    needs_chromium()
    upload = gradient_png(tmp_path / "upload.png")
    expected = predicted(server["url"], upload.read_bytes())
    browser = bench_serve.headless_chromium(tmp_path / "profile", "390,844")
    try:
        browser.get(server["url"] + "/")
        capture = browser.find_element(By.ID, "capture")
        assert (capture.get_attribute("type"), capture.get_attribute("accept"),
                capture.get_attribute("capture")) == ("file", "image/*", "environment")
        take = browser.find_element(By.ID, "take")
        assert take.is_displayed() and take.text.strip() == "Take a photo"  # its label, what is tapped
        assert browser.execute_script("return document.getElementById('capture').labels[0].id") == "take"
        capture.send_keys(str(upload))
        WebDriverWait(browser, 60).until(lambda b: b.execute_script(RESULT_SHOWN))
        assert shown_photo(browser) == upload.read_bytes()
        assert_result_for(browser, expected)
    finally:
        browser.quit()


@pytest.mark.slow
def test_camera_refused_or_unavailable_says_so_and_files_still_work(server, tmp_path):
    needs_chromium()
    upload = gradient_png(tmp_path / "upload.png")
    expected = predicted(server["url"], upload.read_bytes())
    browser = bench_serve.headless_chromium(tmp_path / "profile", "390,844", "--use-fake-device-for-media-stream",
                                            "--deny-permission-prompts")
    try:
        browser.get(server["url"] + "/")
        wait = WebDriverWait(browser, 60)
        error = browser.find_element(By.ID, "error")
        browser.find_element(By.ID, "webcam").click()
        wait.until(lambda b: error.text)
        assert error.text.startswith("the camera was refused: allow it for this page in the browser's settings")
        assert not browser.find_element(By.ID, "camera").is_displayed()
        assert browser.find_element(By.ID, "webcam").is_enabled()
        # No getUserMedia at all, as on a page opened over plain http from another machine.
        browser.execute_script("Object.defineProperty(navigator, 'mediaDevices', {value: undefined});")
        browser.find_element(By.ID, "webcam").click()
        wait.until(lambda b: error.text and not error.text.startswith("the camera was refused"))
        assert error.text.startswith("camera not available here: ")
        assert "open the page on https or on localhost, or use Take a photo on a phone" in error.text
        assert not browser.find_element(By.ID, "camera").is_displayed()
        browser.find_element(By.ID, "file").send_keys(str(upload))
        wait.until(lambda b: b.execute_script(RESULT_SHOWN))
        assert_result_for(browser, expected)  # the error is gone too
    finally:
        browser.quit()


def test_pixel_limit_holds_when_another_thread_resets_the_warning_filter(nasty_data, monkeypatch):
    """decode_image turns PIL's bomb warning into an error with a process-wide filter; a server's other threads
    can reset that filter mid-decode, so the limit is also checked explicitly."""
    monkeypatch.setattr(warnings, "simplefilter", lambda *args, **kwargs: None)  # as if reset by another thread
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        with pytest.raises(decode.BadImage, match="decompression-bomb pixel limit"):
            decode.decode_bytes((nasty_data / "train/cat/bomb_warning.png").read_bytes(), 32)


@pytest.mark.slow
def test_bench_serve_prints_a_table_and_the_memory(trained, capsys):
    assert bench_serve.main(["--checkpoint", str(trained["checkpoint"]), "--requests", "64",
                             "--memory-requests", "16", "--", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    table, result = out.split("\n{", 1)
    result = json.loads("{" + result)
    assert [(r["clients"], r["bad_every"]) for r in result["levels"]] == [(1, 0), (8, 0), (32, 0), (64, 0), (32, 4)]
    assert all(r["requests"] == 64 and r["requests_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
               for r in result["levels"])
    # from the server's /metrics: one client's requests go alone, and every row says how many a pass held
    assert result["levels"][0]["mean_batch"] == 1.0 and all(r["mean_batch"] >= 1 for r in result["levels"])
    assert result["serve_flags"] == ["--threads", "1"] and result["rss_mb"]["after"] > 0
    assert "| 32 |" in table and "| 32, 1 in 4 unreadable |" in table and "MiB after 16 more requests" in table
    assert "forward passes by images in them: 1: " in table
    assert f"`{result['command']}` at commit {result['commit']}, {result['date']};" in table  # BENCHMARKS.md's line


@pytest.mark.slow
def test_bench_serve_measures_each_runtime_in_the_same_run(trained, capsys):
    assert bench_serve.main(["--checkpoint", str(trained["checkpoint"]), "--requests", "64", "--memory-requests", "16",
                             "--runtimes", "onnx", "onnx-int8", "--", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    table, result = out.split("\n{", 1)
    result = json.loads("{" + result)
    assert result["runtimes"] == ["onnx", "onnx-int8"]
    assert [(r["runtime"], r["served_by"], r["clients"]) for r in result["levels"]] == [
        (runtime, runtime, c) for runtime in ("onnx", "onnx-int8") for c in (1, 8, 32, 64, 32)]
    assert "| onnx-int8 | 32, 1 in 4 unreadable |" in table and "\nonnx-int8: server RSS: " in table
    assert set(result["rss_mb_by_runtime"]) == {"onnx", "onnx-int8"}


@pytest.mark.slow
def test_bench_serve_screenshot_saves_the_page_with_an_answer(trained, tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    image = sorted((trained["data"] / "test").rglob("*.png"))[0]
    out = tmp_path / "page.png"
    assert bench_serve.main(["screenshot", "--checkpoint", str(trained["checkpoint"]), "--image", str(image),
                             "--out", str(out), "--size", "390,700"]) == 0
    assert Image.open(out).size[0] >= 390  # the window's width (at the screen's scale)
    assert bench_serve.main(["screenshot", "--image", str(image), "--checkpoint", str(tmp_path / "none.pth"),
                             "--out", str(out)]) == 2


@pytest.mark.slow
def test_workers_serve_from_several_processes(trained):
    with serve_process(trained["checkpoint"], "--workers", "2") as running:
        assert "(this machine only) in 2 processes; scoring with " in running["banner"]
        image = sample_images(trained)[0].read_bytes()
        answers = [json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{running['url']}/predict", data=image, method="POST"), timeout=30).read()) for _ in range(6)]
        assert all(a == answers[0] for a in answers) and answers[0][0]["label"] in ("cat", "dog")
        workers = subprocess.run(["pgrep", "-P", str(running["proc"].pid)], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) >= 2  # uvicorn's worker processes (and its resource tracker)


def test_onnx_runtime_answers_as_pytorch_does(ckpt, trained):
    paths = sample_images(trained)[:6]
    with TestClient(serve.create_app(ckpt, runtime="torch")) as c:
        expected = c.post("/predict", files=as_files(paths)).json()
    with TestClient(serve.create_app(ckpt, runtime="onnx")) as c:
        assert c.get("/health").json()["runtime"] == "onnx"
        got = c.post("/predict", files=as_files(paths)).json()
        cam = c.post("/gradcam", content=paths[0].read_bytes()).json()
    for e, g in zip(expected, got):
        assert g["label"] == e["label"] and g["file"] == e["file"]
        assert g["probabilities"] == pytest.approx(e["probabilities"], abs=1e-4)
        assert g["novelty_score"] == pytest.approx(e["novelty_score"], abs=2e-4) and g["known"] == e["known"]
    assert cam["label"] == expected[0]["label"] and cam["heatmap"].startswith("data:image/png;base64,")


def test_onnx_runtime_falls_back_to_pytorch_when_it_cannot_export_or_does_not_match(ckpt, monkeypatch):
    model = model_from_checkpoint(ckpt)
    runtime, note = predict.onnx_runtime(model, ckpt)
    assert runtime is not None and note.startswith("onnxruntime (probabilities within ")

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'onnxscript'")

    monkeypatch.setattr(predict, "export_features", broken)
    assert predict.onnx_runtime(model, ckpt) == (
        None, "onnxruntime unavailable (ModuleNotFoundError: No module named 'onnxscript'); using PyTorch")
    app = serve.create_app(ckpt, runtime="onnx")
    assert app.state.runtime.endswith("using PyTorch")
    with TestClient(app) as c:
        assert c.get("/health").json()["runtime"] == "torch"

    class Off:  # exports, but its numbers are not PyTorch's
        @classmethod
        def of(cls, *args, **kwargs):
            return cls()

        def __call__(self, x):
            pen, stats = runtime(x)
            return pen + 1.0, stats

    monkeypatch.setattr(predict, "OnnxFeatures", Off)
    runtime_off, note = predict.onnx_runtime(model, ckpt)
    assert runtime_off is None and "differ from PyTorch's by" in note and note.endswith("(> 0.0001); using PyTorch")
