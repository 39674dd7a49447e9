"""baseline.py: the plain pipeline bench.py compares against (ImageFolder + PIL, ResNet-18, Adam, batch 32)."""
import json

import torch
from PIL import Image

from benchmarks import baseline
from loading.synthetic import make_synthetic


def test_baseline_follows_the_recipe():
    """1-channel 7x7 stem, one logit per class; transforms resize to 64x64 and normalize to [-1, 1]."""
    net = baseline.gray_resnet18(3)
    assert net.conv1.in_channels == 1 and net.conv1.kernel_size == (7, 7) and net.fc.out_features == 3
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
    x = baseline.pil_transforms(64, train=False)(Image.new("RGB", (100, 80), (255, 255, 255)))
    assert x.shape == (1, 64, 64) and torch.allclose(x, torch.ones_like(x))


def test_baseline_yields_one_row_per_epoch(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", 4, size=24, splits=("train", "test"))
    assert baseline.main(["--data", str(data), "--epochs", "2", "--workers", "0"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(set(r) == {"epoch", "train_images_per_s", "val_acc", "elapsed_s"} for r in rows)


def test_baseline_without_a_val_or_test_folder_says_so(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", 4, size=24, splits=("train",))
    assert baseline.main(["--data", str(data)]) == 2
    assert "neither val/ nor test/" in capsys.readouterr().err
