"""Near-duplicates: the same photo resized, re-encoded, cropped a little, mirrored or made brighter or darker,
found from the small grayscale thumbnails check_data.py already decodes. The search hashes and sorts (N log N)
instead of comparing every pair (N^2): 2.5 s for 12k photos, 40 s for 100k images on 2 cores (BENCHMARKS.md).

Each image is described by its 8x8 mean-pooled thumbnail, centred and scaled to unit length (brightness and
contrast drop out; resizing and JPEG barely move it). A crop shifts and scales the content, so each image also
gets the descriptors of 18 crops of itself (about 94% and 88% of each side, on a 3x3 grid of places): a copy
cut from it matches one of them closely. Each image's descriptor and its mirror image's are compared with those.
Candidate pairs come from random-hyperplane hashing (descriptors that share every bit of one of several hash
keys), and are kept when the best cosine clears the threshold.

Usage (from audit.py):
    pairs = near_duplicate_pairs(thumbnails)          # uint8 (N, 1, 32, 32) -> [(i, j, similarity)], i < j
    groups = connected_groups(pairs, len(thumbnails))  # [[i, j, ...]], each a set of near-copies
"""
from __future__ import annotations

import io
import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

SIDE = 32           # the thumbnails' side (audit.py decodes at this size anyway)
GRID = 8            # the descriptor is a GRID x GRID thumbnail
CROP_SIDES = (30, 28)  # of SIDE = 32: crops of 6% and 12.5%, and the places between, are matched within a pixel
THRESHOLD = 0.96    # cosine of a near-copy: measured on real photos (bench.py near-copies, BENCHMARKS.md)
TABLES, BITS = 24, 28  # hash tables and bits per key: a near-copy shares a key in one of them (measured)
LOOKALIKE_GROUP = 10  # a chain of more images than this is pictures that look alike at 8x8 (one shape on a
                      # plain ground, a generated set), not copies: counted apart, not named
BUCKET_CAP = 16     # entries of one bucket a query is paired with (candidate_pairs)


def descriptor(x: torch.Tensor) -> torch.Tensor:
    """(N, GRID*GRID) unit vectors: the mean-pooled GRID x GRID thumbnail of float images (N, 1, H, W), minus its
    mean. A flat image (no contrast) is the zero vector and matches nothing."""
    t = F.adaptive_avg_pool2d(x, GRID).flatten(1)
    t = t - t.mean(1, keepdim=True)
    norm = t.norm(dim=1, keepdim=True)
    return torch.where(norm > 1e-3, t / norm.clamp(min=1e-3), torch.zeros_like(t))


def crops(x: torch.Tensor) -> list[torch.Tensor]:
    """The image and its crops of CROP_SIDES pixels on a 3x3 grid of places (whole pixels: the descriptor pools
    them to GRID x GRID whatever their side)."""
    side = x.shape[-1]
    out = [x]
    for c in CROP_SIDES:
        places = sorted({round(o) for o in np.linspace(0, side - c, 3)})
        out += [x[..., oy:oy + c, ox:ox + c] for oy in places for ox in places]
    return out


def variant_descriptors(images: torch.Tensor) -> torch.Tensor:
    """(N, V, D): the descriptors of each image and of its crops, the whole image first."""
    return torch.stack([descriptor(v) for v in crops(images.float())], 1)


def hash_keys(desc: torch.Tensor, planes: torch.Tensor, chunk: int = 1 << 12) -> np.ndarray:
    """(N, TABLES) int64 keys: for each table, which side of each of its BITS random hyperplanes a descriptor is
    (a chunk of descriptors at a time: the bits of all of them at once would not fit in memory at scale)."""
    powers = 2.0 ** torch.arange(BITS, dtype=torch.float64)
    keys = [((d @ planes > 0).view(len(d), TABLES, BITS).to(torch.float64) @ powers).to(torch.int64)
            for d in desc.split(chunk)]
    return torch.cat(keys).numpy() if keys else np.zeros((0, TABLES), dtype=np.int64)


def candidate_pairs(query_keys: np.ndarray, index_keys: np.ndarray, owner: np.ndarray, n: int
                    ) -> Iterator[np.ndarray]:
    """For each hash table, the (M, 2) unique (query, owner of an index entry) pairs whose keys are equal there, the
    query's image (query % n) and the owner different. A sort and a binary search per table: N log N. A query
    pairs with at most BUCKET_CAP entries of its bucket (the first, in index order): images that all look alike
    (plain backgrounds, generated sets) would otherwise pair with each other, N^2; a group of copies is still
    joined, each to the first of them."""
    for t in range(query_keys.shape[1]):
        order = np.argsort(index_keys[:, t], kind="stable")
        sorted_keys = index_keys[order, t]
        lo = np.searchsorted(sorted_keys, query_keys[:, t], "left")
        counts = np.minimum(np.searchsorted(sorted_keys, query_keys[:, t], "right") - lo, BUCKET_CAP)
        if not counts.sum():
            continue
        q = np.repeat(np.arange(len(query_keys)), counts)
        starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
        pairs = np.unique(np.stack([q, owner[order[starts + np.arange(counts.sum())]]], 1), axis=0)
        yield pairs[pairs[:, 0] % n != pairs[:, 1]]


