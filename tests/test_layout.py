"""layout.py: datasets as people download them (split/class folders, wrappers, tables, names) into file lists."""
import io
import os
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.common import IMAGE_EXTENSIONS, UserError, is_hidden
from loading.carve import carve, carve_indices
from loading.layout import (EMPTY, LOOSE, NOT_IN_TRAIN, NOT_READ, SINGLE, UNPARSABLE, format_problems, layout_splits,
                            name_rule, read_layout, walk_files)
from loading.table import CONFLICT, MISSING, NO_LABEL, SEVERAL, SKIPPED, UNLABELED, UNLABELED_FOLDERS, split_of

FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}


@lru_cache(maxsize=None)
def _image_bytes(suffix: str) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4), 128).save(buf, format=FORMATS[suffix.lower()])
    return buf.getvalue()


def make(root: Path, *files: str) -> Path:
    """Tiny images (by extension) or text files at the given paths under root."""
    for name in files:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() in FORMATS:
            p.write_bytes(_image_bytes(p.suffix))
        else:
            p.write_text("not an image")
    return root


def n_files(folder: str, prefix: str, n: int, start: int = 0, sep: str = ".", ext: str = ".jpg") -> list[str]:
    return [f"{folder}/{prefix}{sep}{i}{ext}" for i in range(start, start + n)]


def counts(items) -> dict:
    return dict(sorted(Counter(c for _, c in items).items()))


def rel(lay, split: str) -> list[str]:
    return [Path(p).relative_to(Path(lay.root).absolute()).as_posix() for p, _ in lay.items[split]]


# ---------------------------------------------------------------- class folders

def test_kaggle_cat_and_dog_repeated_wrapper_levels(tmp_path):
    data = make(tmp_path / "cat-and-dog",
                *n_files("training_set/training_set/cats", "cat", 10), *n_files("training_set/training_set/dogs", "dog", 8),
                *n_files("test_set/test_set/cats", "cat", 3, 100), *n_files("test_set/test_set/dogs", "dog", 2, 100))
    lay = read_layout(data)
    assert lay.classes == ["cats", "dogs"]
    assert counts(lay.items["train"]) == {"cats": 10, "dogs": 8} and counts(lay.items["test"]) == {"cats": 3, "dogs": 2}
    assert lay.carve == {"val": 0.2} and lay.problems == {}
    assert lay.description == ("layout: classes from folders in training_set/training_set/ (train) and "
                               "test_set/test_set/ (test); val = 20% of train (stratified, seed 0)")
    splits = layout_splits(lay)
    assert counts(splits["train"]) == {"cats": 8, "dogs": 6} and counts(splits["val"]) == {"cats": 2, "dogs": 2}
    assert splits["test"] == lay.items["test"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p, _ in splits["train"] + splits["val"])


