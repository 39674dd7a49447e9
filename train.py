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
logs/<run-name>/ (TensorBoard, config.json, results.csv, summary.json) and curves/ (PNG plots). A new run moves the
previous run's files to models/<its run name>/ and curves/<its run name>/; --resume continues in place.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from config import TrainConfig, format_config, parse_config
from core.common import UserError, needs_grad_scaler, pick_amp_dtype, pick_device, precision_name, reports_user_errors
from core.metrics import correct_count, energy_margin_loss, loss_sum, mixed_loss
from core.plots import plot_history
from dataset import Split, augment, cutmix, fetch_batch, load_training_data, read_data_layout, to_float
from model import build_model, fetch_pretrained, input_normalization, unwrap
from prediction.checkpoint import (
    BEST,
    LAST,
    build_checkpoint,
    config_of,
    layout_info_of,
    load_resume_checkpoint,
    resume_state_of,
    rng_state,
    save_checkpoint,
    set_rng_state,
    with_resume_state,
)
from prediction.predict import amp, predict_logits
from quality.audit import check_data
from quality.label_errors import format_label_check, label_check
from training.distributed import (
    all_reduce_sum,
    any_rank,
    close_distributed,
    init_distributed,
    is_main_rank,
    quiet_unless_rank0,
    rank_world,
    shard_batches,
    wrap_for_training,
)
from training.optimization import (
    LRSchedule,
    anneal_epochs,
    build_optimizer,
    class_weight_tensor,
    ema_of,
    plan_to_budget,
    planning_epoch_seconds,
    replan_lr,
    seconds_after_training,
    set_backbone_trainable,
    train_mode,
)
from training.outliers import load_other_images, other_crops, rotation_copies
from training.posthoc import calibrate_best_model, fit_novelty
from training.runs import (
    TRAINING_CURVES,
    CtrlC,
    Progress,
    ctrl_c_stops_after_the_step,
    epoch_line,
    interrupted_message,
    log_epoch,
    make_room,
    name_run,
    open_run_log,
    record_epoch,
    save_train_batch,
    write_summary,
)

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


def build_trainer(cfg: TrainConfig, train: Split, num_classes: int, device: torch.device,
                  amp_dtype: torch.dtype | None, pretrained_state: dict | None) -> Trainer:
    """The model, its moving average, loss, optimizer and learning-rate schedule."""
    model = build_model(cfg.arch, num_classes, cfg.channels, cfg.width, cfg.image_size, blocks=cfg.blocks,
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
    --epochs than the saved run planned, the schedule is replanned (optimization.replan_lr)."""
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
        print(f"--epochs {planned} -> {cfg.epochs}: " + replan_lr(t.scheduler, t.optimizer, state["epoch"], cfg.epochs,
                                                             t.steps_per_epoch, cfg.freeze_epochs))
    return Progress(state["epoch"], history, best, saved_epoch=state["epoch"],
                    train_seconds=history[-1]["train_seconds"] if history else 0.0)


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
    t.train_model = wrap_for_training(t.model, t.device, cfg.compile)
    return frozen


def extra_images(t: Trainer, x: torch.Tensor, cfg: TrainConfig, other: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """What a step adds to the augmented batch x (outliers.py): turned copies of its first --rotation-share
    images with their turns, for the rotation head; --other-share random crops of the --other images."""
    turned, turns = rotation_copies(x, cfg.rotation_share, t.generator) if cfg.rotation_weight > 0 else (None, None)
    others = None
    if other is not None:
        n = max(1, round(len(x) * cfg.other_share))
        others = other_crops(other, n, x.shape[-1], t.normalization, t.generator, cfg.other_zoom_out)
    return turned, turns, others


def step_loss(t: Trainer, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
              other: torch.Tensor | None, mixed: tuple[torch.Tensor | None, float] = (None, 1.0)
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, its classification part, the batch's class logits) of one training step, in one forward pass: the
    classification loss on x (on a CutMix batch, `mixed` = (perm, own): split by area between y and y[perm]),
    plus the rotation loss on its turned copies and the energy margins of x and the --other images when those
    are on (extra_images). The train loss reported is the classification part alone, comparable with runs
    without them."""
    turned, turns, others = extra_images(t, x, cfg, other)
    parts = [x] + [p for p in (turned, others) if p is not None]
    batch = torch.cat(parts) if len(parts) > 1 else x
    if cfg.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    n = len(x)
    with amp(t.device, t.amp_dtype):
        out = model(batch)
        logits, rot_logits = out if isinstance(out, tuple) else (out, None)
        loss = class_loss = mixed_loss(t.loss_fn, logits[:n].float(), y, *mixed)
        if turned is not None:
            loss = loss + cfg.rotation_weight * F.cross_entropy(rot_logits[n:n + len(turned)].float(), turns)
        if others is not None:
            loss = loss + cfg.other_weight * energy_margin_loss(logits[:n].float(),
                                                                logits[len(batch) - len(others):].float())
    return loss, class_loss.detach(), logits[:n]


def train_one_epoch(t: Trainer, data: Split, cfg: TrainConfig, deadline: float, ctrl_c: CtrlC | None = None,
                    other: torch.Tensor | None = None) -> dict:
    """One pass over the training images, augmented on whole batches; returns mean loss, accuracy, counts, and
    'interrupted' when a Ctrl-C (ctrl_c.requested, on any rank) ended it after a step, before its end. `other`:
    the --other images (step_loss)."""
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
                    cfg.flip, cfg.max_rotation, cfg.max_shift, cfg.max_scale, t.generator)
        x, perm, own = cutmix(x, cfg.cutmix, t.generator)
        y = labels[idx.to(device)]
        data_seconds += time.perf_counter() - t_data
        with torch.no_grad():
            for b, saved in zip(buffers, saved_buffers):
                saved.copy_(b)
        loss, class_loss, logits = step_loss(t, model, x, y, cfg, other, (perm, own))
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


