"""A run's files and bookkeeping: a name no other run has, the previous run moved aside (never deleted), the
results table and summary, TensorBoard, where the run stands (Progress), and Ctrl-C during the epochs.

Usage (from train.py and evaluate.py):
    name = unique_run_name("20250101-120000-resnet_small", ["logs", "models", "curves"])  # -> ...-2 when taken
    moved = archive_previous_run("models", "curves")   # {run name: folder}: models/<name>/ and curves/<name>/
    append_result("logs/<run>/results.csv", history_record)   # one row per epoch, flushed to disk
    rewrite_results("logs/<run>/results.csv", history)        # --resume: the rows of the epochs last.pth holds
    write_summary("logs", run_name, summary); read_summary("logs", run_name)   # logs/<run>/summary.json
    with ctrl_c_stops_after_the_step() as ctrl_c: ...          # the first Ctrl-C sets ctrl_c.requested

The newest run keeps the plain paths (models/best_model.pth, models/last.pth, curves/training_curves.png);
before a new run writes there, the previous run's files move to models/<its run name>/ and
curves/<its run name>/, named from the run name in its checkpoint's config.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from config import TrainConfig, format_config
from core.common import UserError, remove_stale_temp_files
from core.plots import plot_gallery, save_figure
from dataset import Split, augment, cutmix, to_float, to_uint8
from prediction.checkpoint import BEST, LAST, load_checkpoint, run_name_of
from training.distributed import is_main_rank

TRAINING_CURVES, TRAIN_BATCH, RESULTS = "training_curves.png", "train_batch.png", "results.csv"
LABEL_ERRORS_CSV, LABEL_ERRORS_PNG = "label_errors.csv", "label_errors.png"  # the label check's, in CURVES_DIR
SUMMARY = "summary.json"  # LOG_DIR/<run>/: what the run ended with (train.py's summary; benchmarks/bench.py reads it)
# What a run leaves at the top of --curves-dir: its plots, and what evaluate.py --out-dir CURVES_DIR wrote.
RUN_CURVES = (TRAINING_CURVES, TRAIN_BATCH, "metrics.json", "confusion_matrix.png", "most_confident_wrong.png",
              "most_confident_wrong.csv", "unknown_scores.png", "gradcam_*.png", LABEL_ERRORS_CSV, LABEL_ERRORS_PNG)
# results.csv columns, the figures of the epoch line; val_top5 only where it is shown (more than 5 classes).
RESULT_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "epoch_seconds",
                  "train_images_per_s")


def unique_run_name(name: str, parents: list[str | Path]) -> str:
    """`name`, or name-2, name-3... : the first that is not yet a folder in any of `parents` (logs, models, curves)."""
    candidate, n = name, 1
    while any((Path(p) / candidate).exists() for p in parents):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _checkpoint_run_name(path: Path) -> str | None:
    """The run name stored in a checkpoint's config; None when it has none or cannot be read."""
    try:
        return run_name_of(load_checkpoint(path)) or None
    except UserError:
        return None


def _unnamed(path: Path) -> str:
    """A name for files of a run that recorded none (a hand-made or unreadable checkpoint): their date."""
    return time.strftime("unnamed-%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))


def _free_name(name: str, targets: list[tuple[Path, str]]) -> str:
    """`name`, or name-2, name-3...: the first under which no file about to be moved already exists."""
    candidate, n = name, 1
    while any((parent / candidate / file).exists() for parent, file in targets):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def archive_previous_run(out_dir: str | Path, curves_dir: str | Path) -> dict[str, list[Path]]:
    """Move the previous run's checkpoints (OUT_DIR/best_model.pth, last.pth) into OUT_DIR/<its run name>/ and its
    plots (CURVES_DIR/training_curves.png, ...) into CURVES_DIR/<its run name>/; nothing is deleted or overwritten
    (a name already used there gets a suffix, -2, -3...). The plots go with the run of last.pth (else best).
    Returns {archive name: [the folders written]}; empty when there was nothing to move."""
    out_dir, curves_dir = Path(out_dir), Path(curves_dir)
    groups: dict[str, list[tuple[Path, Path]]] = {}  # run name -> [(file, parent folder of the archive)]
    for file in (out_dir / LAST, out_dir / BEST):
        if file.is_file():
            groups.setdefault(_checkpoint_run_name(file) or _unnamed(file), []).append((file, out_dir))
    curves = sorted({f for pattern in RUN_CURVES for f in curves_dir.glob(pattern) if f.is_file()})
    if curves:
        owner = next(iter(groups), None) or _unnamed(curves[0])
        groups.setdefault(owner, []).extend((f, curves_dir) for f in curves)
    moved: dict[str, list[Path]] = {}
    for name, files in groups.items():
        name = _free_name(name, [(parent, f.name) for f, parent in files])
        for f, parent in files:
            (parent / name).mkdir(parents=True, exist_ok=True)
            os.replace(f, parent / name / f.name)
        moved[name] = list(dict.fromkeys(parent / name for _, parent in files))  # models first, then curves
    return moved


def result_row(h: dict) -> dict:
    """The results.csv row of one epoch's history record (as record_epoch builds it)."""
    return {k: h[k] for k in RESULT_COLUMNS if k in h}


def _write_rows(f, rows: list[dict], header: bool) -> None:
    columns = [c for c in RESULT_COLUMNS if c in rows[0]]
    buf = io.StringIO()  # each row goes to the file in one write: a kill leaves whole rows
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    f.write(buf.getvalue())
    f.flush()
    os.fsync(f.fileno())


def write_summary(log_dir: str | Path, run_name: str, summary: dict) -> Path:
    """LOG_DIR/<run>/summary.json: the run's summary (best accuracy and epoch, seconds, checkpoint, history...),
    written whole or not at all."""
    path = Path(log_dir) / run_name / SUMMARY
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SUMMARY}.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)
    return path