def test_class_folders_without_split_carve_val_and_test_reproducibly(tmp_path):
    data = make(tmp_path / "animals", *n_files("cat", "c", 10), *n_files("dog", "d", 10), *n_files("horse", "h", 20))
    lay = read_layout(data, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert lay.classes == ["cat", "dog", "horse"] and lay.carve == {"val": 0.2, "test": 0.1}
    assert lay.description == ("layout: classes from folders in animals/ (no split folders); "
                               "val = 20% and test = 10% of train (stratified, seed 3)")
    splits = layout_splits(lay)
    assert [counts(splits[s]) for s in ("train", "val", "test")] == [
        {"cat": 7, "dog": 7, "horse": 14}, {"cat": 2, "dog": 2, "horse": 4}, {"cat": 1, "dog": 1, "horse": 2}]
    assert sorted(p for s in splits.values() for p, _ in s) == sorted(p for p, _ in lay.items["train"])
    assert layout_splits(read_layout(data, val_fraction=0.2, test_fraction=0.1, seed=3)) == splits
    assert layout_splits(read_layout(data, val_fraction=0.2, test_fraction=0.1, seed=4))["val"] != splits["val"]


@pytest.mark.parametrize("names", [("Training", "VALID", "Test"), ("trn", "dev", "eval"),
                                   ("train_set", "val_set", "testing"), ("Training Set", "Validation", "test-set")])
def test_split_folder_aliases(tmp_path, names):
    files = [f for name in names for c in ("a", "b") for f in n_files(f"{name}/{c}", c, 2)]
    lay = read_layout(make(tmp_path / "d", *files), test_fraction=0.1)
    assert lay.folders == dict(zip(("train", "val", "test"), names))
    assert [len(lay.items[s]) for s in ("train", "val", "test")] == [4, 4, 4] and lay.carve == {}
    assert [split_of(n) for n in names] == ["train", "val", "test"]


def test_single_wrapper_folder_and_non_split_folder_reported(tmp_path):
    data = make(tmp_path / "DATA", *n_files("dataset/training_set/a", "a", 3), *n_files("dataset/training_set/b", "b", 3),
                *n_files("dataset/validation/a", "a", 1, 9), *n_files("dataset/validation/b", "b", 1, 9),
                *n_files("dataset/extra", "x", 2), "dataset/README.txt")
    lay = read_layout(data)
    assert lay.folders == {"train": "dataset/training_set", "val": "dataset/validation"} and lay.carve == {}
    assert lay.description == ("layout: classes from folders in dataset/training_set/ (train) and "
                               "dataset/validation/ (val)")
    assert lay.problems == {NOT_READ: ["dataset/extra/ (2 images)"]}


def test_data_pointing_at_one_split_folder_of_classes(tmp_path):
    make(tmp_path / "catdog", *n_files("train/cat", "c", 5), *n_files("train/dog", "d", 5), *n_files("val/cat", "c", 2))
    lay = read_layout(tmp_path / "catdog" / "train")
    assert lay.classes == ["cat", "dog"] and len(lay.items["train"]) == 10 and lay.carve == {"val": 0.2}
    assert lay.description.startswith("layout: classes from folders in train/ (no split folders); val = 20%")


def test_class_named_like_a_split_among_class_folders(tmp_path):
    data = make(tmp_path / "vehicles", *n_files("bus", "b", 2), *n_files("car", "c", 2), *n_files("train", "t", 2))
    lay = read_layout(data)
    assert lay.classes == ["bus", "car", "train"] and lay.carve == {"val": 0.2}


def test_two_folders_that_both_look_like_train_stop_with_their_names(tmp_path):
    data = make(tmp_path / "d", *n_files("train/a", "a", 2), *n_files("training_set/a", "a", 2), *n_files("test/a", "a", 2))
    with pytest.raises(UserError, match=r"ambiguous layout .*train/ and training_set/ both look like the train split"):
        read_layout(data)


def test_hidden_entries_are_not_classes_and_other_files_are_reported(tmp_path):
    data = make(tmp_path / "d", *n_files("train/cat", "c", 2), *n_files("train/dog", "d", 2), "train/.DS_Store",
                "train/__MACOSX/cat/._c.0.jpg", ".ipynb_checkpoints/x.jpg", "train/.ipynb_checkpoints/y.jpg",
                "train/cat/.DS_Store", "train/cat/notes.txt", "train/stray.jpg", "train/empty/Thumbs.db")
    lay = read_layout(data)
    assert lay.classes == ["cat", "dog"]
    assert lay.problems == {LOOSE: ["train/stray.jpg"], SKIPPED: ["train/cat/notes.txt", "train/empty/Thumbs.db"],
                            EMPTY: ["train/empty/"]}


def test_val_classes_that_train_lacks_and_single_image_classes_are_reported(tmp_path):
    data = make(tmp_path / "d", *n_files("train/cat", "c", 3), *n_files("train/dog", "d", 1),
                *n_files("val/cat", "c", 1, 50), *n_files("val/horse", "h", 2))
    lay = read_layout(data)
    assert lay.classes == ["cat", "dog"] and counts(lay.items["val"]) == {"cat": 1}
    assert lay.problems == {NOT_IN_TRAIN: ["val: horse (2 images)"], SINGLE: ["dog"]}


def test_classes_subset_and_an_unknown_class(tmp_path):
    data = make(tmp_path / "d", *n_files("a", "a", 2), *n_files("b", "b", 2), *n_files("c", "c", 2))
    lay = read_layout(data, classes=["c", "a"])
    assert lay.classes == ["a", "c"] and counts(lay.items["train"]) == {"a": 2, "c": 2}
    with pytest.raises(UserError, match=r"--classes zebra not found in the data \(it has: a, b, c\)"):
        read_layout(data, classes=["zebra"])


def test_split_the_caller_needs_must_exist(tmp_path):
    data = make(tmp_path / "d", *n_files("test_set/a", "a", 2), *n_files("test_set/b", "b", 2))
    with pytest.raises(UserError, match=r"no train images in .*found test_set/ \(test\); a train split is a folder "
                                        r"named train\|training\|training_set\|train_set\|trn"):
        read_layout(data)
    assert len(read_layout(data, need="test").items["test"]) == 4


# ---------------------------------------------------------------- what cannot train

def test_flat_folder_without_labels_says_which_flag_to_use(tmp_path):
    data = make(tmp_path / "dogs-vs-cats", *n_files("train", "cat", 2), *n_files("train", "dog", 2), "labels.csv")
    with pytest.raises(UserError, match=r"holds 4 images and no class folders.*cat\.0\.jpg\), add --labels-from-name"
                                        r".*add --labels .*labels\.csv"):
        read_layout(data)


def test_one_class_folder_is_refused_with_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"found 1 class \(cat\); a classifier needs at least 2: put each class"):
        read_layout(make(tmp_path / "d", *n_files("train/cat", "c", 3)))
    with pytest.raises(UserError, match=r"no labelled images: no image files"):
        read_layout(make(tmp_path / "e", "train/cat/notes.txt"))
    with pytest.raises(UserError, match="no dataset folder at"):
        read_layout(tmp_path / "missing")


