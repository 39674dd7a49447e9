"""train.py: checkpoints, logs and curves of a run, resume, EMA, schedules, fine-tuning, calibration."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import inference
import train
from config import TrainConfig, parse_config
from conftest import expected_answer, imagenet_like_resnet18, table_labelled_set, train_args
from core import common
from core.metrics import expected_calibration_error
from dataset import Split, augment, cutmix, image_tensor, load_data, to_float
from loading.layout import read_layout
from loading.synthetic import make_synthetic
from model import SmallResNet, adapt_state_dict, build_model
from prediction import Classifier
from prediction.checkpoint import load_checkpoint, model_from_checkpoint, run_name_of
from prediction.predict import predict_logits
from training import loop, optimization, runs
from training.distributed import shard_batches
from training.runs import Progress, read_results, read_summary


@pytest.mark.slow
def test_one_epoch_writes_checkpoints_logs_and_curves(tiny_data, tmp_path):
    assert train.main(train_args(tiny_data, tmp_path)) == 0
    summary = read_summary(tmp_path / "logs", "t")
    assert summary["epochs_run"] == 1 and summary["best_epoch"] == 1 and len(summary["history"]) == 1
    assert summary["best_val_acc"] == summary["history"][0]["val_acc"] and "temperature" in summary
    assert summary["checkpoint"] == str(tmp_path / "models" / "best_model.pth") and summary["stop_reason"] == "completed"
    assert (tmp_path / "models" / "best_model.pth").is_file()
    assert (tmp_path / "models" / "last.pth").is_file()
    run_dir = tmp_path / "logs" / "t"
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 1
    assert (tmp_path / "curves" / "training_curves.png").is_file()
    history = torch.load(tmp_path / "models" / "last.pth", weights_only=True)["history"]
    rows = read_results(run_dir / "results.csv")
    assert [r["epoch"] for r in rows] == [1]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "train_images_per_s"):
        assert rows[0][key] == pytest.approx(history[0][key]), key
    assert "val_top5" not in rows[0]  # two classes: no top-5 in the epoch line, none in the table
    # 16 tiles: plot_gallery's 8 columns x 2 rows of 1.9 x 2.5 inches at 100 dpi.
    from PIL import Image
    with Image.open(tmp_path / "curves" / "train_batch.png") as png:
        assert png.size == (1520, 500)


def test_train_batch_is_16_augmented_training_images_with_their_labels():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8)
    labels = torch.arange(40) % 3
    cfg = parse_config(["--seed", "5", "--cutmix", "0.5"])
    norm = {"mean": 0.5, "std": 0.5}
    shown, names = runs.train_batch_images(images, labels, ["a", "b", "c"], cfg, norm)
    assert shown.shape == (16, 1, 16, 16) and shown.dtype == torch.uint8 and len(names) == 16
    # The same draws as training's augment() and cutmix(), on a generator of their own seeded with --seed.
    g = torch.Generator().manual_seed(5)
    idx = torch.randperm(40, generator=g)[:16]
    expected = augment(to_float(images[idx]), cfg.flip, cfg.max_rotation, cfg.max_shift, cfg.max_scale, g)
    expected, perm, own = cutmix(expected, 1.0, g)
    assert torch.allclose(shown.float(), (expected * 127.5 + 127.5).round().clamp(0, 255), atol=1)
    assert not torch.equal(shown, images[idx])  # augmented, not the raw pixels
    # Each caption: the image's class, and the share and class of the box pasted in when its class differs.
    own_names = [["a", "b", "c"][int(k)] for k in labels[idx]]
    box_names = [own_names[j] for j in perm.tolist()]
    assert names == [a if a == b else f"{a} + {1 - own:.0%} {b}" for a, b in zip(own_names, box_names)]
    assert any(" + " in name for name in names)
    plain, plain_names = runs.train_batch_images(images, labels, ["a", "b", "c"],
                                                 parse_config(["--seed", "5"]), norm)
    assert plain_names == own_names and not torch.equal(plain, shown)  # the default, --cutmix 0: no boxes


@pytest.mark.slow
def test_a_second_run_moves_the_first_aside_and_both_keep_their_results(tiny_data, tmp_path):
    # No --run-name: both get the date-time name, unique even within the same second.
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "2", "--run-name", "")) == 0
    first = load_checkpoint(tmp_path / "models" / "best_model.pth")
    name = run_name_of(first)
    assert train.main(train_args(tiny_data, tmp_path, "--run-name", "", "--seed", "1")) == 0
    second = load_checkpoint(tmp_path / "models" / "best_model.pth")
    assert run_name_of(second) != name and second["config"]["seed"] == 1
    kept = load_checkpoint(tmp_path / "models" / name / "best_model.pth")
    assert kept["metrics"] == first["metrics"] and kept["best"] == first["best"] and kept["epoch"] == first["epoch"]
    assert all(torch.equal(kept["model_state"][k], v) for k, v in first["model_state"].items())
    assert load_checkpoint(tmp_path / "models" / name / "last.pth")["epoch"] == 2
    assert {p.name for p in (tmp_path / "curves" / name).iterdir()} == {"training_curves.png", "train_batch.png"}
    assert (tmp_path / "curves" / "training_curves.png").is_file()  # the new run's
    assert len(read_results(tmp_path / "logs" / name / "results.csv")) == 2
    assert len(read_results(tmp_path / "logs" / run_name_of(second) / "results.csv")) == 1


@pytest.mark.slow
def test_config_file_reproduces_a_run(tiny_data, tmp_path, capsys):
    flags = ["--epochs", "2", "--lr", "2e-3", "--seed", "3", "--no-flip", "--label-smoothing", "0.05"]
    assert train.main(train_args(tiny_data, tmp_path, *flags)) == 0
    first = load_checkpoint(tmp_path / "models" / "last.pth")
    capsys.readouterr()
    saved = tmp_path / "logs" / "t" / "config.json"
    assert train.main(["--config", str(saved)]) == 0  # everything, even the folders, from the file
    again = load_checkpoint(tmp_path / "models" / "last.pth")
    assert run_name_of(again) not in ("", "t")  # a new run with a name of its own; the first moved to models/t/
    different = {k for k in first["config"] if first["config"][k] != again["config"][k]}
    assert different == {"run_name", "config"} and again["config"]["config"] == str(saved)
    assert [h["val_loss"] for h in again["history"]] == [h["val_loss"] for h in first["history"]]
    assert load_checkpoint(tmp_path / "models" / "t" / "last.pth")["history"] == first["history"]


@pytest.mark.slow
def test_resume_with_more_epochs_runs_a_fresh_cosine_over_the_added_ones(tiny_data, tmp_path):
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "2", "--lr", "1e-3")) == 0
    assert train.main(["--resume", "--out-dir", str(tmp_path / "models"), "--epochs", "4"]) == 0
    # The 2-epoch run ended at lr 0, so the fresh cosine starts where a 4-epoch schedule is after epoch 2:
    # 1 warmup epoch of 4, then (2 - 1) / (4 - 1) of the cosine: 0.5 * (1 + cos(pi / 3)) = 0.75 of the peak.
    lrs = [h["lr"] for h in load_checkpoint(tmp_path / "models" / "last.pth")["history"]]
    assert lrs[1] == 0.0 and lrs[2] == pytest.approx(1e-3 * 0.75 * 0.5) and lrs[3] == pytest.approx(0.0, abs=1e-12)
    assert [r["epoch"] for r in read_results(tmp_path / "logs" / "t" / "results.csv")] == [1, 2, 3, 4]


def test_a_replanned_schedule_is_continuous_ends_at_zero_and_survives_a_resume():
    schedule = optimization.LRSchedule(warmup_steps=10, phase1_steps=0, total_steps=100)
    assert schedule.replan(40, 200, 0) == "fresh"  # interrupted mid-way: from the factor it had, no jump
    before = optimization.warmup_cosine(10, 100)(40)
    assert schedule(40) == pytest.approx(before)
    assert schedule(120) == pytest.approx(before * 0.5 * (1 + math.cos(math.pi / 2)))
    assert schedule(200) == 0.0 and all(schedule(s) >= schedule(s + 1) for s in range(40, 200))
    # LambdaLR keeps the replanned schedule in its state_dict, as last.pth does.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    saved = torch.optim.lr_scheduler.LambdaLR(opt, schedule).state_dict()
    fresh = optimization.LRSchedule(warmup_steps=10, phase1_steps=0, total_steps=100)
    torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                      fresh).load_state_dict(saved)
    assert [fresh(s) for s in (40, 120, 200)] == [schedule(s) for s in (40, 120, 200)]


def test_a_time_budget_plans_with_the_last_three_epochs_leaving_out_the_first():
    assert optimization.planning_epoch_seconds([10.0]) == 10.0  # the only one there is
    assert optimization.planning_epoch_seconds([10.0, 2.0]) == 2.0  # the warm-up epoch left out
    assert optimization.planning_epoch_seconds([10.0, 1.0, 2.0, 3.0, 4.0]) == 3.0


def test_a_time_budget_keeps_the_schedule_then_anneals_over_the_last_quarter_of_what_fits():
    assert optimization.epochs_that_fit(100.0, 10.0, 3, 40) == 13
    assert optimization.epochs_that_fit(100.0, 10.0, 3, 8) == 8  # never past --epochs
    assert optimization.epochs_that_fit(-5.0, 10.0, 3, 40) == 3  # nothing fits: stop after this epoch
    # The steps after training: one more pass over val, and the novelty fit's features of the fit images.
    assert optimization.seconds_after_training(2.0, 1000, 5000, novelty=False) == 2.0
    assert optimization.seconds_after_training(2.0, 1000, 5000, novelty=True) == pytest.approx(2 + 13 + 2)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = optimization.LRSchedule(10, 0, 400)  # 10 steps an epoch, 40 epochs planned
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    cfg = TrainConfig(epochs=40, time_budget=150.0, novelty_score="none")

    def epochs(n: int) -> list[float]:
        lrs = []
        for _ in range(10 * n):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs

    epochs(2)
    plan = optimization.plan_to_budget
    assert plan(sched, opt, 10, cfg, 2, 500.0, 10.0) == optimization.BudgetPlan(40, 10.0)  # all 40 fit
    # After epoch 2, 100 s left at 10 s an epoch: 12 fit; the 40-epoch cosine runs on, untouched, ...
    assert plan(sched, opt, 10, cfg, 2, 100.0, 10.0) == optimization.BudgetPlan(12, 10.0)
    assert epochs(6)[-1] == pytest.approx(optimization.warmup_cosine(10, 400)(80))
    assert plan(sched, opt, 10, cfg, 8, 40.0, 10.0) == optimization.BudgetPlan(12, 10.0)
    # ... until the last quarter of them (3 of 12): from there a fresh cosine reaches 0 at the end of epoch 12.
    epochs(1)
    lr9 = opt.param_groups[0]["lr"]
    assert plan(sched, opt, 10, cfg, 9, 30.0, 10.0) == optimization.BudgetPlan(
        12, 10.0, optimization.Replan("fresh", pytest.approx(lr9), 9, 12))
    lrs = epochs(3)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and all(a > b for a, b in zip([lr9] + lrs, lrs))
    # At the planned end the learning rate is 0: the run is complete, even when one more epoch would fit.
    assert plan(sched, opt, 10, cfg, 12, 15.0, 10.0) == optimization.BudgetPlan(12, 10.0, stop=True, ended=True)
    # Annealing, one epoch more than planned is noise; two more move the end; none left: stop, saying why.
    assert plan(sched, opt, 10, cfg, 10, 25.0, 10.0) == optimization.BudgetPlan(12, 10.0)
    assert plan(sched, opt, 10, cfg, 10, 40.0, 10.0).replan.epochs == 14
    assert plan(sched, opt, 10, cfg, 11, 5.0, 10.0) == optimization.BudgetPlan(11, 10.0, stop=True)


def budgeted_toy_run(tmp_path, monkeypatch, seconds) -> dict:
    """A toy run of 40 epochs in a 125 s budget under a clock that moves seconds(epoch) in each epoch's training
    and stands still otherwise (validation and the fits take 0 s); its summary."""
    data = make_synthetic(tmp_path / "data", 8, size=32, seed=0)
    clock, epochs = [1e9], []
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    real_epoch = train.train_one_epoch

    def timed(*args, **kwargs):
        epochs.append(len(epochs) + 1)
        clock[0] += seconds(epochs[-1])
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", timed)
    assert train.main(train_args(data, tmp_path, "--epochs", "40", "--time-budget", "125",
                                 "--novelty-score", "none", "--max-rotation", "0")) == 0
    return runs.read_summary(tmp_path / "logs", "t")


def test_a_budgeted_toy_run_ends_at_the_bottom_of_its_cosine(tmp_path, monkeypatch, capsys):
    """A clock that moves 10 s in each epoch's training and stands still otherwise: with 125 s, 12 of the 40
    epochs fit (nothing is set aside: validation takes 0 s), the last 3 anneal, and the run stops at 12 with its
    learning rate at 0, where a cut-off schedule would still be near its top."""
    summary = budgeted_toy_run(tmp_path, monkeypatch, lambda epoch: 10.0)
    out = capsys.readouterr().out
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(1, 13))
    assert summary["stop_reason"] == "completed"
    assert summary["plan"] == {"last_epoch": 12, "epoch_seconds": 10.0, "replan": None, "stop": True,
                               "seconds_after": 0.0, "ended": True}
    # What train.py says of its plan (the test of its printed lines):
    assert "time budget 125s: about 12 of 40 epochs fit; the learning rate will anneal to 0 over the last 3" in out
    assert "time budget 125s: 12 epochs fit at 10.0s; the learning rate follows a fresh cosine" in out
    assert "after epoch 9 down to 0 at epoch 12" in out
    schedule = optimization.warmup_cosine(2, 80)  # 16 images in batches of 8: 2 steps an epoch, 40 epochs
    assert [h["lr"] for h in history[:9]] == pytest.approx([1e-3 * 4 * schedule(2 * e) for e in range(1, 10)])
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12) and history[8]["lr"] > 3e-3


def test_a_budgeted_run_whose_epochs_speed_up_while_annealing_stops_at_its_planned_end(tmp_path, monkeypatch,
                                                                                       capsys):
    """Epochs of 10 s, then of 8 s from epoch 10, in a 125 s budget: the plan anneals to 0 at epoch 12; after it
    one more epoch would fit, but at learning rate 0 it would learn nothing, so the run ends there, complete."""
    summary = budgeted_toy_run(tmp_path, monkeypatch, lambda epoch: 10.0 if epoch < 10 else 8.0)
    out = capsys.readouterr().out
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 13))
    assert summary["stop_reason"] == "completed" and summary["plan"]["ended"] is True
    assert summary["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert "epoch 13/" not in out


def test_replanning_before_the_backbone_is_unfrozen_keeps_the_two_phase_schedule():
    schedule = optimization.LRSchedule(warmup_steps=10, phase1_steps=100, total_steps=100)  # all frozen, 100 steps
    assert schedule.replan(100, 300, 100) == "two-phase"
    assert [schedule(s) for s in (100, 150, 300)] == \
        [optimization.two_phase_schedule(10, 100, 300)(s) for s in (100, 150, 300)]


@pytest.mark.slow
def test_tensorboard_gets_the_named_scalars(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.main(train_args(tiny_data, tmp_path, "--epochs", "2"))
    acc = EventAccumulator(str(tmp_path / "logs" / "t"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "acc/train", "acc/val", "lr"} <= tags
    assert [e.step for e in acc.Scalars("acc/val")] == [1, 2]


@pytest.mark.slow
def test_resume_continues_at_the_right_epoch(tiny_data, tmp_path):
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "1")) == 0
    first = torch.load(tmp_path / "models" / "last.pth", weights_only=True)
    assert first["epoch"] == 1
    # Only --resume, --out-dir and --epochs: the rest comes from the saved config.
    assert train.main(["--resume", "--out-dir", str(tmp_path / "models"), "--epochs", "3"]) == 0
    summary = read_summary(tmp_path / "logs", "t")  # the resumed run keeps its name
    assert summary["epochs_run"] == 2 and [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    last = torch.load(tmp_path / "models" / "last.pth", weights_only=True)
    assert last["epoch"] == 3 and [h["epoch"] for h in last["history"]] == [1, 2, 3]
    assert last["config"]["data"] == str(tiny_data)


@pytest.mark.slow
@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_resume_equals_an_uninterrupted_run(tiny_data, tmp_path, ema):
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(train_args(tiny_data, a, "--epochs", "2", "--ema-decay", ema))
    train.main(train_args(tiny_data, b, "--epochs", "2", "--ema-decay", ema) + ["--epochs", "1"])
    train.main(["--resume", "--out-dir", str(b / "models"), "--epochs", "2"])
    ca, cb = (torch.load(run / "models" / "last.pth", weights_only=True) for run in (a, b))
    assert [h["val_loss"] for h in ca["history"]] == pytest.approx([h["val_loss"] for h in cb["history"]], rel=1e-4)
    for key in ("model_state", "raw_model_state") if ema != "0" else ("model_state",):
        for name, value in ca[key].items():
            assert torch.allclose(value.float(), cb[key][name].float(), atol=1e-5), (key, name)


def test_ema_is_a_moving_average_with_a_short_warmup():
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    ema = optimization.ema_of(model, decay=0.5)
    weights = []
    for step in range(4):
        with torch.no_grad():
            model[0].weight.fill_(float(step + 1))
            model[1].running_mean.fill_(float(10 * (step + 1)))
        weights.append(step + 1.0)
        ema.update_parameters(model)
    # The first update copies; then decay = min(0.5, (1 + n) / (10 + n)) for n = 1, 2, 3 earlier updates.
    expected_w, expected_m = 1.0, 10.0
    for n, w in zip((1, 2, 3), weights[1:]):
        d = min(0.5, (1 + n) / (10 + n))
        expected_w, expected_m = d * expected_w + (1 - d) * w, d * expected_m + (1 - d) * 10 * w
    assert ema.module[0].weight.flatten().tolist() == pytest.approx([expected_w] * 2)
    assert ema.module[1].running_mean.item() == pytest.approx(expected_m)  # BatchNorm statistics are averaged too
    assert ema.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item()


@pytest.mark.slow
def test_with_ema_the_checkpoint_holds_the_average_and_last_pth_the_raw_weights(tiny_data, tmp_path):
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "2", "--ema-decay", "0.9")) == 0
    last = torch.load(tmp_path / "models" / "last.pth", weights_only=True)
    assert last["ema_steps"] == sum(h["train_images"] for h in last["history"]) // 8
    averaged, raw = last["model_state"], last["raw_model_state"]
    assert averaged.keys() == raw.keys()
    assert not torch.equal(averaged["fc.weight"], raw["fc.weight"])


@pytest.mark.slow
def test_same_seed_same_metrics(tiny_data, tmp_path):
    for run in ("a", "b"):
        assert train.main(train_args(tiny_data, tmp_path / run, "--epochs", "2")) == 0
    ha, hb = (torch.load(tmp_path / r / "models" / "last.pth", weights_only=True)["history"] for r in "ab")
    assert [(h["train_loss"], h["val_loss"], h["val_acc"]) for h in ha] == \
           [(h["train_loss"], h["val_loss"], h["val_acc"]) for h in hb]


@pytest.mark.slow
def test_classes_subset_and_val_split_without_val_folder(tmp_path):
    data = make_synthetic(tmp_path / "d", {"cat": 10, "dog": 10, "horse": 10}, size=24, splits=("train",))
    assert train.main(train_args(data, tmp_path, "--classes", "cat", "dog")) == 0
    ckpt = load_checkpoint(tmp_path / "models" / "best_model.pth")
    assert ckpt["classes"] == ["cat", "dog"] and ckpt["layout"]["carve"] == {"val": 0.2}
    assert ckpt["history"][0]["train_images"] == 16  # 20 of cat and dog, 4 carved to val


@pytest.mark.slow
def test_one_short_run_from_a_csv_labelled_set(tmp_path):
    """Dog Breed style: DATA/train/<id>.png and labels.csv id,breed with ids without the extension."""
    data = table_labelled_set(tmp_path / "dog-breed", 12, 32, ("great pyrenees", "beagle"), "{:04x}",
                              extra_rows="missing01,beagle\n")
    assert train.main(train_args(data, tmp_path, "--labels", str(data / "labels.csv"))) == 0
    ckpt = load_checkpoint(tmp_path / "models" / "best_model.pth")
    assert ckpt["layout"]["description"] == ("layout: labels from labels.csv (columns id -> breed) for the files in "
                                             "train/ (train); val = 20% of train (stratified, seed 0)")
    assert ckpt["history"][0]["train_images"] == 16  # 20 train images (4 carved to val) in batches of 8
    assert ckpt["classes"] == ["beagle", "great pyrenees"] and ckpt["config"]["labels"] == str(data / "labels.csv")
    assert ckpt["layout"]["source"] == "table" and ckpt["layout"]["carve"] == {"val": 0.2}


@pytest.mark.slow
def test_cat_and_dog_nested_layout_and_labels_from_names(tmp_path):
    gen = make_synthetic(tmp_path / "gen", 10, size=32, splits=("train", "test"))
    nested = tmp_path / "cat-and-dog"
    for split, name in (("train", "training_set"), ("test", "test_set")):
        for cls in ("cat", "dog"):
            (nested / name / name).mkdir(parents=True, exist_ok=True)
            (gen / split / cls).rename(nested / name / name / f"{cls}s")
    assert train.main(train_args(nested, tmp_path / "a", "--classes", "dogs", "cats")) == 0
    ckpt = load_checkpoint(tmp_path / "a" / "models" / "best_model.pth")
    assert ckpt["layout"]["description"] == ("layout: classes from folders in training_set/training_set/ (train) "
                                             "and test_set/test_set/ (test); val = 20% of train (stratified, seed 0)")
    assert ckpt["classes"] == ["cats", "dogs"] and ckpt["history"][0]["train_images"] == 16
    flat = tmp_path / "dogs-vs-cats" / "train"
    flat.mkdir(parents=True)
    for i, f in enumerate(sorted(nested.rglob("*.png"))):
        (flat / f"{f.parent.name[:-1]}.{i}.png").symlink_to(f)
    assert train.main(train_args(flat.parent, tmp_path / "b", "--labels-from-name")) == 0
    ckpt = load_checkpoint(tmp_path / "b" / "models" / "best_model.pth")
    assert ckpt["classes"] == ["cat", "dog"] and ckpt["layout"]["source"] == "names"
    assert ckpt["history"][0]["train_images"] == 16  # 20 train images in batches of 8


@pytest.mark.slow
def test_early_stopping(tiny_data, tmp_path):
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "30", "--patience", "1", "--lr", "0")) == 0
    summary = read_summary(tmp_path / "logs", "t")
    assert summary["stop_reason"] == "patience" and summary["plan"] is None
    assert summary["epochs_run"] == summary["best_epoch"] + 1 < 30  # stopped one epoch after the best


def test_stop_reason_is_patience_then_the_time_budget_else_none():
    cfg = TrainConfig(patience=3)
    progress = Progress(best={"acc": 0.9, "epoch": 4})
    assert loop.stop_reason(cfg, progress, 6, deadline=math.inf) is None
    assert loop.stop_reason(cfg, progress, 7, deadline=math.inf) is loop.Stop.PATIENCE
    assert loop.stop_reason(cfg, progress, 6, deadline=0.0) is loop.Stop.TIME_BUDGET
    assert loop.stop_reason(TrainConfig(patience=0), progress, 40, deadline=math.inf) is None


def test_class_weights_auto_are_inverse_frequency():
    w = optimization.class_weight_tensor(torch.tensor([0, 0, 0, 1]), 2, "auto")
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2]))
    assert optimization.class_weight_tensor(torch.tensor([0, 1]), 2, "none") is None


def test_warmup_cosine_schedule():
    f = optimization.warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-9)


def test_user_errors_exit_nonzero_with_one_line(tmp_path, capsys):
    one = make_synthetic(tmp_path / "one", {"cat": 4}, size=24, splits=("train",))
    data = make_synthetic(tmp_path / "d", 4, size=24, splits=("train",))
    # A bad --arch is refused by argparse before any data is read: test_config.py checks that.
    cases = [(train_args(tmp_path / "missing", tmp_path), "no dataset folder at"),
             (train_args(data, tmp_path, "--val-fraction", "0"), "no val split"),
             (train_args(data, tmp_path, "--labels", str(tmp_path / "none.csv")), "no labels table at"),
             (train_args(one, tmp_path), "at least 2"),
             (train_args(data, tmp_path, "--resume"), "nothing to resume"),
             (train_args(data, tmp_path, "--classes", "cat", "zebra"), "zebra")]
    for argv, message in cases:
        code = train.main(argv)
        err = capsys.readouterr().err
        assert code != 0, message
        assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.slow
def test_training_fits_a_temperature_and_logs_the_confusion_matrix(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train.run(parse_config(train_args(tiny_data, tmp_path, "--epochs", "2")))
    ckpt = load_checkpoint(tmp_path / "models" / "best_model.pth")
    assert ckpt["temperature"] == summary["temperature"] != 1.0
    # The reported calibration errors are those of the saved model's val predictions, before and after.
    _, val = load_data(read_layout(tiny_data), 32, 1)
    logits = predict_logits(model_from_checkpoint(ckpt), val.images, torch.device("cpu"), tta=True)
    for key, t in (("val_ece_before", 1.0), ("val_ece_after", ckpt["temperature"])):
        assert summary[key] == pytest.approx(expected_calibration_error(torch.softmax(logits / t, 1), val.labels),
                                             abs=1e-9), key
    acc = EventAccumulator(str(tmp_path / "logs" / "t"))
    acc.Reload()
    assert "confusion_matrix/val" in acc.Tags()["images"]
    assert "acc/val" in acc.Tags()["scalars"]


@pytest.mark.slow
def test_class_weights_change_the_loss(tmp_path):
    data = make_synthetic(tmp_path / "d", {"cat": 24, "dog": 8}, size=32, seed=3)
    losses = {}
    for mode in ("none", "auto"):
        assert train.main(train_args(data, tmp_path / mode, "--class-weights", mode, "--label-smoothing", "0")) == 0
        losses[mode] = torch.load(tmp_path / mode / "models" / "last.pth", weights_only=True)["history"][0]
    assert losses["auto"]["train_loss"] != pytest.approx(losses["none"]["train_loss"], rel=1e-3)
    # Inverse-frequency weights make a mistake on the rare class cost more.
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    w = optimization.class_weight_tensor(labels, 2, "auto")
    assert F.cross_entropy(logits, labels, weight=w) > F.cross_entropy(logits, labels)


def test_pretrained_needs_an_arch_with_imagenet_weights(tiny_data, tmp_path, capsys):
    code = train.main(train_args(tiny_data, tmp_path, "--pretrained"))  # arch resnet_small
    err = capsys.readouterr().err
    assert code == 2 and "resnet18, resnet50 or efficientnet_lite0" in err and "Traceback" not in err


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(("fc.", "rot."))}  # the two heads


def test_param_groups_freeze_and_frozen_batchnorm():
    model = SmallResNet(3, 1, 8)
    groups = optimization.finetune_param_groups(model, 1e-2, 0.05, 0.1)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert {id(p) for g in groups[2:] for p in g["params"]} == {id(model.fc.weight), id(model.fc.bias)}

    optimization.set_backbone_trainable(model, False)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    optimization.train_mode(model)
    assert model.training and model.fc.training
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    optimization.set_backbone_trainable(model, True)
    optimization.train_mode(model)
    assert all(p.requires_grad for p in model.parameters()) and all(m.training for m in model.modules())


@pytest.mark.slow
def test_two_phase_fine_tuning_from_a_weights_file(tmp_path):
    """Phase 1 leaves the pretrained backbone exactly as loaded; phase 2 (after --resume) changes it."""
    data = make_synthetic(tmp_path / "d", 8, size=24, seed=1)
    weights = tmp_path / "r18.pth"
    imagenet_like_resnet18(weights)
    expected = adapt_state_dict(torch.load(weights, weights_only=True), 1)
    # 16 px keeps resnet18 quick on a CPU: 8x8 after its stem.
    argv = train_args(data, tmp_path, "--arch", "resnet18", "--weights", str(weights), "--freeze-epochs", "1",
                      "--lr", "1e-2", "--image-size", "16", "--no-tta")
    assert train.main(argv) == 0
    phase1 = torch.load(tmp_path / "models" / "last.pth", weights_only=True)
    assert phase1["normalization"] == {"mean": [0.449], "std": [0.226]}
    state1 = phase1["model_state"]
    for k, v in _backbone(state1).items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, expected[k]), k  # weights and BatchNorm statistics untouched
    assert not torch.equal(state1["fc.weight"], build_model("resnet18", 2, 1, image_size=16).fc.weight)

    # The resumed run starts in phase 2 (the unfreezing within one run is tested with torchrun, in
    # test_distributed.py, where DDP must be rebuilt).
    assert train.main(["--resume", "--out-dir", str(tmp_path / "models"), "--epochs", "2"]) == 0
    phase2 = torch.load(tmp_path / "models" / "last.pth", weights_only=True)
    assert phase2["epoch"] == 2
    changed = [k for k, v in _backbone(phase2["model_state"]).items() if not torch.equal(v, state1[k])]
    assert "conv1.weight" in changed and "layer4.1.conv2.weight" in changed
    lrs = [g["lr"] for g in phase2["optimizer_state"]["param_groups"]]
    assert lrs[0] == pytest.approx(lrs[2] * 0.1) and lrs[2] > 0

    # Inference normalizes with the checkpoint's statistics, not the [-1, 1] default.
    ckpt = load_checkpoint(tmp_path / "models" / "last.pth")
    image = next((data / "test" / "cat").iterdir())
    result = inference.classify([image], Classifier(ckpt, tta=False))[0]
    x = image_tensor(image, 16, 1, ckpt["normalization"])
    with torch.no_grad():
        probs = torch.softmax(model_from_checkpoint(ckpt)(x), 1)[0]
    assert result["confidence"] == pytest.approx(probs.max().item(), abs=1e-4)


@pytest.mark.slow
def test_image_size_48_and_rgb_end_to_end(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", 8, size=56, seed=3)
    assert train.main(train_args(data, tmp_path, "--image-size", "48", "--channels", "3")) == 0
    ckpt = load_checkpoint(tmp_path / "models" / "best_model.pth")
    assert (ckpt["image_size"], ckpt["channels"]) == (48, 3)
    assert model_from_checkpoint(ckpt).stem[0].in_channels == 3
    capsys.readouterr()
    image = next((data / "test" / "dog").iterdir())
    assert inference.main(["--image", str(image), "--checkpoint", str(tmp_path / "models" / "best_model.pth")]) == 0
    label, conf = expected_answer(ckpt, image)
    assert capsys.readouterr().out == f"{label}  {conf:.2f}\n"


@pytest.mark.slow
def test_many_classes_report_top5(tmp_path):
    classes = {f"shape{k:02d}": 4 for k in range(12)}
    data = make_synthetic(tmp_path / "d", classes, size=40, seed=4)
    assert train.main(train_args(data, tmp_path)) == 0
    ckpt = load_checkpoint(tmp_path / "models" / "last.pth")
    assert ckpt["classes"] == sorted(classes)
    h = ckpt["history"][0]
    assert h["val_acc"] <= h["val_top5"]  # the right class among the best 5 at least as often as first
    results = inference.classify(sorted((data / "test").rglob("*.png"))[:3], Classifier(ckpt))
    assert all(r["label"] in classes for r in results)


class _Lookup(torch.nn.Module):
    """Returns preset logits for images whose pixels all hold their row number."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.fc = torch.nn.Linear(1, logits.shape[1])

    def forward(self, x):
        rows = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
        return self.logits[rows]


