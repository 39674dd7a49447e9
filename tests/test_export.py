"""export.py: TorchScript and ONNX files that compute what the PyTorch model computes."""
import json

import pytest
import torch

import export
import inference
from dataset import image_tensor
from prediction import Classifier
from prediction.checkpoint import load_checkpoint, model_from_checkpoint


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch_and_the_documented_preprocessing(trained, tmp_path):
    ckpt = load_checkpoint(trained["checkpoint"])
    result = export.export(ckpt, tmp_path / "model", ["torchscript"])
    assert result["torchscript_diff"] <= 1e-4
    scripted = torch.jit.load(result["torchscript"])
    pre = json.loads((tmp_path / "model.json").read_text())
    assert pre["classes"] == ["cat", "dog"] and pre["input_shape"] == [1, 1, 32, 32]
    # Follow the documented preprocessing by hand and get inference.py's answer.
    images = sorted((trained["data"] / "test").rglob("*.png"))[:4]
    expected = inference.classify(images, Classifier(ckpt, tta=False))
    for path, want in zip(images, expected):
        x = image_tensor(path, pre["input_shape"][-1], pre["input_shape"][1],
                         {"mean": pre["mean"], "std": pre["std"]})
        probs = torch.softmax(scripted(x) / pre["temperature"], 1)[0]
        assert pre["classes"][probs.argmax()] == want["label"]
        assert probs.max().item() == pytest.approx(want["confidence"], abs=1e-4)


@pytest.mark.slow
def test_onnx_matches_pytorch_for_any_batch_size(trained, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    ckpt = load_checkpoint(trained["checkpoint"])
    result = export.export(ckpt, tmp_path / "model", ["onnx"])
    assert result["onnx_diff"] <= 1e-4
    session = ort.InferenceSession(result["onnx"], providers=["CPUExecutionProvider"])
    model = model_from_checkpoint(ckpt)
    for n in (1, 5):
        x = export.sample_inputs(ckpt, n, seed=n)
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), model(x), atol=1e-4)


@pytest.mark.slow
def test_a_mismatch_is_reported(trained, tmp_path, monkeypatch):
    ckpt = load_checkpoint(trained["checkpoint"])
    monkeypatch.setattr(export, "check_torchscript", lambda *a: 0.5)
    with pytest.raises(export.UserError, match="differ from PyTorch"):
        export.export(ckpt, tmp_path / "model", ["torchscript"])


@pytest.mark.slow
def test_command_line_prints_preprocessing_and_errors_cleanly(trained, tmp_path, capsys):
    out = tmp_path / "m.v1"
    assert export.main(["--checkpoint", str(trained["checkpoint"]), "--format", "torchscript",
                        "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}.pt" in text and "x/255" in text and "grayscale, resized to 32x32" in text
    assert (tmp_path / "m.v1.pt").is_file() and (tmp_path / "m.v1.json").is_file()
    assert export.main(["--checkpoint", str(tmp_path / "none.pth")]) == 2
    assert "run train.py first" in capsys.readouterr().err
