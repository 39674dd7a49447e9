"""Train a ResNet image classifier on a folder of images.

Usage:
    python train.py                                    # trains on ./Dataset (any layout: README "Your data")
    python train.py --data PATH --epochs 20 --arch resnet18
    python train.py --data PATH --classes cat dog      # only these classes
    python train.py --data dog-breed --labels dog-breed/labels.csv   # labels in a CSV (id,breed)
    python train.py --data dogs-vs-cats --labels-from-name           # train/cat.0.jpg -> cat
    python train.py --resume                           # continue from models/last.pth
    python train.py --resume --epochs 60               # train on: a fresh cosine over the added epochs
    python train.py --config logs/RUN/config.json --seed 1   # a saved run's settings, a flag changed
    python train.py --arch resnet50 --pretrained --freeze-epochs 3 --lr 1e-3   # ImageNet weights, two phases
    python train.py --arch resnet18 --weights resnet18-f37072fd.pth            # weights file, no internet needed
    torchrun --nproc_per_node=4 train.py --data PATH   # DistributedDataParallel, one process per GPU
    python train.py --help                             # every setting, from config.py
    tensorboard --logdir logs

Writes models/best_model.pth (best val accuracy), models/last.pth (every epoch, for --resume),
logs/<run-name>/ (TensorBoard, config.json, results.csv) and curves/ (PNG plots). A new run first moves the
previous run's files to models/<its run name>/ and curves/<its run name>/; --resume continues in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from check_data import check_data
from checkpoint import (BEST, LAST, build_checkpoint, config_of, layout_info_of, load_checkpoint,
                        load_resume_checkpoint, model_from_checkpoint, normalization_of, novelty_record,
                        resume_state_of, save_checkpoint, temperature_of, tta_of, with_novelty, with_resume_state,
                        with_temperature)
from common import UserError, pick_device, remove_stale_temp_files
from config import NOVELTY_SCORES, TrainConfig, format_config, parse_config
from dataset import (RowView, Split, augment, batch_flip_lr, batches, expand_inputs, load_data, load_items,
                     load_split, preprocess, random_crops, rotate_quarters, to_float, to_uint8)
from layout import Layout, format_problems, layout_of, layout_splits
from metrics import (confusion_matrix, correct_count, expected_calibration_error, fit_temperature, loss_sum,
                     uniform_cross_entropy)
from model import (WithRotationHead, adapt_state_dict, build_model, has_rotation_head, input_normalization,
                   load_pretrained, unwrap)
from novelty import (accepted, fit_sample, fit_states, make_unknown_images, state_bytes, threshold_for_accept_rate,
                     unknown_report)
from plots import plot_confusion_matrix, plot_gallery, plot_history, save_figure
from predict import extract_features, predict_logits, score_images
from runs import (RESULTS, TRAIN_BATCH, TRAINING_CURVES, append_result, archive_previous_run, rewrite_results,
                  unique_run_name)


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 math (AVX512-BF16 or AMX), where bf16 autocast trains ~2x faster; elsewhere
    PyTorch emulates bf16 and it is slower than fp32. These checks are private to torch.cpu, hence the getattr."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def pick_amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for --amp on this device, or None for plain fp32."""
    if not enabled:
        return None
    if device.type == "cuda":
        # Only where the GPU computes bf16 natively (Ampere and later): T4/V100-class cards emulate it, slowly.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def needs_grad_scaler(amp_dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and fp32 needs none."""
    return amp_dtype == torch.float16


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """What the start-up line says about the arithmetic: 'fp32', 'bf16 autocast' or 'fp16 autocast + GradScaler'."""
    if amp_dtype is None:
        return "fp32"
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype] + " autocast"
    return name + (" + GradScaler" if needs_grad_scaler(amp_dtype) else "")


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate factor per step: linear warmup to 1, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class LRSchedule:
    """The learning-rate factor per step, LambdaLR's lambda: warmup_cosine, or two_phase_schedule when fine-tuning
    starts with a frozen backbone; after replan (--resume with another --epochs), a fresh cosine from the factor
    reached down to 0 at the new end.

    Plain attributes only: LambdaLR saves them in its state_dict (last.pth) and sets them again when that is
    loaded, so a run resumed once more continues the same schedule."""

    def __init__(self, warmup_steps: int, phase1_steps: int, total_steps: int):
        self.warmup_steps, self.phase1_steps, self.total_steps = warmup_steps, phase1_steps, total_steps
        self.restart_step, self.restart_factor = -1, 1.0  # where replan started the fresh cosine, and its height

    def __call__(self, step: int) -> float:
        if 0 <= self.restart_step <= step:
            progress = (step - self.restart_step) / max(1, self.total_steps - self.restart_step)
            return self.restart_factor * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if 0 < self.phase1_steps < self.total_steps:
            return two_phase_schedule(self.warmup_steps, self.phase1_steps, self.total_steps)(step)
        return warmup_cosine(self.warmup_steps, self.total_steps)(step)

    def replan(self, step: int, total_steps: int, phase1_steps: int) -> str:
        """From `step` on, a fresh cosine down to 0 at `total_steps`, starting at this step's factor, so the
        learning rate does not jump ('fresh'). A schedule that had reached its end (factor 0) starts instead from
        the factor a schedule planned for `total_steps` from the beginning has at `step` ('ended'). While the
        backbone is still to be unfrozen (fine-tuning), the two-phase schedule planned for `total_steps` follows,
        whose second phase starts with its own warmup ('two-phase')."""
        factor = self(step)
        self.restart_step, self.total_steps, self.phase1_steps = -1, total_steps, phase1_steps
        if step <= phase1_steps < total_steps:
            return "two-phase"
        if factor == 0.0:
            factor = self(step)
            how = "ended"
        else:
            how = "fresh"
        self.restart_step, self.restart_factor = step, factor
        return how


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # Decay conv and linear weights only: shrinking BN scales and biases just fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


# ---------------------------------------------------------------- transfer learning

def is_head(param_name: str) -> bool:
    return param_name.startswith(("fc.", "rot."))


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) every parameter but the head's (fc)."""
    for name, p in unwrap(model).named_parameters():
        if not is_head(name):
            p.requires_grad_(trainable)