def test_evaluate_top5_counts_a_label_among_the_five_best():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3],    # label 0: top-1
                           [9.0, 8, 7, 6, 5, 4, 3],    # label 4: top-5 only
                           [9.0, 8, 7, 6, 5, 4, 3],    # label 6: neither
                           [0.0, 0, 0, 0, 0, 0, 9]])   # label 6: top-1
    images = torch.arange(4, dtype=torch.uint8)[:, None, None, None].expand(4, 1, 2, 2).clone()
    data = Split(images, torch.tensor([0, 4, 6, 6]), ["a", "b", "c", "d"])
    ev = loop.validate(_Lookup(logits), data, torch.device("cpu"))
    assert ev["acc"] == 0.5 and ev["top5"] == 0.75
    assert "top5" not in loop.validate(_Lookup(logits[:, :5]), Split(images, torch.tensor([0, 4, 1, 1]),
                                                                       ["a", "b", "c", "d"]), torch.device("cpu"))


# ---------------------------------------------------------------- mixed precision
# Which autocast dtype each device gets, and fp16 training through a GradScaler (CPU tests; the CUDA queries are
# replaced by stand-ins for the GPUs in question).

CUDA = torch.device("cuda")


def fake_gpu(native_bf16: bool, emulated_bf16: bool):
    """A torch.cuda.is_bf16_supported for a GPU that computes bf16 natively (A100, H100...), only emulates it
    (T4, V100: counted by the default including_emulation=True), or has none."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or (including_emulation and emulated_bf16)
    return is_bf16_supported


@pytest.mark.parametrize("native, emulated, expected", [(True, True, torch.bfloat16), (False, True, torch.float16),
                                                        (False, False, torch.float16)])
def test_cuda_uses_bf16_only_where_it_is_native(monkeypatch, native, emulated, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_gpu(native, emulated))
    assert common.pick_amp_dtype(CUDA, enabled=True) is expected
    assert common.pick_amp_dtype(CUDA, enabled=False) is None


@pytest.mark.parametrize("native_cpu, expected", [(True, torch.bfloat16), (False, None)])
def test_cpu_uses_bf16_where_native_else_fp32(monkeypatch, native_cpu, expected):
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: native_cpu)
    assert common.pick_amp_dtype(torch.device("cpu"), enabled=True) is expected
    assert common.pick_amp_dtype(torch.device("mps"), enabled=True) is None


def test_only_fp16_needs_a_grad_scaler_and_the_start_up_line_says_which():
    assert [common.needs_grad_scaler(d) for d in (torch.float16, torch.bfloat16, None)] == [True, False, False]
    assert common.precision_name(torch.float16) == "fp16 autocast + GradScaler"
    assert common.precision_name(torch.bfloat16) == "bf16 autocast"
    assert common.precision_name(None) == "fp32"


@pytest.mark.slow
def test_fp16_training_steps_go_through_the_grad_scaler(tiny_data, tmp_path, monkeypatch, capsys):
    """fp16 as on a GPU without native bf16 (CPU autocast computes fp16 too): every step is scaled, stepped by the
    scaler and followed by its update, and the run trains and saves as usual."""
    calls = {"scale": 0, "step": 0, "update": 0}
    for name in calls:
        original = getattr(torch.amp.GradScaler, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.amp.GradScaler, name, spy)
    monkeypatch.setattr(train, "pick_amp_dtype", lambda device, enabled: torch.float16 if enabled else None)
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "2")) == 0
    out = capsys.readouterr().out
    assert "fp16 autocast + GradScaler" in out.split("device: ", 1)[1].splitlines()[0]
    steps = 2 * (32 // 8)  # 16 train images per class, batch 8
    assert calls == {"scale": steps, "step": steps, "update": steps}
    assert (tmp_path / "models" / "best_model.pth").is_file()


@pytest.mark.slow
def test_without_fp16_there_is_no_grad_scaler(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", lambda *a, **k: pytest.fail("GradScaler built"))
    assert train.main(train_args(tiny_data, tmp_path, "--no-amp")) == 0
    assert "fp32" in capsys.readouterr().out.split("device: ", 1)[1].splitlines()[0]


def test_the_fp16_loss_scale_survives_a_resume(tmp_path):
    """With fp16 autocast (CUDA GPUs without bf16) last.pth keeps the GradScaler's scale and --resume restores it,
    rather than starting again from 65,536 and skipping steps until it has shrunk back."""
    cfg = parse_config(["--out-dir", str(tmp_path), "--width", "4", "--image-size", "16", "--epochs", "2"])
    data = Split(torch.zeros(8, 1, 16, 16, dtype=torch.uint8), torch.tensor([0, 1] * 4), [f"{i}.png" for i in range(8)])
    cpu = torch.device("cpu")
    saved = loop.build_trainer(cfg, data, 2, cpu, torch.float16, None)
    saved.scaler.scale(torch.ones(()))  # the scale starts at 65,536 on first use
    saved.scaler.update(new_scale=512.0)
    progress = Progress(history=[{"epoch": 1, "train_seconds": 1.0}], best={"acc": 0.5, "epoch": 1})
    train.save_epoch(saved, cfg, ["a", "b"], {}, progress, {"val": {}, "train": {}}, improved=False, finite=True)
    last = load_checkpoint(tmp_path / train.LAST)
    assert last["scaler_state"]["scale"] == 512.0
    resumed = loop.build_trainer(cfg, data, 2, cpu, torch.float16, None)
    assert loop.restore(resumed, cfg, last) == (Progress(1, progress.history, progress.best, saved_epoch=1,
                                                          train_seconds=1.0, started=pytest.approx(0, abs=1e12)), None)
    assert resumed.scaler.get_scale() == 512.0
    # a last.pth written without loss scaling (bf16, fp32) resumes under fp16 with a fresh scaler
    plain = loop.build_trainer(cfg, data, 2, cpu, None, None)
    train.save_epoch(plain, cfg, ["a", "b"], {}, progress, {"val": {}, "train": {}}, improved=False, finite=True)
    assert "scaler_state" not in load_checkpoint(tmp_path / train.LAST)
    fresh = loop.build_trainer(cfg, data, 2, cpu, torch.float16, None)
    loop.restore(fresh, cfg, load_checkpoint(tmp_path / train.LAST))
    fresh.scaler.scale(torch.ones(()))
    assert fresh.scaler.get_scale() == 65536.0


def test_unlabeled_views_are_of_the_same_images():
    """Black and white unlabelled images: row i of the weak and of the strong view come from one image (the
    strong view's photometric changes keep a black image dark and a white one light)."""
    cfg = TrainConfig(image_size=16, width=4, epochs=1)
    images = torch.zeros(40, 1, 16, 16, dtype=torch.uint8)
    images[::2] = 255
    unlabeled = Split(images, torch.full((40,), -1), [f"{i}.png" for i in range(40)])
    t = loop.build_trainer(cfg, unlabeled, 2, torch.device("cpu"), None, None)
    weak, strong = loop.unlabeled_views(t, unlabeled, torch.randperm(40)[:32], cfg)
    assert weak.shape == strong.shape == (32, 1, 16, 16)
    light = weak.mean((1, 2, 3)) > 0
    assert light.any() and (~light).any() and torch.equal(strong.median(-1).values.median(-1).values[:, 0] > 0,
                                                            light)


@pytest.mark.slow
def test_unlabeled_images_train_in_the_same_steps_and_never_count_as_labelled(tiny_data, tmp_path):
    unlabeled = make_synthetic(tmp_path / "u", {"thing": 24}, size=32, seed=7, splits=("train",))
    other = make_synthetic(tmp_path / "o", {"else": 8}, size=32, seed=8, splits=("train",))
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "2", "--unlabeled", str(unlabeled),
                                 "--pseudo-threshold", "0.5", "--unlabeled-ratio", "2", "--other", str(other),
                                 "--other-synthetic", "0")) == 0
    ckpt = load_checkpoint(tmp_path / "models" / "last.pth")
    assert ckpt["config"]["unlabeled"] == str(unlabeled) and ckpt["config"]["unlabeled_ratio"] == 2.0
    assert load_checkpoint(tmp_path / "models" / "best_model.pth")["novelty"]["score"] == "combined"
    labelled = load_checkpoint(tmp_path / "models" / "last.pth")["history"]
    assert [h["train_images"] for h in labelled] == [32, 32]  # the labelled images only: 32 in batches of 8
    assert all(0.0 <= h["pseudo_share"] <= 1.0 for h in labelled)
    plain = tmp_path / "plain"
    assert train.main(train_args(tiny_data, plain, "--epochs", "2")) == 0
    assert "pseudo_share" not in load_checkpoint(plain / "models" / "last.pth")["history"][0]
    with pytest.raises(common.UserError, match="--unlabeled needs --unlabeled-ratio above 0"):
        parse_config(["--unlabeled", str(unlabeled), "--unlabeled-ratio", "0"])


