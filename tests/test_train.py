import json

import pytest
import torch

import train
from conftest import train_args
from dataset import make_synthetic
from model import load_checkpoint, model_from_checkpoint, predict_logits


def test_one_epoch_writes_checkpoints_logs_and_curves(tiny_data, tmp_path, capsys):
    assert train.main(train_args(tiny_data, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "config:" in out and "done: best val acc" in out
    assert (tmp_path / "models" / "best_model.pth").is_file()
    assert (tmp_path / "models" / "last.pth").is_file()
    run_dir = tmp_path / "logs" / "t"
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 1
    assert (tmp_path / "curves" / "training_curves.png").is_file()


def test_tensorboard_gets_the_named_scalars(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.main(train_args(tiny_data, tmp_path, "--epochs", "2"))
    acc = EventAccumulator(str(tmp_path / "logs" / "t"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "acc/train", "acc/val", "lr"} <= tags
    assert [e.step for e in acc.Scalars("acc/val")] == [1, 2]


def test_checkpoint_is_self_sufficient_and_round_trips(trained):
    raw = torch.load(trained["checkpoint"], weights_only=True)
    assert raw["classes"] == ["cat", "dog"] and raw["image_size"] == 32 and raw["channels"] == 1
    assert raw["normalization"] == {"mean": 0.5, "std": 0.5}
    assert isinstance(raw["config"], dict) and raw["config"]["arch"] == "resnet_small"
    assert 1 <= raw["epoch"] <= 3 and "val" in raw["metrics"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in raw["model_state"])
    model = model_from_checkpoint(load_checkpoint(trained["checkpoint"]))
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    again = model_from_checkpoint(load_checkpoint(trained["checkpoint"]))
    cpu = torch.device("cpu")
    assert torch.equal(predict_logits(model, x, cpu), predict_logits(again, x, cpu))


def test_resume_continues_at_the_right_epoch(tiny_data, tmp_path, capsys):
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "1")) == 0
    first = torch.load(tmp_path / "models" / "last.pth", weights_only=True)
    assert first["epoch"] == 1
    capsys.readouterr()
    # Only --resume, --out-dir and --epochs: the rest comes from the saved config.
    assert train.main(["--resume", "--out-dir", str(tmp_path / "models"), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "resuming after epoch 1" in out
    assert "epoch 2/3" in out and "epoch 3/3" in out and "epoch 1/3" not in out
    last = torch.load(tmp_path / "models" / "last.pth", weights_only=True)
    assert last["epoch"] == 3 and [h["epoch"] for h in last["history"]] == [1, 2, 3]
    assert last["config"]["data"] == str(tiny_data)


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
    ema = train.ema_of(model, decay=0.5)
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


def test_with_ema_the_checkpoint_holds_the_average_and_last_pth_the_raw_weights(tiny_data, tmp_path):
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "2", "--ema-decay", "0.9")) == 0
    last = torch.load(tmp_path / "models" / "last.pth", weights_only=True)
    assert last["ema_steps"] == sum(h["train_images"] for h in last["history"]) // 8
    averaged, raw = last["model_state"], last["raw_model_state"]
    assert averaged.keys() == raw.keys()
    assert not torch.equal(averaged["fc.weight"], raw["fc.weight"])


def test_same_seed_same_metrics(tiny_data, tmp_path):
    for run in ("a", "b"):
        assert train.main(train_args(tiny_data, tmp_path / run, "--epochs", "2")) == 0
    ha, hb = (torch.load(tmp_path / r / "models" / "last.pth", weights_only=True)["history"] for r in "ab")
    assert [(h["train_loss"], h["val_loss"], h["val_acc"]) for h in ha] == \
           [(h["train_loss"], h["val_loss"], h["val_acc"]) for h in hb]


def test_classes_subset_and_val_split_without_val_folder(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", {"cat": 10, "dog": 10, "horse": 10}, size=24, splits=("train",))
    assert train.main(train_args(data, tmp_path, "--classes", "cat", "dog")) == 0
    assert "16 train / 4 val images, classes ['cat', 'dog']" in capsys.readouterr().out
    assert torch.load(tmp_path / "models" / "best_model.pth", weights_only=True)["classes"] == ["cat", "dog"]


def test_early_stopping(tiny_data, tmp_path, capsys):
    train.main(train_args(tiny_data, tmp_path, "--epochs", "30", "--patience", "1", "--lr", "0"))
    out = capsys.readouterr().out
    assert "early stop" in out and "epoch 30/30" not in out


def test_class_weights_auto_are_inverse_frequency():
    w = train.class_weight_tensor(torch.tensor([0, 0, 0, 1]), 2, "auto")
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2]))
    assert train.class_weight_tensor(torch.tensor([0, 1]), 2, "none") is None


def test_warmup_cosine_schedule():
    f = train.warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-9)


def test_user_errors_exit_nonzero_with_one_line(tmp_path, capsys):
    one = make_synthetic(tmp_path / "one", {"cat": 4}, size=24, splits=("train",))
    data = make_synthetic(tmp_path / "d", 4, size=24, splits=("train",))
    # A bad --arch is refused by argparse before any data is read: test_config.py checks that.
    cases = [(train_args(tmp_path / "missing", tmp_path), "no dataset at"),
             (train_args(one, tmp_path), "at least 2"),
             (train_args(data, tmp_path, "--resume"), "nothing to resume"),
             (train_args(data, tmp_path, "--classes", "cat", "zebra"), "zebra")]
    for argv, message in cases:
        code = train.main(argv)
        err = capsys.readouterr().err
        assert code != 0, message
        assert err.startswith("error: ") and message in err and "Traceback" not in err
