import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import bench
from config import TrainConfig
from loading import near_duplicates
from loading.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]


def test_seconds_to_finds_the_first_epoch_reaching_a_target():
    hist = [{"val_acc": 0.7, "t": 10}, {"val_acc": 0.86, "t": 20}, {"val_acc": 0.91, "t": 30}]
    assert bench.seconds_to(hist, 0.85, "val_acc", "t") == 20
    assert bench.seconds_to(hist, 0.95, "val_acc", "t") is None


@pytest.mark.slow
def test_bench_prints_one_json_object(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", 8, size=24, splits=("train", "val"))
    assert bench.main(["--data", str(data), "--epochs", "2", "--skip-baseline", "--workers", "0",
                       "--", "--batch-size", "8", "--image-size", "32", "--width", "8"]) == 0
    result = json.loads(capsys.readouterr().out)  # train.py runs as a program: its lines are not on our stdout
    ours = result["ours"]
    assert result["machine"]["cpu"] and result["machine"]["torch"] == torch.__version__  # never compare machines
    assert ours["epochs"] == 2 and len(ours["val_acc_per_epoch"]) == 2
    assert ours["best_val_acc"] == max(ours["val_acc_per_epoch"])  # read back from the run's summary.json
    assert ours["train_images_per_s"] > 0 and ours["decode_images_per_s"] > 0
    assert 0 <= ours["data_share_after_first_epoch"] < 1
    assert set(ours) >= {"seconds_to_80", "seconds_to_85", "seconds_to_90", "best_val_acc"}


@pytest.mark.slow
def test_bench_runs_the_baseline_from_a_clone_without_shared(tmp_path):
    """A fresh clone has no ../shared: benchmarks.bench still compares against its own baseline."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for script in REPO.glob("*.py"):
        shutil.copy(script, clone)
    for package in (init.parent for init in REPO.glob("*/__init__.py")):
        shutil.copytree(package, clone / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    assert not (tmp_path / "shared").exists()
    data = make_synthetic(tmp_path / "d", 8, size=24, splits=("train", "val"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--data", str(data), "--epochs", "1",
                           "--workers", "0", "--time-budget", "20", "--baseline-epochs", "2", "--baseline-seconds", "120",
                           "--", "--batch-size", "8", "--image-size", "32", "--width", "8"],
                          cwd=clone, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout holds the result only; train.py's lines go to stderr
    base = result["baseline"]
    assert base["epochs"] == 2 and len(base["val_acc_per_epoch"]) == 2
    assert base["train_images_per_s"] > 0 and 0 <= base["best_val_acc"] <= 1
    assert result["ratios"]["train_images_per_s"] > 0


def _result(baseline: bool) -> dict:
    ours = {"train_images_per_s": 836.2, "decode_seconds": 3.3, "decode_images_per_s": 3635.2,
            "seconds_to_80": 104.0, "seconds_to_85": 178.5, "seconds_to_90": None, "best_val_acc": 0.8958,
            "epochs": 4, "wall_seconds": 532.0, "data_share_after_first_epoch": 0.0215,
            "val_acc_per_epoch": [0.7, 0.8958, 0.89, 0.8958]}
    result = {"command": "python bench.py --data D --markdown", "commit": "abc1234", "date": "2026-11-29",
              "machine": {"cpu": "AMD EPYC", "cpu_cores": 2, "torch_threads": 2, "memory_gb": 25.3, "cuda": None,
                          "python": "3.11.7", "torch": "2.15.0"}, "data": "D", "ours": ours}
    if baseline:
        result["baseline"] = {"train_images_per_s": 148.2, "seconds_to_80": None, "seconds_to_85": None,
                              "seconds_to_90": None, "best_val_acc": 0.7366, "epochs": 3, "wall_seconds": 217.0,
                              "val_acc_per_epoch": [0.6965, 0.7251, 0.7366]}
        result["ratios"] = {"train_images_per_s": 5.64}
    return result


def test_bench_markdown_is_the_table_benchmarks_md_holds():
    lines = bench.bench_markdown(_result(baseline=True)).splitlines()
    assert lines[0] == "|  | ours (train.py) | plain pipeline (baseline.py) |"
    assert "| train images/s | 836.2 (5.64x) | 148.2 |" in lines
    assert "| val acc 85% reached after | 178 s | not reached |" in lines
    assert "| val acc 90% reached after | not reached | not reached |" in lines
    # the first epoch at the best accuracy, not the last one
    assert "| best val accuracy | 89.58% (epoch 2 of 4; 532 s in all) | 73.66% (epoch 3 of 3; 217 s in all) |" in lines
    assert lines[-1] == ("`python bench.py --data D --markdown` at commit abc1234, 2026-11-29; AMD EPYC, 2 cores "
                         "(2 torch threads), 25.3 GB, GPU: none; torch 2.15.0")
    alone = bench.bench_markdown(_result(baseline=False)).splitlines()
    assert alone[0] == "|  | ours (train.py) |" and "| train images/s | 836.2 |" in alone


@pytest.mark.parametrize("argv, named", [
    (["--data", "D", "--", "--width", "32", "--epochs", "80"], "--epochs after --"),
    (["--data", "D", "--", "--time-budget=300", "--out-dir", "m"], "--time-budget and --out-dir after --"),
    (["scale", "--", "--image-size", "96"], "--image-size after --"),
    (["label-errors", "--data", "D", "--", "--data", "E"], "--data after --"),
])
def test_a_flag_bench_sets_itself_is_refused_after_the_dashes(argv, named, capsys, tmp_path, monkeypatch):
    """bench.py sets these train.py flags for its run: given after -- they would be replaced without a word.
    Refused before any work (`scale` would first generate its images in ./bench_data)."""
    monkeypatch.chdir(tmp_path)
    assert bench.main(argv) == 2
    assert capsys.readouterr().err == (f"error: {named}: bench.py sets {'them' if ' and ' in named else 'it'} for "
                                       "its run; bench.py's own flags (--help lists them) go before --\n")
    assert not any(tmp_path.iterdir())


def test_train_flags_after_the_dashes_reach_the_run():
    cfg = bench.train_config(["--width", "32", "--lr", "3e-3"], data="D", epochs=7)
    assert (cfg.width, cfg.lr, cfg.data, cfg.epochs) == (32, 3e-3, "D", 7)


def test_the_commit_is_read_before_the_measuring_starts(monkeypatch, capsys):
    """Files edited while a long bench runs must not be charged to (or hide) the code it measured."""
    order = []
    monkeypatch.setattr(bench, "provenance", lambda script, argv: order.append("provenance") or {"commit": "abc"})
    monkeypatch.setattr(bench, "bench_ours", lambda cfg, scratch: order.append("ours") or {"train_images_per_s": 1})
    assert bench.main(["--data", "D", "--skip-baseline"]) == 0
    assert order == ["provenance", "ours"] and json.loads(capsys.readouterr().out)["commit"] == "abc"


def test_the_scale_near_copy_step_searches_the_cached_descriptors_and_says_how_it_ended(tmp_path):
    """`bench.py scale`'s near-copy step on a cached set whose pictures all look alike: every image is counted as
    too alike to judge, and the sentence in its Markdown says so with the step's figures."""
    data = make_synthetic(tmp_path / "d", 40, size=48, splits=("train", "val"))
    cfg = TrainConfig(data=str(data), cache_dir=str(tmp_path / "cache"), workers=0)
    near = bench.measure("near", cfg)
    assert near["images"] == 100 and near["end"] == "done" and near["lookalike_images"] > 50
    assert near["pairs_examined"] <= near_duplicates.PAIRS_PER_IMAGE * 100
    assert list(tmp_path.joinpath("cache").glob("*.near.npy"))  # read from the cache, kept beside the pixels
    sentence = bench.near_copies_sentence(near)
    assert sentence.startswith(f"near-copy check (train.py's start-up search, no time cap): {near['seconds']} s")
    assert f"{near['lookalike_images']:,} images too alike to judge" in sentence
    stopped = bench.near_copies_sentence({**near, "end": "crowded"})
    assert "stopped early (most queries met crowded buckets): 100 images too alike to search" in stopped


def test_near_copies_reports_recall_precision_and_the_copies_the_report_groups(tmp_path, capsys):
    from test_near_duplicates import photo

    rng = np.random.default_rng(3)
    for split, count in (("train", 10), ("val", 5)):
        for cls in ("a", "b"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(count):
                photo(rng).save(tmp_path / "d" / split / cls / f"{i}.png")
    assert bench.main(["near-copies", "--data", str(tmp_path / "d"), "--copies", "6", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 30 and result["copies"] == 6 and result["precision"] == 1.0
    assert result["recall"] >= 5 / 6 and result["wrong_pairs"] == [] and result["untouched_pairs"] == []
    assert result["copies_grouped_with_original"] == round(result["recall"] * 6) and result["images_not_judged"] == 0
