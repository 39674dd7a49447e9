"""train.py when things go wrong: dirty data, SIGKILL mid-run, Ctrl-C, NaN losses and diverging weights."""
import math
import os
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

import train
from training import loop
from conftest import NASTY_IGNORED, NASTY_READABLE, NASTY_UNREADABLE, train_args
from loading.synthetic import make_synthetic
from prediction.checkpoint import load_checkpoint, model_from_checkpoint
from training import distributed
from training.runs import read_results, read_summary

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
    # 24 synthetic + 10 odd-but-valid + 1 duplicate in train; 6 synthetic + 1 leaked copy in val
    assert "data: 35 train / 7 val images" in out
    for rel in NASTY_UNREADABLE:
        assert out.count(f"skipped unreadable image {nasty_data / rel}: ") == 1, rel
    assert f"skipped {len(NASTY_UNREADABLE)} unreadable image(s) in total" in out
    for rel in NASTY_READABLE:
        assert Path(rel).name not in out, rel
    # Non-image files are not dropped silently either: named once, in the start-up list of files left out.
    assert f"  {len(NASTY_IGNORED)} files skipped for their extension: {', '.join(sorted(NASTY_IGNORED))}" in out.splitlines()
    ckpt = load_checkpoint(tmp_path / "models" / "best_model.pth")
    model = model_from_checkpoint(ckpt)
    assert ckpt["classes"] == ["cat", "dog"] and model.fc.out_features == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _start(args: list[str]) -> tuple[subprocess.Popen, list[str], threading.Event]:
    """train.py in a child process; its stdout lines are collected by a thread, `epoch_seen` set on each epoch.
    Another thread drains stderr (the progress bar), so a full pipe never blocks the child."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    epoch_seen = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch "):
                epoch_seen.set()

    proc.stderr_text = []
    proc.readers = [threading.Thread(target=read, daemon=True),
                    threading.Thread(target=lambda: proc.stderr_text.extend(proc.stderr), daemon=True)]
    for reader in proc.readers:
        reader.start()
    return proc, lines, epoch_seen


def _epoch_seconds(lines: list[str]) -> float:
    times = [float(m.group(1)) for line in lines if (m := re.search(r"\s(\d+\.\d)s", line)) and "epoch" in line]
    return times[-1] if times else 0.5


def _assert_checkpoints_load(models: Path) -> None:
    """Whatever is on disk is whole: it loads, its weights are finite, its history has every epoch up to its own."""
    for name in ("best_model.pth", "last.pth"):
        if (models / name).exists():
            ckpt = load_checkpoint(models / name)
            model_from_checkpoint(ckpt)
            assert all(torch.isfinite(v).all() for v in ckpt["model_state"].values() if v.is_floating_point())
            assert [h["epoch"] for h in ckpt["history"]] == list(range(1, ckpt["epoch"] + 1)), name


EPOCH_LINE = re.compile(r"epoch (\d+)/\d+  train loss (\S+) acc (\S+)  val loss (\S+) acc (\S+)")


def _assert_results_hold_the_printed_epochs(results: Path, lines: list[str]) -> None:
    """results.csv is whole rows of epochs 1, 2, ... and every epoch line printed has its row, with its figures."""
    rows = read_results(results)
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    by_epoch = {r["epoch"]: r for r in rows}
    for m in filter(None, map(EPOCH_LINE.match, lines)):
        row = by_epoch[int(m.group(1))]
        printed = [float(v) for v in m.groups()[1:]]
        assert [row[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")] == \
            pytest.approx(printed, abs=5e-5)


@pytest.mark.slow
def test_sigkill_mid_run_never_leaves_a_broken_checkpoint_and_resume_finishes(tmp_path):
    data = make_synthetic(tmp_path / "data", 16, size=40, seed=4)
    out = tmp_path / "killed"
    args = train_args(data, out, "--epochs", "10")
    rng = random.Random(0)  # the kill points, as fractions of an epoch; the machine's speed decides the rest
    for attempt in range(3):
        proc, lines, epoch_seen = _start(args + (["--resume"] if (out / "models" / "last.pth").exists() else []))
        deadline = time.time() + 60
        while not epoch_seen.wait(0.05) and proc.poll() is None:
            assert time.time() < deadline, f"no epoch finished within 60 s: {''.join(lines)}"
        # Anywhere within the next epoch, which includes the checkpoint writes at its end.
        time.sleep(rng.uniform(0.0, 1.2) * _epoch_seconds(lines))
        proc.send_signal(signal.SIGKILL)  # or the run finished already, on a slow draw: the rest must hold too
        proc.wait()
        for reader in proc.readers:
            reader.join(timeout=10)
        _assert_checkpoints_load(out / "models")
        _assert_results_hold_the_printed_epochs(out / "logs" / "t" / "results.csv", lines)
    assert train.main(["--resume", "--out-dir", str(out / "models")]) == 0
    assert sorted(p.name for p in (out / "models").iterdir()) == ["best_model.pth", "last.pth"]
    _assert_checkpoints_load(out / "models")
    resumed = torch.load(out / "models" / "last.pth", weights_only=True)["history"]
    assert [h["epoch"] for h in resumed] == list(range(1, 11))
    # One row per epoch, whatever the kills cut: those of epochs redone after a kill replaced, not repeated.
    rows = read_results(out / "logs" / "t" / "results.csv")
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    assert [r["val_loss"] for r in rows] == pytest.approx([h["val_loss"] for h in resumed])

    assert train.main(train_args(data, tmp_path / "straight", "--epochs", "10")) == 0
    straight = torch.load(tmp_path / "straight" / "models" / "last.pth", weights_only=True)["history"]
    # A resumed epoch replays the saved RNG state, so only float rounding could separate the two runs.
    assert resumed[-1]["val_loss"] == pytest.approx(straight[-1]["val_loss"], rel=1e-3)
    assert resumed[-1]["val_acc"] == pytest.approx(straight[-1]["val_acc"], abs=1e-6)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tiny_data, tmp_path):
    # So many epochs that only the Ctrl-C can end the run, however long the machine takes to send it.
    proc, lines, epoch_seen = _start(train_args(tiny_data, tmp_path, "--epochs", "100000"))
    assert epoch_seen.wait(timeout=60), "no epoch finished within 60 s"
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    for reader in proc.readers:
        reader.join(timeout=10)  # to the end of both pipes
    err = "".join(proc.stderr_text)
    out = "".join(lines)
    assert code == 0 and "Traceback" not in err, err
    assert "Ctrl-C: stopping after this training step" in err
    match = re.search(r"interrupted; (.+last\.pth) holds epoch (\d+): continue with --resume", out)
    assert match, out
    ckpt = load_checkpoint(match.group(1))
    assert ckpt["epoch"] == int(match.group(2)) >= 1


def _ctrl_c_during_step(monkeypatch, step: int, presses: int) -> list:
    """Press Ctrl-C (SIGINT to this process) `presses` times while the step-th training batch (counted over the
    run) is handed out; returns the batches handed out, which tells how many steps ran."""
    taken = []
    original = distributed.shard_batches

    def batches_with_ctrl_c(*args, **kwargs):
        for idx in original(*args, **kwargs):
            taken.append(idx)
            if len(taken) == step:
                for _ in range(presses):
                    os.kill(os.getpid(), signal.SIGINT)
            yield idx
    monkeypatch.setattr(loop, "shard_batches", batches_with_ctrl_c)
    return taken


@pytest.mark.parametrize("presses, step, saved, stop, note", [
    (1, 6, 1, "ctrl_c_in_epoch", "Ctrl-C stopped epoch 2 after a step; that epoch is not saved, --resume starts it "
                                 "again"),
    (1, 4, 1, "ctrl_c", "Ctrl-C stopped the run after epoch 1"),  # the last step of epoch 1: whole, and saved
    (2, 6, 1, "ctrl_c_twice", "a second Ctrl-C stopped it at once"),
])
def test_ctrl_c_stops_after_the_step_and_a_second_at_once(tiny_data, tmp_path, capfd, monkeypatch, presses, step,
                                                          saved, stop, note):
    handler = signal.getsignal(signal.SIGINT)
    taken = _ctrl_c_during_step(monkeypatch, step, presses)
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "5", "--novelty-score", "none")) == 0
    out, err = capfd.readouterr()
    assert len(taken) == step  # 4 steps an epoch (32 images, batch 8): not one step after the Ctrl-C
    last = tmp_path / "models" / "last.pth"
    assert f"interrupted; {last} holds epoch {saved}: continue with --resume ({note})" in out
    assert load_checkpoint(last)["epoch"] == saved
    assert "done: best val acc" in out  # summarised as usual
    assert err.count("Ctrl-C: stopping after this training step (press it again to stop at once)") == 1
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back
    assert [r["epoch"] for r in read_results(tmp_path / "logs" / "t" / "results.csv")] == list(range(1, saved + 1))
    assert read_summary(tmp_path / "logs", "t")["stop_reason"] == stop


# ---------------------------------------------------------------- NaN / inf


def test_nan_loss_stops_the_run_and_keeps_the_checkpoints(tiny_data, tmp_path, capsys, monkeypatch):
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "1")) == 0
    models = tmp_path / "models"
    before = {name: (models / name).read_bytes() for name in ("best_model.pth", "last.pth")}
    capsys.readouterr()
    monkeypatch.setattr(loop, "augment", lambda x, *a, **k: x * math.nan)
    assert train.main(["--resume", "--out-dir", str(models), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "error: training loss became NaN/inf in 4 steps; lower --lr" in err and "Traceback" not in err
    assert {name: (models / name).read_bytes() for name in before} == before


def test_a_single_nan_step_is_skipped_and_counted(tiny_data, tmp_path, capsys, monkeypatch):
    real, calls = loop.augment, []

    def nan_once(x, *a, **k):
        calls.append(1)
        return real(x, *a, **k) * (math.nan if len(calls) == 2 else 1.0)

    monkeypatch.setattr(loop, "augment", nan_once)
    assert train.main(train_args(tiny_data, tmp_path)) == 0
    assert "(1 NaN/inf steps skipped)" in capsys.readouterr().out
    assert torch.load(tmp_path / "models" / "last.pth", weights_only=True)["history"][0]["skipped_steps"] == 1


def test_diverging_weights_never_replace_the_saved_models(tiny_data, tmp_path, capsys):
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "1")) == 0
    models = tmp_path / "models"
    before = {name: (models / name).read_bytes() for name in ("best_model.pth", "last.pth")}
    capsys.readouterr()
    # A fresh run into the same folder with an absurd learning rate: val loss turns NaN in the first epoch.
    # The first run moves to models/t/ untouched; the broken one writes no checkpoint at all.
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "2", "--lr", "1e10", "--warmup-epochs", "0")) == 2
    err = capsys.readouterr().err
    assert "weights or val loss became NaN/inf in epoch 1" in err and "lower --lr" in err
    assert {name: (models / "t" / name).read_bytes() for name in before} == before
    assert not (models / "best_model.pth").exists() and not (models / "last.pth").exists()
    _assert_checkpoints_load(models / "t")
