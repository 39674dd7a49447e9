"""What training adds so that the model can tell its classes from everything else: images of the batch turned by
quarter turns for the rotation head (--rotation-weight; in place, or as copies with --rotation-copies), and images
of no class (--other) pushed towards a prediction with little evidence for any class (energy-margin outlier
exposure, metrics.energy_margin_loss).

Usage (from train.py):
    other = load_other_images("photos_of_other_things/", side=128, channels=1, cache_dir="", workers=2,
                              synthetic=500, seed=0, device=device).images   # uint8, held in memory
    x, turns = turn_in_place(x, 0.25, generator)                      # x: the augmented batch
    turned, turns = rotation_copies(x, 0.25, generator)               # or copies of its first quarter
    others = other_crops(other, n=64, size=64, normalization=norm, generator=generator, zoom_out=0.5)
    loss = loss + 0.1 * energy_margin_loss(logits_of_batch, logits_of_others)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dataset import batch_flip_lr, load_folder, random_crops, rotate_quarters, scale_shift_grid, to_float
from loading.decode import preprocess
from loading.synthetic import make_unknown_images


@dataclass(frozen=True)
class OtherImages:
    """The --other images on the training device (uint8), and how many came from files, could not be read, and
    were generated."""
    images: torch.Tensor
    read: int
    unreadable: int
    generated: int


def load_other_images(folder: str, side: int, channels: int, cache_dir: str, workers: int, synthetic: int,
                      seed: int, device: torch.device) -> OtherImages:
    """Every image file under `folder` (any layout) and `synthetic` generated far-away ones
    (loading/synthetic.py), uint8 at `side` pixels (twice the training side: each step takes random crops of
    them), on the device. They are few (a class's worth), so they are held in memory."""
    other = load_folder(folder, "--other", side, channels, cache_dir, workers)
    drawn = [torch.from_numpy(preprocess(img, side, channels))
             for _, img in make_unknown_images(synthetic, side, seed=seed)]
    images = torch.cat([other.images[torch.arange(len(other.labels))], *([torch.stack(drawn)] if drawn else [])])
    return OtherImages(images.to(device), len(other.labels), len(other.bad), len(drawn))


def rotation_copies(x: torch.Tensor, share: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `share` of the batch x, each given a random quarter turn, and the turns (0-3) on x's device:
    what the rotation head learns to name."""
    n = max(1, round(len(x) * share))
    turns = torch.randint(0, 4, (n,), generator=generator)
    return rotate_quarters(x[:n], turns), turns.to(x.device)


def turn_in_place(x: torch.Tensor, share: float, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x with its first `share` of rows given a random quarter turn each (at least one row left as it was), and
    the turns (0-3) on x's device: the rotation head learns to name them, the class loss skips those rows, and
    the batch costs what it cost without the head."""
    n = min(max(1, round(len(x) * share)), len(x) - 1)
    turned, turns = rotation_copies(x[:n], 1.0, generator)
    return torch.cat([turned, x[n:]]), turns


def other_crops(other: torch.Tensor, n: int, size: int, normalization: dict, generator: torch.Generator,
                zoom_out: float = 0.0) -> torch.Tensor:
    """n random --other images, normalized, each a random crop of 10-100% of its area resized to `size`, the first
    `zoom_out` share of them then shrunk onto a plain ground (zoomed_out), mirrored or not and given a random
    quarter turn: images of no class can look any way, close up or from afar."""
    idx = torch.randint(0, len(other), (n,), generator=generator)
    crops = random_crops(to_float(other[idx.to(other.device)], normalization["mean"], normalization["std"]),
                         size, 0.1, generator)
    k = round(n * zoom_out)
    if k:
        crops = torch.cat([zoomed_out(crops[:k], normalization, generator), crops[k:]])
    return rotate_quarters(batch_flip_lr(crops, generator), torch.randint(0, 4, (n,), generator=generator))


def zoomed_out(x: torch.Tensor, normalization: dict, generator: torch.Generator, smallest: float = 0.3,
               largest: float = 0.8) -> torch.Tensor:
    """Each image of a normalized float (N, C, S, S) batch cut to a random blob (blob_masks) and shrunk to a side
    of `smallest`-`largest` of S, at a random place on a plain ground of a random level per channel: some thing
    on a table, a wall or the sky, where the crops of other_crops are close-ups."""
    n, c = x.shape[:2]
    side = smallest + (largest - smallest) * torch.rand(n, generator=generator)
    centre = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - side)[:, None]
    # output point p reads the input at (p - centre) / side: the image spans centre +- side of the output
    grid = scale_shift_grid(1 / side, -centre / side[:, None], list(x.shape), x.device).to(x.dtype)
    shrunk = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(blob_masks(n, x.shape[-1], generator).to(x.device, x.dtype), grid, mode="bilinear",
                           padding_mode="zeros", align_corners=False)
    ground = to_float(torch.randint(0, 256, (n, c, 1, 1), generator=generator, dtype=torch.uint8).to(x.device),
                      normalization["mean"], normalization["std"])
    return inside * shrunk + (1 - inside) * ground


def blob_masks(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n soft masks (n, 1, size, size) in [0, 1] of irregular round shapes: a disc whose radius (0.5-1 of the half
    side) wanders with a smooth random field, with an edge two pixels wide. Cut-outs with a straight square edge
    would teach the model that a frame marks an image of no class."""
    axis = torch.linspace(-1, 1, size)
    radius = (axis[None, :] ** 2 + axis[:, None] ** 2).sqrt()
    field = F.interpolate(torch.rand(n, 1, 4, 4, generator=generator), size=(size, size), mode="bicubic",
                          align_corners=True)
    edge = 0.5 + 0.5 * field.clamp(0, 1)
    return ((edge - radius) * size / 4 + 0.5).clamp(0, 1)
