"""Which photos to label next: an unlabelled folder ranked by how much labelling each photo would teach the model.
On a pretrained backbone's features (which place photos well before any label): the folder's photos and the
training photos the checkpoint keeps (its kNN bank) are clustered together, and the clusters with the fewest
training photos, those where the model is least sure first, each give their most typical photo (after TypiClust,
Hacohen et al. 2022): the picks cover what the labels do not, where the model needs them most. On features learned
from the labels alone: the photos are grouped into N clusters and each gives its most uncertain photo (the smallest
margin between the model's two most probable classes), the most uncertain first. Either way every part of the
feature space is asked about once, so the picks are neither N near-copies of one photo nor N odd ones out.

Usage (from check_data.py --label-next):
    found = label_next(folder, "models/best_model.pth", n=100, out_dir="curves", move_to="to_label")   # LabelNext
    picks = rank_to_label(features, probs, n=100)     # [Pick], in the order to label them: by uncertainty
    picks = rank_to_label(features, probs, n=100, labelled=bank)   # by typicality where the labels are not
    groups = kmeans(features, k=100)                  # the cluster of each row
    rows = pick_rows(picks, paths, classes, root)     # what label_next.csv holds
    write_picks(rows, picks, images, out_dir)         # label_next.csv and label_next.png
    copied = copy_picks(picks, paths, "to_label")     # copies the picked files; the folder is never changed
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from config import TrainConfig
from core.common import UserError, pick_amp_dtype, pick_device
from dataset import load_folder
from model import WEIGHT_PACKAGES
from prediction.checkpoint import (config_of, load_checkpoint, model_from_checkpoint, normalization_of, novelty_of,
                                   tag_thresholds_of, temperature_of, tta_of)
from prediction.predict import extract_features
from quality.label_errors import write_listing
from training.features import cached_features, feature_logits

LABEL_NEXT_CSV, LABEL_NEXT_PNG = "label_next.csv", "label_next.png"
CSV_COLUMNS = ("rank", "path", "suggested", "confidence", "why")
KMEANS_STEPS = 30  # Lloyd iterations at most (it stops when no photo changes cluster)
LABELLED_GROUPS = 500  # typicality: clusters beyond the n picks for the training photos, at most (k-means' cost)
TYPICAL_NEIGHBOURS = 20  # a photo's typicality: the inverse mean distance to this many nearest in its cluster


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
    group: int          # photos in its cluster, itself included: how many similar photos its label speaks for
    labelled: int | None = None  # training photos in its cluster when picked by typicality (None: by uncertainty)
    group_margin: float | None = None  # the mean margin over its cluster when picked by typicality


def margins(probs: torch.Tensor) -> torch.Tensor:
    """Per row of class probabilities (N, K), the first minus the second largest: 0 = torn between two."""
    top = probs.topk(min(2, probs.shape[1]), dim=1).values
    return top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)


def nearest_centre(features: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest centre for each row, `chunk` rows at a time (the distance matrix stays small)."""
    return torch.cat([torch.cdist(features[i:i + chunk], centres).argmin(1) for i in range(0, len(features), chunk)])


def kmeans(features: torch.Tensor, k: int, steps: int = KMEANS_STEPS, seed: int = 0) -> torch.Tensor:
    """Cluster of each row (N,) of `features` (N, D): k-means++ seeding (each new centre drawn with probability
    proportional to the squared distance to the nearest one so far, so near-copies rarely get two), then Lloyd
    steps. Fewer than k clusters when the rows hold fewer distinct points."""
    x = features.float()
    generator = torch.Generator().manual_seed(seed)
    centres = [x[int(torch.randint(len(x), (1,), generator=generator))]]
    gap = ((x - centres[0]) ** 2).sum(1)
    while len(centres) < min(k, len(x)) and gap.sum() > 0:
        centres.append(x[int(torch.multinomial(gap / gap.sum(), 1, generator=generator))])
        gap = torch.minimum(gap, ((x - centres[-1]) ** 2).sum(1))
    centres = torch.stack(centres)
    assign = nearest_centre(x, centres)
    for _ in range(steps):
        counts = torch.bincount(assign, minlength=len(centres))
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        moved, assign = assign, nearest_centre(x, centres)
        if torch.equal(moved, assign):
            break
    return assign