@pytest.mark.parametrize("val, test", [(1.0, 0.0), (0.6, 0.5), (-0.1, 0.0)])
def test_bad_fractions(tmp_path, val, test):
    with pytest.raises(UserError, match="must each lie in"):
        read_layout(make(tmp_path / "d", *n_files("a", "a", 2), *n_files("b", "b", 2)), val_fraction=val, test_fraction=test)


# ---------------------------------------------------------------- labels in file names

@pytest.mark.parametrize("name, label", [("cat.0.jpg", "cat"), ("dog.12499.jpg", "dog"), ("Abyssinian_12.jpg", "Abyssinian"),
                                         ("great_pyrenees_158.jpg", "great_pyrenees"), ("Cat1.jpg", "Cat"),
                                         ("golden retriever 7.png", "golden retriever"), ("x-2.PNG", "x"),
                                         ("123.jpg", None), ("cat.jpg", None), ("cat_2_b.jpg", None)])
def test_default_name_rule(name, label):
    assert name_rule()(name) == label


def test_kaggle_dogs_vs_cats_labels_from_names(tmp_path):
    data = make(tmp_path / "dogs-vs-cats", *n_files("train", "cat", 5), *n_files("train", "dog", 5, 12495),
                "train/cat.jpg", "train/notes.txt", *n_files("test1", "", 3, 1, sep=""), "sampleSubmission.csv")
    lay = read_layout(data, labels_from_name=True)
    assert lay.classes == ["cat", "dog"] and counts(lay.items["train"]) == {"cat": 5, "dog": 5}
    assert lay.description == ("layout: labels from file names (the name before its number) in train/ (train); "
                               "val = 20% of train (stratified, seed 0)")
    assert lay.problems == {NOT_READ: ["test1/ (3 images)"], SKIPPED: ["train/notes.txt"], UNPARSABLE: ["train/cat.jpg"]}


def test_oxford_pets_style_names_in_one_folder(tmp_path):
    data = make(tmp_path / "pets", "images/Abyssinian_1.jpg", "images/Abyssinian_12.jpg",
                "images/great_pyrenees_158.jpg", "images/great_pyrenees_2.jpg", "images/great_pyrenees_3.jpg")
    lay = read_layout(data, labels_from_name=True, val_fraction=0.5)
    assert lay.classes == ["Abyssinian", "great_pyrenees"]
    assert [counts(s) for s in layout_splits(lay).values()] == [{"Abyssinian": 1, "great_pyrenees": 2},
                                                                {"Abyssinian": 1, "great_pyrenees": 1}, {}]


def test_custom_name_pattern(tmp_path):
    data = make(tmp_path / "d", "train/img_cat_001.png", "train/img_dog_002.png", "train/img_dog_003.png", "train/other.png")
    lay = read_layout(data, name_pattern=r"^img_([a-z]+)_\d+")
    assert lay.classes == ["cat", "dog"] and lay.problems == {UNPARSABLE: ["train/other.png"], SINGLE: ["cat"]}
    assert "labels from file names (pattern '^img_([a-z]+)_\\\\d+')" in lay.description
    named = read_layout(data, name_pattern=r"(?P<prefix>img)_(?P<label>[a-z]+)_")
    assert named.classes == ["cat", "dog"]
    with pytest.raises(UserError, match="has 2 groups; it needs one group"):
        read_layout(data, name_pattern=r"(img)_([a-z]+)")
    with pytest.raises(UserError, match="is not a valid regular expression"):
        read_layout(data, name_pattern=r"([a-z]+")


