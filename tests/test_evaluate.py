import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import inference
import train
from config import UserError, parse_config
from conftest import train_args
from dataset import image_tensor, make_synthetic
from model import build_model, load_checkpoint, model_from_checkpoint, save_atomic

NAMES = ["a", "b", "c", "d"]


def fixed_confusion_matrix() -> torch.Tensor:
    """Rows true, columns predicted: 'c' is never predicted, 'd' has no images and is never predicted."""
    y_true = [0, 0, 0, 0, 1, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 0, 1, 1, 0, 1]
    return evaluate.confusion_matrix(torch.tensor(y_true), torch.tensor(y_pred), 4)


def test_confusion_matrix_counts():
    assert fixed_confusion_matrix().tolist() == [[3, 1, 0, 0], [1, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


def test_report_against_hand_computed_values_without_division_by_zero():
    r = evaluate.classification_report(fixed_confusion_matrix(), NAMES)
    a, b, c, d = (r["per_class"][n] for n in NAMES)
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((3 / 5, 3 / 4, 2 / 3, 4))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((2 / 4, 2 / 3, 4 / 7, 3))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 2)
    assert (d["precision"], d["recall"], d["f1"], d["support"]) == (0.0, 0.0, 0.0, 0)
    assert r["accuracy"] == pytest.approx(5 / 9)
    macro, weighted = r["macro avg"], r["weighted avg"]
    assert (macro["precision"], macro["recall"], macro["f1"]) == pytest.approx(
        ((3 / 5 + 2 / 4) / 4, (3 / 4 + 2 / 3) / 4, (2 / 3 + 4 / 7) / 4))
    assert (weighted["precision"], weighted["recall"], weighted["f1"]) == pytest.approx(
        ((4 * 3 / 5 + 3 * 2 / 4) / 9, 5 / 9, (4 * 2 / 3 + 3 * 4 / 7) / 9))
    assert macro["support"] == weighted["support"] == 9
    assert json.loads(json.dumps(r)) == r  # plain types, no NaN


def test_format_report_is_a_table_with_every_class():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    m = evaluate.compute_metrics(logits, torch.tensor([0, 1, 1]), ["cat", "dog"])
    text = evaluate.format_report(m)
    assert "precision" in text and "weighted avg" in text and "macro avg" in text
    dog = next(line for line in text.splitlines() if line.startswith("dog"))
    assert dog.split()[1:] == ["1.0000", "0.5000", "0.6667", "2"]
    assert "top5_accuracy" not in m


def test_topk_accuracy_and_most_confident_wrong():
    logits = torch.tensor([[5.0, 4, 0, 0, 0, 0], [0, 0, 0, 0, 0, 9], [3, 0, 0, 0, 0, 1], [0, 2, 0, 0, 0, 0]])
    labels = torch.tensor([1, 0, 0, 1])
    assert evaluate.topk_accuracy(logits, labels, 1) == pytest.approx(2 / 4)
    assert evaluate.topk_accuracy(logits, labels, 2) == pytest.approx(3 / 4)
    assert "top5_accuracy" in evaluate.compute_metrics(logits, labels, list("uvwxyz"))
    probs = logits.softmax(1)
    assert evaluate.most_confident_wrong(probs, labels, 10).tolist() == [1, 0]
    assert evaluate.most_confident_wrong(probs, labels, 1).tolist() == [1]


def test_expected_calibration_error_hand_computed():
    probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.65, 0.35], [0.25, 0.75]])
    labels = torch.tensor([0, 1, 0, 1])  # right, wrong, right, right; each in its own bin of 10
    assert evaluate.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(
        (0.05 + 0.85 + 0.35 + 0.25) / 4)
    # One bin holding 0.85 and 0.65 confidence, half right: |0.5 - 0.75| = 0.25.
    assert evaluate.expected_calibration_error(probs[1:3], labels[1:3], n_bins=1) == pytest.approx(0.25)


