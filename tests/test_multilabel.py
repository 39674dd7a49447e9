"""Several tags per image: reading a table of tags (a column of tags or 0/1 columns, files found by a unique name
anywhere under DATA), the carve that spreads every tag, and the data report on tags."""
import csv
import json
import math
from collections import Counter

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import check_data
import evaluate
import export
import inference
import serve
import split_dataset
import train
from conftest import SHARED
from dataset import load_items
from loading.carve import iterative_stratification, split_tags
from loading.layout import layout_splits, read_layout
from loading.table import NO_TAG, SEVERAL
from prediction import Classifier
from prediction.checkpoint import load_checkpoint


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


def tagged_photos(folder, n=24):
    """n generated photos in folder/images and a table of their tags: 'red' when a red square is drawn, 'blue' when
    a blue disc is, 'sky' when the top is light (several per photo, some with none dropped as untagged)."""
    from PIL import ImageDraw
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        image = Image.new("RGB", (64, 64), (200, 220, 255) if i % 3 == 0 else (60, 60, 60))
        draw = ImageDraw.Draw(image)
        tags = ["sky"] if i % 3 == 0 else []
        if i % 2 == 0:
            draw.rectangle([8, 30, 28, 50], fill=(230, 20, 20))
            tags.append("red")
        if i % 4 in (1, 2):
            draw.ellipse([34, 30, 56, 52], fill=(20, 20, 230))
            tags.append("blue")
        image.save(folder / "images" / f"p{i}.png")
        rows.append([f"p{i}.png", " ".join(tags) or "red"])
    write_table(folder / "labels.csv", ["image", "tags"], rows)
    return folder


