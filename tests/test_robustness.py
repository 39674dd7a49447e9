"""Dirty data, the data report, crashes mid-run, Ctrl-C and NaN losses."""
import json
import math
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import dataset
import train
from conftest import (NASTY_DUPLICATE, NASTY_IGNORED, NASTY_LEAK, NASTY_READABLE, NASTY_UNREADABLE, train_args)
from dataset import make_synthetic
from model import load_checkpoint, model_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread, like the child processes: fast on a busy 2-core machine, same rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- dirty data

def test_training_uses_the_good_images_and_names_each_bad_one(nasty_data, tmp_path, capsys):
    assert train.main(train_args(nasty_data, tmp_path)) == 0
    out = capsys.readouterr().out
    # 24 synthetic + 8 odd-but-valid + 1 duplicate in train; 6 synthetic + 1 leaked copy in val
    assert "data: 33 train / 7 val images" in out
    for rel in NASTY_UNREADABLE:
        assert out.count(f"skipped unreadable image {nasty_data / rel}: ") == 1, rel
    assert f"skipped {len(NASTY_UNREADABLE)} unreadable image(s) in total" in out
    for rel in NASTY_READABLE:
        assert Path(rel).name not in out, rel
    # Files skipped for their extension are counted and named once, at start-up.
    note = [line for line in out.splitlines() if line.startswith("skipped ") and "extension" in line]
    assert len(note) == 1 and note[0].startswith(f"skipped {len(NASTY_IGNORED)} file(s) whose extension")
    for rel in NASTY_IGNORED:
        assert out.count(str(nasty_data / rel)) == 1, rel
    assert model_from_checkpoint(load_checkpoint(tmp_path / "models" / "best_model.pth"))


def test_each_odd_but_valid_image_decodes(nasty_data):
    for rel in NASTY_READABLE:
        assert dataset.decode_image(nasty_data / rel, 32).shape == (1, 32, 32), rel


def test_data_report_counts_problems_and_duplicates(nasty_data):
    r = dataset.data_report(nasty_data)
    assert r["classes"] == ["cat", "dog"]
    assert r["counts"] == {"train": {"cat": 17, "dog": 16}, "val": {"cat": 3, "dog": 4}}
    assert sorted(u["path"] for u in r["unreadable"]) == sorted(NASTY_UNREADABLE)
    reasons = {u["path"]: u["reason"] for u in r["unreadable"]}
    assert "decompression-bomb" in reasons["train/dog/bomb.png"]
    assert "decompression-bomb" in reasons["train/cat/bomb_warning.png"]
    assert "truncated" in reasons["train/cat/truncated.jpg"]
    assert r["duplicates"] == [list(NASTY_DUPLICATE)]
    assert r["leaks"] == [list(NASTY_LEAK)]
    assert r["tiny"] == [{"path": "train/dog/one_pixel.png", "size": [1, 1]}]
    assert r["mismatched"] == [{"path": "train/dog/webp_named.png", "format": "WEBP"}]
    assert {"CMYK", "I;16", "P", "RGBA", "RGB", "L"} <= set(r["modes"])
    assert r["sizes"]["min"] == [1, 1] and r["sizes"]["most_common"][0] == [40, 40, 34]
    assert sorted(r["ignored"]) == sorted(NASTY_IGNORED)
    assert r["hidden_folders"] == ["train/.ipynb_checkpoints"]
    assert len(r["hidden_files"]) == 3
    assert r["imbalance"] == pytest.approx(17 / 16, abs=0.01)
    assert r["fatal"] == [] and any("leakage" in w for w in r["warnings"])
    json.dumps(r)  # --json prints it as is