def test_a_name_rule_that_finds_one_class_suggests_a_pattern(tmp_path):
    data = make(tmp_path / "d", "train/IMG_0001.jpg", "train/IMG_0002.jpg")
    with pytest.raises(UserError, match=r"found 1 class \(IMG\).*give --name-pattern REGEX"):
        read_layout(data, labels_from_name=True)


# ---------------------------------------------------------------- labels in a table

def test_kaggle_dog_breed_ids_without_extension(tmp_path):
    ids = [f"{i:04x}" for i in range(6)]
    data = make(tmp_path / "dog-breed", *[f"train/{i}.jpg" for i in ids], "test/ffff.jpg", "test/eeee.jpg")
    (data / "labels.csv").write_text("id,breed\n" + "".join(f"{i},{b}\n" for i, b in zip(ids, ["boxer", "pug"] * 3)))
    lay = read_layout(data, labels_file=data / "labels.csv")
    assert lay.classes == ["boxer", "pug"] and counts(lay.items["train"]) == {"boxer": 3, "pug": 3}
    assert lay.items["test"] == [] and lay.carve == {"val": 0.2}
    assert lay.problems == {UNLABELED_FOLDERS: ["test/ (2 images)"]}
    assert lay.description == ("layout: labels from labels.csv (columns id -> breed) for the files in train/ (train); "
                               "val = 20% of train (stratified, seed 0)")


@pytest.mark.parametrize("table_at, cell", [("data/labels.csv", "train/{}.png"),   # relative to DATA
                                            ("data/labels.csv", "{}.png"),         # relative to DATA/train
                                            ("data/labels.csv", "{}"),             # and without the extension
                                            ("meta/t.csv", "../data/train/{}"),    # relative to the table's folder
                                            ("meta/t.csv", "{abs}")])              # absolute
def test_table_cells_resolve_relative_to_table_data_or_train(tmp_path, table_at, cell):
    data = make(tmp_path / "data", *[f"train/p{i}.png" for i in range(4)])
    table = tmp_path / table_at
    table.parent.mkdir(exist_ok=True)
    rows = [cell.format(f"p{i}", abs=data / "train" / f"p{i}.png") + f",{'ab'[i % 2]}" for i in range(4)]
    table.write_text("filename,label\n" + "\n".join(rows) + "\n")
    lay = read_layout(data, labels_file=table)
    assert lay.classes == ["a", "b"] and rel(lay, "train") == [f"train/p{i}.png" for i in range(4)]
    assert [c for _, c in lay.items["train"]] == ["a", "b", "a", "b"] and lay.problems == {}


def test_split_column_tsv_and_spaces_in_class_names(tmp_path):
    data = make(tmp_path / "d", *[f"images/{i}.jpg" for i in range(8)])
    splits = ["train", "train", "train", "Train", "validation", "valid", "test", "holdout"]
    labels = ["Golden Retriever", "pug", "Golden Retriever", "pug", "Golden Retriever", "pug", "pug", "pug"]
    (data / "meta.tsv").write_text("image\tspecies\tsplit\n" + "".join(
        f"images/{i}.jpg\t{lab}\t{s}\n" for i, (lab, s) in enumerate(zip(labels, splits))))
    lay = read_layout(data, labels_file=data / "meta.tsv")
    assert lay.classes == ["Golden Retriever", "pug"] and lay.carve == {}
    assert [rel(lay, s) for s in ("train", "val", "test")] == [
        ["images/0.jpg", "images/1.jpg", "images/2.jpg", "images/3.jpg"], ["images/4.jpg", "images/5.jpg"],
        ["images/6.jpg"]]
    assert lay.problems == {"table rows with an unknown split": ["images/7.jpg (line 9: 'holdout')"]}
    assert "(columns image -> species, split from column split)" in lay.description


def test_a_fold_column_of_numbers_is_not_a_split(tmp_path):
    data = make(tmp_path / "d", *[f"train/{i}.jpg" for i in range(4)])
    (data / "folds.csv").write_text("file;class;fold\n" + "".join(f"{i}.jpg;{'xy'[i % 2]};{i}\n" for i in range(4)))
    lay = read_layout(data, labels_file=data / "folds.csv")
    assert len(lay.items["train"]) == 4 and lay.carve == {"val": 0.2} and "split from" not in lay.description