def test_temperature_scaling_keeps_argmax_and_lowers_nll_on_overconfident_logits():
    # 100 two-class predictions with a logit gap of 10 (99.995% sure) of which only 70 are right: the best
    # temperature makes sigmoid(10 / T) = 0.7, i.e. T = 10 / ln(7/3).
    labels = torch.zeros(100, dtype=torch.long)
    labels[70:] = 1
    logits = torch.tensor([[10.0, 0.0]]).repeat(100, 1)
    t = evaluate.fit_temperature(logits, labels)
    assert t == pytest.approx(10 / math.log(7 / 3), rel=1e-4)
    assert evaluate.nll(logits, labels, t) < evaluate.nll(logits, labels) - 1
    probs_after = torch.softmax(logits / t, 1)
    assert torch.equal(probs_after.argmax(1), logits.argmax(1))
    assert evaluate.expected_calibration_error(probs_after, labels) < \
        evaluate.expected_calibration_error(logits.softmax(1), labels)


def test_temperature_keeps_argmax_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=g) * 6
    labels = torch.randint(0, 5, (200,), generator=g)
    t = evaluate.fit_temperature(logits, labels)
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))
    assert evaluate.nll(logits, labels, t) <= evaluate.nll(logits, labels)
    assert evaluate.fit_temperature(logits[:0], labels[:0]) == 1.0


def test_plots_are_pngs_that_grow_with_the_number_of_classes(tmp_path):
    small = evaluate.save_figure(evaluate.plot_confusion_matrix(fixed_confusion_matrix(), NAMES), tmp_path / "s.png")
    g = torch.Generator().manual_seed(0)
    cm40 = evaluate.confusion_matrix(torch.randint(0, 40, (800,), generator=g),
                                     torch.randint(0, 40, (800,), generator=g), 40)
    names = [f"animal_{i:02d}" for i in range(40)]
    big = evaluate.save_figure(evaluate.plot_confusion_matrix(cm40, names), tmp_path / "big.png")
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    grid = evaluate.save_figure(evaluate.plot_gallery(images, ["x"] * 3), tmp_path / "g.png")
    empty = evaluate.save_figure(evaluate.plot_gallery(images[:0], []), tmp_path / "e.png")
    sizes = {}
    for p in (small, big, grid, empty):
        with Image.open(p) as im:
            im.verify()
            sizes[p.name] = im.size
    assert sizes["big.png"][0] > sizes["s.png"][0] and sizes["big.png"][1] > sizes["s.png"][1]


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
    assert set(m["per_class"]) == {"cat", "dog"} and 0 <= m["per_class"]["dog"]["recall"] <= 1
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
    assert "no val/ folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # A model trained with --classes cat dog ignores other folders, as training did; a missing class is an error.
    evaluate.check_classes(["cat", "dog", "horse"], ["cat", "dog"], data, subset_ok=True)
    with pytest.raises(UserError, match="missing from the data: dog"):
        evaluate.check_classes(["cat", "horse"], ["cat", "dog"], data, subset_ok=True)


def test_gradcam_has_the_input_size_and_is_not_constant(trained):
    ckpt = load_checkpoint(trained["checkpoint"])
    model = model_from_checkpoint(ckpt)
    x = image_tensor(next((trained["data"] / "test" / "cat").iterdir()), ckpt["image_size"], ckpt["channels"])
    name, layer = evaluate.pick_cam_layer(model, x)
    assert (name, layer) == ("layers.0", model.layers[0])  # 32 px: 8x8 cells there, 4x4 in the next stage
    cam = evaluate.gradcam(model, x, layer)
    assert cam.shape == (ckpt["image_size"], ckpt["image_size"])
    assert cam.min() == 0 and cam.max() == 1 and cam.std() > 0.05
    assert not layer._forward_hooks  # the hook is removed again
    assert not torch.equal(cam, evaluate.gradcam(model, x, layer, class_idx=1 - int(model(x).argmax())))


def test_gradcam_of_the_default_model_at_64_px_has_at_least_8x8_cells():
    torch.manual_seed(0)
    model = build_model("resnet_small", 2).eval()
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    result = evaluate.explain(model, x)
    assert result.layer == "layers.1" and result.cells == (8, 8)
    assert evaluate.gradcam_layer(model) is model.layers[1]
    assert result.cam.shape == (64, 64)
    # A map with 8x8 cells varies within each 16x16 quarter, which a 2x2 map upsampled never does much.
    quarters = result.cam.unfold(0, 32, 32).unfold(1, 32, 32).reshape(4, -1)
    assert (quarters.std(1) > 0.05).all()
    assert evaluate.explain(model, x, "layers.0").cells == (16, 16)
    assert evaluate.explain(model, x, "layers.3").cells == (2, 2)


