"""What train.py says: its values (the data summary, the budget plan, why a run stopped, what was fitted after
training) as the lines it prints. Pure functions of values; the decisions are made in training/loop.py and
training/optimization.py, and only the script prints.

Usage (from train.py):
    text = data_lines(cfg, train, val, classes, summary)      # the data's counts, near-copies, placement
    line = stop_line(cfg, Stop.PATIENCE, plan, progress)       # early stop: no better val accuracy for 5 epochs
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from config import TrainConfig
from core.common import precision_name
from dataset import DataSummary, Split
from loading.near_duplicates import End
from prediction.checkpoint import LAST
from training.distributed import rank_world
from training.loop import Stop
from training.optimization import BudgetPlan, Replan, anneal_epochs
from training.runs import Progress


def device_line(device: torch.device, amp_dtype: torch.dtype | None, batch_size: int) -> str:
    world = rank_world()[1]
    return (f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                                   else f" ({torch.get_num_threads()} threads)")
            + f", {precision_name(amp_dtype)}"
            + (f", {world} processes ({dist.get_backend()}), batch size {batch_size} per process" if world > 1 else ""))


def data_lines(cfg: TrainConfig, train: Split, val: Split, classes: list[str], summary: DataSummary) -> str:
    """The data's counts, the start-up near-copy line, the unreadable files, where training reads its images."""
    lines = [f"data: {len(train.paths)} train / {len(val.paths)} val images, classes {classes}, "
             f"loaded in {summary.seconds:.1f}s", near_copies_line(summary)]
    lines += [f"skipped unreadable image {path}: {reason}" for path, reason in train.bad + val.bad]
    if train.bad or val.bad:
        lines.append(f"skipped {len(train.bad) + len(val.bad)} unreadable image(s) in total")
    p = summary.placement
    size = f"{p.n_bytes / 2**30:.2f} GiB of pixels" + (f", {p.gpu_free_bytes / 2**30:.1f} GiB free on the GPU"
                                                       if p.gpu_free_bytes is not None else "")
    lines.append(f"training images: whole set on {p.device} ({size})" if p.where == "device" else
                 f"training images: batches read from the memory map ({size}"
                 + (", pinned-memory batches to the GPU)" if p.device == "cuda" else ")"))
    if len(train.paths) < cfg.batch_size:
        lines.append(f"note: only {len(train.paths)} training images; each epoch is one batch of that size")
    return "\n".join(lines)


def near_copies_line(summary: DataSummary) -> str:
    check = summary.near
    took = f"{check.seconds:.1f}s"
    if check.found.end is End.TIME_CAP:
        return f"near-copies: not finished in {took} at start-up; python check_data.py DATA gives the full report"
    if check.found.end in (End.CROWDED, End.PAIR_CAP):
        return f"near-copies: not judged, {check.found.n} images look too alike in small thumbnails to search, {took}"
    within, cross, lookalike = check.counts()
    return (f"near-copies: {within} group(s) within train or val, {cross} across them"
            + (" (leakage: python check_data.py DATA names them)" if cross else "")
            + (f"; {lookalike} images look too alike in small thumbnails to judge" if lookalike else "") + f", {took}")


def replan_words(r: Replan) -> str:
    if r.how == "two-phase":
        return f"the learning rate follows the two-phase schedule planned for {r.epochs} epochs (lr {r.lr:.2e} now)"
    return (f"the learning rate follows a fresh cosine from {r.lr:.2e} after epoch {r.epoch} down to 0 at epoch "
            f"{r.epochs}" + (f" (the saved run had finished its schedule at lr 0, so it starts where a "
                             f"{r.epochs}-epoch schedule is after epoch {r.epoch})" if r.how == "ended" else ""))


def budget_lines(cfg: TrainConfig, plan: BudgetPlan, first: bool) -> list[str]:
    """The plan after the first epoch, and each time it moves the learning rate."""
    if plan.replan is not None:
        return [f"time budget {cfg.time_budget:.0f}s: {plan.last_epoch} epochs fit at {plan.epoch_seconds:.1f}s; "
                f"{replan_words(plan.replan)}"]
    if not first or plan.stop:
        return []
    fit = f"all {cfg.epochs} epochs fit" if plan.last_epoch >= cfg.epochs else (
        f"about {plan.last_epoch} of {cfg.epochs} epochs fit; the learning rate will anneal to 0 over the last "
        f"{anneal_epochs(plan.last_epoch)}")
    return [f"time budget {cfg.time_budget:.0f}s: {fit} (at {plan.epoch_seconds:.1f}s, the first epoch's speed; "
            f"{plan.seconds_after:.0f}s set aside for the steps after training)"]


def stop_line(cfg: TrainConfig, stop: Stop, plan: BudgetPlan | None, progress: Progress) -> str:
    epoch = progress.history[-1]["epoch"] if progress.history else progress.start_epoch
    if stop is Stop.PATIENCE:
        return f"early stop: no better val accuracy for {cfg.patience} epochs"
    if stop is Stop.TIME_BUDGET:
        return f"time budget of {cfg.time_budget:.0f}s reached"
    if stop is Stop.NO_EPOCH_FITS:
        return (f"time budget of {cfg.time_budget:.0f}s: no further epoch of {plan.epoch_seconds:.1f}s fits before "
                "the steps after training")
    note = {Stop.CTRL_C_IN_EPOCH: f"Ctrl-C stopped epoch {epoch + 1} after a step; that epoch is not saved, "
                                  "--resume starts it again",
            Stop.CTRL_C: f"Ctrl-C stopped the run after epoch {epoch}",
            Stop.CTRL_C_TWICE: "a second Ctrl-C stopped it at once"}[stop]
    if not progress.saved_epoch:
        return f"interrupted; nothing saved: no epoch had ended ({note})"
    return f"interrupted; {Path(cfg.out_dir) / LAST} holds epoch {progress.saved_epoch}: continue with --resume ({note})"


def calibration_line(fitted: dict, path: Path) -> str:
    return (f"calibration on val: temperature {fitted['temperature']:.3f}, expected calibration error "
            f"{fitted['val_ece_before']:.4f} -> {fitted['val_ece_after']:.4f} (stored in {path})")


def novelty_lines(cfg: TrainConfig, fitted: dict, n_train: int) -> str:
    n_fit = fitted["novelty_train_images"]
    fitted_on = (f"{n_fit} train images" if n_fit == n_train else
                 f"a stratified sample of {n_fit} of the {n_train} train images (--novelty-max-images)")
    line = (f"novelty score {fitted['novelty_score']}: fitted on {fitted_on} in {fitted['novelty_seconds']:.1f}s "
            f"({fitted['novelty_bytes'] / 1e6:.1f} MB stored, scores {', '.join(fitted['novelty_scores'])}); "
            f"threshold {fitted['novelty_threshold']:.4g} accepts {fitted['novelty_val_accepted']:.1%} of val "
            f"(--accept-rate {cfg.accept_rate})")
    if r := fitted.get("known_unknowns"):
        line += (f"\nleft-out classes as unknown images ({', '.join(r['classes'])}: {r['images']} images): "
                 f"{fitted['novelty_score']} AUROC {r['auroc']:.3f}, FPR at 95% TPR {r['fpr_at_95_tpr']:.1%}; at the "
                 f"stored threshold {r['known_rejected']:.1%} of val rejected, {r['unknown_accepted']:.1%} of the "
                 "left-out images accepted")
    return line
