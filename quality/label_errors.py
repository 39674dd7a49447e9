"""Likely label errors, found before training: every training image is predicted by a model that never saw it
(K short runs of the training loop on the cached pixels, one per fold; on a frozen pretrained backbone, K heads on
its cached features), then confident learning (Northcutt et al., 2021) names the images whose given label loses
clearly to another class.

Usage (from check_data.py and train.py):
    probs, seconds, ran = out_of_fold_probs(train, num_classes, cfg, folds=4, epochs=80, budget=600)
        # train: a dataset.Split; ran: the epochs each fold trained (as many of the 80 as fit in about 600 s)
    found = confident_learning(probs, train.labels)    # [{index, given, suggested, confidence, margin}], worst first
    rows = label_error_rows(found, train.paths, classes, root)   # what label_errors.csv holds
    write_label_errors(rows, train.images, out_dir)              # label_errors.csv and label_errors.png
"""
from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path

import torch

from config import TrainConfig
from core.common import UserError, pick_amp_dtype, pick_device
from core.plots import plot_gallery, save_figure
from dataset import Split, load_items
from loading.layout import Layout, read_layout, layout_splits
from model import WEIGHT_PACKAGES, build_model, fetch_pretrained, input_normalization
from prediction.predict import predict_logits
from training.features import cached_features, out_of_fold_head_probs
from training.loop import build_trainer, train_epochs
from training.runs import LABEL_ERRORS_CSV, LABEL_ERRORS_PNG

CSV_COLUMNS = ("path", "given", "suggested", "confidence", "given_probability")


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """A fold number (0..folds-1) for each image: each class is shuffled and dealt round the folds, so every
    fold holds each class in the same proportion."""
    fold = torch.empty(len(labels), dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        fold[idx] = torch.arange(len(idx)) % folds
    return fold


def fold_config(cfg: TrainConfig, epochs: int, seconds: float) -> TrainConfig:
    """The settings a fold's short run trains with: the run's own (architecture, starting weights, augmentation,
    optimizer, schedule, label smoothing, precision), `epochs` of them or as many as fit in `seconds`, without
    what only a full run needs or could not judge here: CutMix, the moving average, the rotation head, --other
    images, class weights, a frozen first phase."""
    return dataclasses.replace(cfg, epochs=epochs, time_budget=seconds, cutmix=0.0, ema_decay=0.0,
                               rotation_weight=0.0, other="", class_weights="none", freeze_epochs=0, compile=False)


def out_of_fold_probs(data: Split, num_classes: int, cfg: TrainConfig, folds: int = 4, epochs: int = 80,
                      report=None, budget: float = 0.0) -> tuple[torch.Tensor, float, list[int]]:
    """(N, classes) softmax probabilities of every image of `data`, each from the model trained on the other
    folds (with the mirror image averaged in), the seconds it took, and each fold's epochs. Each fold trains
    through training/loop.py's loop (fold_config says what differs from a full run). With a `budget` in
    seconds, each fold gets an equal share of the time left and trains as many of `epochs` as fit in it. With
    --pretrained or --weights every fold's model starts from those ImageNet weights, the way to folds strong
    enough on photos that few hard images are named. `report` (a callable) gets a line per fold."""
    t0 = time.time()
    device = pick_device(cfg.device)
    amp_dtype = pick_amp_dtype(device, cfg.amp)
    if cfg.arch in WEIGHT_PACKAGES:
        probs = frozen_backbone_probs(data, num_classes, cfg, folds, device, amp_dtype, report)
        return probs, time.time() - t0, [cfg.epochs] * folds
    pretrained_state = fetch_pretrained(cfg)
    if pretrained_state is not None and report is not None:
        report(f"pretrained: {cfg.weights or 'torchvision ImageNet weights'}, normalization "
               f"{input_normalization(True, cfg.channels, cfg.arch)}")
    fold = stratified_folds(data.labels.cpu(), folds, cfg.seed)
    probs = torch.zeros(len(data.labels), num_classes)
    ran = []
    for k in range(folds):
        held = torch.nonzero(fold == k).flatten()
        share = max((budget - (time.time() - t0)) / (folds - k), 1e-3) if budget > 0 else 0.0  # 0: no limit
        fold_cfg = fold_config(dataclasses.replace(cfg, seed=cfg.seed + k), epochs, share)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + k)  # the same folds' models whoever calls, and the caller's stream untouched
            rest = data.subset(torch.nonzero(fold != k).flatten())
            t = build_trainer(fold_cfg, rest, num_classes, device, amp_dtype, pretrained_state)
            model, trained = train_epochs(t, rest, fold_cfg, share)
        logits = predict_logits(model, data.subset(held).images, device, tta=True, channels_last=cfg.channels_last,
                                normalization=input_normalization(cfg.uses_pretrained, cfg.channels, cfg.arch))
        probs[held] = torch.softmax(logits.float(), 1)
        ran.append(trained)
        if report is not None:
            report(f"label check: fold {k + 1}/{folds} ({len(held)} images, {trained} epochs) predicted, "
                   f"{time.time() - t0:.0f}s")
    return probs, time.time() - t0, ran


