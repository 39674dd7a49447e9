"""Split a flat class-folder collection into train/val/test, reproducibly and stratified.

Usage:
    python split_dataset.py SRC DST                               # 0.7/0.15/0.15, copies, seed 0
    python split_dataset.py photos Dataset --ratios 0.8 0.1 0.1 --seed 1
    python split_dataset.py photos Dataset --ratios 0.8 0.2       # train and val only
    python split_dataset.py photos Dataset --mode link            # hard links (symlinks across disks)
    python split_dataset.py photos Dataset --mode move            # moves the originals: only when asked

SRC holds <class>/<images> (subfolders inside a class are kept); DST must be new or empty and gets
DST/train|val|test/<class>/. Every class is divided in the given ratios (stratified), so small classes keep
their share in each split, and the same seed gives the same split. Non-image files are left out.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from common import SPLITS, UserError
from dataset import find_classes, list_images, stratified_split_k

MODES = ("copy", "link", "move")


def check_ratios(ratios: list[float]) -> list[float]:
    if len(ratios) not in (2, 3):
        raise UserError(f"--ratios takes 2 (train val) or 3 (train val test) numbers, not {len(ratios)}")
    if any(not 0 <= r <= 1 for r in ratios) or ratios[0] <= 0:
        raise UserError(f"--ratios must lie between 0 and 1, with train above 0: {ratios}")
    if abs(sum(ratios) - 1) > 1e-6:
        raise UserError(f"--ratios must add up to 1, not {sum(ratios):g}: {ratios}")
    return ratios


def plan_split(src: Path, ratios: list[float], seed: int) -> tuple[dict[str, list[tuple[Path, Path]]], list[str]]:
    """({split: [(source file, path relative to DST)]}, ignored non-image files) without touching any file."""
    if not src.is_dir():
        raise UserError(f"no folder at {src}")
    classes = find_classes(src)
    if set(classes) & set(SPLITS):
        raise UserError(f"{src} already has {'/'.join(sorted(set(classes) & set(SPLITS)))} folders; expected "
                        f"SRC/<class>/<images>, e.g. {src}/cat/1.jpg")
    if len(classes) < 2:
        raise UserError(f"found {len(classes)} class folder(s) in {src}; expected SRC/<class>/<images> with 2 or more")
    paths, labels, ignored = list_images(src, classes)
    parts = stratified_split_k(torch.tensor(labels, dtype=torch.int64), ratios, seed)
    plan = {}
    for name, idx in zip(SPLITS, parts):
        files = [Path(paths[i]) for i in idx.tolist()]
        plan[name] = [(f, Path(name) / f.relative_to(src)) for f in files]
    return plan, ignored


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
                  mode: str = "copy") -> dict[str, dict[str, int]]:
    """Copy (link, move) SRC/<class>/* into DST/<split>/<class>/*; returns {split: {class: count}}."""
    src, dst = Path(src), Path(dst)
    check_ratios(ratios)
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst} exists and is not an empty folder; choose a new DST")
    if dst.resolve().is_relative_to(src.resolve()):
        raise UserError(f"DST {dst} is inside SRC {src}; it would be read as a class folder next time")
    plan, ignored = plan_split(src, ratios, seed)
    counts: dict[str, dict[str, int]] = {}
    for split, files in plan.items():
        counts[split] = {}
        for source, rel in files:
            place(source, dst / rel, mode)
            cls = rel.parts[1]
            counts[split][cls] = counts[split].get(cls, 0) + 1
    if ignored:
        print(f"left out {len(ignored)} non-image file(s), e.g. {ignored[0]}")
    return counts


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    classes = sorted({c for per in counts.values() for c in per})
    width = max(len(c) for c in classes + ["class"])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in counts)]
    for c in classes + ["total"]:
        row = [sum(per.values()) if c == "total" else per.get(c, 0) for per in counts.values()]
        lines.append(f"{c:<{width}}  " + "  ".join(f"{n:>6}" for n in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder of class folders: SRC/<class>/<images>")
    parser.add_argument("dst", help="new (or empty) folder for DST/train|val|test/<class>/")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.15, 0.15],
                        help="shares of train, val and (optionally) test; they add up to 1")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same split")
    parser.add_argument("--mode", choices=MODES, default="copy",
                        help="copy (default), link (hard link, else symlink) or move the originals")
    args = parser.parse_args(argv)
    try:
        counts = split_dataset(args.src, args.dst, args.ratios, args.seed, args.mode)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_counts(counts))
    print(f"{args.mode} done: {args.dst} (train with: python train.py --data {args.dst})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
