"""Folders of unknown images from a tagged collection: one folder per wanted tag, of links to the photos that carry
it and none of the excluded tags (the known classes), for `evaluate.py --unknown-dir`. On mirflickr, photos of
people, birds and cars without the dog tag are near kinds of a cats-and-dogs model: what its unknown-image score
must reject, beside scenes and objects.

Usage:
    python -m benchmarks.near_kinds --data ../shared/data/mirflickr --labels ../shared/data/mirflickr/labels.csv \
        --tags people:portrait,baby bird car --exclude dog --limit 300 --out near
    python evaluate.py --checkpoint models/best_model.pth --data ../shared/data/catdog --split val --unknown-dir near

A tag given as NAME:TAG,TAG fills the folder NAME with the photos that carry any of those tags. --limit keeps a
seeded sample of each folder. Prints each folder and how many photos it links.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from core.common import UserError
from loading.carve import TAG_SEP
from loading.layout import layout_splits, read_layout


def wanted_folders(specs: list[str]) -> dict[str, set[str]]:
    """{folder: the tags that put a photo in it} from specs TAG or NAME:TAG,TAG."""
    folders = {}
    for spec in specs:
        name, _, tags = spec.partition(":")
        folders[name] = set((tags or name).split(","))
    return folders


def near_kind_items(items: list[tuple[str, str]], folders: dict[str, set[str]], exclude: set[str], limit: int,
                    seed: int = 0) -> dict[str, list[str]]:
    """{folder: sorted paths}: the photos of (path, tags joined by TAG_SEP) items that carry one of the folder's
    tags and no excluded tag; at most `limit` per folder (a seeded sample; 0 = all)."""
    kept = [(p, set(label.split(TAG_SEP))) for p, label in items]
    kept = [(p, tags) for p, tags in kept if not tags & exclude]
    picked = {}
    for name, tags in folders.items():
        paths = sorted({p for p, carried in kept if carried & tags})
        if limit and len(paths) > limit:
            paths = sorted(random.Random(seed).sample(paths, limit))
        picked[name] = paths
    return picked


def link_folders(picked: dict[str, list[str]], out: Path) -> None:
    """out/FOLDER/ of links to each picked photo (a name taken twice keeps both, numbered)."""
    for name, paths in picked.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(paths):
            target = folder / Path(path).name
            if target.exists() or target.is_symlink():
                target = folder / f"{i}-{Path(path).name}"
            target.symlink_to(Path(path).resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the tagged collection's folder")
    parser.add_argument("--labels", required=True, help="its table of tags (as train.py --labels reads it)")
    parser.add_argument("--tags", nargs="+", required=True, help="TAG or NAME:TAG,TAG: one folder each")
    parser.add_argument("--exclude", nargs="*", default=[], help="photos with any of these tags are left out")
    parser.add_argument("--limit", type=int, default=0, help="at most this many photos per folder (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed, with --limit")
    parser.add_argument("--out", required=True, help="where the folders go (must not exist)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} exists; name a new folder")
    lay = read_layout(args.data, labels_file=args.labels)
    items = [item for split in layout_splits(lay).values() for item in split]
    picked = near_kind_items(items, wanted_folders(args.tags), set(args.exclude), args.limit, args.seed)
    link_folders(picked, out)
    for name, paths in picked.items():
        print(f"{out / name}: {len(paths)} photos")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
