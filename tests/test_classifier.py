"""prediction.Classifier, the Python API: every kind of input gives the prediction inference.py gives, bad input
the scripts' errors; the INT8 model export.py writes is loaded by the API, inference.py and serve.py, refused when
made from another checkpoint, and not written when it loses more accuracy than allowed."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import export
import inference
import serve
from core.common import UserError
from loading.decode import BadImage
from prediction import Classifier, Prediction, quantize
from prediction.checkpoint import fingerprint_of, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(trained) -> dict:
    return load_checkpoint(trained["checkpoint"])


@pytest.fixture(scope="module")
def images(trained) -> list[Path]:
    return sorted((trained["data"] / "test").rglob("*.png"))[:6]


@pytest.fixture(scope="module")
def int8_model(trained, tmp_path_factory) -> Path:
    """The toy model's INT8 file, written by export.py beside a copy of its checkpoint (where the API looks)."""
    folder = tmp_path_factory.mktemp("int8")
    shutil.copy(trained["checkpoint"], folder / "best_model.pth")
    assert export.main(["--checkpoint", str(folder / "best_model.pth"), "--format", "onnx-int8", "--out",
                        str(folder / "model"), "--int8-tolerance", "100", "--calibration", "40", "--workers", "0"]) == 0
    return folder / "model.int8.onnx"


def test_every_kind_of_input_gives_inference_pys_prediction(ckpt, images):
    clf = Classifier(ckpt)
    expected = inference.classify(images, clf)
    one = clf.predict(images[0])
    assert isinstance(one, Prediction) and one.as_dict() == {k: v for k, v in expected[0].items() if k != "path"}
    pil = [Image.open(p) for p in images]
    arrays = [np.asarray(im) for im in pil]
    floats = [a.astype(np.float32) / 255 for a in arrays]
    rgb = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]  # gray read back from RGB
    for inputs in (images, [str(p) for p in images], pil, arrays, floats, rgb):
        got = clf.predict(inputs)
        assert [g.label for g in got] == [e["label"] for e in expected]
        assert [g.probabilities for g in got] == pytest.approx([e["probabilities"] for e in expected], abs=2e-3)
    mixed = clf.predict((images[0], pil[1], arrays[2]))
    assert [m.label for m in mixed] == [e["label"] for e in expected[:3]]


def test_a_prediction_is_typed_and_in_the_checkpoints_class_order(ckpt, images):
    clf = Classifier(ckpt)
    assert clf.classes == ["cat", "dog"] and clf.image_size == 32 and clf.channels == 1 and clf.runtime == "torch"
    p = clf.predict(images[0])
    assert list(p.probabilities) == ["cat", "dog"] and sum(p.probabilities.values()) == pytest.approx(1, abs=1e-3)
    assert p.confidence == max(p.probabilities.values()) and p.label == max(p.probabilities, key=p.probabilities.get)
    assert isinstance(p.novelty_score, float) and isinstance(p.known, bool)  # the toy model has a novelty score
    assert clf.predict([]) == []
    assert Classifier(ckpt, threshold=1.0).predict(images[0]).label == "unknown"


def test_bad_input_gets_the_scripts_errors(ckpt, tmp_path):
    clf = Classifier(ckpt)
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(BadImage, match=r"^missing\.jpg: file not found$"):
        clf.predict("missing.jpg")
    with pytest.raises(BadImage, match=r"notes\.jpg: not an image PIL can identify"):
        clf.predict([str(tmp_path / "notes.jpg")])
    with pytest.raises(BadImage, match=r"must be \(H, W\) gray or \(H, W, 3\) RGB .*not shape \(3, 8, 8\)"):
        clf.predict(np.zeros((3, 8, 8), np.uint8))  # channels first, as torch holds them: refused, not misread
    with pytest.raises(BadImage, match=r"uint8 pixels or floats in \[0, 1\], not float64 values from 0 to 255"):
        clf.predict(np.array([[0.0, 255.0]]))
    with pytest.raises(BadImage, match="cannot read a int as an image"):
        clf.predict(7)
    with pytest.raises(UserError, match="runtime must be one of torch, onnx, onnx-int8, not 'tflite'"):
        Classifier(ckpt, runtime="tflite")
    with pytest.raises(UserError, match="--reject needs a checkpoint with a novelty score"):
        Classifier({k: v for k, v in ckpt.items() if k != "novelty"}, reject=True)


