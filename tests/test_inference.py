import csv
import json

import pytest
import torch

import inference
from conftest import expected_answer
from prediction.checkpoint import load_checkpoint, save_checkpoint


def test_single_image_prints_label_and_confidence(trained, capsys):
    img = next((trained["data"] / "test" / "dog").iterdir())
    assert inference.main(["--image", str(img), "--checkpoint", str(trained["checkpoint"])]) == 0
    label, conf = expected_answer(load_checkpoint(trained["checkpoint"]), img)
    assert capsys.readouterr().out == f"{label}  {conf:.2f}\n"


def test_folder_json_and_csv(trained, tmp_path, capsys):
    folder = trained["data"] / "test"
    n = sum(1 for _ in folder.rglob("*.png"))
    out_csv = tmp_path / "p.csv"
    assert inference.main(["--image", str(folder), "--json", "--csv", str(out_csv),
                           "--checkpoint", str(trained["checkpoint"])]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == n
    for r in rows:
        assert r["label"] in ("cat", "dog")
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-3
        assert r["confidence"] == max(r["probabilities"].values())
    table = list(csv.DictReader(out_csv.open()))
    assert len(table) == n and set(table[0]) >= {"path", "label", "confidence", "cat", "dog"}


def test_glob_and_threshold_unknown(trained, capsys):
    pattern = str(trained["data"] / "test" / "cat" / "*.png")
    assert inference.main(["--image", pattern, "--threshold", "1.0", "--json",
                           "--checkpoint", str(trained["checkpoint"])]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(r["label"] == "unknown" for r in rows if r["confidence"] < 1.0)


def test_batch_answers_good_files_and_lists_bad_ones(trained, tmp_path, capsys):
    good = next((trained["data"] / "test" / "cat").iterdir())
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    code = inference.main(["--image", str(good), str(bad), str(tmp_path / "missing.png"),
                           "--checkpoint", str(trained["checkpoint"])])
    captured = capsys.readouterr()
    assert code == 1
    assert str(good) in captured.out
    assert "broken.jpg" in captured.err and "missing.png: file not found" in captured.err
    assert "2 of 3 images could not be read" in captured.err


def test_csv_columns_write_a_submission_with_the_file_stem_as_id(trained, tmp_path, capsys):
    folder = trained["data"] / "test"
    files = sorted(folder.rglob("*.png"))
    sub = tmp_path / "submission.csv"
    ckpt = str(trained["checkpoint"])
    assert inference.main(["--image", str(folder), "--csv", str(sub), "--csv-columns", "id,label",
                           "--checkpoint", ckpt]) == 0
    rows = list(csv.reader(sub.open()))
    assert rows[0] == ["id", "label"]
    answers = {f.stem: expected_answer(load_checkpoint(ckpt), f)[0] for f in files}
    assert {r[0]: r[1] for r in rows[1:]} == answers and len(rows) == len(files) + 1
    assert inference.main(["--image", str(files[0]), "--csv", str(sub), "--csv-columns", "id,dog",
                           "--checkpoint", ckpt]) == 0
    (head, (stem, p_dog)) = list(csv.reader(sub.open()))
    assert head == ["id", "dog"] and stem == files[0].stem and 0 <= float(p_dog) <= 1
    capsys.readouterr()
    assert inference.main(["--image", str(files[0]), "--csv", str(tmp_path / "x.csv"), "--csv-columns", "id,breed",
                           "--checkpoint", ckpt]) == 2
    assert "unknown column(s) breed; choose from id, path, label, confidence, error, novelty_score, known, cat, dog" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("setup,message", [
    ("no_checkpoint", "run train.py first"),
    ("missing_image", "file not found"),
    ("empty_folder", "no image files in folder"),
    ("bad_image", "not an image"),
    ("bad_threshold", "--threshold"),
    ("wrong_classes", "checkpoint weights do not fit arch 'resnet_small' with 3 classes"),
    ("wrong_arch", "checkpoint weights do not fit arch 'resnet18'"),
    ("not_a_checkpoint", "cannot read checkpoint"),
    ("code_in_checkpoint", "refusing to load"),
])


def test_errors_are_one_clear_line(trained, tmp_path, capsys, setup, message):
    ckpt = str(trained["checkpoint"])
    image = str(next((trained["data"] / "test" / "cat").iterdir()))
    extra = []
    if setup == "no_checkpoint":
        ckpt = str(tmp_path / "nothing.pth")
    elif setup == "missing_image":
        image = str(tmp_path / "nope.jpg")
    elif setup == "empty_folder":
        (tmp_path / "empty").mkdir()
        image = str(tmp_path / "empty")
    elif setup == "bad_image":
        (tmp_path / "x.png").write_text("hello")
        image = str(tmp_path / "x.png")
    elif setup == "bad_threshold":
        extra = ["--threshold", "2"]
    elif setup == "not_a_checkpoint":
        ckpt = str(tmp_path / "notes.pth")
        (tmp_path / "notes.pth").write_text("not a checkpoint")
    else:
        raw = torch.load(ckpt, weights_only=True)
        if setup == "wrong_classes":
            raw["classes"] = ["cat", "dog", "horse"]  # 3 names for a 2-logit head
        elif setup == "wrong_arch":
            raw["arch"] = "resnet18"
        else:
            raw["extra"] = Exception("an arbitrary object: unpickling it could run code")
        ckpt = str(tmp_path / f"{setup}.pth")
        torch.save(raw, ckpt)
    code = inference.main(["--image", image, "--checkpoint", ckpt, *extra])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err


def test_threshold_answers_unknown_with_the_stored_temperature(trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained["checkpoint"])
    ckpt["temperature"] = 1e4  # flattens every prediction to about 50/50
    path = tmp_path / "hot.pth"
    save_checkpoint(ckpt, path)
    folder = str(trained["data"] / "test")
    assert inference.main(["--image", folder, "--json", "--threshold", "0.6", "--checkpoint", str(path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(r["label"] == "unknown" and r["confidence"] < 0.51 for r in rows)
    assert inference.main(["--image", folder, "--json", "--threshold", "0.4", "--checkpoint", str(path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["label"] in ("cat", "dog") for r in rows)


def test_onnx_runtime_gives_the_answers_pytorch_gives(trained, capsys):
    folder = trained["data"] / "test"
    args = ["--image", str(folder), "--json", "--reject", "--checkpoint", str(trained["checkpoint"])]
    assert inference.main(args) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert inference.main(args + ["--runtime", "onnx"]) == 0
    out = capsys.readouterr()
    got = [json.loads(line) for line in out.out.splitlines()]
    assert out.err.startswith("scoring with onnxruntime (probabilities within ")
    assert [g["path"] for g in got] == [e["path"] for e in expected]
    for g, e in zip(got, expected):
        assert (g["label"], g["known"]) == (e["label"], e["known"])
        assert g["probabilities"] == pytest.approx(e["probabilities"], abs=1e-4)
        assert g["novelty_score"] == pytest.approx(e["novelty_score"], abs=2e-4)