def frozen_backbone_probs(data: Split, num_classes: int, cfg: TrainConfig, folds: int, device: torch.device,
                          amp_dtype: torch.dtype | None, report=None) -> torch.Tensor:
    """out_of_fold_probs on a frozen pretrained backbone (--arch of model.WEIGHT_PACKAGES): its features of the
    images (from the feature store, computed where missing), then one head per fold on the other folds' features."""
    model = build_model(cfg.arch, num_classes, cfg.channels, image_size=cfg.image_size,
                        pretrained_state=fetch_pretrained(cfg)).to(device)
    feats, computed = cached_features(model, data.images, data.paths, cfg.arch, cfg.cache_dir,
                                      input_normalization(True, cfg.channels, cfg.arch), device, amp_dtype,
                                      cfg.channels_last, cfg.batch_size, "label check")
    if report is not None:
        report(f"label check: features of {len(data.labels)} images ({computed} computed, the rest from the cache)")
    return out_of_fold_head_probs(model, feats, data.labels.cpu(), stratified_folds(data.labels.cpu(), folds, cfg.seed),
                                  cfg, report)


def confident_learning(probs: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Confident learning's label issues (Northcutt et al. 2021, pruned by noise rate, as cleanlab's default).
    Class j's threshold is its average self-confidence (the mean probability of j over the images labelled j); an
    image counts towards (given y, true j) when j is its most probable class among those that clear their
    threshold. Those counts, scaled so that each given label's row sums to its image count, estimate how many
    images labelled y are really j; that many images labelled y, those with the largest margin of j over y, are
    flagged (only where j is the more probable). Most likely first. Each: index, given, suggested (class
    indices), confidence (the suggested class's probability), given_probability."""
    num_classes = probs.shape[1]
    thresholds = torch.tensor([probs[labels == j, j].mean().item() if (labels == j).any() else 1.0
                               for j in range(num_classes)])
    clears = probs >= thresholds
    suggested = torch.where(clears, probs, torch.full_like(probs, -1.0)).argmax(1)
    counted = clears.any(1)
    joint = torch.zeros(num_classes, num_classes)
    joint.index_put_((labels[counted], suggested[counted]), torch.ones(int(counted.sum())), accumulate=True)
    sizes = torch.bincount(labels, minlength=num_classes).float()
    calibrated = joint / joint.sum(1, keepdim=True).clamp(min=1) * sizes[:, None]
    flagged: dict[int, tuple[int, float]] = {}  # index -> (suggested class, margin)
    for y in range(num_classes):
        mine = torch.nonzero(labels == y).flatten()
        for j in range(num_classes):
            n = round(calibrated[y, j].item()) if j != y else 0
            if n == 0 or not len(mine):
                continue
            margin = probs[mine, j] - probs[mine, y]
            top = margin.topk(min(n, len(mine)))
            for i, m in zip(mine[top.indices].tolist(), top.values.tolist()):
                if m > 0 and m > flagged.get(i, (j, -1.0))[1]:
                    flagged[i] = (j, m)
    order = sorted(flagged, key=lambda i: -flagged[i][1])
    return [{"index": i, "given": int(labels[i]), "suggested": flagged[i][0],
             "confidence": round(probs[i, flagged[i][0]].item(), 4),
             "given_probability": round(probs[i, labels[i]].item(), 4)} for i in order]


def label_error_rows(found: list[dict], paths: list[str], classes: list[str], root: str | Path) -> list[dict]:
    """The flagged images as label_errors.csv rows: path (relative to root when inside it, as check_data.py
    --quarantine takes it), given and suggested class names, the probabilities."""
    root = Path(root).resolve()  # as the layout resolves it

    def rel(p: str) -> str:
        try:
            return Path(p).absolute().relative_to(root).as_posix()
        except ValueError:
            return p
    return [{"path": rel(paths[f["index"]]), "given": classes[f["given"]], "suggested": classes[f["suggested"]],
             "confidence": f["confidence"], "given_probability": f["given_probability"]} for f in found]


def write_label_errors(rows: list[dict], found: list[dict], images, out_dir: str | Path, top: int = 32
                       ) -> tuple[Path, Path]:
    """label_errors.csv (every flagged image) and label_errors.png (the `top` most likely, each captioned with
    its given and suggested label) in out_dir."""
    captions = [f"{r['given']} -> {r['suggested']} {r['confidence']:.0%}\n{Path(r['path']).name[:24]}"
                for r in rows[:top]]
    return write_listing(rows, CSV_COLUMNS, images, [f["index"] for f in found[:top]], captions,
                         Path(out_dir) / LABEL_ERRORS_CSV, Path(out_dir) / LABEL_ERRORS_PNG)


def write_listing(rows: list[dict], columns: tuple[str, ...], images, shown: list[int], captions: list[str],
                  csv_path: Path, png_path: Path) -> tuple[Path, Path]:
    """A list of images as a CSV of `rows` and a gallery PNG of images[shown] with their captions: what the
    quality checks write for a person to look at."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    index = torch.tensor(shown, dtype=torch.int64)
    pictures = images[index] if len(index) else torch.zeros(0, 1, 8, 8, dtype=torch.uint8)
    return csv_path, save_figure(plot_gallery(pictures, captions), png_path)


def read_listed_paths(csv_path: str | Path) -> list[str]:
    """The `path` column of a CSV such as label_errors.csv: the files check_data.py --quarantine moves out."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise UserError(f"{csv_path} has no 'path' column")
        return [row["path"] for row in reader if row["path"]]


def label_check(data: Split, classes: list[str], root: str | Path, cfg: TrainConfig, out_dir: str | Path,
                report=None) -> dict:
    """The whole check on a training split: out-of-fold probabilities, confident learning, label_errors.csv and
    label_errors.png in out_dir; `report` (a callable) gets a line as it starts and one per fold. What the report
    and --json carry: images, folds, epochs (each fold's), seconds, found (the CSV's rows, most likely first), csv
    and gallery paths."""
    within = f" or as many as fit in about {cfg.label_error_budget:.0f}s" if cfg.label_error_budget > 0 else ""
    runs = (f"{cfg.epochs} epochs of a head on {cfg.arch}'s features" if cfg.arch in WEIGHT_PACKAGES
            else f"{cfg.label_error_epochs} epochs{within}")
    report = report or (lambda line: None)
    report(f"label check: {cfg.label_error_folds} folds x {runs} on {len(data.labels)} train images, each predicted "
           "by a model that did not see it")
    probs, seconds, ran = out_of_fold_probs(data, len(classes), cfg, cfg.label_error_folds, cfg.label_error_epochs,
                                            report, cfg.label_error_budget)
    found = confident_learning(probs, data.labels)
    rows = label_error_rows(found, data.paths, classes, root)
    csv_path, gallery = write_label_errors(rows, found, data.images, out_dir)
    agree = (probs.argmax(1) == data.labels).float().mean().item()
    return {"images": len(data.labels), "folds": cfg.label_error_folds, "epochs": ran,
            "seconds": round(seconds, 1), "out_of_fold_accuracy": round(agree, 4), "found": rows,
            "csv": str(csv_path), "gallery": str(gallery)}


def format_label_check(summary: dict, limit: int = 20) -> str:
    """The label check as report lines: the count and where the files are, then the most likely ones."""
    found, ran = summary["found"], summary["epochs"]
    epochs = f"{min(ran)}" if min(ran) == max(ran) else f"{min(ran)}-{max(ran)}"
    lines = [f"likely label errors: {len(found)} of {summary['images']} train images "
             f"({summary['folds']} folds x {epochs} epochs, {summary['seconds']:.0f}s; the folds' models "
             f"agree with {summary['out_of_fold_accuracy']:.1%} of the given labels, and the weaker they are, the "
             f"more of these are only hard images); all in {summary['csv']}, the first {min(32, len(found))} in "
             f"{summary['gallery']}"]
    lines += [f"  {r['path']}: labelled {r['given']}, looks {r['suggested']} ({r['confidence']:.0%})"
              for r in found[:limit]]
    if len(found) > limit:
        lines.append(f"  ... and {len(found) - limit} more (see the CSV)")
    if found:
        lines.append(f"  nothing was changed; to move them out: python check_data.py DATA --quarantine DIR "
                     f"--listed {summary['csv']}")
    return "\n".join(lines)


def train_split_of(cfg: TrainConfig) -> tuple[Layout, Split]:
    """cfg.data's layout and its train split, decoded as train.py reads them (through the cache)."""
    lay = read_layout(cfg.data, **cfg.layout_settings(need=None))
    if lay.multi_label:
        raise UserError("--label-errors takes one class per image, not several tags")
    return lay, load_items(layout_splits(lay)["train"], lay.classes, "train", cfg.image_size, cfg.channels,
                           cfg.cache_dir, cfg.workers)


def label_check_of_data(cfg: TrainConfig, out_dir: str | Path, report=None) -> dict:
    """label_check of the train split of cfg.data, read as train.py reads it (check_data.py --label-errors)."""
    lay, train = train_split_of(cfg)
    return label_check(train, lay.classes, lay.root, cfg, out_dir, report)