def read_summary(log_dir: str | Path, run_name: str) -> dict:
    path = Path(log_dir) / run_name / SUMMARY
    if not path.is_file():
        raise UserError(f"{path}: no summary; the training run did not finish")
    return json.loads(path.read_text())


def append_result(path: str | Path, h: dict) -> None:
    """Append one epoch's row to results.csv (the header first in a new file), flushed to disk at once, so a
    crash keeps every finished epoch's row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        _write_rows(f, [result_row(h)], header=new)


def rewrite_results(path: str | Path, history: list[dict]) -> None:
    """results.csv with exactly the epochs of `history` (what --resume continues from): rows of epochs that ended
    after last.pth was written, or that were cut off, are replaced; then training appends as usual."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        if history:
            _write_rows(f, [result_row(h) for h in history], header=True)
    os.replace(tmp, path)


def read_results(path: str | Path) -> list[dict]:
    """results.csv as a list of {column: value} with numbers as floats (epoch as int)."""
    with open(path, newline="") as f:
        return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# ---------------------------------------------------------------- a training run's start, logs and Ctrl-C

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


def name_run(cfg: TrainConfig) -> TrainConfig:
    """A new run gets a name no earlier run has in LOG_DIR, OUT_DIR or CURVES_DIR (default: date-time and arch;
    a name in use gets -2, -3...); a resumed run keeps its own."""
    if cfg.resume:
        return cfg
    wanted = cfg.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.arch}"
    return dataclasses.replace(cfg, run_name=unique_run_name(wanted, [cfg.log_dir, cfg.out_dir, cfg.curves_dir]))


def make_room(cfg: TrainConfig, start_epoch: int, history: list[dict]) -> dict[str, list[Path]]:
    """On the main rank, before anything is written: a new run moves the previous run's checkpoints and plots to
    OUT_DIR/<its run name>/ and CURVES_DIR/<its run name>/ (never deleting) and returns {its name: the folders};
    a resumed run continues in place, its results.csv cut back to the epochs last.pth holds."""
    if not is_main_rank():
        return {}
    if start_epoch:
        rewrite_results(Path(cfg.log_dir) / cfg.run_name / RESULTS, history)
        return {}
    return archive_previous_run(cfg.out_dir, cfg.curves_dir)