def train_mode(model: nn.Module) -> None:
    """model.train(), except BatchNorm layers with frozen weights: they also keep their running statistics, so a
    frozen pretrained backbone computes what it computed on ImageNet while the head learns."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.weight is not None and not m.weight.requires_grad:
            m.eval()


def finetune_param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_factor: float) -> list[dict]:
    """Discriminative learning rates: the backbone learns at lr x backbone_lr_factor, the new head at lr.
    Weight decay on conv and linear weights only, as in make_optimizer."""
    groups = []
    for head, scale in ((False, backbone_lr_factor), (True, 1.0)):
        params = [p for n, p in unwrap(model).named_parameters() if is_head(n) == head]
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": lr * scale, "weight_decay": weight_decay})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": lr * scale, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.freeze_epochs > 0 or cfg.uses_pretrained:
        groups = finetune_param_groups(model, cfg.lr, cfg.weight_decay, cfg.backbone_lr_factor)
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return make_optimizer(model, cfg.lr, cfg.weight_decay)


def two_phase_schedule(warmup_steps: int, phase1_steps: int, total_steps: int):
    """warmup_cosine over the head-only phase, then a fresh warmup and cosine once the backbone is unfrozen:
    the warmup keeps the first full-network steps from wrecking the pretrained features."""
    first = warmup_cosine(warmup_steps, phase1_steps)
    second = warmup_cosine(warmup_steps, total_steps - phase1_steps)
    return lambda step: first(step) if step < phase1_steps else second(step - phase1_steps)


# ---------------------------------------------------------------- several processes (torchrun)

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


def wrap_for_training(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The module the training steps call: DistributedDataParallel under torchrun, compiled with --compile.
    Built again when the backbone is unfrozen, since DDP only syncs parameters that were trainable when built."""
    if has_rotation_head(model):
        model = WithRotationHead(model)
    if rank_world()[1] > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    return torch.compile(model) if cfg.compile else model


def place_images(images: torch.Tensor | RowView, device: torch.device, placement: str
                 ) -> tuple[torch.Tensor | RowView, str]:
    """Where training reads its images from, and a line saying so. 'device' copies the whole set there once (on a
    GPU no batch crosses the PCIe bus again; on CPU it is a copy in RAM); 'map' leaves it in the cache's memory
    map and each batch reads its rows (the OS page cache keeps the hot pages). 'auto' is 'device' on CUDA when
    the pixels take at most half of the free GPU memory, 'device' on MPS, and 'map' on CPU, where a RAM copy
    would only duplicate the page cache."""
    if placement not in ("auto", "device", "map"):
        raise UserError(f"--data-placement must be auto, device or map, not {placement!r}")
    n_bytes = math.prod(images.shape) * images.dtype.itemsize
    size = f"{n_bytes / 2**30:.2f} GiB of pixels"
    if placement == "auto":
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            placement = "device" if n_bytes <= free // 2 else "map"
            size += f", {free / 2**30:.1f} GiB free on the GPU"
        else:
            placement = "device" if device.type == "mps" else "map"
    if placement == "map":
        how = ", pinned-memory batches to the GPU" if device.type == "cuda" else ""
        return images, f"training images: batches read from the memory map ({size}{how})"
    whole = torch.empty(images.shape, dtype=images.dtype, device=device)
    for i in range(0, len(whole), 4096):  # in blocks: the host never holds a second full copy on the way
        whole[i:i + 4096] = images[i:i + 4096].to(device)
    return whole, f"training images: whole set on {device} ({size})"


def fetch_batch(images: torch.Tensor | RowView, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One batch of uint8 images on `device`: indexed where they are when the whole set is there, else read from
    the memory map (in pinned memory on CUDA, so the copy to the GPU is asynchronous)."""
    if images.device.type == device.type:
        return images[idx.to(images.device)]
    batch = images[idx]
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def class_weight_tensor(labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """Inverse-frequency loss weights (mean 1) for mode 'auto', None for 'none'."""
    if mode == "none":
        return None
    if mode != "auto":
        raise UserError(f"--class-weights must be 'auto' or 'none', not {mode!r}")
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


def ema_of(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of the model whose weights and BatchNorm statistics follow an exponential moving average.

    Averaging the recent weights acts like a lower learning rate without slowing the training itself, so the
    average is better than the raw model while the learning rate is still high. The decay ramps up from 0.1 over
    the first steps (as in timm), so the average does not remember the random start."""
    def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, weight)
            else:  # BatchNorm's step counter
                a.copy_(c)
    return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


# ---------------------------------------------------------------- Ctrl-C

class CtrlC:
    """Ctrl-C during the epochs: the first asks the run to stop after the training step in progress (train_one_epoch
    checks `requested` after each step); a second raises KeyboardInterrupt at once. Nothing is raised inside a
    library call on the first, so no TensorBoard writer or progress bar is left half-way through a write."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        try:  # os.write, not print: a handler that prints can land inside another print to the same stream
            os.write(2, b"\nCtrl-C: stopping after this training step (press it again to stop at once)\n")
        except OSError:
            pass


@contextlib.contextmanager
def ctrl_c_stops_after_the_step():
    """Install a CtrlC as the SIGINT handler while the block runs and put the previous handler back after. Off the
    main thread (where Python cannot set handlers) it only yields a CtrlC that is never requested."""
    ctrl_c = CtrlC()
    if threading.current_thread() is not threading.main_thread():
        yield ctrl_c
        return
    previous = signal.signal(signal.SIGINT, ctrl_c)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def interrupted_message(out_dir: str, saved_epoch: int, note: str = "") -> str:
    """What the run says when Ctrl-C stopped it: which epoch last.pth holds (only saved epochs count)."""
    if not saved_epoch:
        return "interrupted; nothing saved: no epoch had ended" + (f" ({note})" if note else "")
    return (f"interrupted; {Path(out_dir) / LAST} holds epoch {saved_epoch}: continue with --resume"
            + (f" ({note})" if note else ""))


# ---------------------------------------------------------------- one run, step by step

@dataclass
class Trainer:
    """What the training steps share, built once per run by build_trainer."""
    model: nn.Module                      # the network itself
    ema: AveragedModel | None             # a moving average of its weights, evaluated and saved when on
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: nn.Module
    generator: torch.Generator            # shuffling and augmentation draws
    device: torch.device
    amp_dtype: torch.dtype | None
    normalization: dict                   # {"mean", "std"} the pixels are normalized with
    steps_per_epoch: int                  # per process
    scaler: torch.amp.GradScaler | None = None  # loss scaling, for fp16 autocast only
    train_model: nn.Module | None = None  # what the steps call: the model under DDP / torch.compile (set_phase)

    @property
    def eval_model(self) -> nn.Module:
        """Evaluated each epoch and saved as the checkpoint's weights."""
        return self.model if self.ema is None else self.ema.module


