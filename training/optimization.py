"""The optimizer and what steers it: learning-rate schedules (warmup + cosine, two phases for a frozen backbone,
replanned on --resume with another --epochs), AdamW parameter groups, class weights for the loss, and the
moving average of the weights (EMA).

Usage (from train.py):
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(warmup_steps, phase1_steps, total_steps))
    ema = ema_of(model, 0.999)                  # evaluated and saved instead of the raw weights
    weights = class_weight_tensor(labels, num_classes, "auto")   # inverse frequency, mean 1
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from config import TrainConfig
from model import unwrap


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


@dataclass(frozen=True)
class Replan:
    """What replan_lr did: after `epoch`, the learning rate (`lr`, the head's) follows a new schedule down to 0
    at `epochs`; `how` is LRSchedule.replan's answer ('fresh', 'ended' or 'two-phase')."""
    how: str
    lr: float
    epoch: int
    epochs: int


def replan_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer, epoch: int,
              epochs: int, steps_per_epoch: int, freeze_epochs: int) -> Replan:
    """--resume with another --epochs: the remaining epochs get a fresh cosine from the current learning rate down
    to 0 (LRSchedule.replan has the details), set on the optimizer at once."""
    schedule, step = scheduler.lr_lambdas[0], scheduler.last_epoch
    how = schedule.replan(step, epochs * steps_per_epoch, min(freeze_epochs, epochs) * steps_per_epoch)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * schedule(step)
    return Replan(how, optimizer.param_groups[-1]["lr"], epoch, epochs)


def epochs_that_fit(seconds_left: float, epoch_seconds: float, epoch: int, max_epochs: int) -> int:
    """The last epoch a time budget allows after `epoch`: as many more epochs of `epoch_seconds` as fit in
    `seconds_left`, at most max_epochs, never before `epoch`."""
    more = int(max(0.0, seconds_left) // max(epoch_seconds, 1e-9))
    return max(epoch, min(max_epochs, epoch + more))


def planning_epoch_seconds(epoch_seconds: list[float]) -> float:
    """The speed a time budget plans with: the mean of the last three epochs' seconds, the first epoch left out
    once there are others (it runs slower: warm-up)."""
    recent = (epoch_seconds[1:] or epoch_seconds)[-3:]
    return sum(recent) / len(recent)


def seconds_after_training(val_seconds: float, val_images: int, fit_images: int, novelty: bool) -> float:
    """What the steps after the last epoch will take, from one validation pass's time: the calibration is one
    more pass over val; the novelty fit extracts features of `fit_images` train images (about 1.3x the cost of
    predicting them: the stage statistics) and scores val once more."""
    per_image = val_seconds / max(1, val_images)
    return val_seconds + (per_image * 1.3 * fit_images + val_seconds if novelty else 0.0)


ANNEAL_SHARE = 0.25  # under a time budget, the last quarter of the epochs that fit anneal the learning rate to 0


def anneal_epochs(fits: int) -> int:
    """How many of the `fits` epochs a time budget allows anneal the learning rate: ANNEAL_SHARE of them, 1 at least."""
    return max(1, round(ANNEAL_SHARE * fits))


@dataclass(frozen=True)
class BudgetPlan:
    """--time-budget after an epoch: the last epoch the run now expects (`last_epoch`) at `epoch_seconds` an epoch,
    validation included; the schedule change made for it (None: none); whether the run stops now, and whether
    that is because its learning rate reached 0 at the planned end (`ended`: the run is complete) rather than
    because no further epoch fits; and the seconds set aside for the steps after training."""
    last_epoch: int
    epoch_seconds: float
    replan: Replan | None = None
    stop: bool = False
    seconds_after: float = 0.0
    ended: bool = False


def plan_to_budget(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int, cfg: TrainConfig, epoch: int, seconds_left: float,
                   epoch_seconds: float) -> BudgetPlan:
    """--time-budget, after `epoch`: the last epoch that fits in `seconds_left` (the steps after training already
    set aside) at `epoch_seconds` an epoch, validation included, at most --epochs; what the plan changed; and
    whether the run stops now.

    While the whole schedule fits, nothing changes. When it does not, the run keeps the --epochs schedule's
    learning rate (high and slowly falling: what a short run learns most from) until the last ANNEAL_SHARE of
    the epochs that fit, and then lays a fresh cosine from the learning rate reached down to 0 at the last of
    them (replan_lr), so the run ends on the low end of its schedule instead of being cut off half-way down it.
    Once annealing, the end moves when the speed does: earlier at once, later by 2 epochs or more; once the
    learning rate has reached 0 at that end, the run stops there, however much time is left (an epoch at
    learning rate 0 would learn nothing)."""
    end = scheduler.lr_lambdas[0].total_steps // steps_per_epoch  # where the learning rate reaches 0 now
    if end < cfg.epochs and epoch >= end:
        return BudgetPlan(epoch, epoch_seconds, stop=True, ended=True)
    fits = epochs_that_fit(seconds_left, epoch_seconds, epoch, cfg.epochs)
    if fits == epoch:
        return BudgetPlan(epoch, epoch_seconds, stop=epoch < cfg.epochs)
    annealing = end < cfg.epochs
    if (not annealing and fits >= end) or (annealing and end <= fits < end + 2):
        return BudgetPlan(min(fits, end), epoch_seconds)
    if not annealing and fits - epoch > anneal_epochs(fits):
        return BudgetPlan(fits, epoch_seconds)  # not yet: the schedule runs on at its height
    return BudgetPlan(fits, epoch_seconds, replan_lr(scheduler, optimizer, epoch, fits, steps_per_epoch,
                                                     cfg.freeze_epochs))


def two_phase_schedule(warmup_steps: int, phase1_steps: int, total_steps: int):
    """warmup_cosine over the head-only phase, then a fresh warmup and cosine once the backbone is unfrozen:
    the warmup keeps the first full-network steps from wrecking the pretrained features."""
    first = warmup_cosine(warmup_steps, phase1_steps)
    second = warmup_cosine(warmup_steps, total_steps - phase1_steps)
    return lambda step: first(step) if step < phase1_steps else second(step - phase1_steps)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # Decay conv and linear weights only: shrinking BN scales and biases just fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


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


def class_weight_tensor(labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """Inverse-frequency loss weights (mean 1) for mode 'auto', None for 'none'."""
    if mode == "none":
        return None
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


def tag_pos_weight(labels: torch.Tensor, cap: float = 10.0) -> torch.Tensor:
    """Per tag, the weight of its positive images in the binary loss: sqrt(negatives / positives), at least 1 and
    at most `cap`. A rare tag's few positives then count more, without the full ratio's over-confidence."""
    positives = labels.sum(0)
    return ((len(labels) - positives) / positives.clamp(min=1)).sqrt().clamp(1.0, cap)
