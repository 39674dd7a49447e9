"""Likely label errors before training (label_errors.py): folds, confident learning on given probabilities, and
the whole check on a tiny set with planted wrong labels, from check_data.py and train.py, and quarantine of the
listed files."""
from __future__ import annotations

import csv
import json
import shutil
import types

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import check_data
import train
from config import TrainConfig
from conftest import train_args
from model import fetch_pretrained
from quality import label_errors
from quality.label_errors import (confident_learning, fold_config, out_of_fold_probs, read_listed_paths,
                                  stratified_folds, train_split_of)
from training import loop
from training.loop import build_trainer, train_epochs


def test_stratified_folds_deal_each_class_evenly_and_repeat_with_the_seed():
    labels = torch.tensor([0] * 12 + [1] * 8 + [2] * 4)
    fold = stratified_folds(labels, 4, seed=0)
    for c, n in ((0, 12), (1, 8), (2, 4)):
        assert torch.bincount(fold[labels == c], minlength=4).tolist() == [n // 4] * 4
    assert torch.equal(fold, stratified_folds(labels, 4, seed=0))
    assert not torch.equal(fold, stratified_folds(labels, 4, seed=1))


def test_confident_learning_flags_images_whose_label_loses_to_a_class_over_its_threshold():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.8, 0.2],
                          [0.1, 0.9],   # labelled 0, class 1 at 0.9 >= class 1's threshold: flagged
                          [0.2, 0.8], [0.1, 0.9], [0.2, 0.8],
                          [0.6, 0.4]])  # labelled 1, class 0 at 0.6 < class 0's threshold (0.675): kept
    # thresholds: class 0 = mean(0.9, 0.9, 0.8, 0.1) = 0.675; class 1 = mean(0.8, 0.9, 0.8, 0.4) = 0.725
    found = confident_learning(probs, labels)
    assert [(f["index"], f["given"], f["suggested"]) for f in found] == [(3, 0, 1)]
    assert found[0]["confidence"] == pytest.approx(0.9) and found[0]["given_probability"] == pytest.approx(0.1)
    # the order is by margin: a clearer case first
    probs[7] = torch.tensor([0.95, 0.05])
    assert [f["index"] for f in confident_learning(probs, labels)] == [7, 3]