def test_missing_unlabeled_conflicting_and_empty_rows_are_named(tmp_path):
    data = make(tmp_path / "d", *[f"train/{n}.jpg" for n in ("a", "b", "c", "d", "e", "f", "g")], "train/h.png",
                "train/h.jpg", "train/i.jpg", "train/j.jpg", "train/readme.md")
    (data / "labels.csv").write_text("file_name,label\na,cat\nb,dog\nc,cat\nd,dog\nghost.jpg,cat\ne,cat\ne,dog\n"
                                     "f,\n,dog\nh,cat\na,cat\n")
    lay = read_layout(data, labels_file=data / "labels.csv")
    assert lay.classes == ["cat", "dog"] and rel(lay, "train") == ["train/a.jpg", "train/b.jpg", "train/c.jpg",
                                                                    "train/d.jpg"]
    assert lay.problems == {MISSING: ["ghost.jpg (line 6)"], NO_LABEL: ["f (line 9)"],
                            "table rows with no file": ["line 10"], SEVERAL: ["h (line 11: h.jpg, h.png)"],
                            CONFLICT: ["train/e.jpg (cat, dog)"], SKIPPED: ["train/readme.md"],
                            UNLABELED: ["train/g.jpg", "train/i.jpg", "train/j.jpg"]}
    assert format_problems(lay, limit=2).splitlines()[-1] == \
        "3 images with no label in the table: train/g.jpg, train/i.jpg, ... (1 more)"
    assert format_problems(lay).splitlines()[0] == "1 table rows whose file is missing: ghost.jpg (line 6)"


def test_label_columns_by_name_when_headers_are_unusual(tmp_path):
    data = make(tmp_path / "d", *[f"train/{i}.jpg" for i in range(4)])
    (data / "t.csv").write_text("Picture Name,Kind,breed\n" + "".join(f"{i}.jpg,{'ab'[i % 2]},x\n" for i in range(4)))
    with pytest.raises(UserError, match=r"cannot tell which columns .*Picture Name, Kind, breed.*--label-columns"):
        read_layout(data, labels_file=data / "t.csv")
    assert read_layout(data, labels_file=data / "t.csv", label_columns=["picture name", "Kind"]).classes == ["a", "b"]
    with pytest.raises(UserError, match=r"no column 'kind2' in"):
        read_layout(data, labels_file=data / "t.csv", label_columns=["Picture Name", "kind2"])
    with pytest.raises(UserError, match=r"found 1 class \(x\).*--label-columns FILE_COL LABEL_COL"):
        read_layout(data, labels_file=data / "t.csv", label_columns=["Picture Name", "breed"])


def test_a_table_that_names_no_file_here_and_conflicting_sources(tmp_path):
    data = make(tmp_path / "d", "train/a.jpg")
    (data / "t.csv").write_text("id,label\nzzz,cat\n")
    with pytest.raises(UserError, match=r"no labelled images: no row of .*t\.csv names a file .*\(1 table rows whose "
                                        r"file is missing: zzz \(line 2\); 1 folders with no labelled image: train/ \(1 image\)\)"):
        read_layout(data, labels_file=data / "t.csv")
    with pytest.raises(UserError, match="one way"):
        read_layout(data, labels_file=data / "t.csv", labels_from_name=True)
    with pytest.raises(UserError, match="no labels table at"):
        read_layout(data, labels_file=data / "nope.csv")


# ---------------------------------------------------------------- carving