def fit_to_budget(t: Trainer, cfg: TrainConfig, progress: Progress, epoch: int, deadline: float,
                  val_seconds: float, counts: tuple[int, int], device: torch.device) -> tuple[int, str]:
    """--time-budget after `epoch`: the last epoch the run now expects and why it stops now ('' to go on), from
    optimization.plan_to_budget at the speed of the last three epochs, the steps after training (calibration,
    novelty fit: estimated from this epoch's validation time and the image `counts`, val and train) set aside.
    Every rank plans from the same figures (their mean), so they agree on when to stop. Says the plan after
    the first epoch, and each time it moves the learning rate."""
    this_run = [h["epoch_seconds"] for h in progress.history[progress.start_epoch:]]
    after = seconds_after_training(val_seconds, counts[0], min(counts[1], cfg.novelty_max_images or counts[1]),
                                   cfg.novelty_score != "none")
    world = rank_world()[1]
    seconds_left, epoch_seconds = (v / world for v in all_reduce_sum([deadline - time.time() - after,
                                                                       planning_epoch_seconds(this_run)], device))
    planned, change, stop = plan_to_budget(t.scheduler, t.optimizer, t.steps_per_epoch, cfg, epoch, seconds_left,
                                           epoch_seconds)
    if change:
        print(change)
    elif epoch == progress.start_epoch + 1 and not stop:
        fit = f"all {cfg.epochs} epochs fit" if planned >= cfg.epochs else (
            f"about {planned} of {cfg.epochs} epochs fit; the learning rate will anneal to 0 over the last "
            f"{anneal_epochs(planned)}")
        print(f"time budget {cfg.time_budget:.0f}s: {fit} (at {epoch_seconds:.1f}s, the first epoch's speed; "
              f"{after:.0f}s set aside for the steps after training)")
    return planned, stop


def summarise(cfg: TrainConfig, progress: Progress, fitted: dict) -> dict:
    """The run's summary (best accuracy and epoch, seconds, checkpoint, history, what was fitted after training),
    printed in one line and written to LOG_DIR/<run>/summary.json."""
    best = progress.best
    summary = {"best_val_acc": best["acc"], "best_epoch": best["epoch"],
               "epochs_run": len(progress.history) - progress.start_epoch,
               "train_seconds": round(progress.train_seconds, 1),
               "wall_seconds": round(time.time() - progress.started, 1),
               "checkpoint": str(Path(cfg.out_dir) / BEST), "history": progress.history, **fitted}
    if best["epoch"]:
        cost = f" (novelty score: {fitted['novelty_seconds']:.0f}s of it)" if "novelty_seconds" in fitted else ""
        print(f"done: best val acc {best['acc']:.4f} at epoch {best['epoch']}, {summary['wall_seconds']:.0f}s{cost}, "
              f"saved {summary['checkpoint']}")
    if is_main_rank():
        write_summary(cfg.log_dir, cfg.run_name, summary)
    if rank_world()[1] > 1:
        dist.barrier()  # no rank leaves (and tears down the group) while rank 0 still writes
    return summary


