"""split_dataset.py: reproducible, stratified train/val/test folders from a flat class-folder collection."""
import os

import pytest
import torch

from dataset import load_data, make_synthetic, stratified_split_k
from split_dataset import main, split_dataset


@pytest.fixture
def flat(tmp_path):
    """SRC/<class>/* with 20, 10 and 7 images, and a non-image file."""
    root = make_synthetic(tmp_path / "gen", {"a": 20, "b": 10, "c": 7}, size=16, splits=("train",))
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    return root / "train"


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_ratios_stratified_and_every_image_once(flat, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main([str(flat), str(dst), "--ratios", "0.7", "0.15", "0.15"]) == 0
    assert "left out 1 non-image file" in capsys.readouterr().out
    counts = {s: {c: len(list((dst / s / c).iterdir())) for c in "abc"} for s in ("train", "val", "test")}
    assert counts == {"train": {"a": 14, "b": 7, "c": 5}, "val": {"a": 3, "b": 2, "c": 1},
                      "test": {"a": 3, "b": 1, "c": 1}}
    names = sorted(p.name for p in dst.rglob("*.png"))
    assert names == sorted(p.name for p in flat.rglob("*.png"))  # each image in exactly one split
    assert len(list(flat.rglob("*.png"))) == 37  # copies: the originals stay
    train, val, classes = load_data(str(dst), None, 16, 1, 0.2, 0)  # train.py reads the result
    assert classes == ["a", "b", "c"] and len(train.paths) == 26 and len(val.paths) == 6


def test_same_seed_same_split_other_seed_other_split(flat, tmp_path):
    for name, seed in (("x", 0), ("y", 0), ("z", 1)):
        split_dataset(flat, tmp_path / name, [0.7, 0.15, 0.15], seed)
    assert _files(tmp_path / "x") == _files(tmp_path / "y")
    assert _files(tmp_path / "x") != _files(tmp_path / "z")


def test_k_way_split_keeps_class_shares_and_small_classes_in_every_split():
    labels = torch.tensor([0] * 100 + [1] * 3)
    parts = stratified_split_k(labels, [0.7, 0.15, 0.15], seed=0)
    assert [torch.bincount(labels[p], minlength=2).tolist() for p in parts] == [[70, 1], [15, 1], [15, 1]]
    assert sorted(torch.cat(parts).tolist()) == list(range(103))
    two = stratified_split_k(labels, [0.8, 0.2], seed=0)
    assert [len(p) for p in two] == [82, 21]


def test_link_and_move_modes(flat, tmp_path):
    split_dataset(flat, tmp_path / "linked", [0.5, 0.5], mode="link")
    linked = next((tmp_path / "linked").rglob("*.png"))
    original = flat / linked.parent.name / linked.name
    assert os.path.samefile(linked, original) and not (tmp_path / "linked" / "test").exists()
    split_dataset(flat, tmp_path / "moved", [0.5, 0.5], mode="move")
    assert not list(flat.rglob("*.png")) and len(list((tmp_path / "moved").rglob("*.png"))) == 37


@pytest.mark.parametrize("extra,message", [
    (["--ratios", "0.7", "0.2", "0.2"], "add up to 1"),
    (["--ratios", "1.2", "-0.2"], "between 0 and 1"),
    (["--ratios", "0.5", "0.2", "0.2", "0.1"], "2 (train val) or 3"),
])
def test_bad_ratios_are_user_errors(flat, tmp_path, capsys, extra, message):
    assert main([str(flat), str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and not (tmp_path / "out").exists()


def test_refuses_non_empty_destination_and_already_split_source(flat, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main([str(flat), str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main([str(flat.parent), str(tmp_path / "out")]) == 2  # gen/ holds train/: already split
    assert "already has train folders" in capsys.readouterr().err
    assert main([str(flat), str(flat / "split")]) == 2
    assert "inside SRC" in capsys.readouterr().err
