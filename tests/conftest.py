"""Shared fixtures: tiny generated datasets and a trained toy checkpoint, all under pytest's tmp_path."""
from __future__ import annotations

from pathlib import Path

import pytest

from dataset import make_synthetic

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """train/val/test with 16 train images per class (cat, dog) at 40x40."""
    return make_synthetic(tmp_path / "data", 16, size=40, seed=1)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Fast flags for a toy run whose outputs all stay under `out`."""
    return ["--data", str(data), "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--width", "8",
            "--workers", "0", "--out-dir", str(out / "models"), "--log-dir", str(out / "logs"),
            "--curves-dir", str(out / "curves"), "--cache-dir", str(out / "cache"), "--run-name", "t", *extra]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """A toy model trained once for the whole session: {'data', 'out', 'checkpoint'}."""
    import train

    out = tmp_path_factory.mktemp("trained")
    data = make_synthetic(out / "data", 24, size=40, seed=2)
    assert train.main(train_args(data, out, "--epochs", "3")) == 0
    return {"data": data, "out": out, "checkpoint": out / "models" / "best_model.pth"}