def test_gradcam_finds_the_stages_of_torchvision_resnets():
    model = build_model("resnet18", 3, 1, image_size=64).eval()
    assert evaluate.pick_cam_layer(model, torch.randn(1, 1, 64, 64)) == ("layer3", model.layer3)  # 8x8
    assert evaluate.pick_cam_layer(model, torch.randn(1, 1, 48, 40)) == ("layer2", model.layer2)  # 12x10
    assert evaluate.pick_cam_layer(model, torch.randn(1, 1, 48, 40), "layer4") == ("layer4", model.layer4)
    assert evaluate.gradcam_layer(model) is model.layer3  # the one-argument call: for 64x64 input
    cam = evaluate.gradcam(model, torch.randn(1, 1, 48, 40), model.layer4, class_idx=2)
    assert cam.shape == (48, 40) and 0 <= cam.min() <= cam.max() <= 1


def test_cam_layer_that_is_not_there_or_not_a_feature_map_is_refused():
    model = build_model("resnet_small", 2, width=8).eval()
    x = torch.zeros(1, 1, 64, 64)
    with pytest.raises(UserError, match=r"'layer4' is not a layer of this SmallResNet; its stages: layers.0, "
                                        r"layers.1, layers.2, layers.3 \(or auto\)"):
        evaluate.explain(model, x, "layer4")
    with pytest.raises(UserError, match="feature map"):
        evaluate.explain(model, x, "fc")


def test_mirror_averaged_gradcam_of_a_mirrored_image_is_the_mirrored_map():
    torch.manual_seed(1)
    model = build_model("resnet_small", 3, width=8).eval()
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    plain, mirrored = evaluate.explain(model, x, tta=True), evaluate.explain(model, x.flip(-1), tta=True)
    assert plain.class_idx == mirrored.class_idx
    assert torch.allclose(plain.cam.flip(-1), mirrored.cam, atol=1e-5)
    assert not torch.allclose(evaluate.explain(model, x).cam, plain.cam, atol=1e-3)  # tta changes the map


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
    for row in inference.classify([Path(p) for p in images], raw, tta=tta == "--tta"):
        x = image_tensor(row["path"], raw["image_size"], raw["channels"])
        result = evaluate.explain(model, x, tta=tta == "--tta", temperature=raw["temperature"])
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


def test_training_fits_a_temperature_and_logs_the_confusion_matrix(tiny_data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train.run(parse_config(train_args(tiny_data, tmp_path, "--epochs", "2")))
    assert "calibration on val: temperature" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "models" / "best_model.pth")
    assert ckpt["temperature"] == summary["temperature"] != 1.0
    assert 0 <= summary["val_ece_after"] <= 1 and 0 <= summary["val_ece_before"] <= 1
    acc = EventAccumulator(str(tmp_path / "logs" / "t"))
    acc.Reload()
    assert "confusion_matrix/val" in acc.Tags()["images"]
    assert "acc/val" in acc.Tags()["scalars"]


def test_threshold_answers_unknown_with_the_stored_temperature(trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained["checkpoint"])
    ckpt["temperature"] = 1e4  # flattens every prediction to about 50/50
    path = tmp_path / "hot.pth"
    save_atomic(ckpt, path)
    folder = str(trained["data"] / "test")
    assert inference.main(["--image", folder, "--json", "--threshold", "0.6", "--checkpoint", str(path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(r["label"] == "unknown" and r["confidence"] < 0.51 for r in rows)
    assert inference.main(["--image", folder, "--json", "--threshold", "0.4", "--checkpoint", str(path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["label"] in ("cat", "dog") for r in rows)


def test_class_weights_change_the_loss(tmp_path):
    data = make_synthetic(tmp_path / "d", {"cat": 24, "dog": 8}, size=32, seed=3)
    losses = {}
    for mode in ("none", "auto"):
        assert train.main(train_args(data, tmp_path / mode, "--class-weights", mode, "--label-smoothing", "0")) == 0
        losses[mode] = torch.load(tmp_path / mode / "models" / "last.pth", weights_only=True)["history"][0]
    assert losses["auto"]["train_loss"] != pytest.approx(losses["none"]["train_loss"], rel=1e-3)
    # Inverse-frequency weights make a mistake on the rare class cost more.
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    w = train.class_weight_tensor(labels, 2, "auto")
    assert F.cross_entropy(logits, labels, weight=w) > F.cross_entropy(logits, labels)