@dataclass
class Progress:
    """Where a run stands: what --resume restores, and what the summary reports."""
    start_epoch: int = 0                  # epochs finished before this process started
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"acc": -1.0, "epoch": 0})
    saved_epoch: int = 0                  # the last epoch whose last.pth was written
    train_seconds: float = 0.0            # training time of all epochs so far, carried over by --resume
    started: float = field(default_factory=time.time)


def set_up(cfg: TrainConfig) -> tuple[TrainConfig, torch.device, torch.dtype | None]:
    """Seed, pick the device (joining torchrun's process group) and precision, name the run, print settings."""
    torch.manual_seed(cfg.seed)
    device = init_distributed(pick_device(cfg.device))
    world = rank_world()[1]
    amp_dtype = pick_amp_dtype(device, cfg.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = name_run(cfg)
    print("config:", format_config(cfg))
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                                 else f" ({torch.get_num_threads()} threads)")
          + f", {precision_name(amp_dtype)}"
          + (f", {world} processes ({dist.get_backend()}), batch size {cfg.batch_size} per process"
             if world > 1 else ""))
    return cfg, device, amp_dtype


def name_run(cfg: TrainConfig) -> TrainConfig:
    """A new run gets a name no earlier run has in LOG_DIR, OUT_DIR or CURVES_DIR (default: date-time and arch;
    a name in use gets -2, -3...); a resumed run keeps its own."""
    if cfg.resume:
        return cfg
    wanted = cfg.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.arch}"
    name = unique_run_name(wanted, [cfg.log_dir, cfg.out_dir, cfg.curves_dir])
    if cfg.run_name and name != cfg.run_name:
        print(f"run name {cfg.run_name!r} is taken (an earlier run's folder exists); this run is {name!r}")
    return dataclasses.replace(cfg, run_name=name)


def fetch_pretrained(cfg: TrainConfig) -> dict | None:
    """The adapted ImageNet weights when asked for; fetched before the data so a missing download fails fast."""
    if not cfg.uses_pretrained:
        return None
    state = adapt_state_dict(load_pretrained(cfg.arch, cfg.weights), cfg.channels)
    print(f"pretrained: {cfg.weights or 'torchvision ImageNet weights'}, "
          f"normalization {input_normalization(True, cfg.channels)}")
    return state


def read_data_layout(cfg: TrainConfig, resume_ckpt: dict | None) -> tuple[Layout, dict]:
    """Which files train and val are, printed as the 'layout:' line and the problems (first 10 of each kind),
    and what the checkpoint records of it; a resumed run whose carved val differs from its first one is named."""
    lay = layout_of(cfg)
    print(lay.description)
    problems = format_problems(lay)
    if problems:
        print("data problems (left out):\n" + "\n".join(f"  {line}" for line in problems.splitlines()))
    val_paths = sorted(p for p, _ in layout_splits(lay)["val"])
    info = {"description": lay.description, "source": lay.source, "folders": dict(lay.folders),
            "carve": dict(lay.carve), "val_files_sha1": hashlib.sha1("\n".join(val_paths).encode()).hexdigest()}
    before = layout_info_of(resume_ckpt).get("val_files_sha1") if resume_ckpt is not None else None
    if resume_ckpt is not None and lay.carve.get("val") and before != info["val_files_sha1"]:
        print("warning: the val split carved now differs from the one this run started with (a version before "
              "the one-carve change, or other files/settings); its val accuracies are not comparable")
    return lay, info


def load_training_data(cfg: TrainConfig, lay: Layout, device: torch.device, expected_classes: list[str] | None
                       ) -> tuple[Split, Split, list[str]]:
    """Train and val splits, decoded once (cached), reported, and the training images placed (place_images)."""
    t0 = time.time()
    classes = lay.classes
    if expected_classes is not None and expected_classes != classes:
        raise UserError(f"the checkpoint's classes {expected_classes} differ from the data's {classes}")
    train, val = load_data(lay, cfg.image_size, cfg.channels, cfg.cache_dir, cfg.workers, cfg.max_bad_fraction)
    print(f"data: {len(train.paths)} train / {len(val.paths)} val images, classes {classes}, "
          f"loaded in {time.time() - t0:.1f}s")
    for path, reason in train.bad + val.bad:
        print(f"skipped unreadable image {path}: {reason}")
    if train.bad or val.bad:
        print(f"skipped {len(train.bad) + len(val.bad)} unreadable image(s) in total")
    train.images, placement = place_images(train.images, device, cfg.data_placement)
    train.labels = train.labels.to(device)
    print(placement)
    if len(train.paths) < cfg.batch_size:
        print(f"note: only {len(train.paths)} training images; each epoch is one batch of that size")
    return train, val, classes


def load_other_images(cfg: TrainConfig, device: torch.device) -> torch.Tensor | None:
    """The --other images (every image file under the folder, any layout) and --other-synthetic generated ones,
    uint8 at twice the training side (each step takes random crops of them), on the device; None without
    --other. They are few (a class's worth), so they are held in memory."""
    if not cfg.other:
        return None
    if not Path(cfg.other).is_dir():
        raise UserError(f"--other {cfg.other}: no such folder")
    side = 2 * cfg.image_size
    paths = [str(p) for p in expand_inputs([cfg.other])]
    other = load_split(paths, [0] * len(paths), "other", side, cfg.channels, cfg.cache_dir, cfg.workers)
    if not len(other.labels):
        raise UserError(f"--other {cfg.other}: none of its {len(paths)} image files could be read")
    drawn = [torch.from_numpy(preprocess(img, side, cfg.channels))
             for _, img in make_unknown_images(cfg.other_synthetic, side, seed=cfg.seed)]
    images = torch.cat([other.images[torch.arange(len(other.labels))], *([torch.stack(drawn)] if drawn else [])])
    print(f"other: {len(other.labels)} images of no class from {cfg.other} ({len(other.bad)} unreadable) and "
          f"{len(drawn)} generated ones; {cfg.other_share:g} x batch size of them per step, in random crops, towards "
          f"a uniform prediction (weight {cfg.other_weight:g})")
    return images.to(device)