def test_an_epoch_with_unlabeled_images_is_one_pass_over_them_while_the_labelled_batches_cycle():
    cfg = TrainConfig(image_size=16, width=4, batch_size=8, unlabeled="u", unlabeled_ratio=2.0)
    labelled = Split(torch.zeros(20, 1, 16, 16, dtype=torch.uint8), torch.zeros(20, dtype=torch.long),
                     [f"{i}.png" for i in range(20)])
    t = loop.build_trainer(cfg, labelled, 2, torch.device("cpu"), None, None, n_unlabeled=100)
    assert t.steps_per_epoch == 6  # 100 unlabelled images, 16 a step (2 per labelled image), the last 4 dropped
    pairs = list(loop.epoch_batches(t, 20, 100, cfg))
    assert len(pairs) == 6 and all(len(idx) == 8 and len(u) == 16 for idx, u in pairs)
    seen = torch.cat([u for _, u in pairs])
    assert len(seen.unique()) == 96 and int(seen.max()) < 100  # each unlabelled image at most once an epoch
    first_pass = torch.cat([idx for idx, _ in pairs[:2]])
    assert len(first_pass.unique()) == 16 and int(torch.cat([idx for idx, _ in pairs]).max()) < 20
    # without unlabelled images, an epoch is exactly one pass over the labelled ones, as before
    plain = loop.build_trainer(dataclasses.replace(cfg, unlabeled=""), labelled, 2, torch.device("cpu"), None, None)
    torch.manual_seed(0)
    plain.generator.manual_seed(3)
    got = [idx for idx, u in loop.epoch_batches(plain, 20, 0, cfg)]
    want = list(shard_batches(20, 8, torch.Generator().manual_seed(3)))
    assert plain.steps_per_epoch == 2 and len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert loop.unlabeled_batch_size(5, cfg) == 5  # a folder smaller than a step's share: all of it each step


@pytest.mark.parametrize("ema_decay", [0.995, 0.0])
def test_pseudo_labels_come_from_the_evaluated_model_in_eval_mode_and_training_goes_on_in_train_mode(ema_decay):
    cfg = TrainConfig(image_size=16, width=4, ema_decay=ema_decay, channels_last=False)
    data = Split(torch.zeros(8, 1, 16, 16, dtype=torch.uint8), torch.zeros(8, dtype=torch.long),
                 [f"{i}.png" for i in range(8)])
    t = loop.build_trainer(cfg, data, 2, torch.device("cpu"), None, None)
    optimization.train_mode(t.model)
    weak = torch.randn(4, 1, 16, 16)
    logits = loop.teacher_logits(t, weak, cfg)
    assert logits.shape == (4, 2) and not logits.requires_grad and t.model.training
    with torch.no_grad():
        expected = t.eval_model.eval()(weak)  # eval mode: BatchNorm's running statistics, not the batch's
    optimization.train_mode(t.model)
    assert torch.allclose(logits, expected) and (t.ema is None) == (t.eval_model is t.model)