def test_check_command_prints_report_and_quarantines(nasty_data, tmp_path, capsys):
    jail = tmp_path / "quarantine"
    assert dataset.main(["check", str(nasty_data), "--quarantine", str(jail)]) == 0
    out = capsys.readouterr().out
    for rel in NASTY_UNREADABLE:
        assert rel in out
        assert (jail / rel).is_file() and not (nasty_data / rel).exists()
    assert "train/dog/dog_0001.png = val/dog/leaked_dog_0001.png" in out and "verdict: ok to train" in out
    assert (f"skipped for their extension, not one of .bmp .gif .jpeg .jpg .pgm .png .ppm .tif .tiff .webp "
            f"(rename any that are images) ({len(NASTY_IGNORED)}):") in out
    for rel in NASTY_IGNORED:
        assert f"\n  {rel}\n" in out, rel
    # Quarantined files are gone from the data, so the next check is clean and nothing was deleted.
    assert dataset.main(["check", str(nasty_data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unreadable"] == []
    assert len(list(jail.rglob("*.*"))) == len(NASTY_UNREADABLE)


def test_quarantine_refuses_a_folder_inside_the_data(nasty_data, capsys):
    assert dataset.main(["check", str(nasty_data), "--quarantine", str(nasty_data / "train" / "bad")]) == 2
    assert "inside the data's split folders" in capsys.readouterr().err
    assert (nasty_data / NASTY_UNREADABLE[0]).exists()


@pytest.mark.parametrize("problem,message", [
    ("one_class", "a classifier needs at least 2"),
    ("empty_class", "train/ has no readable image for class(es): horse"),
    ("all_bad_class", "train/ has no readable image for class(es): horse"),
    ("mostly_bad", "cannot be read"),
    ("val_missing_class", "val/ has no readable image for class(es): dog"),
])
def test_fatal_problems_exit_nonzero(tmp_path, capsys, problem, message):
    data = make_synthetic(tmp_path / "d", 3, size=24, splits=("train",))
    if problem == "one_class":
        for f in (data / "train" / "dog").iterdir():
            f.unlink()
        (data / "train" / "dog").rmdir()
    elif problem == "empty_class":
        (data / "train" / "horse").mkdir()
    elif problem == "all_bad_class":
        (data / "train" / "horse").mkdir()
        (data / "train" / "horse" / "h.jpg").write_bytes(b"")
    elif problem == "mostly_bad":
        for i in range(8):
            (data / "train" / "cat" / f"bad{i}.png").write_text("no")
    else:
        make_synthetic(data, {"cat": 8}, size=24, splits=("val",))
    assert dataset.main(["check", str(data)]) == 1
    out = capsys.readouterr().out
    assert f"FATAL: {message}" in out or message in out
    assert "verdict: cannot train on this data" in out
    if problem == "empty_class":
        assert "train/horse" in out.split("class folders without image files")[1]


def test_check_without_train_folder_and_train_check_only(tmp_path, capsys):
    assert dataset.main(["check", str(tmp_path)]) == 2
    assert "no train/ folder" in capsys.readouterr().err
    data = make_synthetic(tmp_path / "d", 3, size=24, splits=("train", "test"))
    assert train.main(["--check-only", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "test" in out.splitlines()[1] and "no val/ folder" in out
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------- crashes and Ctrl-C

def _start(args: list[str]) -> tuple[subprocess.Popen, list[str], threading.Event]:
    """train.py in a child process; its stdout lines are collected by a thread, `epoch_seen` set on each epoch."""
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    epoch_seen = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch "):
                epoch_seen.set()

    threading.Thread(target=read, daemon=True).start()
    return proc, lines, epoch_seen


def _epoch_seconds(lines: list[str]) -> float:
    times = [float(m.group(1)) for line in lines if (m := re.search(r"\s(\d+\.\d)s", line)) and "epoch" in line]
    return times[-1] if times else 0.5


def _assert_checkpoints_load(models: Path) -> None:
    for name in ("best_model.pth", "last.pth"):
        if (models / name).exists():
            ckpt = load_checkpoint(models / name)
            model_from_checkpoint(ckpt)
            assert all(torch.isfinite(v).all() for v in ckpt["model_state"].values() if v.is_floating_point())


def test_sigkill_mid_run_never_leaves_a_broken_checkpoint_and_resume_finishes(tmp_path):
    data = make_synthetic(tmp_path / "data", 16, size=40, seed=4)
    out = tmp_path / "killed"
    args = train_args(data, out, "--epochs", "10")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kills = 0
    for attempt in range(3):
        proc, lines, epoch_seen = _start(args + (["--resume"] if (out / "models" / "last.pth").exists() else []))
        deadline = time.time() + 60
        while not epoch_seen.wait(0.05) and proc.poll() is None:
            assert time.time() < deadline, f"no epoch finished within 60 s: {''.join(lines)}"
        # Anywhere within the next epoch, which includes the checkpoint writes at its end.
        time.sleep(rng.uniform(0.0, 1.2) * _epoch_seconds(lines))
        proc.send_signal(signal.SIGKILL)
        kills += proc.wait() == -signal.SIGKILL
        _assert_checkpoints_load(out / "models")
    assert kills == 3, f"training finished before it could be killed (seed {seed})"
    assert train.main(["--resume", "--out-dir", str(out / "models")]) == 0
    assert sorted(p.name for p in (out / "models").iterdir()) == ["best_model.pth", "last.pth"]
    _assert_checkpoints_load(out / "models")
    resumed = torch.load(out / "models" / "last.pth", weights_only=True)["history"]
    assert [h["epoch"] for h in resumed] == list(range(1, 11))

    assert train.main(train_args(data, tmp_path / "straight", "--epochs", "10")) == 0
    straight = torch.load(tmp_path / "straight" / "models" / "last.pth", weights_only=True)["history"]
    # A resumed epoch replays the saved RNG state, so only float rounding could separate the two runs.
    assert resumed[-1]["val_loss"] == pytest.approx(straight[-1]["val_loss"], rel=1e-3), seed
    assert resumed[-1]["val_acc"] == pytest.approx(straight[-1]["val_acc"], abs=1e-6), seed


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tiny_data, tmp_path):
    proc, lines, epoch_seen = _start(train_args(tiny_data, tmp_path, "--epochs", "200"))
    assert epoch_seen.wait(timeout=60), "no epoch finished within 60 s"
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    err = proc.stderr.read()
    out = "".join(lines)
    assert code == 0 and "Traceback" not in err, err
    match = re.search(r"interrupted; (.+last\.pth) holds epoch (\d+): continue with --resume", out)
    assert match, out
    ckpt = load_checkpoint(match.group(1))
    assert ckpt["epoch"] == int(match.group(2)) >= 1


# ---------------------------------------------------------------- NaN / inf

def test_nan_loss_stops_the_run_and_keeps_the_checkpoints(tiny_data, tmp_path, capsys, monkeypatch):
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "1")) == 0
    models = tmp_path / "models"
    before = {name: (models / name).read_bytes() for name in ("best_model.pth", "last.pth")}
    capsys.readouterr()
    monkeypatch.setattr(train, "augment", lambda x, *a, **k: x * math.nan)
    assert train.main(["--resume", "--out-dir", str(models), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "error: training loss became NaN/inf in 4 steps; lower --lr" in err and "Traceback" not in err
    assert {name: (models / name).read_bytes() for name in before} == before


def test_a_single_nan_step_is_skipped_and_counted(tiny_data, tmp_path, capsys, monkeypatch):
    real, calls = train.augment, []

    def nan_once(x, *a, **k):
        calls.append(1)
        return real(x, *a, **k) * (math.nan if len(calls) == 2 else 1.0)

    monkeypatch.setattr(train, "augment", nan_once)
    assert train.main(train_args(tiny_data, tmp_path)) == 0
    assert "(1 NaN/inf steps skipped)" in capsys.readouterr().out
    assert torch.load(tmp_path / "models" / "last.pth", weights_only=True)["history"][0]["skipped_steps"] == 1


def test_diverging_weights_never_replace_the_saved_models(tiny_data, tmp_path, capsys):
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "1")) == 0
    models = tmp_path / "models"
    before = {name: (models / name).read_bytes() for name in ("best_model.pth", "last.pth")}
    capsys.readouterr()
    # A fresh run into the same folder with an absurd learning rate: val loss turns NaN in the first epoch.
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "2", "--lr", "1e10", "--warmup-epochs", "0")) == 2
    err = capsys.readouterr().err
    assert "weights or val loss became NaN/inf in epoch 1" in err and "lower --lr" in err
    assert {name: (models / name).read_bytes() for name in before} == before
    _assert_checkpoints_load(models)
