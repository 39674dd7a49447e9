"""split_dataset.py: reproducible, stratified train/val/test folders from any layout train.py reads."""
import os

import pytest

from conftest import table_labelled_set
from dataset import load_data
from loading.layout import read_layout
from loading.table import SKIPPED
from loading.synthetic import make_synthetic
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
    assert f"1 {SKIPPED}: a/notes.txt" in capsys.readouterr().out
    counts = {s: {c: len(list((dst / s / c).iterdir())) for c in "abc"} for s in ("train", "val", "test")}
    assert counts == {"train": {"a": 14, "b": 7, "c": 5}, "val": {"a": 3, "b": 2, "c": 1},
                      "test": {"a": 3, "b": 1, "c": 1}}
    names = sorted(p.name for p in dst.rglob("*.png"))
    assert names == sorted(p.name for p in flat.rglob("*.png"))  # each image in exactly one split
    assert len(list(flat.rglob("*.png"))) == 37  # copies: the originals stay
    lay = read_layout(dst)  # train.py reads the result
    train, val = load_data(lay, 16, 1)
    assert lay.classes == ["a", "b", "c"] and len(train.paths) == 26 and len(val.paths) == 6


def test_same_seed_same_split_other_seed_other_split(flat, tmp_path):
    for name, seed in (("x", 0), ("y", 0), ("z", 1)):
        split_dataset(flat, tmp_path / name, [0.7, 0.15, 0.15], seed)
    assert _files(tmp_path / "x") == _files(tmp_path / "y")
    assert _files(tmp_path / "x") != _files(tmp_path / "z")


def test_a_csv_source_becomes_canonical_class_folders(tmp_path, capsys):
    src = table_labelled_set(tmp_path / "breeds", 10, 16, ("big dog", "small dog"), "{:03d}")
    assert main([str(src), str(tmp_path / "out"), "--labels", str(src / "labels.csv"), "--ratios", "0.8", "0.2"]) == 0
    assert "layout: labels from labels.csv (columns id -> breed)" in capsys.readouterr().out
    counts = {s: {c: len(list((tmp_path / "out" / s / c).iterdir())) for c in ("big dog", "small dog")}
              for s in ("train", "val")}
    assert counts == {"train": {"big dog": 8, "small dog": 8}, "val": {"big dog": 2, "small dog": 2}}
    assert read_layout(tmp_path / "out").classes == ["big dog", "small dog"]


def test_split_folders_in_the_source_are_kept_and_only_the_missing_split_carved(tmp_path):
    src = make_synthetic(tmp_path / "src", 10, size=16, splits=("train", "test"))  # test: 2 per class
    counts = split_dataset(src, tmp_path / "out", [0.8, 0.2])
    assert counts["test"] == {"cat": 2, "dog": 2} and counts["val"] == {"cat": 2, "dog": 2}
    assert counts["train"] == {"cat": 8, "dog": 8}


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


def test_refuses_non_empty_destination_and_destination_inside_source(flat, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main([str(flat), str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main([str(flat), str(flat / "split")]) == 2
    assert "inside SRC" in capsys.readouterr().err
