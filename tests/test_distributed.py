"""torchrun: DistributedDataParallel over 2 CPU processes (gloo), and the sharding of each epoch."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import train_args
from dataset import batches
from prediction.checkpoint import load_checkpoint, model_from_checkpoint
from test_multilabel import tagged_photos
from training.distributed import shard_batches

ROOT = Path(__file__).resolve().parents[1]


def test_shards_are_disjoint_equal_and_agree_with_one_process():
    n, bs, world = 37, 4, 3
    shards = [torch.cat(list(shard_batches(n, bs, torch.Generator().manual_seed(7), r, world)))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
    every = torch.cat(shards).tolist()
    assert len(every) == len(set(every)) and set(every) <= set(range(n))
    assert len(every) == world * ((n // world) // bs) * bs
    one = [b.tolist() for b in shard_batches(n, bs, torch.Generator().manual_seed(7))]
    assert one == [b.tolist() for b in batches(n, bs, True, torch.Generator().manual_seed(7), drop_last=True)]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_train_and_write_one_checkpoint(tiny_data, tmp_path):
    # Two epochs with the first frozen: DDP is rebuilt when the backbone is unfrozen.
    argv = train_args(tiny_data, tmp_path, "--device", "cpu", "--epochs", "2", "--freeze-epochs", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *argv]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes (gloo)" in r.stdout
    # Only rank 0 prints and writes.
    assert r.stdout.count("epoch 1/2") == 1 and r.stdout.count("epoch 2: backbone unfrozen") == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["best_model.pth", "last.pth"]
    assert len(list((tmp_path / "logs" / "t").glob("events.out.tfevents.*"))) == 1
    ckpt = load_checkpoint(tmp_path / "models" / "last.pth")
    # 32 training images: each rank trains on its 16 (2 steps of 8), and the counts are summed over ranks.
    assert ckpt["metrics"]["train"]["images"] == 32
    assert ckpt["epoch"] == 2 and not any(k.startswith("module.") for k in ckpt["model_state"])
    model = model_from_checkpoint(ckpt)  # loads strictly: every key of the unwrapped model, none of DDP's
    assert set(model.state_dict()) == set(ckpt["model_state"])


@pytest.mark.slow
def test_torchrun_trains_a_tag_model_with_the_same_val_map_on_every_rank(tmp_path):
    # Every rank scores all of val (an AP does not add up across ranks), so the best epoch is the same on each.
    data = tagged_photos(tmp_path / "tagged")
    argv = ["--data", str(data), "--labels", str(data / "labels.csv"), "--val-fraction", "0.25", "--device", "cpu",
            "--epochs", "2", "--batch-size", "8", "--workers", "0", "--out-dir", str(tmp_path / "models"),
            "--log-dir", str(tmp_path / "logs"), "--curves-dir", str(tmp_path / "curves"), "--run-name", "t"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *argv]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch 2/2") == 1 and "mAP" in r.stdout and "tags: thresholds fitted on val" in r.stdout
    ckpt = load_checkpoint(tmp_path / "models" / "best_model.pth")
    assert len(ckpt["tag_thresholds"]) == 3 and 0 <= ckpt["metrics"]["val"]["map"] <= 1