def planted(tmp_path, flips: int = 6, per_class: int = 48):
    """An easy set ('cat' = horizontal stripes, 'dog' = vertical ones, random period, phase and noise) with
    `flips` cat images moved into train/dog/: the wrong labels a check must find."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for split, n in (("train", per_class), ("val", 8)):
        for k, name in enumerate(("cat", "dog")):
            (data / split / name).mkdir(parents=True)
            for i in range(n):
                period, phase = rng.uniform(4, 10), rng.uniform(0, 10)
                wave = 127 + 100 * np.sin((np.arange(40) + phase) * 2 * np.pi / period)
                img = np.tile(wave[:, None] if k == 0 else wave[None, :], (1, 40) if k == 0 else (40, 1))
                img = np.clip(img + rng.normal(0, 30, (40, 40)), 0, 255).astype(np.uint8)
                Image.fromarray(img, "L").save(data / split / name / f"{name}_{i:04d}.png")
    moved = []
    for i in range(flips):
        src = data / "train" / "cat" / f"cat_{i:04d}.png"
        shutil.move(src, data / "train" / "dog" / src.name)
        moved.append(f"train/dog/{src.name}")
    return data, moved


# The toy folds (16 epochs on 72 images each) learn the shapes only without the random zoom, as before it existed.
FAST = ["--image-size", "32", "--width", "8", "--batch-size", "16", "--workers", "0", "--device", "cpu",
        "--label-error-epochs", "16", "--max-scale", "0"]


@pytest.mark.slow
def test_check_data_finds_planted_wrong_labels_and_quarantine_moves_the_listed_files(tmp_path, capsys):
    data, moved = planted(tmp_path)
    out = tmp_path / "report"
    assert check_data.main([str(data), "--label-errors", "--out-dir", str(out), "--cache-dir", "",
                            "--json", *FAST]) == 0
    report = json.loads(capsys.readouterr().out)  # the progress lines went to stderr
    rows = list(csv.DictReader(open(out / "label_errors.csv")))
    assert report["label_errors"]["found"] == [{**r, "confidence": float(r["confidence"]),
                                                "given_probability": float(r["given_probability"])} for r in rows]
    found = {r["path"] for r in rows}
    assert len(found & set(moved)) >= 5, rows  # measured: all 6 and 1 clean image (16 epochs of 4 folds on 96 images)
    assert len(found - set(moved)) <= 2, rows
    assert all(r["given"] == "dog" and r["suggested"] == "cat" for r in rows if r["path"] in moved)
    assert (out / "label_errors.png").stat().st_size > 0
    assert read_listed_paths(out / "label_errors.csv") == [r["path"] for r in rows]
    # quarantine the listed files: moved under the folder with their paths, nothing else
    held = tmp_path / "held"
    assert check_data.main([str(data), "--quarantine", str(held), "--listed", str(out / "label_errors.csv"),
                            "--workers", "0"]) == 0
    for path in found:
        assert (held / path).is_file() and not (data / path).exists()
    assert "quarantined" in capsys.readouterr().out
    # a list naming files that are no longer there moves nothing and says which
    assert check_data.main([str(data), "--quarantine", str(held), "--listed", str(out / "label_errors.csv"),
                            "--workers", "0"]) == 2
    assert "not under" in capsys.readouterr().err


def test_listed_needs_quarantine_and_a_path_column(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        check_data.main([str(tiny_data), "--listed", "x.csv"])
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,cat\n")
    assert check_data.main([str(tiny_data), "--quarantine", str(tmp_path / "q"), "--listed", str(bad)]) == 2
    assert "has no 'path' column" in capsys.readouterr().err


@pytest.mark.slow
def test_train_find_label_errors_reports_them_and_trains_on_every_image(tmp_path, capsys):
    data, moved = planted(tmp_path)
    assert train.main(train_args(data, tmp_path, "--find-label-errors", "--label-error-epochs", "16",
                                 "--batch-size", "16", "--max-scale", "0")) == 0
    out = capsys.readouterr().out
    assert "likely label errors:" in out and "data: 96 train" in out  # nothing was left out of training
    rows = list(csv.DictReader(open(tmp_path / "curves" / "label_errors.csv")))
    assert len({r["path"] for r in rows} & set(moved)) >= 4, rows  # measured: 5 of the 6


def test_with_weights_the_folds_start_from_them_and_predict_on_imagenet_normalized_input(tmp_path, monkeypatch,
                                                                                          capsys):
    """--weights (or --pretrained) reaches the label check: every fold's model starts from those weights, fed as
    train.py feeds them."""
    r18 = torchvision.models.resnet18(weights=None)
    torch.save(r18.state_dict(), tmp_path / "r18.pth")
    data, _ = planted(tmp_path, flips=2, per_class=8)
    cfg = TrainConfig(data=str(data), arch="resnet18", weights=str(tmp_path / "r18.pth"), image_size=32,
                      batch_size=8, workers=0, cache_dir="", device="cpu")
    _, split = train_split_of(cfg)
    fold_cfg = fold_config(cfg, epochs=0, seconds=0.0)
    t = build_trainer(fold_cfg, split, 2, torch.device("cpu"), None, fetch_pretrained(cfg))
    model, trained = train_epochs(t, split, fold_cfg)
    assert trained == 0
    assert torch.equal(model.conv1.weight, r18.conv1.weight.sum(1, keepdim=True))  # gray stem: RGB kernels summed
    assert torch.equal(model.layer4[1].conv2.weight, r18.layer4[1].conv2.weight)
    seen = []
    real = label_errors.predict_logits
    monkeypatch.setattr(label_errors, "predict_logits",
                        lambda *a, **kw: seen.append(kw["normalization"]) or real(*a, **kw))
    out = tmp_path / "report"
    assert check_data.main([str(data), "--label-errors", "--out-dir", str(out), "--cache-dir", "", "--workers", "0",
                            "--arch", "resnet18", "--weights", str(tmp_path / "r18.pth"), "--image-size", "32",
                            "--batch-size", "8", "--label-error-folds", "2", "--label-error-epochs", "1"]) == 0
    assert seen == [{"mean": [0.449], "std": [0.226]}] * 2  # ImageNet's, for gray input, in both folds
    printed = capsys.readouterr().out
    assert f"pretrained: {tmp_path / 'r18.pth'}" in printed and "likely label errors:" in printed
    assert (out / "label_errors.csv").is_file()


def test_a_budget_shares_the_time_between_the_folds_and_each_trains_the_epochs_that_fit(tmp_path, monkeypatch):
    """A clock that moves one second per training batch: each fold gets an equal share of the time left and
    trains as many epochs as fit in it (training/loop.py's planner), not the most it may (50); without a budget
    each trains `epochs`."""
    data, _ = planted(tmp_path, flips=0, per_class=8)
    cfg = TrainConfig(data=str(data), image_size=32, width=8, batch_size=8, workers=0, cache_dir="", device="cpu")
    _, split = train_split_of(cfg)  # 16 images: 8 in each of 2 folds, one batch an epoch
    ticks = [0.0]
    real_batches = loop.shard_batches

    def timed_batches(*a, **kw):
        for b in real_batches(*a, **kw):
            ticks[0] += 1.0
            yield b
    clock = types.SimpleNamespace(time=lambda: ticks[0], perf_counter=lambda: ticks[0])
    monkeypatch.setattr(loop, "shard_batches", timed_batches)
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(label_errors, "time", clock)
    optimizers, real_optimizer = [], loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", lambda *a: optimizers.append(real_optimizer(*a)) or optimizers[-1])
    probs, seconds, ran = out_of_fold_probs(split, 2, cfg, folds=2, epochs=50, report=lambda line: None, budget=12)
    assert ran == [6, 6] and seconds == 12.0 and probs.shape == (16, 2)
    assert [o.param_groups[0]["lr"] for o in optimizers] == [0.0, 0.0]  # each fold ended at the bottom of its schedule
    assert out_of_fold_probs(split, 2, cfg, folds=2, epochs=3, report=lambda line: None)[2] == [3, 3]
