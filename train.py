"""Train a ResNet image classifier on a folder of images.

Usage:
    python train.py                                    # trains on ./Dataset (DATA/train/<class>/*)
    python train.py --data PATH --epochs 20 --arch resnet18
    python train.py --data PATH --classes cat dog      # only these class folders
    python train.py --resume                           # continue from models/last.pth
    python train.py --help                             # every setting, from config.py
    tensorboard --logdir logs

Writes models/best_model.pth (best val accuracy), models/last.pth (every epoch, for --resume),
logs/<run-name>/ (TensorBoard and config.json) and curves/ (PNG plots).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import TrainConfig, UserError, format_config, given_flags
from dataset import NORMALIZATION, Split, augment, batches, load_data, to_float
from model import (CHECKPOINT_VERSION, build_model, load_checkpoint, predict_logits, save_atomic, unwrap)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate factor per step: linear warmup to 1, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # Decay conv and linear weights only: shrinking BN scales and biases just fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def class_weight_tensor(labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """Inverse-frequency loss weights (mean 1) for mode 'auto', None for 'none'."""
    if mode == "none":
        return None
    if mode != "auto":
        raise UserError(f"--class-weights must be 'auto' or 'none', not {mode!r}")
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


def train_one_epoch(model: nn.Module, data: Split, optimizer: torch.optim.Optimizer, scheduler, loss_fn: nn.Module,
                    device: torch.device, cfg: TrainConfig, generator: torch.Generator,
                    amp_dtype: torch.dtype | None, deadline: float) -> dict:
    """One pass over the training images, augmented on whole batches; returns mean loss, accuracy, counts."""
    from tqdm import tqdm

    model.train()
    images, labels = data.images.to(device), data.labels.to(device)
    loss_sum = correct = seen = skipped = steps = 0
    steps_total = len(images) // cfg.batch_size or 1
    # The forward pass of a skipped step has already moved BatchNorm's running statistics: keep a copy to undo it.
    buffers = list(model.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    bar = tqdm(batches(len(images), cfg.batch_size, True, generator, drop_last=True), total=steps_total,
               leave=False, desc="train", mininterval=1.0, file=sys.stderr)
    for idx in bar:
        idx = idx.to(device)
        x = augment(to_float(images[idx]), cfg.flip, cfg.max_rotation, cfg.max_shift, generator)
        y = labels[idx]
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for b, saved in zip(buffers, saved_buffers):
                saved.copy_(b)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            # A NaN/inf step would poison the weights: skip it, count it, and stop if it keeps happening.
            skipped += 1
            with torch.no_grad():
                for b, saved in zip(buffers, saved_buffers):
                    b.copy_(saved)
            optimizer.zero_grad(set_to_none=True)
            if skipped > max(3, steps_total // 10):
                raise UserError(f"training loss became NaN/inf in {skipped} steps; lower --lr (now {cfg.lr})")
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        steps += 1
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        if steps % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        if time.time() > deadline:
            break
    bar.close()
    return {"loss": loss_sum / max(1, seen), "acc": correct / max(1, seen), "images": seen,
            "skipped_steps": skipped}


def evaluate(model: nn.Module, data: Split, device: torch.device, tta: bool = False, channels_last: bool = False,
             amp_dtype: torch.dtype | None = None) -> dict:
    """Plain cross-entropy loss and accuracy over a split."""
    logits = predict_logits(model, data.images, device, tta=tta, channels_last=channels_last, amp_dtype=amp_dtype)
    loss = F.cross_entropy(logits, data.labels).item() if len(data.labels) else float("nan")
    acc = (logits.argmax(1) == data.labels).float().mean().item() if len(data.labels) else float("nan")
    return {"loss": loss, "acc": acc}


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


def make_checkpoint(model: nn.Module, cfg: TrainConfig, classes: list[str], epoch: int, metrics: dict,
                    history: list[dict], best: dict) -> dict:
    """The self-sufficient checkpoint: everything inference and evaluation need, in plain types."""
    return {"format_version": CHECKPOINT_VERSION, "model_state": unwrap(model).state_dict(), "arch": cfg.arch,
            "classes": list(classes), "image_size": cfg.image_size, "channels": cfg.channels,
            "normalization": dict(NORMALIZATION), "config": cfg.to_dict(), "epoch": epoch, "metrics": metrics,
            "best": dict(best), "history": history, "temperature": 1.0}


def plot_history(history: list[dict], path: Path) -> None:
    """Loss, accuracy and learning-rate curves per epoch as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, axis, title in (("loss", ax[0], "loss"), ("acc", ax[1], "accuracy")):
        axis.plot(ep, [h[f"train_{key}"] for h in history], "o-", label="train")
        axis.plot(ep, [h[f"val_{key}"] for h in history], "o-", label="val")
        axis.set_title(title)
        axis.legend()
    ax[2].plot(ep, [h["lr"] for h in history], "o-")
    ax[2].set_title("learning rate (end of epoch)")
    for axis in ax:
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def resolve_config(argv: list[str] | None) -> tuple[TrainConfig, dict | None]:
    """Settings from flags; with --resume, the saved run's settings with the given flags on top."""
    given = given_flags(argv)
    cfg = dataclasses.replace(TrainConfig(), **given)
    if not cfg.resume:
        return cfg, None
    ckpt = load_checkpoint(Path(cfg.out_dir) / "last.pth", hint="nothing to resume: train without --resume first")
    if "optimizer_state" not in ckpt:
        raise UserError(f"{Path(cfg.out_dir) / 'last.pth'} has no optimizer state to resume from")
    return dataclasses.replace(TrainConfig.from_dict(ckpt["config"]), **given), ckpt


