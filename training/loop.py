"""The training loop, the one place a model is trained: the trainer (model, moving average, loss, optimizer,
schedule, precision), one step, one epoch, validation, when to stop, and the time-budget plan. train.py runs it
with validation and checkpoints between epochs; the label check (quality/label_errors.py) trains its folds with
`train_epochs`, the same epochs without them.

Usage:
    t = build_trainer(cfg, train, num_classes, device, amp_dtype, pretrained_state)
    set_phase(t, cfg, epoch=1)                       # freeze or unfreeze the backbone; wrap for DDP / compile
    stats = train_one_epoch(t, train, cfg, deadline) # {"loss", "acc", "images", "skipped_steps", ...}
    ev = validate(t.eval_model, val, device)         # {"loss", "acc"(, "top5")}
    stop = stop_reason(cfg, progress, epoch, deadline)   # a Stop, or None to go on
    plan = plan_budget(t, cfg, progress, epoch, deadline, val_seconds, (n_val, n_train), device)   # a BudgetPlan
    model, epochs = train_epochs(t, data, cfg, epochs=80, seconds=150)   # a short run, no validation
"""
from __future__ import annotations

import dataclasses
import enum
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from config import TrainConfig
from core.common import UserError, needs_grad_scaler
from core.metrics import consistency_loss, correct_count, energy_margin_loss, loss_sum, mixed_loss, tag_figures
from dataset import Split, augment, cutmix, fetch_batch, strong_augment, to_float
from model import build_model, input_normalization, unwrap
from prediction.checkpoint import config_of, resume_state_of, set_rng_state
from prediction.predict import amp, predict_logits
from training.distributed import all_reduce_sum, any_rank, rank_world, shard_batches, wrap_for_training
from training.optimization import (BudgetPlan, LRSchedule, Replan, build_optimizer, class_weight_tensor, ema_of,
                                   plan_to_budget, planning_epoch_seconds, replan_lr, seconds_after_training,
                                   set_backbone_trainable, tag_pos_weight, train_mode)
from training.outliers import other_crops, rotation_copies, turn_in_place
from training.runs import CtrlC, Progress


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


class Stop(enum.Enum):
    """Why a run ended: it ran every planned epoch, or what stopped it first."""
    COMPLETED = "completed"              # every epoch of --epochs (or of what --time-budget planned)
    PATIENCE = "patience"                # --patience epochs without a better val accuracy
    TIME_BUDGET = "time_budget"          # --time-budget spent
    NO_EPOCH_FITS = "no_epoch_fits"      # --time-budget: no further epoch fits before the steps after training
    CTRL_C_IN_EPOCH = "ctrl_c_in_epoch"  # Ctrl-C stopped an epoch after a step; that epoch is not saved
    CTRL_C = "ctrl_c"                    # Ctrl-C (pressed during the last step or the save) stopped it after an epoch
    CTRL_C_TWICE = "ctrl_c_twice"        # a second Ctrl-C stopped it at once