def test_readme_api_lines_run_as_written(trained, images, tmp_path):
    """README's Python block (the API), run as a script where a user would run it."""
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (tmp_path / "models").mkdir()
    shutil.copy(trained["checkpoint"], tmp_path / "models" / "best_model.pth")
    Image.open(images[0]).convert("RGB").save(tmp_path / "photo.jpg")
    (tmp_path / "snippet.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    expected = Classifier.load(tmp_path / "models" / "best_model.pth").predict(str(tmp_path / "photo.jpg"))
    assert expected.label in run.stdout and "['cat', 'dog'] 32" in run.stdout


@pytest.mark.slow
def test_int8_export_is_loaded_by_the_api_inference_and_serve(trained, int8_model, images, capsys):
    checkpoint = int8_model.parent / "best_model.pth"
    float_clf, clf = Classifier.load(checkpoint), Classifier.load(checkpoint, runtime="onnx-int8")
    assert clf.runtime == "onnx-int8" and clf.runtime_note.startswith(f"onnxruntime INT8 ({int8_model}; at export on ")
    got, expected = clf.predict(images), float_clf.predict(images)
    assert sum(g.label == e.label for g, e in zip(got, expected)) >= len(images) - 1
    assert max(abs(g.confidence - e.confidence) for g, e in zip(got, expected)) < 0.1
    assert inference.main(["--image", str(images[0]), "--checkpoint", str(checkpoint), "--runtime", "onnx-int8",
                           "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["label"] == got[0].label and out.err.startswith("scoring with onnxruntime INT8 (")
    app = serve.create_app(load_checkpoint(checkpoint), runtime="onnx-int8", int8_model=int8_model)
    with TestClient(app) as c:
        assert c.get("/health").json()["runtime"] == "onnx-int8"
        answer = c.post("/predict", content=images[0].read_bytes()).json()[0]
    assert answer["label"] == got[0].label and answer["confidence"] == pytest.approx(got[0].confidence, abs=1e-4)
    # The file answers like export.py's float ONNX model to code that reads only its 'logits'.
    import onnxruntime
    session = onnxruntime.InferenceSession(str(int8_model), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()][:2] == ["logits", "penultimate"]
    assert session.run(["logits"], {"image": np.zeros((3, 1, 32, 32), np.float32)})[0].shape == (3, 2)


def quantized_weights(path: Path) -> dict[str, np.ndarray]:
    """The integer weights of every Conv and Gemm of an INT8 QDQ file, by node name."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    return {node.name: stored[producer[node.input[1]].input[0]] for node in graph.node
            if node.op_type in ("Conv", "Gemm") and node.input[1] in producer}


@pytest.mark.slow
def test_int8_weights_leave_no_int16_pair_sum_to_saturate(int8_model):
    """On AVX2 CPUs without VNNI onnxruntime sums uint8 x int8 products in pairs into int16: with 8-bit weights
    (up to 127) two bright pixels give 2 x 255 x 127 = 64,770 and saturate at 32,767, which wrecked the first
    convolution's output and with it the known/unknown verdicts. 7-bit weights (|w| <= 64) cannot pass it."""
    weights = quantized_weights(int8_model)
    assert len(weights) >= 5 and all(w.dtype == np.int8 for w in weights.values())  # the convolutions and the head
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights.values()) <= 64
    assert 2 * 255 * 64 <= 32767


@pytest.mark.slow
def test_int8_kernels_of_this_cpu_keep_the_verdicts_of_a_model_with_a_rotation_head(ckpt, int8_model):
    """The default model has a rotation head and a combined novelty score. INT8 as this CPU's fused integer
    kernels run it answers as the file's quantized arithmetic, computed operator by operator in float (no
    fusion), says: the same labels and known/unknown verdicts. Where the kernels saturate (AVX2 without VNNI,
    8-bit weights) the first convolution's output is clipped and the verdicts part ways."""
    import onnxruntime

    from model import has_rotation_head
    from prediction.checkpoint import model_from_checkpoint
    from prediction.predict import OnnxFeatures, predict_images

    model = model_from_checkpoint(ckpt)
    assert has_rotation_head(model) and ckpt["novelty"]["score"] == "combined"
    fused, exact = OnnxFeatures(int8_model), OnnxFeatures(int8_model)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    exact.session = onnxruntime.InferenceSession(str(int8_model), options, providers=["CPUExecutionProvider"])
    train_images, val = quantize.int8_images(ckpt, None, 40, workers=0)
    images = list(torch.as_tensor(val.images)) + list(torch.as_tensor(train_images))
    got, expected = (predict_images(model, ckpt, images, runtime=r) for r in (fused, exact))
    assert [g.label for g in got] == [e.label for e in expected]
    assert [g.known for g in got] == [e.known for e in expected]
    assert max(abs(g.novelty_score - e.novelty_score) for g, e in zip(got, expected)) < 0.05


@pytest.mark.slow
def test_int8_file_of_another_checkpoint_or_none_is_refused(ckpt, int8_model, tmp_path):
    other = {**ckpt, "model_state": {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model_state"].items()}}
    assert fingerprint_of(other) != fingerprint_of(ckpt) == fingerprint_of(load_checkpoint(int8_model.parent /
                                                                                          "best_model.pth"))
    with pytest.raises(UserError, match=r"model\.int8\.onnx was not made from this checkpoint .*write it again with "
                                        r"`python export.py --checkpoint CHECKPOINT --format onnx-int8 --out "):
        Classifier(other, runtime="onnx-int8", int8_model=int8_model)
    save_checkpoint(ckpt, tmp_path / "best_model.pth")
    with pytest.raises(UserError, match=r"no INT8 model at .*model\.int8\.onnx: write it with"):
        Classifier.load(tmp_path / "best_model.pth", runtime="onnx-int8")
    assert serve.main(["--checkpoint", str(tmp_path / "best_model.pth"), "--runtime", "onnx-int8",
                       "--workers", "2"]) == 2  # refused before any worker starts


@pytest.mark.slow
def test_int8_that_loses_too_much_accuracy_is_not_written_and_the_float_model_is_kept(trained, tmp_path,
                                                                                       monkeypatch, capsys):
    real = quantize.compare

    def worse(*args, **kwargs):
        check = real(*args, **kwargs)
        return quantize.Int8Check(check.images, 0.5, check.float_accuracy, check.float_accuracy - 0.2, None)

    stale = tmp_path / "model.int8.onnx"
    stale.write_bytes(b"an older export")
    monkeypatch.setattr(quantize, "compare", worse)
    assert export.main(["--checkpoint", str(trained["checkpoint"]), "--format", "onnx-int8", "--out",
                        str(tmp_path / "model"), "--calibration", "20", "--workers", "0"]) == 1
    out = capsys.readouterr()
    assert not stale.exists() and not (tmp_path / "model.int8.onnx.partial").exists()
    assert (tmp_path / "model.onnx").is_file() and f"wrote {tmp_path / 'model.onnx'}" in out.out
    assert "(-20.00 points)" in out.out and "INT8 not written: it loses more than --int8-tolerance 0.5 points of " \
        f"val accuracy; kept the float model {tmp_path / 'model.onnx'}" in out.err


def test_int8_export_needs_data_it_can_read(trained, tmp_path):
    ckpt = load_checkpoint(trained["checkpoint"])
    no_data = {**ckpt, "config": {**ckpt["config"], "data": ""}}
    save_checkpoint(no_data, tmp_path / "c.pth")
    assert export.main(["--checkpoint", str(tmp_path / "c.pth"), "--format", "onnx-int8",
                        "--out", str(tmp_path / "m")]) == 2
    with pytest.raises(UserError, match="the checkpoint does not say which data it trained on: give it with --data DIR"):
        export.export(no_data, tmp_path / "m", ["onnx-int8"])
    assert not (tmp_path / "m.int8.onnx").exists() and not (tmp_path / "m.json").exists()


def test_calibration_reader_feeds_normalized_batches(ckpt):
    images = torch.randint(0, 256, (70, 1, 32, 32), dtype=torch.uint8)
    reader = quantize.calibration_reader(images, ckpt["normalization"])
    batches = iter(reader.get_next, None)
    sizes = [b["image"].shape[0] for b in batches]
    assert sizes == [32, 32, 6]
    first = quantize.calibration_reader(images[:1], {"mean": 0.5, "std": 0.5}).get_next()["image"]
    assert first.dtype == np.float32 and np.allclose(first, images[:1].numpy() / 255 * 2 - 1, atol=1e-6)