def typicality(features: torch.Tensor) -> torch.Tensor:
    """Per row of L2-normalised features (one cluster's), the inverse mean distance to its TYPICAL_NEIGHBOURS
    nearest other rows: high in the dense middle of the cluster, low at its odd edges."""
    k = min(TYPICAL_NEIGHBOURS, len(features) - 1)
    if k < 1:
        return torch.ones(len(features))
    nearest = torch.cdist(features, features).topk(k + 1, largest=False).values[:, 1:]
    return 1 / (nearest.mean(1) + 1e-9)


def typical_picks(features: torch.Tensor, labelled: torch.Tensor, margin: torch.Tensor, n: int
                  ) -> list[tuple[int, int, int, float]]:
    """(row, cluster size, labelled photos in the cluster, the cluster's mean margin) of up to n photos: the
    length-normalized `features` and the `labelled` ones clustered together (k-means, one cluster per labelled photo
    plus n, at most LABELLED_GROUPS plus n); the clusters with the fewest labelled photos first, the smallest mean
    `margin` (the model least sure) first among them; from each the most typical of its photos."""
    x = torch.cat([F.normalize(features.float(), dim=1), F.normalize(labelled.float(), dim=1)])
    groups = kmeans(x, min(len(labelled), LABELLED_GROUPS) + n)
    mine, theirs = groups[:len(features)], groups[len(features):]
    sizes = torch.bincount(mine, minlength=int(groups.max()) + 1)
    covered = torch.bincount(theirs, minlength=len(sizes))
    mean_margin = torch.zeros(len(sizes)).index_add_(0, mine, margin.float()) / sizes.clamp(min=1)
    order = sorted((c for c in range(len(sizes)) if sizes[c] > 0),
                   key=lambda c: (int(covered[c]), float(mean_margin[c])))
    picks = []
    for c in order[:n]:
        rows = torch.nonzero(mine == c)[:, 0]
        picks.append((int(rows[typicality(x[rows]).argmax()]), int(sizes[c]), int(covered[c]),
                      round(float(mean_margin[c]), 4)))
    return picks


def rank_to_label(features: torch.Tensor, probs: torch.Tensor, n: int, labelled: torch.Tensor | None = None
                  ) -> list[Pick]:
    """The n photos to label first. Without `labelled`: the length-normalized `features` (N, D), e.g. the
    penultimate layer, grouped into n clusters (kmeans); from each its most uncertain photo (smallest margin), the
    most uncertain first. With `labelled` (features of photos already labelled, in the same space): typical_picks.
    When the photos hold fewer than n distinct points, the most uncertain of the rest fill the list."""
    if n < 1:
        raise UserError(f"--label-next takes how many photos to pick, at least 1, not {n}")
    if len(features) == 0:
        return []
    margin = margins(probs)
    top = probs.topk(min(2, probs.shape[1]), dim=1)

    def pick(i: int, group: int, labelled_in_group: int | None = None, group_margin: float | None = None) -> Pick:
        return Pick(i, int(top.indices[i, 0]), int(top.indices[i, -1]), round(float(top.values[i, 0]), 4),
                    round(float(margin[i]), 4), group, labelled_in_group, group_margin)
    by_margin = margin.argsort(stable=True).tolist()

    def filled(chosen: list[int]) -> list[int]:
        """`chosen`, then the most uncertain of the other photos, n in all."""
        taken = set(chosen)
        return (chosen + [i for i in by_margin if i not in taken])[:n]
    if labelled is not None and len(labelled):
        found = {i: rest for i, *rest in typical_picks(features, labelled, margin, n)}
        return [pick(i, *found.get(i, (1,))) for i in filled(list(found))]
    groups = kmeans(F.normalize(features.float(), dim=1), n)
    sizes = torch.bincount(groups)
    first = {}
    for i in by_margin:  # the first photo met in each cluster is its most uncertain; dicts keep that order
        first.setdefault(int(groups[i]), i)
    return [pick(i, int(sizes[groups[i]])) for i in filled(list(first.values()))]


