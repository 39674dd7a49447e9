"""Several processes (torchrun): which rank this is, the process group, summing figures over ranks, each rank's
share of the batches, and the wrapped module the training steps call. In a plain `python train.py` every function
here is the one-process case: rank 0 of 1, nothing to sum, the plain model.

Usage (from train.py):
    device = init_distributed(pick_device("auto"))   # joins torchrun's group; cuda:LOCAL_RANK on GPUs
    if is_main_rank(): ...                           # the process that prints, logs and writes files
    loss, n = all_reduce_sum([loss, n], device)
    for idx in shard_batches(len(train), 128, generator, *rank_world()): ...
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from core.common import UserError
from dataset import batches
from model import WithRotationHead, has_rotation_head


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless running under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_rank() -> bool:
    """The process that prints, logs and writes files: the only one, or rank 0 under torchrun."""
    return rank_world()[0] == 0


def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1) join the process group, NCCL on CUDA and gloo on CPU, and return this
    rank's device (cuda:LOCAL_RANK on GPUs). A plain `python train.py` gets `device` back untouched."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "mps":
        raise UserError("torchrun needs --device cuda or --device cpu (no process groups on mps)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def quiet_unless_rank0():
    """Under torchrun only rank 0 prints; the other ranks' stdout goes to /dev/null (errors still reach stderr)."""
    if int(os.environ.get("RANK", "0")) == 0:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums of these numbers over all ranks; the numbers themselves in a single process."""
    if rank_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one: ranks must agree to skip a step or stop, or DDP waits forever."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def shard_batches(n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1):
    """This rank's shuffled training batches for one epoch. Every rank draws the same permutation (generators
    seeded alike stay in step) and takes every world-th index, cut to equal lengths so all ranks run the same
    number of steps. In one process this is exactly batches(..., drop_last=True)."""
    if world == 1:
        yield from batches(n, batch_size, True, generator, drop_last=True)
        return
    order = torch.randperm(n, generator=generator)
    order = order[:n - n % world][rank::world]
    for idx in batches(len(order), batch_size, False, drop_last=True):
        yield order[idx]


def wrap_for_training(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """The module the training steps call: DistributedDataParallel under torchrun, compiled with --compile.
    Built again when the backbone is unfrozen, since DDP only syncs parameters that were trainable when built."""
    if has_rotation_head(model):
        model = WithRotationHead(model)
    if rank_world()[1] > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    return torch.compile(model) if compile else model