def build_trainer(cfg: TrainConfig, train: Split, num_classes: int, device: torch.device,
                  amp_dtype: torch.dtype | None, pretrained_state: dict | None) -> Trainer:
    """The model, its moving average, loss, optimizer and learning-rate schedule."""
    model = build_model(cfg.arch, num_classes, cfg.channels, cfg.width, cfg.image_size,
                        pretrained_state=pretrained_state, rotation_head=cfg.rotation_weight > 0).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = class_weight_tensor(train.labels, num_classes, cfg.class_weights)
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                  label_smoothing=cfg.label_smoothing)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = max(1, len(train.paths) // rank_world()[1] // cfg.batch_size)
    warmup_steps, total_steps = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    phase1_steps = min(cfg.freeze_epochs, cfg.epochs) * steps_per_epoch
    schedule = LRSchedule(warmup_steps, phase1_steps, total_steps)
    return Trainer(model, ema_of(model, cfg.ema_decay) if cfg.ema_decay > 0 else None, optimizer,
                   torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), loss_fn,
                   torch.Generator().manual_seed(cfg.seed), device, amp_dtype,
                   input_normalization(cfg.uses_pretrained, cfg.channels), steps_per_epoch,
                   torch.amp.GradScaler(device.type) if needs_grad_scaler(amp_dtype) else None)


def restore(t: Trainer, cfg: TrainConfig, ckpt: dict) -> Progress:
    """Continue from last.pth: raw and averaged weights, optimizer, schedule, random state, history; with another
    --epochs than the saved run planned, the schedule is replanned (replan_schedule)."""
    state = resume_state_of(ckpt)
    # With EMA, model_state holds the average (what inference uses) and raw_model_state what training resumes.
    t.model.load_state_dict(state["raw_model_state"])
    if t.ema is not None:
        t.ema.module.load_state_dict(state["ema_state"])
        t.ema.n_averaged.fill_(state["ema_steps"])
    t.optimizer.load_state_dict(state["optimizer_state"])
    t.scheduler.load_state_dict(state["scheduler_state"])
    set_rng_state(state["rng"], t.generator)
    if t.scaler is not None and state["scaler_state"]:  # else (a run saved on bf16 or fp32) it starts afresh
        t.scaler.load_state_dict(state["scaler_state"])
    best = state["best"]
    print(f"resuming after epoch {state['epoch']} (best val acc {best['acc']:.4f} at epoch {best['epoch']})")
    history = state["history"]
    planned = config_of(ckpt).get("epochs", cfg.epochs)
    if planned != cfg.epochs:
        replan_schedule(t, cfg, state["epoch"], planned)
    return Progress(state["epoch"], history, best, saved_epoch=state["epoch"],
                    train_seconds=history[-1]["train_seconds"] if history else 0.0)


def replan_schedule(t: Trainer, cfg: TrainConfig, epoch: int, planned: int) -> None:
    """--resume with another --epochs: the remaining epochs get a fresh cosine from the current learning rate down
    to 0 (LRSchedule.replan has the details), and the start-up output says so."""
    schedule, step = t.scheduler.lr_lambdas[0], t.scheduler.last_epoch
    how = schedule.replan(step, cfg.epochs * t.steps_per_epoch,
                          min(cfg.freeze_epochs, cfg.epochs) * t.steps_per_epoch)
    for group, base in zip(t.optimizer.param_groups, t.scheduler.base_lrs):
        group["lr"] = base * schedule(step)
    lr = t.optimizer.param_groups[-1]["lr"]
    print(f"--epochs {planned} -> {cfg.epochs}: " + (
        f"the learning rate follows the two-phase schedule planned for {cfg.epochs} epochs (lr {lr:.2e} now)"
        if how == "two-phase" else
        f"the learning rate follows a fresh cosine from {lr:.2e} after epoch {epoch} down to 0 at epoch "
        f"{cfg.epochs}" + (f" (the saved run had finished its schedule at lr 0, so it starts where a "
                           f"{cfg.epochs}-epoch schedule is after epoch {epoch})" if how == "ended" else "")))


def set_phase(t: Trainer, cfg: TrainConfig, epoch: int) -> bool:
    """Freeze the backbone for the first --freeze-epochs, unfreeze it after, and (re)wrap the model for
    training, since DDP only syncs the parameters that were trainable when it was built. True while frozen."""
    frozen, first_call = epoch <= cfg.freeze_epochs, t.train_model is None
    set_backbone_trainable(t.model, not frozen)
    if frozen and first_call:
        print(f"epochs 1-{cfg.freeze_epochs}: training the head only; then the backbone at lr x "
              f"{cfg.backbone_lr_factor}")
    elif not first_call:
        print(f"epoch {epoch}: backbone unfrozen")
    t.train_model = wrap_for_training(t.model, cfg, t.device)
    return frozen


def make_room(cfg: TrainConfig, progress: Progress) -> None:
    """On the main rank, before anything is written: a new run moves the previous run's checkpoints and plots to
    OUT_DIR/<its run name>/ and CURVES_DIR/<its run name>/ (never deleting) and says where; a resumed run
    continues in place, its results.csv cut back to the epochs last.pth holds."""
    if not is_main_rank():
        return
    if progress.start_epoch:
        rewrite_results(Path(cfg.log_dir) / cfg.run_name / RESULTS, progress.history)
        return
    for name, folders in archive_previous_run(cfg.out_dir, cfg.curves_dir).items():
        print(f"previous run {name!r} moved to {' and '.join(f'{f}/' for f in folders)}")


