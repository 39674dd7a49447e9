"""evaluate.py: the metrics table, metrics.json and plots of a checkpoint on a split, and Grad-CAM."""
import csv
import json
import shutil

import pytest
import torch
from PIL import Image

import evaluate
from checkpoint import load_checkpoint, model_from_checkpoint
from common import UserError
from dataset import image_tensor
from layout import layout_splits, read_layout
from metrics import compute_metrics
from model import build_model


def test_format_report_is_a_table_with_every_class():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    m = compute_metrics(logits, torch.tensor([0, 1, 1]), ["cat", "dog"])
    text = evaluate.format_report(m)
    assert "precision" in text and "weighted avg" in text and "macro avg" in text
    dog = next(line for line in text.splitlines() if line.startswith("dog"))
    assert dog.split()[1:] == ["1.0000", "0.5000", "0.6667", "2"]
    assert "top5_accuracy" not in m


def test_main_writes_table_json_pngs_and_csv(trained, tmp_path, capsys):
    out = tmp_path / "curves"
    # No --data: the data the checkpoint was trained on, test split.
    assert evaluate.main(["--checkpoint", str(trained["checkpoint"]), "--out-dir", str(out), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "precision" in text and "weighted avg" in text and "ECE" in text
    m = json.loads((out / "metrics.json").read_text())
    n = sum(1 for _ in (trained["data"] / "test").rglob("*.png"))
    assert m["classes"] == ["cat", "dog"] and m["images"] == n
    assert sum(map(sum, m["confusion_matrix"])) == n
    assert m["temperature"] == pytest.approx(load_checkpoint(trained["checkpoint"])["temperature"])
    cm = m["confusion_matrix"]
    assert set(m["per_class"]) == {"cat", "dog"}
    assert m["per_class"]["dog"]["recall"] == pytest.approx(cm[1][1] / sum(cm[1]))
    assert m["accuracy"] == pytest.approx((cm[0][0] + cm[1][1]) / n)
    for name in ("confusion_matrix.png", "most_confident_wrong.png"):
        with Image.open(out / name) as im:
            im.verify()
    rows = list(csv.DictReader((out / "most_confident_wrong.csv").open()))
    wrong = n - round(m["accuracy"] * n)
    assert len(rows) == min(wrong, 32)
    assert all(r["true"] != r["predicted"] for r in rows)
    confs = [float(r["confidence"]) for r in rows]
    assert confs == sorted(confs, reverse=True)


def test_class_mismatch_and_missing_split_are_clear_errors(trained, tmp_path, capsys):
    data = tmp_path / "d"
    shutil.copytree(trained["data"] / "test", data / "test")
    (data / "test" / "dog").rename(data / "test" / "horse")
    ckpt = str(trained["checkpoint"])
    assert evaluate.main(["--data", str(data), "--checkpoint", ckpt, "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "missing from the data: dog" in err and "not in the checkpoint: horse" in err
    assert evaluate.main(["--data", str(data), "--split", "val", "--checkpoint", ckpt]) == 2
    assert "no val images in" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # A model trained with --classes cat dog ignores other folders, as training did; a missing class is an error.
    evaluate.check_classes(["cat", "dog", "horse"], ["cat", "dog"], data, subset_ok=True)
    with pytest.raises(UserError, match="missing from the data: dog"):
        evaluate.check_classes(["cat", "horse"], ["cat", "dog"], data, subset_ok=True)


@pytest.mark.slow
def test_evaluate_rebuilds_the_carved_val_the_model_was_selected_on(tmp_path, capsys):
    from conftest import train_args
    from dataset import make_synthetic
    import train

    data = make_synthetic(tmp_path / "gen", 14, size=32, splits=("train",)) / "train"  # class folders, no split
    assert train.main(train_args(data, tmp_path, "--val-fraction", "0.25", "--seed", "3", "--no-amp")) == 0
    ckpt_path = tmp_path / "models" / "best_model.pth"
    ckpt = load_checkpoint(ckpt_path)
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(ckpt_path), "--split", "val", "--out-dir", str(out), "--workers", "0",
                          "--no-tta" if not ckpt["tta"] else "--tta"]) == 0
    text = capsys.readouterr().out
    assert "layout: classes from folders in train/ (no split folders); val = 25% of train (stratified, seed 3)" in text
    m = json.loads((out / "metrics.json").read_text())
    val = layout_splits(read_layout(data, val_fraction=0.25, seed=3))["val"]
    assert m["images"] == len(val) == 6 and m["split"] == "val"
    assert m["accuracy"] == ckpt["metrics"]["val"]["acc"]  # the same images, the same model
    assert evaluate.main(["--checkpoint", str(ckpt_path), "--split", "test", "--out-dir", str(out)]) == 2
    assert "train.py --test-fraction 0.1" in capsys.readouterr().err


def test_gradcam_has_the_input_size_and_is_not_constant(trained):
    ckpt = load_checkpoint(trained["checkpoint"])
    model = model_from_checkpoint(ckpt)
    layer = evaluate.gradcam_layer(model)
    assert layer is model.layers[-1]
    x = image_tensor(next((trained["data"] / "test" / "cat").iterdir()), ckpt["image_size"], ckpt["channels"])
    cam = evaluate.gradcam(model, x, layer)
    assert cam.shape == (ckpt["image_size"], ckpt["image_size"])
    assert cam.min() == 0 and cam.max() == 1 and cam.std() > 0.05
    assert not layer._forward_hooks  # the hook is removed again
    assert not torch.equal(cam, evaluate.gradcam(model, x, layer, class_idx=1 - int(model(x).argmax())))


def test_gradcam_finds_layer4_of_torchvision_resnets():
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1, image_size=48).eval()
    assert evaluate.gradcam_layer(model) is model.layer4
    cam = evaluate.gradcam(model, torch.randn(1, 1, 48, 40), model.layer4, class_idx=2)
    assert cam.shape == (48, 40) and cam.min() == 0 and cam.max() == 1


def test_gradcam_command_writes_pngs_and_reports_bad_files(trained, tmp_path, capsys):
    img = next((trained["data"] / "test" / "dog").iterdir())
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    code = evaluate.main(["--gradcam", str(img), str(bad), "--checkpoint", str(trained["checkpoint"]),
                          "--out-dir", str(tmp_path / "cams")])
    captured = capsys.readouterr()
    assert code == 1 and "bad.jpg" in captured.err
    png = tmp_path / "cams" / f"gradcam_{img.stem}.png"
    assert str(png) in captured.out
    with Image.open(png) as im:
        im.verify()


def test_without_out_dir_it_writes_under_the_runs_own_curves_folder(trained, capsys):
    assert evaluate.main(["--checkpoint", str(trained["checkpoint"]), "--data", str(trained["data"]),
                          "--gallery", "2", "--workers", "0"]) == 0
    # The run was trained with --curves-dir OUT/curves --run-name t.
    run_curves = trained["out"] / "curves" / "t"
    assert (run_curves / "metrics.json").is_file() and (run_curves / "confusion_matrix.png").is_file()
    assert not (trained["out"] / "curves" / "metrics.json").exists()
