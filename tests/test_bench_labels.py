"""benchmarks/bench_labels.py: the labelled / unlabelled carve of train, and both commands end to end on a toy set."""
import json

import pytest
import torch

from benchmarks import bench_labels
from config import TrainConfig
from loading.synthetic import make_synthetic

TOY = ["--", "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--width", "8", "--workers", "0",
       "--device", "cpu"]


def test_stratified_keeps_per_class_of_each_class_the_same_for_a_seed():
    labels = ["a"] * 10 + ["b"] * 3
    picked = bench_labels.stratified(labels, 4, torch.Generator().manual_seed(0))
    assert [labels[i] for i in picked].count("a") == 4 and [labels[i] for i in picked].count("b") == 3
    assert picked == bench_labels.stratified(labels, 4, torch.Generator().manual_seed(0))


def test_tune_measures_on_train_photos_and_never_reads_val(tmp_path):
    data = make_synthetic(tmp_path / "d", 20, size=32, seed=1)
    cfg = TrainConfig(data=str(data))
    labelled, rest, val = bench_labels.split_train(str(data), cfg, 5, 10, seed=0)
    assert len(labelled) == 10 and len(val) == 10 and len(rest) == 20
    paths = [{p for p, _ in items} for items in (labelled, rest, val)]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert all("/train/" in p for p in set.union(*paths))
    _, _, real_val = bench_labels.split_train(str(data), cfg, 5, 0, seed=0)
    assert real_val and all("/val/" in p for p, _ in real_val)


def test_unlabelled_links_hide_the_labels(tmp_path):
    data = make_synthetic(tmp_path / "d", 3, size=32, seed=1, splits=("train",))
    items = [(str(p), p.parent.name) for p in sorted(data.rglob("*.png"))]
    truth = bench_labels.link_unlabelled(items, tmp_path / "u")
    assert sorted(truth) == [f"{i:05d}.png" for i in range(6)]
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == sorted(truth)
    assert [truth[f"{i:05d}.png"] for i in range(6)] == [c for _, c in items]


@pytest.mark.slow
def test_both_commands_run_end_to_end_on_a_toy_set(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", 16, size=32, seed=1)
    assert bench_labels.main(["semi", "--data", str(data), "--per-class", "4", "--time-budget", "3600",
                              "--epochs", "2", *TOY[:1], *TOY[3:]]) == 0
    semi = json.loads(capsys.readouterr().out)
    assert (semi["labelled"], semi["unlabeled"], semi["val_from"]) == (8, 24, "val")
    assert semi["supervised"]["epochs"] == 2 and "pseudo_share_last_epoch" in semi["semi_supervised"]
    assert bench_labels.main(["label-next", "--data", str(data), "--per-class", "4", "--add", "6", "--seeds", "3",
                              "--markdown", *TOY]) == 0
    table = capsys.readouterr().out
    assert "| seed | seed model | seed + ranked | seed + random |" in table and "\n| 3 | " in table
    assert "python -m benchmarks.bench_labels label-next --data" in table
    # the seed model and both arms semi-supervised: the seed on the pool, each arm on the pool less its picks
    work, shared = tmp_path / "work", tmp_path / "shared_cache"
    assert bench_labels.main(["label-next", "--data", str(data), "--per-class", "4", "--add", "6", "--seeds", "3",
                              "--seed-unlabeled", "10", "--arms-unlabeled", "10", "--work-dir", str(work),
                              "--cache-dir", str(shared), *TOY]) == 0
    # a shared cache folder keeps no decoded pixels of the temporary folders (the runs did decode there)
    assert shared.is_dir()  # the runs decoded there
    assert not list(shared.glob("*.npy")) and not list(shared.glob("*.index.pt"))
    row = json.loads(capsys.readouterr().out)["seeds"][0]
    assert 0.0 <= row["seed_pseudo_share_last_epoch"] <= 1.0 and row["ranked_picked_per_class"]
    assert all(0.0 <= row[f"{arm}_pseudo_share_last_epoch"] <= 1.0 for arm in ("ranked", "random"))
    pool = {p.resolve() for p in (work / "seed3" / "pool").iterdir()}
    for arm in ("ranked", "random"):
        added = {p.resolve() for p in (work / "seed3" / arm / "train").rglob("*.png")} & pool
        arm_pool = {p.resolve() for p in (work / "seed3" / f"{arm}_pool").iterdir()}
        assert len(added) == 6 and arm_pool == pool - added


def test_labelled_links_keep_two_photos_of_one_name(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "1.png").write_bytes(folder.encode())
    bench_labels.link_labelled([(str(tmp_path / "x" / "1.png"), "cat"), (str(tmp_path / "y" / "1.png"), "cat")],
                               tmp_path / "out")
    assert sorted(p.read_bytes() for p in (tmp_path / "out" / "cat").iterdir()) == [b"x", b"y"]