def train_batch_images(images: torch.Tensor, labels: torch.Tensor, classes: list[str], cfg: TrainConfig,
                       normalization: dict, n: int = 16) -> tuple[torch.Tensor, list[str]]:
    """n training images, as the network sees them (the training augmentation, on a generator of their own so the
    run's draws are not changed), back to uint8, and their class names."""
    generator = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(labels), generator=generator)[:n]
    x = to_float(images[idx.to(images.device)].cpu(), normalization["mean"], normalization["std"])
    x = augment(x, cfg.flip, cfg.max_rotation, cfg.max_shift, generator)
    names = [classes[int(k)] for k in labels[idx.to(labels.device)]]
    return to_uint8(x, normalization["mean"], normalization["std"]), names


def save_train_batch(cfg: TrainConfig, train: Split, classes: list[str], normalization: dict) -> None:
    """CURVES_DIR/train_batch.png: 16 augmented training images with their labels, to check the augmentation."""
    if not is_main_rank() or len(train.labels) == 0:
        return
    images, captions = train_batch_images(train.images, train.labels, classes, cfg, normalization)
    path = save_figure(plot_gallery(images, captions), Path(cfg.curves_dir) / TRAIN_BATCH)
    print(f"augmented training images: {path}")


def open_run_log(cfg: TrainConfig):
    """On the main rank: clear temp files of a run killed while saving, write config.json, open TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter  # slow to import; only training needs it

    if not is_main_rank():
        return None
    remove_stale_temp_files(cfg.out_dir, "*.pth")
    run_dir = Path(cfg.log_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(format_config(cfg))
    return SummaryWriter(str(run_dir))


def extra_images(t: Trainer, x: torch.Tensor, cfg: TrainConfig, other: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What a step adds to the augmented batch x: turned copies of its first --rotation-share images, with
    their turns, for the rotation head; and --other-share random --other images (load_other_images), each a
    random crop of 10-100% of its area, mirrored or not and given a random quarter turn: images of no class can
    look any way."""
    turned = turns = others = None
    if cfg.rotation_weight > 0:
        n = max(1, round(len(x) * cfg.rotation_share))
        turns = torch.randint(0, 4, (n,), generator=t.generator)
        turned = rotate_quarters(x[:n], turns)
        turns = turns.to(t.device)
    if other is not None:
        n = max(1, round(len(x) * cfg.other_share))
        idx = torch.randint(0, len(other), (n,), generator=t.generator)
        crops = random_crops(to_float(other[idx.to(other.device)], t.normalization["mean"], t.normalization["std"]),
                             x.shape[-1], 0.1, t.generator)
        others = rotate_quarters(batch_flip_lr(crops, t.generator), torch.randint(0, 4, (n,), generator=t.generator))
    return turned, turns, others


def step_loss(t: Trainer, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
              other: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, its classification part, the batch's class logits) of one training step, in one forward pass: the
    classification loss on x, plus the rotation loss on its turned copies and the --other images' cross-entropy
    to the uniform prediction when those are on (extra_images). The train loss reported is the classification
    part alone, comparable with runs without them."""
    turned, turns, others = extra_images(t, x, cfg, other)
    parts = [x] + [p for p in (turned, others) if p is not None]
    batch = torch.cat(parts) if len(parts) > 1 else x
    if cfg.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    n = len(x)
    with torch.autocast(t.device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
        out = model(batch)
        logits, rot_logits = out if isinstance(out, tuple) else (out, None)
        loss = class_loss = t.loss_fn(logits[:n].float(), y)
        if turned is not None:
            loss = loss + cfg.rotation_weight * F.cross_entropy(rot_logits[n:n + len(turned)].float(), turns)
        if others is not None:
            loss = loss + cfg.other_weight * uniform_cross_entropy(logits[len(batch) - len(others):].float())
    return loss, class_loss.detach(), logits[:n]


def train_one_epoch(t: Trainer, data: Split, cfg: TrainConfig, deadline: float, ctrl_c: CtrlC | None = None,
                    other: torch.Tensor | None = None) -> dict:
    """One pass over the training images, augmented on whole batches; returns mean loss, accuracy, counts, and
    'interrupted' when a Ctrl-C (ctrl_c.requested, on any rank) ended it after a step, before its end. `other`:
    the --other images (step_loss)."""
    from tqdm import tqdm

    model, device = t.train_model, t.device
    train_mode(model)
    rank, world = rank_world()
    images, labels = data.images, data.labels.to(device)  # images: on the device, or the cache's memory map
    total_loss = correct = seen = skipped = steps = 0
    # Under torchrun the ranks share one generator state, so augmentation draws repeat across ranks, each on
    # different images; that keeps the permutations in step without passing state between processes.
    bar = tqdm(shard_batches(len(images), cfg.batch_size, t.generator, rank, world), total=t.steps_per_epoch,
               leave=False, desc="train", mininterval=1.0, file=sys.stderr, disable=rank != 0)
    # The forward pass of a skipped step has already moved BatchNorm's running statistics: keep a copy to undo it.
    buffers = list(model.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    data_seconds = 0.0  # time spent fetching and augmenting batches (exact on CPU; CUDA runs it async)
    interrupted = False
    for idx in bar:
        t_data = time.perf_counter()
        x = augment(to_float(fetch_batch(images, idx, device), t.normalization["mean"], t.normalization["std"]),
                    cfg.flip, cfg.max_rotation, cfg.max_shift, t.generator)
        y = labels[idx.to(device)]
        data_seconds += time.perf_counter() - t_data
        with torch.no_grad():
            for b, saved in zip(buffers, saved_buffers):
                saved.copy_(b)
        loss, class_loss, logits = step_loss(t, model, x, y, cfg, other)
        # The ranks agree on both in one reduction: skip this step (NaN/inf), and stop after it (Ctrl-C).
        nonfinite, stop = (v > 0 for v in all_reduce_sum(
            [float(not torch.isfinite(loss).item()), float(ctrl_c is not None and ctrl_c.requested)], device))
        if nonfinite:
            # A NaN/inf step would poison the weights: skip it, count it, and stop if it keeps happening.
            skipped += 1
            with torch.no_grad():
                for b, saved in zip(buffers, saved_buffers):
                    b.copy_(saved)
            t.optimizer.zero_grad(set_to_none=True)
            if skipped > max(3, t.steps_per_epoch // 10):
                raise UserError(f"training loss became NaN/inf in {skipped} steps; lower --lr (now {cfg.lr})")
            if stop:
                interrupted = True
                break
            continue
        t.optimizer.zero_grad(set_to_none=True)
        if t.scaler is None:
            loss.backward()
            t.optimizer.step()
        else:  # fp16: scaled loss; steps whose gradients overflowed are skipped and the scale lowered
            t.scaler.scale(loss).backward()
            t.scaler.step(t.optimizer)
            t.scaler.update()
        t.scheduler.step()
        if t.ema is not None:
            t.ema.update_parameters(t.model)
        steps += 1
        total_loss += class_loss.item() * len(y)
        correct += correct_count(logits, y)
        seen += len(y)
        if steps % 10 == 0:
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        if stop:
            interrupted = True
            break
        if deadline < math.inf and any_rank(time.time() > deadline, device):
            break
    bar.close()
    interrupted = interrupted and steps + skipped < t.steps_per_epoch  # stopped on its last step: a whole epoch
    total_loss, correct, seen = all_reduce_sum([total_loss, correct, seen], device)
    return {"loss": total_loss / max(1, seen), "acc": correct / max(1, seen), "images": int(seen),
            "skipped_steps": skipped, "data_seconds": data_seconds, "interrupted": interrupted}


def validate(model: nn.Module, data: Split, device: torch.device, tta: bool = False, channels_last: bool = False,
             amp_dtype: torch.dtype | None = None, normalization: dict | None = None) -> dict:
    """Plain cross-entropy loss and accuracy over a split, and top-5 accuracy ('top5') with more than 5 classes.
    Under torchrun each rank scores every world-th image and the sums are reduced: all ranks get the same numbers."""
    rank, world = rank_world()
    if world > 1:
        data = data.subset(torch.arange(rank, len(data.labels), world))
    logits = predict_logits(model, data.images, device, tta=tta, channels_last=channels_last, amp_dtype=amp_dtype,
                            normalization=normalization)
    labels, n = data.labels, len(data.labels)
    num_classes = unwrap(model).fc.out_features
    top5 = correct_count(logits, labels, 5) if num_classes > 5 else 0
    total_loss, correct, top5, n = all_reduce_sum([loss_sum(logits, labels), correct_count(logits, labels), top5, n],
                                                  device)
    out = {"loss": total_loss / n if n else float("nan"), "acc": correct / n if n else float("nan")}
    if num_classes > 5:
        out["top5"] = top5 / n if n else float("nan")
    return out


def record_epoch(progress: Progress, epoch: int, tr: dict, ev: dict, lr: float, train_seconds: float,
                 epoch_started: float) -> dict:
    """Append the epoch's figures to the history (what last.pth, the curves and bench.py read) and return them."""
    progress.train_seconds += train_seconds
    h = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": ev["loss"],
         "val_acc": ev["acc"], "lr": lr, "train_seconds": round(progress.train_seconds, 2),
         "epoch_seconds": round(time.time() - epoch_started, 2),
         "train_images_per_s": round(tr["images"] / max(1e-9, train_seconds), 1),
         "train_images": tr["images"], "skipped_steps": tr["skipped_steps"],
         "data_seconds": round(tr["data_seconds"], 2), "elapsed_seconds": round(time.time() - progress.started, 2)}
    if "top5" in ev:
        h["val_top5"] = ev["top5"]
    progress.history.append(h)
    return h