def train_batch_images(images: torch.Tensor, labels: torch.Tensor, classes: list[str], cfg: TrainConfig,
                       normalization: dict, n: int = 16) -> tuple[torch.Tensor, list[str]]:
    """n training images, as the network sees them (the training augmentation, on a generator of their own so the
    run's draws are not changed; with --cutmix on, as in a CutMix batch), back to uint8, and their class names
    ('cat + 30% dog': the share of the image a CutMix box of another class covers)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(labels), generator=generator)[:n]
    x = to_float(images[idx.to(images.device)].cpu(), normalization["mean"], normalization["std"])
    x = augment(x, cfg.flip, cfg.max_rotation, cfg.max_shift, cfg.max_scale, generator)
    x, perm, own = cutmix(x, float(cfg.cutmix > 0), generator)
    picked = labels[idx.to(labels.device)].cpu()
    names = ([" ".join(c for c, y in zip(classes, row.tolist()) if y) for row in picked] if picked.dim() == 2
             else [classes[int(k)] for k in picked])  # several tags per image: the tags
    if perm is not None:
        names = [name if names[j] == name else f"{name} + {1 - own:.0%} {names[j]}"
                 for name, j in zip(names, perm.tolist())]
    return to_uint8(x, normalization["mean"], normalization["std"]), names


def save_train_batch(cfg: TrainConfig, train: Split, classes: list[str], normalization: dict) -> Path | None:
    """CURVES_DIR/train_batch.png: 16 augmented training images with their labels, to check the augmentation
    (on the main rank, when there are images); its path."""
    if not is_main_rank() or len(train.labels) == 0:
        return None
    images, captions = train_batch_images(train.images, train.labels, classes, cfg, normalization)
    return save_figure(plot_gallery(images, captions), Path(cfg.curves_dir) / TRAIN_BATCH)


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


def log_epoch(writer, h: dict, cfg: TrainConfig) -> None:
    """The epoch's scalars to TensorBoard and its row to LOG_DIR/<run-name>/results.csv (flushed to disk)."""
    if writer is None:
        return
    append_result(Path(cfg.log_dir) / cfg.run_name / RESULTS, h)
    for key, tag in (("train_loss", "loss/train"), ("val_loss", "loss/val"), ("train_acc", "acc/train"),
                     ("val_acc", "acc/val"), ("val_top5", "acc5/val"), ("val_map", "map/val"),
                     ("val_micro_f1", "f1_micro/val"), ("val_macro_f1", "f1_macro/val"), ("lr", "lr")):
        if key in h:
            writer.add_scalar(tag, h[key], h["epoch"])
    writer.flush()


@dataclass
class Progress:
    """Where a run stands: what --resume restores, and what the summary reports."""
    start_epoch: int = 0                  # epochs finished before this process started
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"acc": -1.0, "epoch": 0})
    saved_epoch: int = 0                  # the last epoch whose last.pth was written
    train_seconds: float = 0.0            # training time of all epochs so far, carried over by --resume
    started: float = field(default_factory=time.time)


def improves(ev: dict, best: dict) -> bool:
    """Whether an epoch's val figures beat the best so far: by val mAP with several tags per image, else by val
    accuracy (the best of no epoch yet holds neither, or -1)."""
    key = "map" if "map" in ev else "acc"
    return ev[key] > best.get(key, -1.0)


def record_epoch(progress: Progress, epoch: int, tr: dict, ev: dict, lr: float, train_seconds: float,
                 epoch_started: float) -> dict:
    """Append the epoch's figures to the history (what last.pth, the curves and benchmarks/bench.py read) and
    return them."""
    progress.train_seconds += train_seconds
    h = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": ev["loss"],
         "val_acc": ev["acc"], "lr": lr, "train_seconds": round(progress.train_seconds, 2),
         "epoch_seconds": round(time.time() - epoch_started, 2),
         "train_images_per_s": round(tr["images"] / max(1e-9, train_seconds), 1),
         "train_images": tr["images"], "skipped_steps": tr["skipped_steps"],
         "data_seconds": round(tr["data_seconds"], 2), "elapsed_seconds": round(time.time() - progress.started, 2)}
    if "top5" in ev:
        h["val_top5"] = ev["top5"]
    for key in ("map", "micro_f1", "macro_f1"):  # several tags per image
        if key in ev:
            h[f"val_{key}"] = ev[key]
    if "pseudo_share" in tr:
        h["pseudo_share"] = round(tr["pseudo_share"], 4)
    progress.history.append(h)
    return h


def epoch_line(h: dict, epochs: int, improved: bool) -> str:
    top5 = f" top5 {h['val_top5']:.4f}" if "val_top5" in h else ""
    if "val_map" in h:
        top5 += f" mAP {h['val_map']:.4f} F1 {h['val_micro_f1']:.4f}"
    return (f"epoch {h['epoch']}/{epochs}  train loss {h['train_loss']:.4f} acc {h['train_acc']:.4f}  "
            f"val loss {h['val_loss']:.4f} acc {h['val_acc']:.4f}{top5}  lr {h['lr']:.2e}  {h['epoch_seconds']:.1f}s"
            + ("  *best*" if improved else "")
            + (f"  ({h['skipped_steps']} NaN/inf steps skipped)" if h["skipped_steps"] else ""))
