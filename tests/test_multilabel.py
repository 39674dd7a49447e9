"""Several tags per image: reading a table of tags (a column of tags or 0/1 columns, files found by a unique name
anywhere under DATA), the carve that spreads every tag, and the data report on tags."""
import csv
import json
from collections import Counter

import pytest
from PIL import Image

import check_data
from conftest import SHARED
from loading.carve import iterative_stratification, split_tags
from loading.layout import NO_TAG, SEVERAL, layout_splits, read_layout


def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (40, 40), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(folder / name)


def write_table(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def test_iterative_stratification_spreads_every_tag_in_the_ratios():
    tags = [{"a", "b"}] * 40 + [{"b"}] * 40 + [{"c"}] * 10 + [{"rare"}] * 5 + [set()] * 5
    parts = iterative_stratification(tags, [0.8, 0.2], seed=3)
    assert sorted(parts[0] + parts[1]) == list(range(100))
    val = Counter(t for i in parts[1] for t in tags[i])
    assert (val["a"], val["b"], val["c"], val["rare"]) == (8, 16, 2, 1)
    assert len(parts[1]) == 20
    assert parts == iterative_stratification(tags, [0.8, 0.2], seed=3)
    assert parts != iterative_stratification(tags, [0.8, 0.2], seed=4)


def test_a_table_of_tags_names_bare_files_in_a_folder_beside_it(tmp_path):
    data = tmp_path / "flickr"
    write_images(data / "images", [f"im{i}.jpg" for i in range(12)])
    write_images(data / "other", ["twice.jpg"])
    write_images(data / "images", ["twice.jpg"])
    rows = [[f"im{i}.jpg", ["sea sky", "dog", "sky  dog people"][i % 3]] for i in range(11)]
    rows += [["im11.jpg", ""], ["twice.jpg", "dog"]]
    write_table(data / "labels.csv", ["image", "tags"], rows)
    lay = read_layout(data, labels_file=data / "labels.csv", val_fraction=0.25)
    assert lay.multi_label and lay.classes == ["dog", "people", "sea", "sky"]
    assert "columns image -> tags (several tags per image, separated by spaces)" in lay.description
    assert "every tag spread by iterative stratification" in lay.description
    labels = dict((p.rsplit("/", 1)[1], c) for p, c in lay.items["train"])
    assert labels["im2.jpg"] == "dog|people|sky" and split_tags(labels["im0.jpg"]) == {"sea", "sky"}
    assert lay.problems[NO_TAG] == ["im11.jpg (line 13)"] and "twice.jpg" in lay.problems[SEVERAL][0]
    splits = layout_splits(lay)
    assert len(splits["train"]) + len(splits["val"]) == 11
    assert set().union(*(split_tags(c) for _, c in splits["val"])) == {"dog", "people", "sea", "sky"}


def test_zero_one_columns_are_tags_and_a_class_with_spaces_stays_one_label(tmp_path):
    data = tmp_path / "posters"
    write_images(data, [f"{i}.png" for i in range(6)])
    write_table(data / "train.csv", ["Id", "Genre", "Action", "Comedy", "Film Noir"],
                [[str(i), "['x']", str(i % 2), str((i + 1) % 2), str(int(i < 2))] for i in range(6)])
    lay = read_layout(data, labels_file=data / "train.csv", val_fraction=0.0)
    assert lay.multi_label and lay.classes == ["Action", "Comedy", "Film Noir"]
    assert "columns Id -> 3 tag columns of 0/1 (Action, ...)" in lay.description
    assert dict((p.rsplit("/", 1)[1], c) for p, c in lay.items["train"])["0.png"] == "Comedy|Film Noir"
    write_table(data / "breeds.csv", ["file", "breed"], [[f"{i}.png", ["golden retriever", "pug"][i % 2]]
                                                          for i in range(6)])
    lay = read_layout(data, labels_file=data / "breeds.csv", val_fraction=0.0)
    assert not lay.multi_label and lay.classes == ["golden retriever", "pug"]
    lay = read_layout(data, labels_file=data / "breeds.csv", val_fraction=0.0, multi_label=True)
    assert lay.multi_label and lay.classes == ["golden", "pug", "retriever"]


def test_the_data_report_counts_images_per_tag_and_names_rare_tags(tmp_path, capsys):
    data = tmp_path / "flickr"
    write_images(data / "images", [f"im{i}.jpg" for i in range(30)])
    write_table(data / "labels.csv", ["image", "tags"],
                [[f"im{i}.jpg", "people portrait" if i % 2 else "sea"] for i in range(29)] + [["im29.jpg", "owl"]])
    assert check_data.main([str(data), "--labels", str(data / "labels.csv"), "--json", "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["train"]["people"] + report["counts"]["val"]["people"] == 14
    tags = report["tags"]
    assert tags["images"] == 30 and tags["pairs"][0] == ["people", "portrait", 14]
    assert tags["rare_to_learn"] == ["owl"] and "owl" in tags["rare_to_measure"]
    assert any("too rare to learn well: owl" in w for w in report["warnings"])


@pytest.mark.skipif(not (SHARED / "data" / "mirflickr").is_dir(), reason="needs ../shared/data/mirflickr")
def test_mirflickr_reads_as_fourteen_tags_each_in_val():
    data = SHARED / "data" / "mirflickr"
    lay = read_layout(data, labels_file=data / "labels.csv")
    assert lay.multi_label and len(lay.classes) == 14 and not lay.problems
    splits = layout_splits(lay)
    assert len(splits["train"]) + len(splits["val"]) == 3500
    val = Counter(t for _, c in splits["val"] for t in split_tags(c))
    assert set(val) == set(lay.classes) and min(val.values()) >= 5