def log_epoch(writer, h: dict, cfg: TrainConfig) -> None:
    """The epoch's scalars to TensorBoard and its row to LOG_DIR/<run-name>/results.csv (flushed to disk)."""
    if writer is None:
        return
    append_result(Path(cfg.log_dir) / cfg.run_name / RESULTS, h)
    for key, tag in (("train_loss", "loss/train"), ("val_loss", "loss/val"), ("train_acc", "acc/train"),
                     ("val_acc", "acc/val"), ("val_top5", "acc5/val"), ("lr", "lr")):
        if key in h:
            writer.add_scalar(tag, h[key], h["epoch"])
    writer.flush()


def epoch_line(h: dict, epochs: int, improved: bool) -> str:
    top5 = f" top5 {h['val_top5']:.4f}" if "val_top5" in h else ""
    return (f"epoch {h['epoch']}/{epochs}  train loss {h['train_loss']:.4f} acc {h['train_acc']:.4f}  "
            f"val loss {h['val_loss']:.4f} acc {h['val_acc']:.4f}{top5}  lr {h['lr']:.2e}  {h['epoch_seconds']:.1f}s"
            + ("  *best*" if improved else "")
            + (f"  ({h['skipped_steps']} NaN/inf steps skipped)" if h["skipped_steps"] else ""))


def is_finite(t: Trainer, val_loss: float) -> bool:
    """False once the val loss or any weight (raw or averaged) is NaN/inf."""
    nets = (t.model,) if t.eval_model is t.model else (t.model, t.eval_model)
    return math.isfinite(val_loss) and all(torch.isfinite(p).all() for net in nets for p in net.parameters())


def save_epoch(t: Trainer, cfg: TrainConfig, classes: list[str], layout: dict, progress: Progress, metrics: dict,
               improved: bool, finite: bool) -> None:
    """best_model.pth when val accuracy improved; last.pth, with what --resume needs, unless the model broke
    (a broken model must not replace the last good state that --resume starts from)."""
    epoch = progress.history[-1]["epoch"]
    ckpt = build_checkpoint(t.eval_model, cfg, classes, epoch, metrics, progress.history, progress.best, layout)
    if improved:
        save_checkpoint(ckpt, Path(cfg.out_dir) / BEST)
    if finite:
        ckpt = with_resume_state(ckpt, t.optimizer, t.scheduler, rng_state(t.generator),
                                 raw_model=t.model if t.ema is not None else None,
                                 ema_steps=int(t.ema.n_averaged) if t.ema is not None else 0, scaler=t.scaler)
        save_checkpoint(ckpt, Path(cfg.out_dir) / LAST)


