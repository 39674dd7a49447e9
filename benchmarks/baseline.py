"""The plain pipeline bench.py compares against: what most image-classifier repos do.

Usage:
    python -m benchmarks.baseline --data ../shared/data/catdog                 # 1 epoch, one JSON line per epoch
    python -m benchmarks.baseline --data DATA --epochs 3 --max-seconds 400 --workers 2
    python -m benchmarks.baseline --data DATA --device cuda                   # the same pipeline on a GPU

Recipe: torchvision ImageFolder, with PIL decoding and transforms on every image of every epoch (grayscale,
resize to 64x64, random mirror and rotation of up to 10 degrees for training, [-1, 1] normalization);
torchvision ResNet-18 (weights=None) whose first convolution takes 1 channel and whose head has one logit per
class; Adam at lr 1e-3, cross-entropy, batch 32; the model on --device and each batch copied there (pinned on
CUDA). DATA holds train/<class>/* and val/<class>/* (or test/).
Each line: epoch, train images/s, val accuracy and wall seconds since training started (evaluation included).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.models import resnet18

from core.common import UserError, pick_device, reports_user_errors


def pil_transforms(size: int, train: bool) -> transforms.Compose:
    """PIL image -> normalized (1, size, size) tensor; training adds a random mirror and rotation."""
    steps = [transforms.Grayscale(num_output_channels=1), transforms.Resize((size, size))]
    if train:
        steps += [transforms.RandomHorizontalFlip(), transforms.RandomRotation(10)]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])


def gray_resnet18(num_classes: int) -> nn.Module:
    """torchvision's ResNet-18, untrained, with a 1-channel 7x7 stride-2 first convolution."""
    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(1, net.conv1.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def eval_folder(data: Path) -> Path:
    """DATA/val, else DATA/test: the images accuracy is measured on."""
    for name in ("val", "test"):
        if (data / name).is_dir():
            return data / name
    raise UserError(f"{data} has neither val/ nor test/ to measure accuracy on")


def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            total += len(y)
    return right / max(1, total)


def train_baseline(data: str, epochs: int = 1, max_seconds: float = float("inf"), workers: int = 2,
                   batch_size: int = 32, size: int = 64, seed: int = 0, device: str = "cpu") -> Iterator[dict]:
    """Train the plain pipeline on `device` (the model there, each batch copied to it, as the usual
    `.to(device)` scripts do), yielding {epoch, train_images_per_s, val_acc, elapsed_s} after each epoch.
    Past max_seconds the current epoch stops after its step, is evaluated, and is the last one."""
    torch.manual_seed(seed)
    device = pick_device(device)
    root = Path(data)
    if not (root / "train").is_dir():
        raise UserError(f"no train/ folder in {root}")
    train_set = datasets.ImageFolder(str(root / "train"), pil_transforms(size, train=True))
    val_set = datasets.ImageFolder(str(eval_folder(root)), pil_transforms(size, train=False))
    if val_set.classes != train_set.classes:
        raise UserError(f"class folders differ: train {train_set.classes}, eval {val_set.classes}")
    pin = device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin)
    val_loader = DataLoader(val_set, batch_size=128, num_workers=workers, pin_memory=pin)
    model = gray_resnet18(len(train_set.classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    start = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        t_epoch, images = time.time(), 0
        for x, y in train_loader:
            optimizer.zero_grad()
            criterion(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
            images += len(y)
            if time.time() - start > max_seconds:
                break
        speed = images / (time.time() - t_epoch)
        yield {"epoch": epoch, "train_images_per_s": round(speed, 1), "val_acc": round(accuracy(model, val_loader, device), 4),
               "elapsed_s": round(time.time() - start, 1)}
        if time.time() - start > max_seconds:
            return


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset root with train/ and val/ (or test/)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over train/ (default: 1)")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="stop after the step that passes this many seconds (default: no limit)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: cpu)")
    args = parser.parse_args(argv)
    for row in train_baseline(args.data, args.epochs, args.max_seconds, args.workers, device=args.device):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