def unlabeled_batch_size(n_unlabeled: int, cfg: TrainConfig, world: int = 1) -> int:
    """--unlabeled images in each step of each process: --unlabeled-ratio per labelled image of the batch, at
    most what one process's share of the folder holds."""
    return max(1, min(round(cfg.batch_size * cfg.unlabeled_ratio), n_unlabeled // world))


def epoch_steps(n: int, n_unlabeled: int, cfg: TrainConfig, world: int = 1) -> int:
    """Steps in an epoch of each process: one pass over the n training images, or, with --unlabeled images, over
    whichever of the two takes more steps (the other's batches cycle through further passes)."""
    steps = max(1, n // world // cfg.batch_size)
    if n_unlabeled:
        steps = max(steps, n_unlabeled // world // unlabeled_batch_size(n_unlabeled, cfg, world))
    return steps


def _passes(n: int, batch_size: int, generator: torch.Generator, rank: int, world: int):
    """This rank's index batches of pass after pass over n images, each pass in a fresh order."""
    while True:
        yield from shard_batches(n, batch_size, generator, rank, world)


def epoch_batches(t: Trainer, n: int, n_unlabeled: int, cfg: TrainConfig):
    """(labelled, unlabelled or None) index batches of this rank's t.steps_per_epoch steps. Without --unlabeled
    images these are exactly one pass over the training images (distributed.shard_batches); with them, each
    step also takes the next unlabeled_batch_size indices of passes over those, every rank its own share."""
    rank, world = rank_world()
    labelled = _passes(n, cfg.batch_size, t.generator, rank, world)
    u_size = unlabeled_batch_size(n_unlabeled, cfg, world) if n_unlabeled else 0
    unlabelled = _passes(n_unlabeled, u_size, t.generator, rank, world) if n_unlabeled else None
    for _ in range(t.steps_per_epoch):
        yield next(labelled), None if unlabelled is None else next(unlabelled)


def build_trainer(cfg: TrainConfig, train: Split, num_classes: int, device: torch.device,
                  amp_dtype: torch.dtype | None, pretrained_state: dict | None, n_unlabeled: int = 0) -> Trainer:
    """The model, its moving average, loss, optimizer and learning-rate schedule; `n_unlabeled`: how many
    --unlabeled images there are, which sets an epoch's steps (epoch_steps)."""
    model = build_model(cfg.arch, num_classes, cfg.channels, cfg.width, cfg.image_size, blocks=cfg.blocks,
                        pretrained_state=pretrained_state, rotation_head=cfg.rotation_weight > 0).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if train.labels.dim() == 2:  # 0/1 tags: a sigmoid per tag, rare tags' positives weighed up
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=tag_pos_weight(train.labels.cpu()).to(device))
    else:
        weights = class_weight_tensor(train.labels.cpu(), num_classes, cfg.class_weights)
        loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                      label_smoothing=cfg.label_smoothing)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = epoch_steps(len(train.paths), n_unlabeled, cfg, rank_world()[1])
    warmup_steps, total_steps = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    phase1_steps = min(cfg.freeze_epochs, cfg.epochs) * steps_per_epoch
    schedule = LRSchedule(warmup_steps, phase1_steps, total_steps)
    return Trainer(model, ema_of(model, cfg.ema_decay) if cfg.ema_decay > 0 else None, optimizer,
                   torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), loss_fn,
                   torch.Generator().manual_seed(cfg.seed), device, amp_dtype,
                   input_normalization(cfg.uses_pretrained, cfg.channels, cfg.arch), steps_per_epoch,
                   torch.amp.GradScaler(device.type) if needs_grad_scaler(amp_dtype) else None)


def restore(t: Trainer, cfg: TrainConfig, ckpt: dict) -> tuple[Progress, Replan | None]:
    """Continue from last.pth: raw and averaged weights, optimizer, schedule, random state, history; with another
    --epochs than the saved run planned, the schedule is replanned (the Replan; None when the same)."""
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
    history = state["history"]
    replan = None
    if config_of(ckpt).get("epochs", cfg.epochs) != cfg.epochs:
        replan = replan_lr(t.scheduler, t.optimizer, state["epoch"], cfg.epochs, t.steps_per_epoch,
                           cfg.freeze_epochs)
    return Progress(state["epoch"], history, state["best"], saved_epoch=state["epoch"],
                    train_seconds=history[-1]["train_seconds"] if history else 0.0), replan


def set_phase(t: Trainer, cfg: TrainConfig, epoch: int) -> bool:
    """Freeze the backbone for the first --freeze-epochs, unfreeze it after, and (re)wrap the model for
    training, since DDP only syncs the parameters that were trainable when it was built. True while frozen."""
    frozen = epoch <= cfg.freeze_epochs
    set_backbone_trainable(t.model, not frozen)
    t.train_model = wrap_for_training(t.model, t.device, cfg.compile)
    return frozen


# ---------------------------------------------------------------- one step, one epoch

def extra_images(t: Trainer, x: torch.Tensor, cfg: TrainConfig, other: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int, torch.Tensor | None]:
    """The augmented batch x as the step trains it, and what it adds (training/outliers.py): (x, turned copies
    or None, the turns for the rotation head, how many of x's first rows are turned in place, --other-share
    random crops of the --other images or None). The rotation head's --rotation-share of x is turned in place
    (those rows teach the turn, not the class), or with --rotation-copies given as turned copies; a batch of one
    image gets a copy, so that it still teaches its class and the head trains in every step."""
    turned, turns, in_place = None, None, 0
    if cfg.rotation_weight > 0 and (cfg.rotation_copies or len(x) == 1):
        turned, turns = rotation_copies(x, cfg.rotation_share, t.generator)
    elif cfg.rotation_weight > 0:
        x, turns = turn_in_place(x, cfg.rotation_share, t.generator)
        in_place = len(turns)
    others = None
    if other is not None:
        n = max(1, round(len(x) * cfg.other_share))
        others = other_crops(other, n, x.shape[-1], t.normalization, t.generator, cfg.other_zoom_out)
    return x, turned, turns, in_place, others


def unlabeled_views(t: Trainer, unlabeled: Split, idx: torch.Tensor, cfg: TrainConfig
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weak, strong) views of the --unlabeled images at idx, row i of both from the same image: training's own
    augmentation, and dataset.strong_augment."""
    mean, std = t.normalization["mean"], t.normalization["std"]
    base = to_float(fetch_batch(unlabeled.images, idx, t.device), mean, std)
    weak = augment(base, cfg.flip, cfg.max_rotation, cfg.max_shift, cfg.max_scale, t.generator)
    return weak, strong_augment(base, mean, std, generator=t.generator)


def teacher_logits(t: Trainer, weak: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The class logits of the --unlabeled images' weak views by the model evaluated (the moving average, where
    there is one) in eval mode, without gradients: steadier pseudo-labels than the model in training gives, and
    a forward pass that trains nothing costs no backward pass."""
    teacher = t.eval_model
    teacher.eval()
    if cfg.channels_last:
        weak = weak.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), amp(t.device, t.amp_dtype):
        out = teacher(weak)
    if teacher is t.model:  # no moving average: the model in training, back to training mode
        train_mode(t.model)
    return (out[0] if isinstance(out, tuple) else out).float()