def run(cfg: TrainConfig, resume_ckpt: dict | None = None) -> dict:
    """Train as `cfg` says; returns the summary (best accuracy, epoch, seconds, checkpoint path)."""
    cfg, device, amp_dtype = set_up(cfg)
    pretrained_state = fetch_pretrained(cfg) if resume_ckpt is None else None  # a resumed run has its weights
    lay, layout_info = read_data_layout(cfg, layout_info_of(resume_ckpt).get("val_files_sha1", "")
                                        if resume_ckpt is not None else None)
    train, val, classes = load_training_data(cfg, lay, device, resume_ckpt["classes"] if resume_ckpt else None)
    other = (load_other_images(cfg.other, 2 * cfg.image_size, cfg.channels, cfg.cache_dir, cfg.workers,
                               cfg.other_synthetic, cfg.seed, device) if cfg.other else None)
    t = build_trainer(cfg, train, len(classes), device, amp_dtype, pretrained_state)
    progress = restore(t, cfg, resume_ckpt) if resume_ckpt is not None else Progress()
    frozen = set_phase(t, cfg, progress.start_epoch + 1)
    make_room(cfg, progress.start_epoch, progress.history)
    if cfg.find_label_errors:
        if rank_world()[1] > 1:
            raise UserError("--find-label-errors runs in one process: run python check_data.py DATA --label-errors "
                            "first, then torchrun")
        print(format_label_check(label_check(train, classes, lay.root, cfg, cfg.curves_dir)))
    writer = open_run_log(cfg)
    save_train_batch(cfg, train, classes, t.normalization)
    progress.started = time.time()
    deadline = progress.started + cfg.time_budget - progress.train_seconds if cfg.time_budget > 0 else math.inf
    stopped, at_once, planned = "", False, cfg.epochs
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
                val_seconds = time.time() - epoch_started - train_seconds
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
                print(epoch_line(h, planned, improved), flush=True)
                if not finite:
                    kept = "best_model.pth and last.pth were kept" if progress.saved_epoch else "nothing was saved"
                    raise UserError(f"the model's weights or val loss became NaN/inf in epoch {epoch}; {kept}; "
                                    f"lower --lr (now {cfg.lr})")
                stopped = stop_reason(cfg, progress, epoch, deadline)
                if cfg.time_budget > 0 and not stopped:  # the end of the schedule where the time left says
                    planned, stopped = fit_to_budget(t, cfg, progress, epoch, deadline, val_seconds,
                                                     (len(val.labels), len(train.labels)), device)
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
    if stopped:
        print(stopped)
    if progress.history and is_main_rank():
        plot_history(progress.history, Path(cfg.curves_dir) / TRAINING_CURVES)
    # After training, on the best model: a softmax temperature fitted on val, then the novelty score.
    finished, best = is_main_rank() and progress.best["epoch"] and len(val.labels), Path(cfg.out_dir) / BEST
    fitted = calibrate_best_model(best, val, device, cfg.tta, None if at_once else writer) if finished else {}
    if writer is not None and not at_once:
        writer.close()
    if finished and cfg.novelty_score != "none":
        fitted.update(fit_novelty(best, train, val, cfg, device))
    return summarise(cfg, progress, fitted)


def resolve_config(argv: list[str] | None) -> tuple[TrainConfig, dict | None]:
    """Settings from flags; with --resume, the saved run's settings with the given flags on top."""
    cfg = parse_config(argv)
    if not cfg.resume:
        return cfg, None
    ckpt = load_resume_checkpoint(cfg.out_dir)
    return parse_config(argv, TrainConfig.from_dict(config_of(ckpt))), ckpt


@reports_user_errors
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
    except KeyboardInterrupt:  # Ctrl-C outside the epoch loop: while loading data, setting up or plotting
        print("interrupted; checkpoints already written are complete (continue with --resume if last.pth exists)",
              file=sys.stderr)
        return 130
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