def test_carve_keeps_class_shares_small_classes_in_every_split_and_uses_every_index_once():
    labels = [0] * 100 + [1] * 3
    parts = carve_indices(labels, [0.7, 0.15, 0.15], seed=0)
    assert [[sum(labels[i] == k for i in p) for k in (0, 1)] for p in parts] == [[70, 1], [15, 1], [15, 1]]
    assert [len(p) for p in carve_indices(labels, [0.8, 0.2], seed=0)] == [82, 21]
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        labels = torch.randint(0, 4, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
        ratios = [[0.8, 0.2], [0.7, 0.2, 0.1], [0.5, 0.25, 0.25]][trial % 3]
        ours = carve_indices(labels, ratios, seed=trial)
        assert sorted(i for p in ours for i in p) == list(range(len(labels)))
        for c, n in Counter(labels).items():  # largest remainder: each class's count within 1 of its share
            got = [sum(labels[i] == c for i in p) for p in ours]
            assert sum(got) == n and all(abs(k - n * r) < 1 + (n > 1) for k, r in zip(got, ratios)), (got, n, ratios)
        assert ours == carve_indices(labels, ratios, seed=trial)


def test_carve_on_items_is_stratified_and_seeded():
    items = [(f"/x/{c}{i}.jpg", c) for c in ("cat", "dog") for i in range(10)] + [("/x/solo.jpg", "owl")]
    a = carve(items, {"val": 0.2, "test": 0.1}, seed=0)
    assert [counts(a[s]) for s in ("train", "val", "test")] == [{"cat": 7, "dog": 7, "owl": 1},
                                                                {"cat": 2, "dog": 2}, {"cat": 1, "dog": 1}]
    assert a == carve(items, {"val": 0.2, "test": 0.1}, seed=0) and a != carve(items, {"val": 0.2, "test": 0.1}, seed=1)
    assert a["val"] == sorted(a["val"], key=items.index)  # stable order: as in the input


def test_paths_are_absolute_but_keep_a_symlinked_data_folder_as_given(tmp_path):
    real = make(tmp_path / "real", *n_files("a", "a", 2), *n_files("b", "b", 2))
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    lay = read_layout(tmp_path / "link")
    assert [p for p, _ in lay.items["train"]][0] == str(tmp_path / "link" / "a" / "a.0.jpg")


def test_a_table_without_split_column_takes_the_split_from_the_folder(tmp_path):
    data = make(tmp_path / "d", "train/1.jpg", "train/2.jpg", "val/3.jpg", "val/4.jpg")
    (data / "labels.csv").write_text("path,label\ntrain/1.jpg,x\ntrain/2.jpg,y\nval/3.jpg,x\nval/4,y\n")
    lay = read_layout(data, labels_file=data / "labels.csv")
    assert [rel(lay, s) for s in ("train", "val")] == [["train/1.jpg", "train/2.jpg"], ["val/3.jpg", "val/4.jpg"]]
    assert lay.carve == {} and lay.problems == {}


def _os_walk_files(d: Path) -> tuple[list[str], list[str]]:
    """The listing walk_files replaces (os.walk following links, sorted, hidden entries left out), as a reference."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        dirnames[:] = sorted(n for n in dirnames if not is_hidden(n))
        for n in sorted(filenames):
            if not is_hidden(n):
                p = Path(dirpath) / n
                (images if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(str(p))
    return images, others


def test_walk_files_lists_what_os_walk_lists_in_its_order(tmp_path):
    root = make(tmp_path / "d", "z.jpg", "a.PNG", "sub/b.jpg", "sub/deeper/c.jpeg", "sub/x.txt", ".DS_Store",
                "notes.txt", ".hidden/e.jpg", "__MACOSX/f.jpg", "b/g.jpg", "h.", "Thumbs.db", "i.webp", "j.jpg.bak")
    (tmp_path / "elsewhere").mkdir()
    make(tmp_path / "elsewhere", "m.jpg", "dir/n.jpg")
    (root / "link.jpg").symlink_to(tmp_path / "elsewhere" / "m.jpg")
    (root / "linkdir").symlink_to(tmp_path / "elsewhere" / "dir", target_is_directory=True)  # entered
    (root / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    images, others = walk_files(str(root))
    assert (images, others) == _os_walk_files(root)
    assert [Path(p).relative_to(root).as_posix() for p in images] == [
        "a.PNG", "broken.jpg", "i.webp", "link.jpg", "z.jpg", "b/g.jpg", "linkdir/n.jpg", "sub/b.jpg",
        "sub/deeper/c.jpeg"]
    assert walk_files(str(tmp_path / "missing")) == ([], [])


def test_a_folder_of_symlinked_class_folders_reads_like_the_folders_and_a_loop_is_refused(tmp_path):
    real = make(tmp_path / "real", "cat/1.jpg", "cat/2.jpg", "dog/3.jpg", "dog/4.jpg")
    links = tmp_path / "links"
    links.mkdir()
    for c in ("cat", "dog"):
        (links / c).symlink_to(real / c, target_is_directory=True)
    lay = read_layout(links, val_fraction=0)
    assert lay.classes == ["cat", "dog"] and len(lay.items["train"]) == 4
    (links / "cat" / "again").symlink_to(links, target_is_directory=True)  # real/cat/again -> links
    with pytest.raises(UserError, match="symlink loop: .*again"):
        walk_files(str(links))