def why(pick: Pick, classes: list[str]) -> str:
    """The reason a photo was picked, in words."""
    if pick.labelled is not None:
        return (f"typical: the most typical of {pick.group} similar photos, among which the model saw "
                f"{pick.labelled or 'no'} training photos; its mean margin over them {pick.group_margin:.2f}")
    return (f"uncertain: {classes[pick.suggested]} by a margin of {pick.margin:.2f} over "
            f"{classes[pick.runner_up]}; the most uncertain of {pick.group} similar photos")


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


def folder_features(ckpt: dict, images: torch.Tensor, paths: list[str], cache_dir: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of the images as the checkpoint's model sees them; on a frozen pretrained
    backbone, from the feature store (in the arithmetic its training used), so that a pool whose files a run has
    seen costs nothing."""
    model = model_from_checkpoint(ckpt)
    if ckpt["arch"] not in WEIGHT_PACKAGES:
        features = extract_features(model, images, tta=tta_of(ckpt), normalization=normalization_of(ckpt))
        return features["penultimate"], features["logits"]
    cfg = TrainConfig.from_dict(config_of(ckpt))
    device = pick_device(cfg.device)
    feats, _ = cached_features(model.to(device), images, paths, ckpt["arch"], cache_dir, normalization_of(ckpt),
                               device, pick_amp_dtype(device, cfg.amp), cfg.channels_last, cfg.batch_size,
                               "label-next")
    return feature_logits(model.cpu(), feats, tta_of(ckpt))


def labelled_bank(ckpt: dict) -> torch.Tensor | None:
    """The training photos' features a pretrained backbone's checkpoint keeps (its kNN novelty score's bank, all of
    them or a sample), against which typical_picks finds what the labels do not cover; None for other networks,
    whose features come from the labels alone, or without a kNN bank."""
    novelty = novelty_of(ckpt)
    if ckpt["arch"] not in WEIGHT_PACKAGES or novelty is None:
        return None
    return novelty.get("states", {}).get("knn", {}).get("bank")


def label_next(folder: str, checkpoint: str, n: int, out_dir: str | Path, move_to: str = "", cache_dir: str = "",
               workers: int = 0) -> LabelNext:
    """The n photos of `folder` (any layout; labels in it ignored) the checkpoint's model would learn most from:
    ranked (rank_to_label on its penultimate features, its calibrated probabilities and, on a pretrained backbone,
    the training photos' features it keeps), written to out_dir
    (write_picks) and, with move_to, copied there."""
    ckpt = load_checkpoint(checkpoint)
    if tag_thresholds_of(ckpt) is not None:
        raise UserError("--label-next ranks by a model of one class per image, not one of several tags")
    unlabelled = load_folder(folder, "--label-next", ckpt["image_size"], ckpt["channels"], cache_dir, workers)
    penultimate, logits = folder_features(ckpt, unlabelled.images, unlabelled.paths, cache_dir)
    probs = torch.softmax(logits / temperature_of(ckpt), dim=1)
    picks = rank_to_label(penultimate, probs, n, labelled_bank(ckpt))
    rows = pick_rows(picks, unlabelled.paths, list(ckpt["classes"]), folder)
    csv_path, gallery = write_picks(rows, picks, unlabelled.images, out_dir)
    copied = copy_picks(picks, unlabelled.paths, move_to) if move_to else []
    return LabelNext(len(unlabelled.paths), len(unlabelled.bad), rows, csv_path, gallery, copied)