def step_loss(t: Trainer, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
              other: torch.Tensor | None, mixed: tuple[torch.Tensor | None, float] = (None, 1.0),
              views: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(loss, its classification part, the class logits and labels it was on, how many unlabelled images got a
    target) of one training step, in one forward pass: the classification loss on x's rows that were not turned
    (on a CutMix batch, `mixed` = (perm, own): split by area between y and y[perm]), plus the rotation loss on
    the turned rows or copies and the energy margins of x and the --other images when those are on
    (extra_images), plus the --unlabeled images' consistency loss (metrics.consistency_loss): their strong
    views, in the same pass, trained towards the class the evaluated model gives their weak views
    (teacher_logits). The train loss reported is the classification part alone, comparable with runs without
    them."""
    x, turned, turns, k, others = extra_images(t, x, cfg, other)
    targets = None if views is None else teacher_logits(t, views[0], cfg)
    parts = [p for p in (x, turned, others, None if views is None else views[1]) if p is not None]
    batch = torch.cat(parts) if len(parts) > 1 else x
    if cfg.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    n, start, confident = len(x), len(x) + (0 if turned is None else len(turned)), 0
    perm, own = mixed
    with amp(t.device, t.amp_dtype):
        out = model(batch)
        logits, rot_logits = out if isinstance(out, tuple) else (out, None)
        loss = class_loss = mixed_loss(t.loss_fn, logits[k:n].float(), y[k:], None if perm is None else y[perm][k:],
                                       own)
        if turns is not None:
            rows = rot_logits[:k] if k else rot_logits[n:start]
            loss = loss + cfg.rotation_weight * F.cross_entropy(rows.float(), turns)
        if others is not None:
            loss = loss + cfg.other_weight * energy_margin_loss(logits[k:n].float(),
                                                                logits[start:start + len(others)].float())
        if targets is not None:
            u_loss, mask = consistency_loss(logits[len(batch) - len(targets):], targets, cfg.pseudo_threshold)
            loss, confident = loss + cfg.unlabeled_weight * u_loss, int(mask.sum())
    return loss, class_loss.detach(), logits[k:n], y[k:], confident


def optimizer_step(t: Trainer, loss: torch.Tensor) -> None:
    """Backpropagate the loss and step the optimizer, the schedule and the moving average: the one place a
    model's weights are trained. With fp16, a scaled loss; steps whose gradients overflowed are skipped and the
    scale lowered."""
    t.optimizer.zero_grad(set_to_none=True)
    if t.scaler is None:
        loss.backward()
        t.optimizer.step()
    else:
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
    t.scheduler.step()
    if t.ema is not None:
        t.ema.update_parameters(t.model)


class BufferGuard:
    """A copy of a model's buffers (BatchNorm's running statistics) taken before each step, so a skipped step's
    forward pass can be undone."""

    def __init__(self, model: nn.Module):
        self.buffers = list(model.buffers())
        self.saved = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def save(self) -> None:
        for b, saved in zip(self.buffers, self.saved):
            saved.copy_(b)

    @torch.no_grad()
    def restore(self) -> None:
        for b, saved in zip(self.buffers, self.saved):
            b.copy_(saved)


def augmented_batch(t: Trainer, data: Split, idx: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, float]]:
    """(x, y, (perm, own)) of one step: the batch read where the images are, normalized, augmented, CutMixed."""
    x = augment(to_float(fetch_batch(data.images, idx, t.device), t.normalization["mean"], t.normalization["std"]),
                cfg.flip, cfg.max_rotation, cfg.max_shift, cfg.max_scale, t.generator)
    x, perm, own = cutmix(x, cfg.cutmix, t.generator)
    return x, labels[idx.to(t.device)], (perm, own)


def train_one_epoch(t: Trainer, data: Split, cfg: TrainConfig, deadline: float = math.inf,
                    ctrl_c: CtrlC | None = None, other: torch.Tensor | None = None, progress_bar: bool = True,
                    unlabeled: Split | None = None) -> dict:
    """One epoch (epoch_batches: a pass over the training images, or over the --unlabeled ones), augmented on
    whole batches; returns mean loss and accuracy (of the labelled images the class loss saw), counts, and
    'interrupted' when a Ctrl-C (ctrl_c.requested, on any rank) ended it after a step, before its end; with
    `unlabeled` also 'pseudo_share', the share of its images drawn that got a target. `other`: the --other images
    (step_loss). A NaN/inf step is skipped (its BatchNorm statistics undone); too many stop the run with a
    UserError."""
    model, device = t.train_model, t.device
    train_mode(model)
    rank = rank_world()[0]
    labels = data.labels.to(device)  # images: on the device, or the cache's memory map
    total_loss = correct = seen = judged = skipped = steps = data_seconds = 0  # judged: images the class loss saw
    # Under torchrun the ranks share one generator state, so augmentation draws repeat across ranks, each on
    # different images; that keeps the permutations in step without passing state between processes.
    n_unlabeled = 0 if unlabeled is None else len(unlabeled.labels)
    bar = tqdm(epoch_batches(t, len(data.labels), n_unlabeled, cfg), total=t.steps_per_epoch, leave=False,
               desc="train", mininterval=1.0, file=sys.stderr, disable=rank != 0 or not progress_bar)
    guard, stop, drawn, confident = BufferGuard(model), False, 0, 0
    for idx, u_idx in bar:
        t_data = time.perf_counter()
        x, y, mixed = augmented_batch(t, data, idx, labels, cfg)
        views = None if u_idx is None else unlabeled_views(t, unlabeled, u_idx, cfg)
        data_seconds += time.perf_counter() - t_data  # exact on CPU; CUDA runs it async
        guard.save()
        loss, class_loss, logits, class_y, sure = step_loss(t, model, x, y, cfg, other, mixed, views)
        # The ranks agree on both in one reduction: skip this step (NaN/inf), and stop after it (Ctrl-C).
        nonfinite, stop = (v > 0 for v in all_reduce_sum(
            [float(not torch.isfinite(loss).item()), float(ctrl_c is not None and ctrl_c.requested)], device))
        if nonfinite:
            skipped += 1
            guard.restore()
            t.optimizer.zero_grad(set_to_none=True)
            if skipped > max(3, t.steps_per_epoch // 10):
                raise UserError(f"training loss became NaN/inf in {skipped} steps; lower --lr (now {cfg.lr})")
        else:
            optimizer_step(t, loss)
            steps, seen, judged = steps + 1, seen + len(y), judged + len(class_y)
            drawn, confident = drawn + (0 if views is None else len(views[0])), confident + sure
            total_loss += class_loss.item() * len(class_y)
            correct += correct_count(logits, class_y)
            if steps % 10 == 0:
                bar.set_postfix(loss=f"{total_loss / judged:.3f}")
        if stop or (deadline < math.inf and any_rank(time.time() > deadline, device)):
            break
    bar.close()
    interrupted = stop and steps + skipped < t.steps_per_epoch  # stopped on its last step: a whole epoch
    total_loss, correct, seen, judged, drawn, confident = all_reduce_sum(
        [total_loss, correct, seen, judged, drawn, confident], device)
    out = {"loss": total_loss / max(1, judged), "acc": correct / max(1, judged), "images": int(seen),
           "skipped_steps": skipped, "data_seconds": data_seconds, "interrupted": interrupted}
    return out | ({"pseudo_share": confident / max(1, drawn)} if unlabeled is not None else {})


def validate(model: nn.Module, data: Split, device: torch.device, tta: bool = False, channels_last: bool = False,
             amp_dtype: torch.dtype | None = None, normalization: dict | None = None) -> dict:
    """Plain cross-entropy loss and accuracy over a split, and top-5 accuracy ('top5') with more than 5 classes.
    Under torchrun each rank scores every world-th image and the sums are reduced: all ranks get the same numbers.
    With 0/1 tags: the binary loss, the share of tags right at 0.5, and mAP, micro and macro F1 at 0.5 ('map',
    'micro_f1', 'macro_f1'), every rank scoring every image (an AP does not add up across ranks)."""
    rank, world = rank_world()
    tagged = data.labels.dim() == 2
    if world > 1 and not tagged:
        data = data.subset(torch.arange(rank, len(data.labels), world))
    logits = predict_logits(model, data.images, device, tta=tta, channels_last=channels_last, amp_dtype=amp_dtype,
                            normalization=normalization)
    if tagged:
        return tag_validation(logits.float().cpu(), data.labels.cpu())
    labels, n = data.labels, len(data.labels)
    num_classes = unwrap(model).fc.out_features
    top5 = correct_count(logits, labels, 5) if num_classes > 5 else 0
    total_loss, correct, top5, n = all_reduce_sum([loss_sum(logits, labels), correct_count(logits, labels), top5, n],
                                                  device)
    out = {"loss": total_loss / n if n else float("nan"), "acc": correct / n if n else float("nan")}
    if num_classes > 5:
        out["top5"] = top5 / n if n else float("nan")
    return out


def tag_validation(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """validate's figures for 0/1 tags (labels (N, T)), from the logits of every image."""
    n = len(labels)
    out = {"loss": loss_sum(logits, labels) / n if n else float("nan"),
           "acc": correct_count(logits, labels) / n if n else float("nan")}
    if n:
        figures = tag_figures(torch.sigmoid(logits), labels, [0.5] * labels.shape[1],
                              [str(t) for t in range(labels.shape[1])])
        out.update(map=figures["map"], micro_f1=figures["micro_f1"], macro_f1=figures["macro_f1"])
    return out