def run(cfg: TrainConfig, resume_ckpt: dict | None = None) -> dict:
    """Train as `cfg` says; returns the summary (best accuracy, epoch, seconds, checkpoint path)."""
    from torch.utils.tensorboard import SummaryWriter

    # -- seed and device
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    amp_dtype = None
    if cfg.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        torch.backends.cudnn.benchmark = True
    if not cfg.run_name:
        cfg = dataclasses.replace(cfg, run_name=f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.arch}")
    print("config:", format_config(cfg))
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)}, {amp_dtype})" if device.type == "cuda"
                                 else f" ({torch.get_num_threads()} threads)"))

    # -- data: decoded once (cached), then kept as uint8 tensors
    t0 = time.time()
    train, val, classes = load_data(cfg.data, cfg.classes or None, cfg.image_size, cfg.channels, cfg.val_fraction,
                                    cfg.seed, cfg.cache_dir, cfg.workers, cfg.max_bad_fraction)
    if resume_ckpt is not None and resume_ckpt["classes"] != classes:
        raise UserError(f"the checkpoint's classes {resume_ckpt['classes']} differ from the data's {classes}")
    print(f"data: {len(train.paths)} train / {len(val.paths)} val images, classes {classes}, "
          f"loaded in {time.time() - t0:.1f}s")
    for path, reason in train.bad + val.bad:
        print(f"skipped unreadable image {path}: {reason}")
    if train.bad or val.bad:
        print(f"skipped {len(train.bad) + len(val.bad)} unreadable image(s) in total")
    if len(train.paths) < cfg.batch_size:
        print(f"note: only {len(train.paths)} training images; each epoch is one batch of that size")

    # -- model, loss, optimizer, schedule
    model = build_model(cfg.arch, len(classes), cfg.channels, cfg.width, cfg.image_size).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = class_weight_tensor(train.labels, len(classes), cfg.class_weights)
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                  label_smoothing=cfg.label_smoothing)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    steps_per_epoch = max(1, len(train.paths) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch))
    start_epoch, history = 0, []
    best = {"acc": -1.0, "epoch": 0}
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model_state"])
        optimizer.load_state_dict(resume_ckpt["optimizer_state"])
        scheduler.load_state_dict(resume_ckpt["scheduler_state"])
        set_rng_state(resume_ckpt["rng"], generator)
        start_epoch, history, best = resume_ckpt["epoch"], resume_ckpt["history"], resume_ckpt["best"]
        print(f"resuming after epoch {start_epoch} (best val acc {best['acc']:.4f} at epoch {best['epoch']})")
    train_model = torch.compile(model) if cfg.compile else model

    # -- loop
    out_dir, run_dir = Path(cfg.out_dir), Path(cfg.log_dir) / cfg.run_name
    for stale in out_dir.glob(".*.pth.*.tmp"):  # save_atomic's temp file of a run killed while saving
        stale.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(format_config(cfg))
    writer = SummaryWriter(str(run_dir))
    t_start = time.time()
    train_seconds = sum(h["train_seconds"] for h in history)
    deadline = t_start + cfg.time_budget - train_seconds if cfg.time_budget > 0 else float("inf")
    stopped, saved_epoch = "", start_epoch
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            t_epoch = time.time()
            tr = train_one_epoch(train_model, train, optimizer, scheduler, loss_fn, device, cfg, generator,
                                 amp_dtype, deadline)
            train_seconds += time.time() - t_epoch
            ev = evaluate(model, val, device, cfg.tta, cfg.channels_last, amp_dtype)
            lr = optimizer.param_groups[0]["lr"]
            h = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": ev["loss"],
                 "val_acc": ev["acc"], "lr": lr, "train_seconds": round(train_seconds, 2),
                 "epoch_seconds": round(time.time() - t_epoch, 2),
                 "train_images_per_s": round(tr["images"] / max(1e-9, time.time() - t_epoch), 1),
                 "skipped_steps": tr["skipped_steps"]}
            history.append(h)
            for key, tag in (("train_loss", "loss/train"), ("val_loss", "loss/val"), ("train_acc", "acc/train"),
                             ("val_acc", "acc/val"), ("lr", "lr")):
                writer.add_scalar(tag, h[key], epoch)
            writer.flush()
            finite = math.isfinite(ev["loss"]) and all(torch.isfinite(p).all() for p in model.parameters())
            improved = finite and ev["acc"] > best["acc"]
            if improved:
                best = {"acc": ev["acc"], "epoch": epoch, "loss": ev["loss"]}
            ckpt = make_checkpoint(model, cfg, classes, epoch, {"val": ev, "train": tr}, history, best)
            if improved:
                save_atomic(ckpt, out_dir / "best_model.pth")
            ckpt.update(optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                        rng=rng_state(generator))
            if finite:  # a broken model must not replace the last good state that --resume starts from
                save_atomic(ckpt, out_dir / "last.pth")
                saved_epoch = epoch
            print(f"epoch {epoch}/{cfg.epochs}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f}  "
                  f"val loss {ev['loss']:.4f} acc {ev['acc']:.4f}  lr {lr:.2e}  {h['epoch_seconds']:.1f}s"
                  + ("  *best*" if improved else "")
                  + (f"  ({tr['skipped_steps']} NaN/inf steps skipped)" if tr["skipped_steps"] else ""), flush=True)
            if not finite:
                kept = "best_model.pth and last.pth were kept" if saved_epoch else "nothing was saved"
                raise UserError(f"the model's weights or val loss became NaN/inf in epoch {epoch}; {kept}; "
                                f"lower --lr (now {cfg.lr})")
            if cfg.patience and epoch - best["epoch"] >= cfg.patience:
                stopped = f"early stop: no better val accuracy for {cfg.patience} epochs"
                break
            if time.time() > deadline:
                stopped = f"time budget of {cfg.time_budget:.0f}s reached"
                break
    except KeyboardInterrupt:
        # Only the epochs whose last.pth was written count: Ctrl-C may land between an epoch and its save.
        stopped = (f"interrupted; {out_dir / 'last.pth'} holds epoch {saved_epoch}: continue with --resume"
                   if saved_epoch else "interrupted before the first epoch ended; nothing saved")
    finally:
        writer.close()

    # -- summary
    if stopped:
        print(stopped)
    if history:
        plot_history(history, Path(cfg.curves_dir) / "training_curves.png")
    summary = {"best_val_acc": best["acc"], "best_epoch": best["epoch"], "epochs_run": len(history) - start_epoch,
               "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - t_start, 1),
               "checkpoint": str(out_dir / "best_model.pth"), "history": history}
    if best["epoch"]:
        print(f"done: best val acc {best['acc']:.4f} at epoch {best['epoch']}, {summary['wall_seconds']:.0f}s, "
              f"saved {summary['checkpoint']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume_ckpt = resolve_config(argv)
        if cfg.check_only:
            from dataset import main as dataset_main
            return dataset_main(["check", cfg.data])
        if resume_ckpt is not None and resume_ckpt["epoch"] >= cfg.epochs:
            print(f"{cfg.out_dir}/last.pth already finished {resume_ckpt['epoch']} of {cfg.epochs} epochs; "
                  "pass a larger --epochs to train on")
            return 0
        run(cfg, resume_ckpt)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the epoch loop: while loading data, setting up or plotting
        print("interrupted; checkpoints already written are complete (continue with --resume if last.pth exists)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