def near_duplicate_pairs(images: torch.Tensor, threshold: float = THRESHOLD, seed: int = 0,
                         chunk: int = 1 << 12) -> list[tuple[int, int, float]]:
    """Pairs (i, j, cosine) of near-copies among uint8 images (N, 1, SIDE, SIDE), i < j, most similar first.
    Each image's whole descriptor and its mirror image's are the queries; every image's variants are the index."""
    n = len(images)
    if n < 2:
        return []
    variants = torch.cat([variant_descriptors(images[i:i + chunk]) for i in range(0, n, chunk)])  # (N, V, D)
    v = variants.shape[1]
    mirrored = torch.cat([descriptor(images[i:i + chunk].float().flip(-1)) for i in range(0, n, chunk)])
    queries = torch.cat([variants[:, 0], mirrored])  # query q is image q % n
    planes = torch.randn(variants.shape[-1], TABLES * BITS, generator=torch.Generator().manual_seed(seed))
    index = variants.reshape(n * v, -1)
    usable = (index.norm(dim=1) > 0).numpy()
    owner = np.repeat(np.arange(n), v)[usable]
    best: dict[tuple[int, int], float] = {}
    for pairs in candidate_pairs(hash_keys(queries, planes), hash_keys(index[torch.from_numpy(usable)], planes),
                                 owner, n):
        for start in range(0, len(pairs), chunk):
            p = torch.from_numpy(pairs[start:start + chunk])
            sims = (variants[p[:, 1]] @ queries[p[:, 0], :, None]).squeeze(-1).max(1).values
            hit = sims >= threshold
            for (q, j), sim in zip(p[hit].tolist(), sims[hit].tolist()):
                key = (min(q % n, j), max(q % n, j))
                best[key] = max(best.get(key, -1.0), sim)
    return sorted(((i, j, round(sim, 4)) for (i, j), sim in best.items()), key=lambda p: (-p[2], p[0], p[1]))


def connected_groups(pairs: list[tuple[int, int, float]], n: int) -> list[list[int]]:
    """The groups of images joined by pairs (union-find), each sorted, largest first."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j, _ in pairs:
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in sorted({i for p in pairs for i in p[:2]}):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def thumbnails(images, max_values: int = 1 << 22) -> torch.Tensor:
    """uint8 (N, 1, SIDE, SIDE) grayscale thumbnails of uint8 images (N, C, S, S) (a tensor or a dataset.RowView),
    as near_duplicate_pairs takes them; read a few at a time (max_values pixel values, 16 MiB as floats), so that
    the check adds little to a training run's memory."""
    chunk = max(1, max_values // max(1, math.prod(images.shape[1:])))
    out = [F.interpolate(images[i:i + chunk].float().mean(1, keepdim=True), size=SIDE, mode="area").round()
           .to(torch.uint8) for i in range(0, len(images), chunk)]
    return torch.cat(out) if out else torch.zeros(0, 1, SIDE, SIDE, dtype=torch.uint8)


def copy_groups(groups: list[list[int]]) -> tuple[list[list[int]], int]:
    """(the groups of at most LOOKALIKE_GROUP images, how many images the larger ones hold): a real photo has a
    few copies, while pictures that only look alike at this resolution chain into one large group."""
    small = [g for g in groups if len(g) <= LOOKALIKE_GROUP]
    return small, sum(len(g) for g in groups if len(g) > LOOKALIKE_GROUP)


def cross_and_within(groups: list[list[int]], first_of_second: int) -> tuple[int, int]:
    """How many groups span both parts of a list of images split at `first_of_second` (train, then val), and how
    many lie within one."""
    cross = sum(1 for g in groups if g[0] < first_of_second <= g[-1])
    return cross, len(groups) - cross


def altered_copy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A near-copy as they occur in downloaded sets, to measure and test with: cropped by up to 10% of each side
    (anywhere), resized 0.5-1.5x, mirrored half the time, brightness +-20%, saved as JPEG at quality 40-95."""
    img = img.convert("RGB")
    w, h = img.size
    cut = rng.uniform(0, 0.1)
    cw, ch = max(8, int(w * (1 - cut))), max(8, int(h * (1 - cut)))
    ox, oy = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    scale = rng.uniform(0.5, 1.5)
    img = img.crop((ox, oy, ox + cw, oy + ch)).resize((max(8, int(cw * scale)), max(8, int(ch * scale))),
                                                      Image.BILINEAR)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(40, 96)))
    return Image.open(io.BytesIO(buf.getvalue()))