def is_finite(t: Trainer, val_loss: float) -> bool:
    """False once the val loss or any weight (raw or averaged) is NaN/inf."""
    nets = (t.model,) if t.eval_model is t.model else (t.model, t.eval_model)
    return math.isfinite(val_loss) and all(torch.isfinite(p).all() for net in nets for p in net.parameters())


# ---------------------------------------------------------------- when to stop

def stop_reason(cfg: TrainConfig, progress: Progress, epoch: int, deadline: float) -> Stop | None:
    """Why training stops after this epoch (early stopping, time budget), or None to go on."""
    if cfg.patience and epoch - progress.best["epoch"] >= cfg.patience:
        return Stop.PATIENCE
    if time.time() > deadline:
        return Stop.TIME_BUDGET
    return None


def plan_budget(t: Trainer, cfg: TrainConfig, progress: Progress, epoch: int, deadline: float,
                val_seconds: float, counts: tuple[int, int], device: torch.device) -> BudgetPlan:
    """--time-budget after `epoch`: optimization.plan_to_budget at the speed of the last three epochs, the steps
    after training (calibration, novelty fit: estimated from this epoch's validation time and the image
    `counts`, val and train) set aside. Every rank plans from the same figures (their mean), so they agree on
    when to stop."""
    this_run = [h["epoch_seconds"] for h in progress.history[progress.start_epoch:]]
    after = seconds_after_training(val_seconds, counts[0], min(counts[1], cfg.novelty_max_images or counts[1]),
                                   cfg.novelty_score != "none")
    world = rank_world()[1]
    seconds_left, epoch_seconds = (v / world for v in all_reduce_sum([deadline - time.time() - after,
                                                                       planning_epoch_seconds(this_run)], device))
    plan = plan_to_budget(t.scheduler, t.optimizer, t.steps_per_epoch, cfg, epoch, seconds_left, epoch_seconds)
    return dataclasses.replace(plan, seconds_after=after)


# ---------------------------------------------------------------- a short run without validation

def train_epochs(t: Trainer, data: Split, cfg: TrainConfig, seconds: float = 0.0) -> tuple[nn.Module, int]:
    """Train t's model on `data` for cfg.epochs epochs, or, with `seconds`, as many of them as fit in that time
    (the learning rate annealed to 0 over the last of them, as --time-budget plans), without validation or
    checkpoints; returns the trained model in eval mode and the epochs it trained."""
    set_phase(t, cfg, 1)
    planned, epoch, times = cfg.epochs, 0, []
    while epoch < planned:
        started = time.time()
        train_one_epoch(t, data, cfg, progress_bar=False)
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)  # the epoch's time, not the time to queue its kernels
        epoch, times = epoch + 1, times + [time.time() - started]
        if seconds > 0:
            planned = plan_to_budget(t.scheduler, t.optimizer, t.steps_per_epoch, cfg, epoch, seconds - sum(times),
                                     planning_epoch_seconds(times)).last_epoch
    return t.eval_model.eval(), epoch
