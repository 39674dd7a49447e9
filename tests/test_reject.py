"""Images of no known class end to end: the novelty score and threshold train.py stores, inference.py --reject,
evaluate.py --unknown-dir, older checkpoints without them, and left-out classes reported at the end of training."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import inference
import train
from config import NOVELTY_SCORES, TrainConfig
from conftest import load_folder, train_args
from core.common import UserError
from loading import synthetic
from loading.synthetic import make_synthetic
from prediction import Classifier
from prediction import novelty as nv
from prediction import predict
from prediction.checkpoint import load_checkpoint, model_from_checkpoint, novelty_of, save_checkpoint, with_novelty


def val_scores(ckpt: dict, data: Path) -> torch.Tensor:
    """The stored score of every val image, computed again from the checkpoint alone."""
    novelty = novelty_of(ckpt)
    val = load_folder(data / "val", ckpt["classes"], ckpt["image_size"], ckpt["channels"])
    model = model_from_checkpoint(ckpt)
    feats = predict.extract_features(model, val.images, tta=novelty["tta"], normalization=ckpt["normalization"])
    return nv.novelty_score(novelty["states"][novelty["score"]], feats)


def noise_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(folder / f"noise_{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB").save(paths[-1])
    return paths


def test_training_stores_the_score_and_a_val_threshold_that_load_with_weights_only(trained):
    raw = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)  # plain types and tensors only
    ckpt = load_checkpoint(trained["checkpoint"])
    novelty = novelty_of(ckpt)
    assert novelty["threshold"] == raw["novelty"]["threshold"] and novelty["score"] == nv.DEFAULT_SCORE == TrainConfig.novelty_score
    assert set(novelty["states"]) == set(NOVELTY_SCORES) - {"rotation"} and novelty["accept_rate"] == TrainConfig.accept_rate
    assert sum(nv.state_bytes(s) for s in novelty["states"].values()) < 10_000_000
    scores = val_scores(ckpt, trained["data"])
    share = nv.accepted(scores, novelty["threshold"]).double().mean().item()
    assert novelty["accept_rate"] <= share < novelty["accept_rate"] + 1 / len(scores) + 1e-9
    # the threshold is one of the val scores (fitted where training ran, recomputed here on the CPU: on a GPU the
    # float32 distances differ in the 6th-7th digit)
    assert torch.isclose(scores.double(), torch.tensor(novelty["threshold"]).double(), rtol=1e-5, atol=1e-6).any()


def test_default_score_in_config_is_the_measured_one():
    assert TrainConfig.novelty_score == nv.DEFAULT_SCORE
    with pytest.raises(UserError, match="--accept-rate"):
        TrainConfig(accept_rate=0.0)
    with pytest.raises(UserError, match="--novelty-score must be one of combined, msp, .* none, not 'odin'"):
        TrainConfig(novelty_score="odin")
    with pytest.raises(UserError, match="--novelty-score rotation needs the rotation head"):
        TrainConfig(novelty_score="rotation", rotation_weight=0)
    assert TrainConfig(novelty_score="rotation").rotation_weight > 0  # the default trains the head
    with pytest.raises(UserError, match=r"--rotation-share must be in \(0, 1\), not 1.0"):
        TrainConfig(rotation_share=1.0)
    assert TrainConfig(rotation_share=1.0, rotation_weight=0).rotation_share == 1.0  # no head: the share is not used
    assert TrainConfig(novelty_score="none").novelty_score == "none"


@pytest.fixture
def split_threshold(trained, tmp_path) -> tuple[Path, list[Path], dict]:
    """A copy of the trained checkpoint whose threshold falls between the scores of some known test images and
    some noise images, so that both verdicts occur: (checkpoint, images, {path: score})."""
    images = sorted((trained["data"] / "test" / "cat").glob("*.png"))[:3] + noise_images(tmp_path / "noise", 3)
    ckpt = load_checkpoint(trained["checkpoint"])
    scores = {r["path"]: r["novelty_score"] for r in inference.classify(images, Classifier(ckpt))}
    ordered = sorted(scores.values())
    threshold = (ordered[2] + ordered[3]) / 2
    path = tmp_path / "ckpt.pth"
    save_checkpoint(with_novelty(ckpt, {**novelty_of(ckpt), "threshold": threshold}), path)
    return path, images, scores


def test_reject_in_json_csv_and_text(split_threshold, tmp_path, capsys):
    path, images, scores = split_threshold
    threshold = novelty_of(load_checkpoint(path))["threshold"]
    out_csv = tmp_path / "p.csv"
    assert inference.main(["--image", *map(str, images), "--reject", "--json", "--csv", str(out_csv),
                           "--checkpoint", str(path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in images]
    for r in rows:
        assert r["novelty_score"] == pytest.approx(scores[r["path"]], abs=1e-3)
        assert r["known"] == (r["novelty_score"] <= threshold)
        assert (r["label"] == "unknown") == (not r["known"])
        assert r["label"] in ("cat", "dog", "unknown") and r["confidence"] == max(r["probabilities"].values())
    assert sum(r["known"] for r in rows) == 3  # the threshold splits the six scores in the middle
    table = list(csv.DictReader(out_csv.open()))
    assert [(t["label"], t["known"], float(t["novelty_score"])) for t in table] == \
           [(r["label"], str(r["known"]), r["novelty_score"]) for r in rows]

    rejected = next(r for r in rows if not r["known"])
    assert inference.main(["--image", rejected["path"], "--reject", "--checkpoint", str(path)]) == 0
    # One image alone and six in a batch give scores equal to float precision, not always to the last digit printed.
    line = re.fullmatch(r"unknown  (\S+)  novelty (\S+) no known class\n", capsys.readouterr().out)
    assert line and line[1] == f"{rejected['confidence']:.2f}"
    assert float(line[2]) == pytest.approx(rejected["novelty_score"], rel=1e-6, abs=0.011)
    kept = next(r for r in rows if r["known"])
    assert inference.main(["--image", kept["path"], "--reject", "--checkpoint", str(path)]) == 0
    line = re.fullmatch(rf"{kept['label']}  (\S+)  novelty (\S+) known\n", capsys.readouterr().out)
    assert line and line[1] == f"{kept['confidence']:.2f}"
    assert float(line[2]) == pytest.approx(kept["novelty_score"], rel=1e-6, abs=0.011)

    # without --reject the label is the class even for a rejected image; --threshold still means confidence
    assert inference.main(["--image", rejected["path"], "--json", "--checkpoint", str(path)]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["label"] in ("cat", "dog") and plain["known"] is False
    assert inference.main(["--image", kept["path"], "--reject", "--threshold", "1.0", "--json",
                           "--checkpoint", str(path)]) == 0
    strict = json.loads(capsys.readouterr().out)
    assert strict["label"] == "unknown" and strict["known"] is True and strict["confidence"] < 1.0


def test_the_score_ignores_a_tta_override(split_threshold):
    path, images, scores = split_threshold
    ckpt = load_checkpoint(path)
    for tta in (False, True):
        got = inference.classify(images, Classifier(ckpt, tta=tta))
        assert [r["novelty_score"] for r in got] == pytest.approx([scores[str(p)] for p in images], abs=1e-3)


def test_an_older_checkpoint_still_predicts_but_reject_says_retrain(trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained["checkpoint"])
    old = {k: v for k, v in ckpt.items() if k != "novelty"}
    path = tmp_path / "old.pth"
    save_checkpoint(old, path)
    img = next((trained["data"] / "test" / "dog").iterdir())
    assert inference.main(["--image", str(img), "--json", "--checkpoint", str(path)]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"path", "label", "confidence", "probabilities"}
    assert inference.main(["--image", str(img), "--reject", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --reject needs a checkpoint with a novelty score")
    assert "retrain" in err
    unknown = tmp_path / "u"
    noise_images(unknown, 2)
    assert evaluate.main(["--data", str(trained["data"]), "--checkpoint", str(path), "--unknown-dir", str(unknown),
                          "--out-dir", str(tmp_path / "e"), "--workers", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --unknown-dir needs a checkpoint with a novelty score")
    damaged = with_novelty(old, {"score": "knn", "states": {}})
    save_checkpoint(damaged, path)
    with pytest.raises(UserError, match="damaged novelty record"):
        load_checkpoint(path)


def test_evaluate_unknown_dir_writes_the_metrics_and_the_histogram(trained, tmp_path, capsys):
    unknown = synthetic.write_unknown_set(tmp_path / "unknown", count=18, size=40, seed=3)
    nested = unknown / "more" / "deeper"
    nested.mkdir(parents=True)
    for p in sorted(unknown.glob("*.png"))[:4]:
        shutil.copy(p, nested / f"copy_{p.name}")
    (unknown / "notes.txt").write_text("not an image")
    out = tmp_path / "eval"
    assert evaluate.main(["--data", str(trained["data"]), "--split", "test", "--checkpoint", str(trained["checkpoint"]),
                          "--unknown-dir", str(unknown), "--out-dir", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "unknown images: 22 from" in printed  # 18 flat + 4 in subfolders, the text file ignored
    m = json.loads((out / "metrics.json").read_text())["unknown"]
    assert set(m) == {"score", "known_images", "unknown_images", "auroc", "fpr_at_95_tpr", "known_rejected",
                      "unknown_accepted", "by_score", "by_folder", "command", "commit", "date", "machine"}
    assert (m["known_images"], m["unknown_images"]) == (len(load_folder(trained["data"] / "test", ["cat", "dog"],
                                                                         32).labels), 22)
    # every stored score; the four turns' is stored only when chosen
    assert m["score"] == nv.DEFAULT_SCORE and set(m["by_score"]) == set(NOVELTY_SCORES) - {"rotation"}
    assert all(set(r) == {"auroc", "fpr_at_95_tpr", "by_folder"} for r in m["by_score"].values())
    assert m["by_score"][m["score"]]["auroc"] == m["auroc"]
    assert m["by_score"][m["score"]]["fpr_at_95_tpr"] == m["fpr_at_95_tpr"]
    assert all(0.0 <= m[k] <= 1.0 for k in ("auroc", "fpr_at_95_tpr", "known_rejected", "unknown_accepted"))
    # the known share rejected is the test images' at the stored threshold
    ckpt = load_checkpoint(trained["checkpoint"])
    novelty = novelty_of(ckpt)
    test = load_folder(trained["data"] / "test", ckpt["classes"], ckpt["image_size"], ckpt["channels"])
    feats = predict.extract_features(model_from_checkpoint(ckpt), test.images, tta=novelty["tta"],
                                normalization=ckpt["normalization"])
    scores = nv.novelty_score(novelty["states"][novelty["score"]], feats)
    assert m["known_rejected"] == pytest.approx((~nv.accepted(scores, novelty["threshold"])).double().mean().item())
    assert (out / "unknown_scores.png").stat().st_size > 5000


def test_a_training_set_over_the_limit_fits_the_score_on_a_stratified_sample(tmp_path, capsys):
    data = make_synthetic(tmp_path / "data", 20, size=40, seed=3, splits=("train", "val"))
    out = tmp_path / "run"
    assert train.main(train_args(data, out, "--novelty-max-images", "9")) == 0
    assert ("novelty score combined: fitted on a stratified sample of 10 of the 40 train images "
            "(--novelty-max-images)") in capsys.readouterr().out  # 5 per class: 9 x 20/40, rounded up
    ckpt = load_checkpoint(out / "models" / "best_model.pth")
    novelty = novelty_of(ckpt)
    assert novelty["train_images"] == 10
    scores = val_scores(ckpt, data)  # the threshold is still chosen on every val image
    assert len(scores) == 10 and nv.accepted(scores, novelty["threshold"]).sum() == 10  # ceil(0.95 x 10)


@pytest.mark.slow
def test_left_out_classes_are_reported_as_unknown_and_the_threshold_takes_the_accept_rate(tmp_path, capsys):
    data = make_synthetic(tmp_path / "data", 20, size=40, seed=6, classes=("cat", "dog", "horse"),
                          splits=("train", "val"))
    out = tmp_path / "run"
    assert train.main(train_args(data, out, "--classes", "cat", "dog", "--accept-rate", "0.6", "--epochs", "2")) == 0
    printed = capsys.readouterr().out
    assert "left-out classes as unknown images (horse: 5 images)" in printed
    assert "novelty score combined: fitted on 40 train images in" in printed
    assert "(novelty score: " in printed.splitlines()[-1]  # the time it cost, in the summary line
    ckpt = load_checkpoint(out / "models" / "best_model.pth")
    assert ckpt["classes"] == ["cat", "dog"]
    novelty = novelty_of(ckpt)
    assert novelty["accept_rate"] == 0.6 and novelty["train_images"] == 40
    scores = val_scores(ckpt, data)  # the 10 cat and dog val images; no horse
    assert len(scores) == 10 and nv.accepted(scores, novelty["threshold"]).sum() == 6