@pytest.mark.slow
def test_a_tag_model_trains_and_answers_with_tags(tmp_path, capsys):
    data = tagged_photos(tmp_path / "tagged")
    common = ["--data", str(data), "--labels", str(data / "labels.csv"), "--workers", "0", "--out-dir",
              str(tmp_path / "m"), "--log-dir", str(tmp_path / "l"), "--curves-dir", str(tmp_path / "c"),
              "--cache-dir", str(tmp_path / "cache"), "--val-fraction", "0.25"]
    # The default network: a sigmoid per tag, the best epoch by mAP, thresholds after training; --resume goes on.
    assert train.main([*common, "--epochs", "2"]) == 0
    assert train.main([*common, "--epochs", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "epoch 3/3" in out and "mAP" in out and "tags: thresholds fitted on val (each tag's best F1)" in out
    ckpt = load_checkpoint(tmp_path / "m" / "best_model.pth")
    assert ckpt["arch"] == "resnet_small" and len(ckpt["tag_thresholds"]) == 3
    assert Classifier(ckpt).predict(data / "images" / "p0.png").labels is not None
    assert train.main([*common, "--other", str(data / "images")]) == 2
    assert "--other takes one class per image, not several tags" in capsys.readouterr().err
    assert check_data.main([str(data), "--labels", str(data / "labels.csv"), "--label-errors"]) == 2
    assert "--label-errors takes one class per image, not several tags" in capsys.readouterr().err
    assert check_data.main([str(data / "images"), "--label-next", "2", "--checkpoint",
                            str(tmp_path / "m" / "best_model.pth")]) == 2
    assert "--label-next ranks by a model of one class per image" in capsys.readouterr().err
    assert train.main([*common, "--arch", "efficientnet_lite0", "--image-size", "64", "--epochs", "30",
                       "--weight-decay", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "mAP" in out and "tags: thresholds fitted on val (each tag's best F1)" in out
    ckpt = load_checkpoint(tmp_path / "m" / "best_model.pth")
    assert ckpt["classes"] == ["blue", "red", "sky"] and len(ckpt["tag_thresholds"]) == 3
    photo = data / "images" / "p0.png"  # sky and red
    prediction = Classifier(ckpt).predict(photo)
    assert prediction.labels is not None and prediction.label == " ".join(prediction.labels)
    assert set(prediction.probabilities) == {"blue", "red", "sky"}
    assert inference.main(["--checkpoint", str(tmp_path / "m" / "best_model.pth"), "--image", str(photo),
                           "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["labels"] == list(prediction.labels)
    assert evaluate.main(["--checkpoint", str(tmp_path / "m" / "best_model.pth"), "--split", "val",
                          "--out-dir", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert set(metrics["per_tag"]) == {"blue", "red", "sky"} and 0 <= metrics["map"] <= 1
    assert metrics["per_tag"]["red"]["support"] + metrics["per_tag"]["blue"]["support"] > 0
    assert (tmp_path / "e" / "pr_curves.png").is_file() and (tmp_path / "e" / "worst_misses.png").is_file()
    with TestClient(serve.create_app(ckpt, "best_model.pth")) as client:
        assert client.post("/predict", content=photo.read_bytes()).json()[0]["labels"] == list(prediction.labels)
        health = client.get("/health").json()
        assert health["tag_thresholds"] == {c: round(t, 4) for c, t in zip(ckpt["classes"], ckpt["tag_thresholds"])}
        assert health["val_map"] == round(ckpt["metrics"]["val"]["map"], 4)
        assert client.post("/gradcam", content=photo.read_bytes()).json()["labels"] == list(prediction.labels)
        assert "tagThresholds" in client.get("/").text
    assert export.main(["--checkpoint", str(tmp_path / "m" / "best_model.pth"), "--out", str(tmp_path / "x" / "model"),
                        "--format", "onnx", "onnx-int8", "--int8-tolerance", "100"]) == 0  # 5 val images
    assert "INT8 agrees with float on" in capsys.readouterr().out  # tag sets compared, calibrated on tag images
    saved = json.loads((tmp_path / "x" / "model.json").read_text())
    assert saved["tag_thresholds"] == dict(zip(ckpt["classes"], ckpt["tag_thresholds"]))


def test_zero_one_columns_beside_a_label_column_are_not_tags(tmp_path):
    data = tmp_path / "pets"
    write_images(data, [f"{i}.png" for i in range(6)])
    write_table(data / "labels.csv", ["file", "label", "occluded", "truncated"],
                [[f"{i}.png", ["cat", "dog"][i % 2], str(i % 2), str(int(i < 3))] for i in range(6)])
    lay = read_layout(data, labels_file=data / "labels.csv", val_fraction=0.0)
    assert not lay.multi_label and lay.classes == ["cat", "dog"]


def test_tag_metrics_on_a_hand_worked_case():
    from core.metrics import average_precision, best_f1_thresholds, tag_figures
    scores, hits = torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0])
    assert average_precision(scores, hits) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert math.isnan(average_precision(scores, torch.zeros(4)))
    probs = torch.stack([scores, scores], 1)
    targets = torch.stack([hits, torch.zeros(4)], 1)
    # Tag 0: keeping the top 3 gives F1 0.8, the best: the threshold lies between 0.7 and 0.1.
    assert best_f1_thresholds(probs, targets) == pytest.approx([0.4, 0.5])
    figures = tag_figures(probs, targets, [0.4, 0.5], ["a", "b"])
    assert figures["per_tag"]["a"]["f1"] == pytest.approx(0.8) and figures["per_tag"]["b"]["support"] == 0
    # micro: 2 right; 3 predicted for a and 3 for b (no truth); 2 true: 2*2 / (6 + 2).
    assert figures["micro_f1"] == pytest.approx(0.5) and figures["macro_f1"] == pytest.approx(0.8)
    assert figures["map"] == pytest.approx((1 + 2 / 3) / 2)  # the tag no image has is left out


def test_rows_with_no_tag_are_left_out_or_kept_as_images_with_none(tmp_path, capsys):
    data = tagged_photos(tmp_path / "tagged", 12)
    rows = [["image", "tags"]] + [[f"p{i}.png", "" if i < 3 else ["red", "blue sky"][i % 2]] for i in range(12)]
    write_table(data / "labels.csv", *rows[:1], rows[1:])
    lay = read_layout(data, labels_file=data / "labels.csv", val_fraction=0.0)
    assert len(lay.items["train"]) == 9 and len(lay.problems[NO_TAG]) == 3
    lay = read_layout(data, labels_file=data / "labels.csv", val_fraction=0.0, untagged=True)
    assert len(lay.items["train"]) == 12 and NO_TAG not in lay.problems
    untagged = [c for _, c in lay.items["train"] if not split_tags(c)]
    assert len(untagged) == 3
    split = load_items(lay.items["train"], lay.classes, "train", 32, 3, tags=True)
    assert split.labels.shape == (12, 3) and int((split.labels.sum(1) == 0).sum()) == 3
    assert check_data.main([str(data), "--labels", str(data / "labels.csv"), "--untagged", "--workers", "0"]) == 0
    assert "3 with no tag, kept" in capsys.readouterr().out
    assert split_dataset.main([str(data), str(tmp_path / "out"), "--labels", str(data / "labels.csv")]) == 2
    assert "several tags per image, which class folders cannot hold" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_tag_model_trains_within_a_time_budget(tmp_path, capsys):
    data = tagged_photos(tmp_path / "tagged")
    assert train.main(["--data", str(data), "--labels", str(data / "labels.csv"), "--workers", "0",
                       "--val-fraction", "0.25", "--time-budget", "8", "--epochs", "1000",
                       "--out-dir", str(tmp_path / "m"), "--log-dir", str(tmp_path / "l"),
                       "--curves-dir", str(tmp_path / "c"), "--run-name", "b"]) == 0
    out = capsys.readouterr().out
    assert "tags: thresholds fitted on val" in out
    summary = json.loads((tmp_path / "l" / "b" / "summary.json").read_text())
    assert summary["plan"] is not None and summary["wall_seconds"] < 60 and "best_val_map" in summary
    assert len(summary["history"]) < 1000 and "val_map" in summary["history"][-1]