def stop_reason(cfg: TrainConfig, progress: Progress, epoch: int, deadline: float) -> str:
    """Why training stops after this epoch (early stopping, time budget), or '' to go on."""
    if cfg.patience and epoch - progress.best["epoch"] >= cfg.patience:
        return f"early stop: no better val accuracy for {cfg.patience} epochs"
    if time.time() > deadline:
        return f"time budget of {cfg.time_budget:.0f}s reached"
    return ""


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def calibrate_best_model(path: Path, val: Split, device: torch.device, tta: bool, writer) -> dict:
    """Fit a softmax temperature for the best model on val and store it in its checkpoint (inference and
    evaluate.py divide the logits by it); also log the val confusion matrix to TensorBoard.

    Returns the temperature and the expected calibration error on val before and after it.
    """
    ckpt = load_checkpoint(path)
    logits = predict_logits(model_from_checkpoint(ckpt).to(device), val.images, device, tta=tta,
                            normalization=normalization_of(ckpt))
    temperature = fit_temperature(logits, val.labels)
    before = expected_calibration_error(torch.softmax(logits, 1), val.labels)
    after = expected_calibration_error(torch.softmax(logits / temperature, 1), val.labels)
    save_checkpoint(with_temperature(ckpt, temperature), path)
    cm = confusion_matrix(val.labels, logits.argmax(1), len(ckpt["classes"]))
    if writer is not None:
        writer.add_figure("confusion_matrix/val", plot_confusion_matrix(cm, ckpt["classes"]), ckpt["epoch"])
    print(f"calibration on val: temperature {temperature:.3f}, expected calibration error {before:.4f} -> "
          f"{after:.4f} (stored in {path})")
    return {"temperature": temperature, "val_ece_before": before, "val_ece_after": after}


def check_novelty_settings(cfg: TrainConfig) -> None:
    """Refuse a bad --novelty-score or --accept-rate before training rather than after it."""
    if cfg.novelty_score != "none" and cfg.novelty_score not in NOVELTY_SCORES:
        raise UserError(f"--novelty-score must be one of {', '.join(NOVELTY_SCORES)} or none, not {cfg.novelty_score!r}")
    if not 0.0 < cfg.accept_rate <= 1.0:
        raise UserError(f"--accept-rate must be in (0, 1], not {cfg.accept_rate}")
    if cfg.novelty_score == "rotation" and cfg.rotation_weight <= 0:
        raise UserError("--novelty-score rotation needs the rotation head: give --rotation-weight > 0")


def left_out_images(cfg: TrainConfig, classes: list[str]) -> tuple[Split | None, list[str]]:
    """With --classes, the images of the other classes in val (else train), read as the run read its data:
    images of no class the model knows, for the report at the end of training only (never trained on, never
    used to choose the threshold)."""
    if not cfg.classes:
        return None, []
    everything = layout_of(dataclasses.replace(cfg, classes=[]), need=None)
    for name in ("val", "train"):
        items = [(p, c) for p, c in everything.items[name] if c not in classes]
        if items:
            others = sorted({c for _, c in items})
            split = load_items(items, others, name, cfg.image_size, cfg.channels, cfg.cache_dir, cfg.workers)
            return (split if len(split.labels) else None), others
    return None, []


def fit_novelty(path: Path, train: Split, val: Split, cfg: TrainConfig, device: torch.device) -> dict:
    """Fit the novelty scores on the best model's features of (a stratified sample of) the train images, choose
    the threshold that accepts --accept-rate of val, store both in its checkpoint; report on the left-out classes
    when there are some. Only the sample's features are held at once, so memory does not grow with the data."""
    started = time.time()
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt).to(device)
    tta = tta_of(ckpt)
    options = {"device": device, "tta": tta, "normalization": normalization_of(ckpt),
               "channels_last": cfg.channels_last, "batch_size": cfg.batch_size}  # no bigger than training's
    sample = train.subset(fit_sample(train.labels.cpu(), cfg.novelty_max_images, cfg.seed))
    states = fit_states(extract_features(model, sample.images, **options), sample.labels.cpu(),
                        len(ckpt["classes"]), cfg.novelty_score, temperature_of(ckpt))
    val_scores = score_images(model, val.images, states, **options)
    threshold = threshold_for_accept_rate(val_scores[cfg.novelty_score], cfg.accept_rate)
    seconds = time.time() - started
    n_fit = len(sample.labels)
    save_checkpoint(with_novelty(ckpt, novelty_record(states, cfg.novelty_score, threshold, cfg.accept_rate, tta,
                                                      seconds, n_fit)), path)
    size = sum(state_bytes(s) for s in states.values())
    fitted_on = (f"{n_fit} train images" if n_fit == len(train.labels) else
                 f"a stratified sample of {n_fit} of the {len(train.labels)} train images (--novelty-max-images)")
    print(f"novelty score {cfg.novelty_score}: fitted on {fitted_on} in {seconds:.1f}s "
          f"({size / 1e6:.1f} MB stored, scores {', '.join(states)}); threshold {threshold:.4g} accepts "
          f"{accepted(val_scores[cfg.novelty_score], threshold).double().mean().item():.1%} of val "
          f"(--accept-rate {cfg.accept_rate})")
    out = {"novelty_score": cfg.novelty_score, "novelty_threshold": threshold, "novelty_seconds": round(seconds, 1),
           "novelty_bytes": size, "novelty_train_images": n_fit}
    left_out, left_out_names = left_out_images(cfg, ckpt["classes"])
    if left_out is not None:
        report = unknown_report(cfg.novelty_score, threshold, val_scores,
                                score_images(model, left_out.images, states, **options))
        out["known_unknowns"] = {"classes": left_out_names, "images": len(left_out.labels), **report}
        print(f"left-out classes as unknown images ({', '.join(left_out_names)}: {len(left_out.labels)} images): "
              f"{cfg.novelty_score} AUROC {report['auroc']:.3f}, FPR at 95% TPR {report['fpr_at_95_tpr']:.1%}; "
              f"at the stored threshold {report['known_rejected']:.1%} of val rejected, "
              f"{report['unknown_accepted']:.1%} of the left-out images accepted")
    return out


