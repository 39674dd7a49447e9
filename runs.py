"""A run's files: a name no other run has, the previous run moved aside (never deleted), the results table.

Usage (from train.py and evaluate.py):
    name = unique_run_name("20250101-120000-resnet_small", ["logs", "models", "curves"])  # -> ...-2 when taken
    moved = archive_previous_run("models", "curves")   # {run name: folder}: models/<name>/ and curves/<name>/
    append_result("logs/<run>/results.csv", history_record)   # one row per epoch, flushed to disk
    rewrite_results("logs/<run>/results.csv", history)        # --resume: the rows of the epochs last.pth holds

The newest run keeps the plain paths (models/best_model.pth, models/last.pth, curves/training_curves.png);
before a new run writes there, the previous run's files move to models/<its run name>/ and
curves/<its run name>/, named from the run name in its checkpoint's config.
"""
from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

from checkpoint import BEST, LAST, load_checkpoint, run_name_of
from common import UserError

TRAINING_CURVES, TRAIN_BATCH, RESULTS = "training_curves.png", "train_batch.png", "results.csv"
# What a run leaves at the top of --curves-dir: its plots, and what evaluate.py --out-dir CURVES_DIR wrote.
RUN_CURVES = (TRAINING_CURVES, TRAIN_BATCH, "metrics.json", "confusion_matrix.png", "most_confident_wrong.png",
              "most_confident_wrong.csv", "unknown_scores.png", "gradcam_*.png")
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
    """The results.csv row of one epoch's history record (as train.py's record_epoch builds it)."""
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
