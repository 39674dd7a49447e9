"""Which photos to label next: an unlabelled folder ranked by how much labelling each photo would teach the model.
Uncertain photos first (a small margin between the model's two most probable classes), spread over the feature
space by a greedy k-center cover of the uncertain ones, so that the picks are not N near-copies of one hard photo.

Usage (from check_data.py --label-next):
    found = label_next(folder, "models/best_model.pth", n=100, out_dir="curves", move_to="to_label")   # LabelNext
    picks = rank_to_label(features, probs, n=100)     # [Pick], in the order to label them
    rows = pick_rows(picks, paths, classes, root)     # what label_next.csv holds
    write_picks(rows, picks, images, out_dir)         # label_next.csv and label_next.png
    copied = copy_picks(picks, paths, "to_label")     # copies the picked files; the folder is never changed
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from core.common import UserError
from dataset import load_folder
from prediction.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of, temperature_of, tta_of
from prediction.predict import extract_features
from quality.label_errors import write_listing

LABEL_NEXT_CSV, LABEL_NEXT_PNG = "label_next.csv", "label_next.png"
CSV_COLUMNS = ("rank", "path", "suggested", "confidence", "why")
POOL_FACTOR = 2  # the cover is drawn from the POOL_FACTOR x n most uncertain photos


@dataclass(frozen=True)
class LabelNext:
    """What label_next found and wrote."""
    images: int            # readable images in the folder
    unreadable: int        # image files that could not be read
    rows: list[dict]       # label_next.csv's rows, in the order to label them
    csv: Path
    gallery: Path
    copied: list[Path]     # the copies --move-to made (none without it)


@dataclass(frozen=True)
class Pick:
    """One photo to label."""
    index: int          # into the folder's images
    suggested: int      # the model's most probable class
    runner_up: int      # its second most probable class
    confidence: float   # the probability of `suggested`
    margin: float       # confidence minus the runner-up's probability: small = uncertain
    distance: float     # feature distance to the nearest earlier pick (inf for the first): large = new


def margins(probs: torch.Tensor) -> torch.Tensor:
    """Per row of class probabilities (N, K), the first minus the second largest: 0 = torn between two."""
    top = probs.topk(min(2, probs.shape[1]), dim=1).values
    return top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)


def farthest_first(features: torch.Tensor, n: int, first: int = 0) -> tuple[list[int], list[float]]:
    """A greedy k-center cover: from row `first`, n rows of `features` each the farthest from those before it;
    returns the rows and each one's distance to the nearest earlier row (inf for the first)."""
    chosen, gaps = [first], [math.inf]
    nearest = (features - features[first]).norm(dim=1)
    for _ in range(min(n, len(features)) - 1):
        i = int(nearest.argmax())
        chosen.append(i)
        gaps.append(float(nearest[i]))
        nearest = torch.minimum(nearest, (features - features[i]).norm(dim=1))
    return chosen, gaps


def rank_to_label(features: torch.Tensor, probs: torch.Tensor, n: int, pool_factor: float = POOL_FACTOR
                  ) -> list[Pick]:
    """The n photos to label first: of the pool_factor x n most uncertain (smallest margin), a greedy k-center
    cover of their length-normalized features (`features`: (N, D), e.g. the penultimate layer), started from
    the most uncertain; in the order they were picked."""
    if n < 1:
        raise UserError(f"--label-next takes how many photos to pick, at least 1, not {n}")
    margin = margins(probs)
    pool = margin.argsort(stable=True)[:max(n, round(pool_factor * n))]
    order, gaps = farthest_first(F.normalize(features[pool].float(), dim=1), n)
    top = probs.topk(min(2, probs.shape[1]), dim=1)
    picks = []
    for j, gap in zip(order, gaps):
        i = int(pool[j])
        runner_up = int(top.indices[i, -1])
        picks.append(Pick(i, int(top.indices[i, 0]), runner_up, round(float(top.values[i, 0]), 4),
                          round(float(margin[i]), 4), gap))
    return picks


def why(pick: Pick, classes: list[str]) -> str:
    """The reason a photo was picked, in words."""
    near = "the first pick" if math.isinf(pick.distance) else f"{pick.distance:.2f} from the nearest earlier pick"
    return (f"uncertain: {classes[pick.suggested]} by a margin of {pick.margin:.2f} over "
            f"{classes[pick.runner_up]}; {near}")


def pick_rows(picks: list[Pick], paths: list[str], classes: list[str], root: str | Path) -> list[dict]:
    """label_next.csv's rows: rank, path (relative to root when inside it), suggested label, confidence, why."""
    root = os.path.abspath(root)  # not resolved: a folder of links stays the folder its rows name

    def rel(p: str) -> str:
        path = os.path.abspath(p)
        return Path(os.path.relpath(path, root)).as_posix() if path.startswith(root + os.sep) else p
    return [{"rank": r, "path": rel(paths[p.index]), "suggested": classes[p.suggested], "confidence": p.confidence,
             "why": why(p, classes)} for r, p in enumerate(picks, 1)]


def write_picks(rows: list[dict], picks: list[Pick], images, out_dir: str | Path, top: int = 48
                ) -> tuple[Path, Path]:
    """label_next.csv (every pick) and label_next.png (the first `top`, each captioned with its rank and
    suggested label) in out_dir."""
    captions = [f"{r['rank']}. {r['suggested']}? {r['confidence']:.0%}\n{Path(r['path']).name[:24]}"
                for r in rows[:top]]
    return write_listing(rows, CSV_COLUMNS, images, [p.index for p in picks[:top]], captions,
                         Path(out_dir) / LABEL_NEXT_CSV, Path(out_dir) / LABEL_NEXT_PNG)


def copy_picks(picks: list[Pick], paths: list[str], dest: str | Path) -> list[Path]:
    """Copies of the picked files in one folder (`dest`, made if missing), for labelling: a name already there
    gets -2, -3... The files themselves are never moved or changed."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in picks:
        src = Path(paths[p.index])
        target, k = dest / src.name, 2
        while target.exists():
            target, k = dest / f"{src.stem}-{k}{src.suffix}", k + 1
        shutil.copy2(src, target)
        copied.append(target)
    return copied


def label_next(folder: str, checkpoint: str, n: int, out_dir: str | Path, move_to: str = "", cache_dir: str = "",
               workers: int = 0) -> LabelNext:
    """The n photos of `folder` (any layout; labels in it ignored) the checkpoint's model would learn most from:
    ranked (rank_to_label on its penultimate features and its calibrated probabilities), written to out_dir
    (write_picks) and, with move_to, copied there."""
    ckpt = load_checkpoint(checkpoint)
    unlabelled = load_folder(folder, "--label-next", ckpt["image_size"], ckpt["channels"], cache_dir, workers)
    features = extract_features(model_from_checkpoint(ckpt), unlabelled.images, tta=tta_of(ckpt),
                                normalization=normalization_of(ckpt))
    probs = torch.softmax(features["logits"] / temperature_of(ckpt), dim=1)
    picks = rank_to_label(features["penultimate"], probs, n)
    rows = pick_rows(picks, unlabelled.paths, list(ckpt["classes"]), folder)
    csv_path, gallery = write_picks(rows, picks, unlabelled.images, out_dir)
    copied = copy_picks(picks, unlabelled.paths, move_to) if move_to else []
    return LabelNext(len(unlabelled.paths), len(unlabelled.bad), rows, csv_path, gallery, copied)