def summarise(cfg: TrainConfig, t: Trainer, train: Split, val: Split, progress: Progress, writer,
              stopped: str) -> dict:
    """Print why training stopped, plot the curves, calibrate the best model and fit its novelty score;
    returns the summary."""
    if stopped:
        print(stopped)
    best, out_dir = progress.best, Path(cfg.out_dir)
    if progress.history and is_main_rank():
        plot_history(progress.history, Path(cfg.curves_dir) / TRAINING_CURVES)
    finished = is_main_rank() and best["epoch"] and len(val.labels)
    calibration = calibrate_best_model(out_dir / BEST, val, t.device, cfg.tta, writer) if finished else {}
    if writer is not None:
        writer.close()
    novelty = {}
    if finished and cfg.novelty_score != "none":
        novelty = fit_novelty(out_dir / BEST, train, val, cfg, t.device)
    summary = {"best_val_acc": best["acc"], "best_epoch": best["epoch"],
               "epochs_run": len(progress.history) - progress.start_epoch,
               "train_seconds": round(progress.train_seconds, 1),
               "wall_seconds": round(time.time() - progress.started, 1),
               "checkpoint": str(out_dir / BEST), "history": progress.history, **calibration, **novelty}
    if best["epoch"]:
        cost = f" (novelty score: {novelty['novelty_seconds']:.0f}s of it)" if novelty else ""
        print(f"done: best val acc {best['acc']:.4f} at epoch {best['epoch']}, {summary['wall_seconds']:.0f}s{cost}, "
              f"saved {summary['checkpoint']}")
    if rank_world()[1] > 1:
        dist.barrier()  # no rank leaves (and tears down the group) while rank 0 still writes
    return summary


def run(cfg: TrainConfig, resume_ckpt: dict | None = None) -> dict:
    """Train as `cfg` says; returns the summary (best accuracy, epoch, seconds, checkpoint path)."""
    check_novelty_settings(cfg)
    cfg, device, amp_dtype = set_up(cfg)
    pretrained_state = fetch_pretrained(cfg) if resume_ckpt is None else None  # a resumed run has its weights
    lay, layout_info = read_data_layout(cfg, resume_ckpt)
    train, val, classes = load_training_data(cfg, lay, device, resume_ckpt["classes"] if resume_ckpt else None)
    other = load_other_images(cfg, device)
    t = build_trainer(cfg, train, len(classes), device, amp_dtype, pretrained_state)
    progress = restore(t, cfg, resume_ckpt) if resume_ckpt is not None else Progress()
    frozen = set_phase(t, cfg, progress.start_epoch + 1)
    make_room(cfg, progress)
    writer = open_run_log(cfg)
    save_train_batch(cfg, train, classes, t.normalization)
    progress.started = time.time()
    deadline = progress.started + cfg.time_budget - progress.train_seconds if cfg.time_budget > 0 else math.inf
    stopped, at_once = "", False
    try:
        with ctrl_c_stops_after_the_step() as ctrl_c:
            for epoch in range(progress.start_epoch + 1, cfg.epochs + 1):
                if frozen and epoch > cfg.freeze_epochs:
                    frozen = set_phase(t, cfg, epoch)
                epoch_started = time.time()
                tr = train_one_epoch(t, train, cfg, deadline, ctrl_c, other)
                if tr.pop("interrupted"):
                    stopped = interrupted_message(cfg.out_dir, progress.saved_epoch,
                                                  f"Ctrl-C stopped epoch {epoch} after a step; that epoch is not "
                                                  "saved, --resume starts it again")
                    break
                train_seconds = time.time() - epoch_started
                ev = validate(t.eval_model, val, device, cfg.tta, cfg.channels_last, amp_dtype, t.normalization)
                lr = t.optimizer.param_groups[-1]["lr"]  # the head's, when the backbone has a lower one
                h = record_epoch(progress, epoch, tr, ev, lr, train_seconds, epoch_started)
                log_epoch(writer, h, cfg)
                finite = is_finite(t, ev["loss"])
                improved = finite and ev["acc"] > progress.best["acc"]
                if improved:
                    progress.best = {"acc": ev["acc"], "epoch": epoch, "loss": ev["loss"]}
                if is_main_rank():
                    save_epoch(t, cfg, classes, layout_info, progress, {"val": ev, "train": tr}, improved, finite)
                if finite:
                    progress.saved_epoch = epoch
                print(epoch_line(h, cfg.epochs, improved), flush=True)
                if not finite:
                    kept = "best_model.pth and last.pth were kept" if progress.saved_epoch else "nothing was saved"
                    raise UserError(f"the model's weights or val loss became NaN/inf in epoch {epoch}; {kept}; "
                                    f"lower --lr (now {cfg.lr})")
                stopped = stop_reason(cfg, progress, epoch, deadline)
                if not stopped and any_rank(ctrl_c.requested, device):  # pressed in the last step or the save
                    stopped = interrupted_message(cfg.out_dir, progress.saved_epoch,
                                                  f"Ctrl-C stopped the run after epoch {epoch}")
                if stopped:
                    break
    except KeyboardInterrupt:
        # The second Ctrl-C, raised wherever the run was (even inside TensorBoard's writer, which is then left
        # alone: flushing it could wait forever). Only epochs whose last.pth was written count.
        stopped, at_once = interrupted_message(cfg.out_dir, progress.saved_epoch, "a second Ctrl-C stopped it at "
                                               "once"), True
    finally:
        if writer is not None and not at_once:
            writer.flush()
    return summarise(cfg, t, train, val, progress, None if at_once else writer, stopped)


def resolve_config(argv: list[str] | None) -> tuple[TrainConfig, dict | None]:
    """Settings from flags; with --resume, the saved run's settings with the given flags on top."""
    cfg = parse_config(argv)
    if not cfg.resume:
        return cfg, None
    ckpt = load_resume_checkpoint(cfg.out_dir)
    return parse_config(argv, TrainConfig.from_dict(config_of(ckpt))), ckpt


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume_ckpt = resolve_config(argv)
        if cfg.check_only:
            return check_data(cfg)
        if resume_ckpt is not None and resume_ckpt["epoch"] >= cfg.epochs:
            print(f"{cfg.out_dir}/{LAST} already finished {resume_ckpt['epoch']} of {cfg.epochs} epochs; "
                  "pass a larger --epochs to train on")
            return 0
        with quiet_unless_rank0():
            run(cfg, resume_ckpt)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the epoch loop: while loading data, setting up or plotting
        print("interrupted; checkpoints already written are complete (continue with --resume if last.pth exists)",
              file=sys.stderr)
        return 130
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
