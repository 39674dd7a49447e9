"""Write any dataset layout train.py reads as DST/train|val|test/<class>/, reproducibly and stratified.

Usage:
    python split_dataset.py SRC DST                               # 0.7/0.15/0.15, copies, seed 0
    python split_dataset.py dog-breed Dataset --labels dog-breed/labels.csv   # labels from a table
    python split_dataset.py dogs-vs-cats Dataset --labels-from-name          # cat.0.jpg -> cat
    python split_dataset.py photos Dataset --ratios 0.8 0.1 0.1 --seed 1
    python split_dataset.py photos Dataset --ratios 0.8 0.2       # train and val only
    python split_dataset.py photos Dataset --mode link            # hard links (symlinks across disks)
    python split_dataset.py photos Dataset --mode move            # moves the originals: only when asked
    python split_dataset.py photos Dataset --classes cat dog      # only these classes

SRC is read as train.py --data reads it (loading/layout.py: class folders, split folders and their aliases, a labels
table, labels in file names). DST must be new or empty and gets DST/<split>/<class>/<file name>. Split folders
SRC already has are kept; the missing val/test shares are carved from train, each class divided in the given
ratios (stratified, the same carve train.py uses), so the same seed gives the same split. Files left out (no
label, not an image...) are counted and named.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from config import SOURCE_FIELDS, TrainConfig, add_flags
from core.common import UserError, reports_user_errors
from loading.layout import format_problems, read_layout, layout_splits

MODES = ("copy", "link", "move")


def check_ratios(ratios: list[float]) -> list[float]:
    if len(ratios) not in (2, 3):
        raise UserError(f"--ratios takes 2 (train val) or 3 (train val test) numbers, not {len(ratios)}")
    if any(not 0 <= r <= 1 for r in ratios) or ratios[0] <= 0:
        raise UserError(f"--ratios must lie between 0 and 1, with train above 0: {ratios}")
    if abs(sum(ratios) - 1) > 1e-6:
        raise UserError(f"--ratios must add up to 1, not {sum(ratios):g}: {ratios}")
    return ratios


def plan_split(src: Path, ratios: list[float], seed: int, source: dict | None = None
               ) -> dict[str, list[tuple[Path, Path]]]:
    """{split: [(source file, path relative to DST)]} without touching any file; prints the 'layout:' line and
    the files left out. `source`: TrainConfig's label-source fields (labels, labels_from_name...)."""
    if not src.is_dir():
        raise UserError(f"no folder at {src}")
    cfg = TrainConfig(data=str(src), val_fraction=ratios[1], test_fraction=ratios[2] if len(ratios) > 2 else 0.0,
                      seed=seed, **(source or {}))
    lay = read_layout(cfg.data, **cfg.layout_settings())
    if lay.multi_label:
        raise UserError(f"{src} has several tags per image, which class folders cannot hold: train on the table as it "
                        "is (train.py --labels carves val so that every tag is in it)")
    print(lay.description)
    problems = format_problems(lay)
    if problems:
        print(problems)
    plan = {}
    for name, items in layout_splits(lay).items():
        used: set[tuple[str, str]] = set()
        plan[name] = []
        for path, cls in items:
            f = Path(path)
            target, n = f.name, 1
            while (cls, target) in used:  # same name in two folders of one class (a flat table's files)
                target = f"{f.stem}_{n}{f.suffix}"
                n += 1
            used.add((cls, target))
            plan[name].append((f, Path(name) / cls / target))
    return {name: files for name, files in plan.items() if files}


def place(source: Path, target: Path, mode: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        shutil.copy2(source, target)
    elif mode == "move":
        shutil.move(source, target)
    else:
        try:
            os.link(source, target)
        except OSError:  # another file system, or one without hard links
            target.symlink_to(source.resolve())


def split_dataset(src: str | Path, dst: str | Path, ratios: list[float], seed: int = 0,
                  mode: str = "copy", source: dict | None = None) -> dict[str, dict[str, int]]:
    """Copy (link, move) SRC's images into DST/<split>/<class>/*; returns {split: {class: count}}."""
    src, dst = Path(src), Path(dst)
    check_ratios(ratios)
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst} exists and is not an empty folder; choose a new DST")
    if dst.resolve().is_relative_to(src.resolve()):
        raise UserError(f"DST {dst} is inside SRC {src}; it would be read as a class folder next time")
    plan = plan_split(src, ratios, seed, source)
    counts: dict[str, dict[str, int]] = {}
    for split, files in plan.items():
        counts[split] = {}
        for source, rel in files:
            place(source, dst / rel, mode)
            cls = rel.parts[1]
            counts[split][cls] = counts[split].get(cls, 0) + 1
    return counts


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    classes = sorted({c for per in counts.values() for c in per})
    width = max(len(c) for c in classes + ["class"])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in counts)]
    for c in classes + ["total"]:
        row = [sum(per.values()) if c == "total" else per.get(c, 0) for per in counts.values()]
        lines.append(f"{c:<{width}}  " + "  ".join(f"{n:>6}" for n in row))
    return "\n".join(lines)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="dataset folder, any layout train.py reads (README 'Your data')")
    parser.add_argument("dst", help="new (or empty) folder for DST/train|val|test/<class>/")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.15, 0.15],
                        help="shares of train, val and (optionally) test; they add up to 1")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same split")
    parser.add_argument("--mode", choices=MODES, default="copy",
                        help="copy (default), link (hard link, else symlink) or move the originals")
    add_flags(parser, (*SOURCE_FIELDS, "classes"))
    args = parser.parse_args(argv)
    source = {k: v for k, v in vars(args).items() if k in (*SOURCE_FIELDS, "classes")}
    counts = split_dataset(args.src, args.dst, args.ratios, args.seed, args.mode, source)
    print(format_counts(counts))
    print(f"{args.mode} done: {args.dst} (train with: python train.py --data {args.dst})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
