"""evaluate.py: the metrics table, metrics.json and plots of a checkpoint on a split, and Grad-CAM."""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import inference
from core.common import UserError, save_atomic
from core.metrics import compute_metrics
from dataset import image_tensor
from loading.layout import layout_splits, read_layout
from model import build_model
from prediction import Classifier, predict
from prediction.checkpoint import load_checkpoint, model_from_checkpoint


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
    import train
    from conftest import train_args
    from loading.synthetic import make_synthetic

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
    x = image_tensor(next((trained["data"] / "test" / "cat").iterdir()), ckpt["image_size"], ckpt["channels"])
    name, layer = predict.pick_cam_layer(model, x)
    assert (name, layer) == ("layers.0", model.layers[0])  # 32 px: 8x8 cells there, 4x4 in the next stage
    cam = predict.gradcam(model, x, layer)
    assert cam.shape == (ckpt["image_size"], ckpt["image_size"])
    assert cam.min() == 0 and cam.max() == 1 and cam.std() > 0.05
    assert not layer._forward_hooks  # the hook is removed again
    assert not torch.equal(cam, predict.gradcam(model, x, layer, class_idx=1 - int(model(x).argmax())))


def test_gradcam_of_the_default_model_at_64_px_has_at_least_8x8_cells():
    torch.manual_seed(1)  # an untrained model whose maps are not all 0 (ReLU can zero an untrained model's map)
    model = build_model("resnet_small", 2).eval()
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    result = predict.explain(model, x)
    assert result.layer == "layers.1" and result.cells == (8, 8)
    assert predict.gradcam_layer(model) is model.layers[1]
    assert result.cam.shape == (64, 64)
    coarse = predict.explain(model, x, "layers.3")
    assert coarse.cells == (2, 2) and result.cam.amax() > 0 and coarse.cam.amax() > 0

    def detail(cam: torch.Tensor) -> float:
        """What a 2x2 map, upsampled, misses of the map: ~0 for a map of 2x2 cells, large for finer ones."""
        smooth = F.interpolate(F.adaptive_avg_pool2d(cam[None, None], 2), size=64, mode="bilinear")[0, 0]
        return ((cam - smooth).abs().mean() / cam.abs().mean()).item()

    assert detail(result.cam) > 2 * detail(coarse.cam)
    assert predict.explain(model, x, "layers.0").cells == (16, 16)


@pytest.mark.slow
def test_gradcam_finds_the_stages_of_torchvision_resnets():
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1, image_size=64).eval()
    assert predict.pick_cam_layer(model, torch.randn(1, 1, 64, 64)) == ("layer3", model.layer3)  # 8x8
    assert predict.pick_cam_layer(model, torch.randn(1, 1, 48, 40)) == ("layer2", model.layer2)  # 12x10
    assert predict.pick_cam_layer(model, torch.randn(1, 1, 48, 40), "layer4") == ("layer4", model.layer4)
    assert predict.gradcam_layer(model) is model.layer3  # the one-argument call: for 64x64 input
    cam = predict.gradcam(model, torch.randn(1, 1, 48, 40), model.layer4, class_idx=2)
    assert cam.shape == (48, 40) and cam.min() == 0 and cam.max() == 1


def test_cam_layer_that_is_not_there_or_not_a_feature_map_is_refused():
    model = build_model("resnet_small", 2, width=8).eval()
    x = torch.zeros(1, 1, 64, 64)
    with pytest.raises(UserError, match=r"'layer4' is not a layer of this SmallResNet; its stages: layers.0, "
                                        r"layers.1, layers.2, layers.3 \(or auto\)"):
        predict.explain(model, x, "layer4")
    with pytest.raises(UserError, match="feature map"):
        predict.explain(model, x, "fc")


@pytest.mark.slow
def test_mirror_averaged_gradcam_of_a_mirrored_image_is_the_mirrored_map():
    torch.manual_seed(1)
    model = build_model("resnet_small", 3, width=8).eval()
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    plain, mirrored = predict.explain(model, x, tta=True), predict.explain(model, x.flip(-1), tta=True)
    assert plain.class_idx == mirrored.class_idx
    assert torch.allclose(plain.cam.flip(-1), mirrored.cam, atol=1e-5)
    assert not torch.allclose(predict.explain(model, x).cam, plain.cam, atol=1e-3)  # tta changes the map


@pytest.mark.slow
@pytest.mark.parametrize("tta", ["--tta", "--no-tta"])
def test_gradcam_prints_the_label_and_confidence_inference_prints(trained, tmp_path, capsys, tta):
    # The toy model answers ~0.50 for every image; a random head with larger weights gives confidences that differ
    # from image to image and with the mirror, and a temperature that is not 1 checks that it is applied.
    raw = load_checkpoint(trained["checkpoint"])
    w = raw["model_state"]["fc.weight"]
    g = torch.Generator().manual_seed(0)
    raw["model_state"]["fc.weight"] = torch.randn(w.shape, generator=g) * w.abs().mean() * 20
    raw["temperature"] = 2.0
    save_atomic(raw, tmp_path / "sharp.pth")
    images = [str(p) for p in sorted((trained["data"] / "test").rglob("*.png"))]
    ckpt = ["--checkpoint", str(tmp_path / "sharp.pth"), tta]
    assert inference.main(["--image", *images, *ckpt]) == 0
    expected = capsys.readouterr().out.splitlines()
    assert evaluate.main(["--gradcam", *images, "--out-dir", str(tmp_path), *ckpt]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Grad-CAM on layers.0 (8x8 cells at 32x32 input), tta {tta == '--tta'}"
    assert [line.split("  -> ")[0] for line in lines[1:]] == expected
    assert len({line.split()[2] for line in expected}) > 2  # confidences that differ, so a mismatch would show
    # The exact probabilities too, not only their two printed decimals.
    model = model_from_checkpoint(raw)
    for row in inference.classify([Path(p) for p in images], Classifier(raw, tta=tta == "--tta")):
        x = image_tensor(row["path"], raw["image_size"], raw["channels"])
        result = predict.explain(model, x, tta=tta == "--tta", temperature=raw["temperature"])
        assert [round(p, 4) for p in result.probabilities.tolist()] == list(row["probabilities"].values())


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
