"""The data a training run reads: the train/val splits decoded through the cache, batches, augmentation on
whole batches of tensors, and where training reads its images from.

Usage:
    python dataset.py demo DIR                   # write a small synthetic cat/dog-like set for a smoke test
    python dataset.py unknown DIR --count 600    # write synthetic far-away images (shapes, noise, text...)

    train, val = load_data(read_layout("Dataset"), size=64, channels=1, cache_dir="cache")   # two Splits
    x = augment(to_float(train.images[idx]), flip=True, max_degrees=10, max_shift=0.1, max_scale=0.1)

Which files there are and their labels comes from loading/layout.py (any folder layout, a labels table, file
names). Each image is decoded once (loading/decode.py; grayscale, IMAGE_SIZE x IMAGE_SIZE, uint8) into a
memory-mapped array in CACHE_DIR keyed by path, size and mtime (loading/cache.py), so later epochs and later runs
skip JPEG decoding, whatever layout the files came from, and read batches from the map.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from config import NORMALIZATION, TrainConfig
from core.common import UserError, reports_user_errors
from loading.cache import derived_rows, update_cache
from loading.carve import narrow_tags, split_tags
from loading.decode import decode_files, decode_image, expand_inputs, mapped_tensor
from loading.layout import Layout, layout_splits, read_layout
from loading.near_duplicates import GRID, VARIANTS, StartUpCheck, descriptors, start_up_check
from loading.synthetic import make_synthetic, write_unknown_set

# ---------------------------------------------------------------- pixels to the network's floats and back

def to_float(x: torch.Tensor, mean: float | list[float] = NORMALIZATION["mean"],
             std: float | list[float] = NORMALIZATION["std"]) -> torch.Tensor:
    """uint8 pixels (..., C, H, W) to floats (x / 255 - mean) / std; mean and std are one value or one per channel.

    The default (0.5, 0.5) maps to [-1, 1]; other statistics (ImageNet's, for pretrained weights) come from the
    checkpoint's "normalization" so training, inference and export agree.
    """
    if mean == 0.5 and std == 0.5:  # (x / 255 - 0.5) / 0.5 in one pass
        return x.float().div_(127.5).sub_(1.0)
    shape = (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(shape)
    return x.float().div_(255.0).sub_(m).div_(s)


def to_uint8(x: torch.Tensor, mean: float | list[float] = NORMALIZATION["mean"],
             std: float | list[float] = NORMALIZATION["std"]) -> torch.Tensor:
    """to_float undone: normalized floats (..., C, H, W) back to uint8 pixels, for pictures of what the network saw."""
    shape = (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(shape)
    return (x.float() * s + m).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


def image_tensor(path: str | Path, size: int, channels: int = 1, normalization: dict | None = None) -> torch.Tensor:
    """One file to a normalized (1, channels, size, size) float tensor, as the model sees it at evaluation."""
    norm = normalization or NORMALIZATION
    return to_float(torch.from_numpy(decode_image(path, size, channels)), norm["mean"], norm["std"])[None]


# ---------------------------------------------------------------- cache and splits

class RowView:
    """Chosen rows of a uint8 image tensor (usually the read-only memory map of the cache), read only when
    indexed: a subset or reordering that copies no pixels. view[idx] is a plain tensor of those images."""

    def __init__(self, base: torch.Tensor, rows: torch.Tensor):
        self.base, self.rows = base, rows

    @classmethod
    def of(cls, images: "torch.Tensor | RowView", idx: torch.Tensor) -> "RowView":
        return cls(images.base, images.rows[idx]) if isinstance(images, RowView) else cls(images, idx)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> torch.Tensor:
        return self.base[self.rows[key]]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.base.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """All the rows as one tensor on `device`: this does hold every pixel in memory."""
        return self.base[self.rows].to(device, non_blocking=non_blocking)


@dataclass
class Split:
    """A decoded split: uint8 images (N, C, S, S), int64 labels, their paths, and the files that failed.
    With a cache the images are a read-only memory map (or a RowView of one): index them a batch at a time, and
    `near` holds their near-copy descriptors (near_duplicates.descriptors), kept in the cache beside them."""
    images: torch.Tensor | RowView
    labels: torch.Tensor
    paths: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)
    near: torch.Tensor | RowView | None = None

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(RowView.of(self.images, idx), self.labels[idx], [self.paths[i] for i in idx.tolist()],
                     near=None if self.near is None else RowView.of(self.near, idx))

    def near_descriptors(self) -> torch.Tensor | RowView:
        """The near-copy descriptors of the images: the cache's, or computed now when there is no cache."""
        return descriptors(self.images) if self.near is None else self.near


def cache_folder(paths: list[str]) -> str:
    """The folder that holds every file of the list (for DATA/train/<class>/* the split folder): the cache is
    keyed by it, so a carved val shares train's cache and any layout of the same files finds it. Found from the
    common prefix of the list's smallest and largest path, cut at its last separator: no work per file in Python."""
    common = os.path.commonprefix([min(paths), max(paths)]) if paths else ""
    return common[:common.rfind(os.sep)] or (os.sep if common.startswith(os.sep) else ".")


def load_split(paths: list[str], labels: list[int], name: str, size: int, channels: int = 1,
               cache_dir: str = "", workers: int = 0) -> Split:
    """Decode a list of image files with their class indices. With cache_dir, files new or changed since the
    last run (by path, size and mtime) are decoded into the memory-mapped cache (loading/cache.py) and the images
    are read from the map; without one they are decoded into memory. `name` (train, val...) labels the progress
    bar."""

    def decode(some: list[str]):
        return decode_files(some, size, channels, workers, desc=f"decoding {name}")

    near_base = None
    if cache_dir and paths:
        pixels, rows, reasons, _ = update_cache(cache_dir, cache_folder(paths), paths, size, channels, decode)
        base = mapped_tensor(pixels)
        near_base = mapped_tensor(derived_rows(pixels, "near", (VARIANTS, GRID * GRID), np.float16,
                                               lambda block: descriptors(torch.from_numpy(block)).numpy(),
                                               desc=f"near-copy descriptors {name}"))
    else:
        decoded = list(decode(paths))
        reasons = [reason for _, reason in decoded]
        good = [p for p, _ in decoded if p is not None]
        ok = np.array([p is not None for p, _ in decoded], dtype=bool)
        rows = np.where(ok, np.cumsum(ok) - 1, -1).astype(np.int64)
        base = (torch.from_numpy(np.stack(good)) if good
                else torch.zeros(0, channels, size, size, dtype=torch.uint8))
    keep = np.flatnonzero(rows >= 0)
    order = torch.from_numpy(rows[keep])
    in_order = torch.equal(order, torch.arange(len(base)))
    kept = keep.tolist()
    return Split(images=base if in_order else RowView(base, order),
                 labels=kept_labels(labels, kept),
                 paths=[paths[i] for i in kept],
                 bad=[(paths[i], reasons[i]) for i in np.flatnonzero(rows < 0).tolist()],
                 near=None if near_base is None else near_base if in_order else RowView(near_base, order))


def kept_labels(labels: list, kept: list[int]) -> torch.Tensor:
    """The labels of the kept rows: class indices as int64 (N,), or rows of 0/1 tags as float32 (N, T)."""
    if labels and isinstance(labels[0], list):
        return torch.tensor([labels[i] for i in kept], dtype=torch.float32).reshape(len(kept), len(labels[0]))
    return torch.tensor([labels[i] for i in kept], dtype=torch.int64)


def load_items(items: list[tuple[str, str]], classes: list[str], name: str, size: int, channels: int = 1,
               cache_dir: str = "", workers: int = 0, tags: bool = False) -> Split:
    """load_split of layout items (path, class name), labelled by their index in `classes`; with `tags` (a
    layout with several tags per image) by a 0/1 row over `classes`, the tags (Split.labels (N, T) float32)."""
    if tags:
        labels = [[float(c in split_tags(label)) for c in classes] for _, label in items]
    else:
        index = {c: k for k, c in enumerate(classes)}
        labels = [index[c] for _, c in items]
    return load_split([p for p, _ in items], labels, name, size, channels, cache_dir, workers)


def check_split(split: Split, classes: list[str], where: str, max_bad_fraction: float) -> None:
    """Refuse splits that cannot train: a class with no readable image, or mostly unreadable files."""
    total = len(split.paths) + len(split.bad)
    if total and len(split.bad) / total > max_bad_fraction:
        raise UserError(f"{len(split.bad)} of {total} image files in {where} cannot be read "
                        f"(more than {max_bad_fraction:.0%}); run `python check_data.py DATA` for a report "
                        f"(first: {split.bad[0][0]}: {split.bad[0][1]})")
    tagged = split.labels.dim() == 2
    counts = split.labels.sum(0) if tagged else torch.bincount(split.labels, minlength=len(classes))
    empty = [c for c, n in zip(classes, counts.tolist()) if n == 0]
    if empty and tagged and not where.startswith("train"):  # a tag val lacks: its AP cannot be measured, no more
        return
    if empty:
        raise UserError(f"class(es) with no readable images in {where}: {', '.join(empty)}")


def load_data(lay: Layout, size: int, channels: int, cache_dir: str = "", workers: int = 0,
              max_bad_fraction: float = 0.5) -> tuple[Split, Split]:
    """(train, val) of a layout: the carve is applied to the file lists first (so a file that later becomes
    unreadable does not reshuffle val), then each split is decoded (cached) and checked."""
    splits = layout_splits(lay)
    if not splits["val"]:
        raise UserError(f"no val split in {lay.root}: give a val folder, a split column in --labels, or "
                        "--val-fraction above 0")
    out = []
    for name in ("train", "val"):
        split = load_items(splits[name], lay.classes, name, size, channels, cache_dir, workers, lay.multi_label)
        check_split(split, lay.classes, f"{name} ({lay.folders.get(name, lay.folders.get('train', lay.root))})",
                    max_bad_fraction)
        out.append(split)
    return out[0], out[1]


def batches(n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
            drop_last: bool = False):
    """Index tensors for each batch of range(n), shuffled with `generator` when asked."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if (drop_last and n >= batch_size) else n
    for i in range(0, stop, batch_size):
        yield order[i:i + batch_size]


# ---------------------------------------------------------------- batch augmentation (pure tensor functions)

def batch_flip_lr(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror a random half of a (N, C, H, W) batch left-right."""
    flip = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def batch_affine(x: torch.Tensor, degrees: torch.Tensor, shifts: torch.Tensor, scales: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Rotate each image of a float (N, C, H, W) batch by degrees[i] (counter-clockwise) about its centre, shift it
    by shifts[i] = (dx, dy) in fractions of its side and, given `scales`, zoom it by 1 / scales[i] (a scale under 1
    enlarges the centre, over 1 shrinks the image); borders are filled by reflection."""
    rad = degrees.to(x.device, torch.float32) * (math.pi / 180)
    cos, sin = torch.cos(rad), torch.sin(rad)
    if scales is not None:
        scales = scales.to(x.device, torch.float32)
        cos, sin = cos * scales, sin * scales
    shifts = shifts.to(x.device, torch.float32)
    # affine_grid maps output coordinates to input ones, in [-1, 1]: the inverse rotation and zoom, then the shift.
    theta = torch.stack([torch.stack([cos, -sin, -2 * shifts[:, 0]], 1),
                         torch.stack([sin, cos, -2 * shifts[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def random_affine(x: torch.Tensor, max_degrees: float, max_shift: float, max_scale: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """batch_affine with angles uniform in [-max_degrees, max_degrees], shifts in [-max_shift, max_shift] and
    scales in [1 - max_scale, 1 + max_scale]."""
    if max_degrees <= 0 and max_shift <= 0 and max_scale <= 0:
        return x
    n = x.shape[0]
    degrees = (torch.rand(n, generator=generator) * 2 - 1) * max_degrees
    shifts = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    scales = 1 + (torch.rand(n, generator=generator) * 2 - 1) * max_scale if max_scale > 0 else None
    return batch_affine(x, degrees, shifts, scales)


def augment(x: torch.Tensor, flip: bool, max_degrees: float, max_shift: float, max_scale: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Training augmentation of a normalized float batch: random mirror, rotation, shift and zoom."""
    if flip:
        x = batch_flip_lr(x, generator)
    return random_affine(x, max_degrees, max_shift, max_scale, generator)


def cutmix(x: torch.Tensor, share: float, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """CutMix (Yun et al., 2019) on a whole (N, C, H, W) batch, for a random `share` of the batches: one random box
    (its area uniform in [0, 1] x the image's, centred anywhere, clipped at the borders) is replaced in every image
    by the same box of another image of the batch (a random permutation). Returns the batch, the permutation
    (None: left as it was) and the share of each image still its own, the weight of its own label in the loss
    (the rest goes to the label of the image perm names)."""
    if share <= 0 or torch.rand(1, generator=generator).item() >= share:
        return x, None, 1.0
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    side = (1 - torch.rand(1, generator=generator).item()) ** 0.5  # the box's side, as a share of the image's
    cy, cx = (torch.rand(2, generator=generator) * torch.tensor([h, w])).long().tolist()
    bh, bw = round(h * side) // 2, round(w * side) // 2
    y0, y1, x0, x1 = max(0, cy - bh), min(h, cy + bh), max(0, cx - bw), min(w, cx + bw)
    perm = torch.randperm(n, generator=generator).to(x.device)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return out, perm, 1 - (y1 - y0) * (x1 - x0) / (h * w)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
             ) -> torch.Tensor:
    """n draws from U(low, high), one per image, shaped (n, 1, 1, 1) to scale a batch."""
    return (low + (high - low) * torch.rand(n, generator=generator)).to(device).view(n, 1, 1, 1)


def photometric(x: torch.Tensor, brightness: float, contrast: float, gamma: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image brightness (+-brightness added), contrast (scaled by 1 +- contrast about the image's mean) and
    gamma (an exponent in exp(+-gamma)) of a float (N, C, H, W) batch of pixels in [0, 1]; clipped to [0, 1]."""
    n, device = x.shape[0], x.device
    x = x + _uniform(n, -brightness, brightness, generator, device)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * _uniform(n, 1 - contrast, 1 + contrast, generator, device) + mean).clamp(0, 1)
    return x.pow(_uniform(n, -gamma, gamma, generator, device).exp())


def blur_and_noise(x: torch.Tensor, blur_share: float, noise: float, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """A 3x3 Gaussian blur of a random `blur_share` of the images of a float (N, C, H, W) batch, then Gaussian
    noise of a standard deviation uniform in [0, noise] per image."""
    n, c, device = x.shape[0], x.shape[1], x.device
    kernel = torch.tensor([1.0, 2.0, 1.0], device=device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(c, 1, 3, 3).to(x.dtype)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
    chosen = (torch.rand(n, generator=generator) < blur_share).to(device).view(n, 1, 1, 1)
    x = torch.where(chosen, blurred, x)
    sigma = _uniform(n, 0.0, noise, generator, device)
    return x + sigma * torch.randn(x.shape, generator=generator).to(device, x.dtype)


def cutout(x: torch.Tensor, side: float, fill: float | torch.Tensor, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Each image of a (N, C, H, W) batch with one square of `side` x its height, centred anywhere (clipped at
    the borders), set to `fill` (DeVries and Taylor, 2017)."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    size = max(1, round(side * h))
    cy, cx = (torch.rand(n, generator=generator) * h).long(), (torch.rand(n, generator=generator) * w).long()
    top, left = (cy - size // 2).view(n, 1, 1), (cx - size // 2).view(n, 1, 1)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return torch.where(box[:, None].to(x.device), torch.as_tensor(fill, dtype=x.dtype, device=x.device), x)


def strong_augment(x: torch.Tensor, mean: float | list[float], std: float | list[float], max_degrees: float = 30.0,
                   max_shift: float = 0.2, max_scale: float = 0.3, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """The strong view of a normalized float batch (what a semi-supervised step trains towards a pseudo-label,
    FixMatch-style): random mirror; brightness, contrast and gamma; blur and noise; a larger rotation, shift and
    zoom than training's; and a cutout of a quarter of the side, filled with the mean pixel. `mean` and `std` are
    the normalization the batch carries (to_float's), so the photometric changes act on pixels in [0, 1]."""
    shape = (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    pixels = batch_flip_lr(x, generator) * s + m
    pixels = blur_and_noise(photometric(pixels, 0.3, 0.4, 0.4, generator), 0.5, 0.05, generator)
    x = random_affine((pixels - m) / s, max_degrees, max_shift, max_scale, generator)
    return cutout(x, 0.25, 0.0, generator)


def rotate_quarters(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Each square image x[i] of a (N, C, S, S) batch turned by turns[i] quarter turns (0-3) counter-clockwise."""
    out = x.clone()
    for k in range(1, 4):
        rows = (turns == k).nonzero().flatten().to(x.device)
        if len(rows):
            out[rows] = torch.rot90(x[rows], k, (2, 3))
    return out


def random_crops(x: torch.Tensor, size: int, min_area: float, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """A random square crop of each image of a float (N, C, H, H) batch, of area uniform in [min_area, 1] x its
    area, at a random place, resized (bilinear) to size x size."""
    n = x.shape[0]
    side = (min_area + (1 - min_area) * torch.rand(n, generator=generator)).sqrt()
    centre = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - side)[:, None]
    grid = scale_shift_grid(side, centre, [n, x.shape[1], size, size], x.device)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def scale_shift_grid(scale: torch.Tensor, shift: torch.Tensor, shape: list[int], device: torch.device
                     ) -> torch.Tensor:
    """F.grid_sample's grid for an output of `shape` (N, C, H, W) whose point p (coordinates in [-1, 1]) reads the
    input at scale[i] * p + shift[i]: scale < 1 crops and enlarges, scale > 1 shrinks."""
    zero = torch.zeros_like(scale)
    theta = torch.stack([torch.stack([scale, zero, shift[:, 0]], 1), torch.stack([zero, scale, shift[:, 1]], 1)], 1)
    return F.affine_grid(theta.to(device, torch.float32), shape, align_corners=False)


# ---------------------------------------------------------------- a training run's data

def layout_record(lay: Layout) -> dict:
    """What a checkpoint records of the data it was trained on: the layout's description, where the labels came
    from, the split folders, the carve, and a digest of the val files (a resumed run compares it with its own)."""
    val_paths = sorted(p for p, _ in layout_splits(lay)["val"])
    return {"description": lay.description, "source": lay.source, "folders": dict(lay.folders),
            "carve": dict(lay.carve), "val_files_sha1": hashlib.sha1("\n".join(val_paths).encode()).hexdigest()}


@dataclass(frozen=True)
class Placement:
    """Where training reads its images from: 'device' (the whole set copied there) or 'map' (batches read from
    the cache's memory map); the pixels' bytes; the free GPU memory that decided it ('auto' on CUDA)."""
    where: str
    device: str
    n_bytes: int
    gpu_free_bytes: int | None = None


@dataclass(frozen=True)
class DataSummary:
    """What loading a run's data found, for train.py to report: the seconds it took, the start-up near-copy
    search among train and val, and where the training images are read from."""
    seconds: float
    near: StartUpCheck
    placement: Placement


def load_training_data(cfg: TrainConfig, lay: Layout, device: torch.device, expected_classes: list[str] | None
                       ) -> tuple[Split, Split, DataSummary]:
    """Train and val splits, decoded once (cached) and checked, the near-copy search among them (at most
    near_duplicates.START_UP_SECONDS), and the training images placed (place_images). The unreadable files are
    in each split's `bad`."""
    t0 = time.time()
    if expected_classes is not None and expected_classes != lay.classes:
        raise UserError(f"the checkpoint's classes {expected_classes} differ from the data's {lay.classes}")
    train, val = load_data(lay, cfg.image_size, cfg.channels, cfg.cache_dir, cfg.workers, cfg.max_bad_fraction)
    seconds = time.time() - t0
    near = start_up_check(train.near_descriptors(), val.near_descriptors())
    train.images, placement = place_images(train.images, device, cfg.data_placement)
    train.labels = train.labels.to(device)
    return train, val, DataSummary(seconds, near, placement)


def trained_items(saved: dict, classes: list[str], data: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """Every split's (path, class) items of the data a training run read, read again as it read them: its saved
    config (a checkpoint's) for the layout, labels, carve and classes; `data` instead of the run's data folder
    if given. Only the checkpoint's `classes` are kept."""
    data = data or saved.get("data")
    if not data:
        raise UserError("the checkpoint does not say which data it trained on: give it with --data DIR")
    cfg = dataclasses.replace(TrainConfig.from_dict(saved), data=data)
    lay = read_layout(cfg.data, **cfg.layout_settings(need="val"))
    splits = layout_splits(lay)
    if lay.multi_label:  # tags the run did not learn are dropped from each image
        keep = set(classes)
        return {name: [(p, narrow) for p, c in items if (narrow := narrow_tags(c, keep))]
                for name, items in splits.items()}
    return {name: [(path, c) for path, c in items if c in classes] for name, items in splits.items()}


def load_folder(folder: str, flag: str, size: int, channels: int, cache_dir: str = "", workers: int = 0) -> Split:
    """Every image file under `folder` (any layout; its labels, if any, ignored: -1 each), decoded through the
    cache as train is: the folder a flag such as --unlabeled or --other names, which its errors name."""
    if not Path(folder).is_dir():
        raise UserError(f"{flag} {folder}: no such folder")
    paths = [str(p) for p in expand_inputs([folder])]
    split = load_split(paths, [-1] * len(paths), flag.lstrip("-"), size, channels, cache_dir, workers)
    if not len(split.labels):
        raise UserError(f"{flag} {folder}: none of its {len(paths)} image files could be read")
    return split


# ---------------------------------------------------------------- where training reads its images

def place_images(images: torch.Tensor | RowView, device: torch.device, placement: str
                 ) -> tuple[torch.Tensor | RowView, Placement]:
    """Where training reads its images from. 'device' copies the whole set there once (on a GPU no batch crosses
    the PCIe bus again; on CPU it is a copy in RAM); 'map' leaves it in the cache's memory map and each batch
    reads its rows (the OS page cache keeps the hot pages). 'auto' is 'device' on CUDA when the pixels take at
    most half of the free GPU memory, 'device' on MPS, and 'map' on CPU, where a RAM copy would only duplicate
    the page cache."""
    n_bytes = math.prod(images.shape) * images.dtype.itemsize
    free = None
    if placement == "auto":
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            placement = "device" if n_bytes <= free // 2 else "map"
        else:
            placement = "device" if device.type == "mps" else "map"
    if placement == "map":
        return images, Placement("map", device.type, n_bytes, free)
    whole = torch.empty(images.shape, dtype=images.dtype, device=device)
    for i in range(0, len(whole), 4096):  # in blocks: the host never holds a second full copy on the way
        whole[i:i + 4096] = images[i:i + 4096].to(device)
    return whole, Placement("device", str(device), n_bytes, free)


def fetch_batch(images: torch.Tensor | RowView, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One batch of uint8 images on `device`: indexed where they are when the whole set is there, else read from
    the memory map (in pinned memory on CUDA, so the copy to the GPU is asynchronous)."""
    if images.device.type == device.type:
        return images[idx.to(images.device)]
    batch = images[idx]
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="write a small synthetic dataset")
    p_demo.add_argument("dir")
    p_demo.add_argument("--per-class", type=int, default=150)
    p_demo.add_argument("--seed", type=int, default=0)
    p_unknown = sub.add_parser("unknown", help="write synthetic far-away images (a flat folder of PNGs)")
    p_unknown.add_argument("dir")
    p_unknown.add_argument("--count", type=int, default=600)
    p_unknown.add_argument("--size", type=int, default=128)
    p_unknown.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        make_synthetic(args.dir, args.per_class, seed=args.seed)
        print(f"wrote a synthetic dataset to {args.dir} (train/val/test, classes cat and dog)")
    else:
        if args.count < 1 or args.size < 8:
            raise UserError("--count must be at least 1 and --size at least 8")
        root = write_unknown_set(args.dir, args.count, args.size, args.seed)
        print(f"wrote {args.count} images to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
