"""Near-duplicates: the same photo resized, re-encoded, cropped a little, mirrored or made brighter or darker,
found from small grayscale thumbnails. The search hashes and sorts (N log N) instead of comparing every pair
(N^2), and its memory and work are bounded by construction, whatever the images look like.

Each image is described by its 8x8 mean-pooled thumbnail, centred and scaled to unit length (brightness and
contrast drop out; resizing and JPEG barely move it). A crop shifts and scales the content, so each image also
gets the descriptors of 18 crops of itself (about 94% and 88% of each side, on a 3x3 grid of places): a copy
cut from it matches one of them closely. Each image's descriptor and its mirror image's (the 8x8 grid flipped)
are compared with those. Candidate pairs come from random-hyperplane hashing (descriptors that share every bit
of one of several hash keys), and are kept when the best cosine clears the threshold.

Bounds, for N images:
- input: the descriptors, float16 (N, VARIANTS, GRID*GRID), 2,432 bytes per image; dataset.py keeps them in a
  memory-mapped file beside the decoded-image cache (file pages, computed once per cached image);
- working memory, at most WORK_BYTES_PER_IMAGE: the whole images' descriptors (128 bytes per image), the keys
  of TABLE_GROUP tables (168), one table's buckets (304 at the peak), the queries' order (16), the pairs found
  (12 bytes each: at most 5 N kept, and 5 N more before they are merged, only when most images have
  near-copies), and blocks of candidates of a fixed size (QUERY_BLOCK queries, PAIR_BLOCK pairs);
- work: a query pairs with no entry of a bucket holding more than BUCKET_CAP images (pictures that all look
  alike in 8x8 thumbnails: plain grounds, scans, generated sets); when most queries meet such buckets
  (CROWDED_SHARE) the search stops, and it examines at most PAIRS_PER_IMAGE x N candidate pairs in all, then
  stops too, saying why (Search.end); an image with more than LOOKALIKE_GROUP near-copies or whose queries
  meet crowded buckets in CROWDED_QUERIES tables, and everything joined to it, is a look-alike, not judged.

Usage (from quality/audit.py and dataset.py):
    found = find_near_copies(descriptors(thumbnails))   # uint8 (N, 1, 32, 32) -> Search (or DescriptorBlocks)
    groups, lookalike = found.groups()                   # [[i, j, ...]] sets of near-copies, images not judged
    pairs = near_duplicate_pairs(thumbnails)             # [(i, j, similarity)], i < j, most similar first
    check = start_up_check(train_descriptors, val_descriptors)  # train.py's start-up search, at most 10 s
"""
from __future__ import annotations

import enum
import io
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from tqdm import tqdm

SIDE = 32           # the thumbnails' side (quality/audit.py decodes at this size anyway)
GRID = 8            # the descriptor is a GRID x GRID thumbnail
CROP_SIDES = (30, 28)  # of SIDE = 32: crops of 6% and 12.5%, and the places between, are matched within a pixel
VARIANTS = 1 + 9 * len(CROP_SIDES)  # descriptors per image: the whole image, then its crops
# The cosine of a near-copy: measured on real photos (benchmarks/bench.py near-copies, docs/experiments/data-checks.md).
THRESHOLD = 0.96
TABLES, BITS = 24, 28  # hash tables and bits per key: a near-copy shares a key in one of them (measured)
TABLE_GROUP = 2     # tables keyed in one pass over the descriptors: 4 bytes a key, VARIANTS + 2 keys per image
LOOKALIKE_GROUP = 10  # a chain of more images than this is pictures that look alike at 8x8 (one shape on a
                      # plain ground, a generated set), not copies: counted apart, not named
BUCKET_CAP = 16     # a bucket of more images than this, in one table, pairs with no query: they look alike
CROWDED_QUERIES = TABLES  # an image whose queries (2 per table) meet a crowded bucket this often is a look-alike
CROWDED_SHARE = 0.5  # when more of all the queries so far than this met crowded buckets, the search stops
PAIRS_PER_IMAGE = 128  # candidate pairs the whole search examines, per image, before it stops
QUERY_BLOCK = 1 << 14  # queries paired at a time (at most BUCKET_CAP pairs each)
PAIR_BLOCK = 1 << 12   # candidate pairs verified at a time
WORK_BYTES_PER_IMAGE = 1000  # the bound on the search's own memory per image, blocks of a fixed size aside
START_UP_SECONDS = 10.0  # train.py's start-up check stops after this; check_data.py gives the full report
OWNER_BITS = 35     # a bucket entry is (key << OWNER_BITS) | image, one sortable uint64 (BITS + 1 + 35 = 64)


class End(enum.Enum):
    """How a search ended."""
    DONE = "done"
    CROWDED = "crowded"    # most queries met crowded buckets: the images look too alike to search
    PAIR_CAP = "pair cap"  # PAIRS_PER_IMAGE x N pairs examined: too many images look alike to search
    TIME_CAP = "time cap"  # the caller's deadline passed


@dataclass
class Search:
    """What find_near_copies found among n images: pairs (P, 2) of images i < j with their cosine `sims`, the
    look-alikes, not judged (`lookalike`: images whose queries met crowded buckets in CROWDED_QUERIES tables or
    with more than LOOKALIKE_GROUP near-copies, and the images joined to those), the candidate pairs examined,
    and how the search ended. When it did not finish, no image is judged."""
    n: int
    pairs: np.ndarray
    sims: np.ndarray
    lookalike: np.ndarray
    examined: int
    end: End

    def pair_list(self) -> list[tuple[int, int, float]]:
        """[(i, j, cosine rounded to 4 places)], most similar first."""
        order = np.lexsort((self.pairs[:, 1], self.pairs[:, 0], -self.sims.round(4)))
        return [(int(i), int(j), round(float(s), 4)) for (i, j), s in zip(self.pairs[order], self.sims[order])]

    def groups(self) -> tuple[list[list[int]], int]:
        """(the groups of near-copies of at most LOOKALIKE_GROUP images, each sorted, largest first; how many
        images are not judged: look-alikes, those in larger groups, every image when the search did not finish)."""
        if self.end is not End.DONE:
            return [], self.n
        small, big = copy_groups(connected_groups(self.pairs, self.n))
        return small, big + int(self.lookalike.sum())


class Joined:
    """Two sources of rows (tensors or dataset.RowViews: train's descriptors and val's) read as one, rows of the
    first then of the second, copying nothing until indexed: joined[a:b] and joined[index tensor] are tensors."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, key: slice | torch.Tensor) -> torch.Tensor:
        cut = len(self.first)
        if isinstance(key, slice):
            start, stop, _ = key.indices(len(self))
            return torch.cat([self.first[start:min(stop, cut)], self.second[max(0, start - cut):max(0, stop - cut)]])
        key = torch.as_tensor(key)
        low = key < cut
        head = self.first[key[low]]
        out = torch.empty((len(key), *head.shape[1:]), dtype=head.dtype)
        out[low] = head
        out[~low] = self.second[key[~low] - cut]
        return out


def descriptor(x: torch.Tensor) -> torch.Tensor:
    """(N, GRID*GRID) unit vectors: the mean-pooled GRID x GRID thumbnail of float images (N, 1, H, W), minus its
    mean. A flat image (no contrast) is the zero vector and matches nothing."""
    t = F.adaptive_avg_pool2d(x, GRID).flatten(1)
    t = t - t.mean(1, keepdim=True)
    norm = t.norm(dim=1, keepdim=True)
    return torch.where(norm > 1e-3, t / norm.clamp(min=1e-3), torch.zeros_like(t))


def mirrored(d: torch.Tensor) -> torch.Tensor:
    """The descriptors (M, GRID*GRID) of the mirror images: each grid flipped left to right."""
    return d.reshape(-1, GRID, GRID).flip(-1).reshape(-1, GRID * GRID)


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
    """(N, VARIANTS, D): the descriptors of each image and of its crops, the whole image first."""
    return torch.stack([descriptor(v) for v in crops(images.float())], 1)


def descriptors(images, chunk: int = 1 << 12) -> torch.Tensor:
    """float16 (N, VARIANTS, GRID*GRID): the variant descriptors of uint8 images (N, C, S, S) of any side (a
    tensor or a dataset.RowView), through their SIDE thumbnails, a block of images at a time."""
    out = [variant_descriptors(thumbnails(images[i:i + chunk])).half() for i in range(0, len(images), chunk)]
    return torch.cat(out) if out else torch.zeros(0, VARIANTS, GRID * GRID, dtype=torch.float16)


class DescriptorBlocks:
    """The descriptors of images given one at a time (uint8 (C, S, S) arrays, as they are decoded), computed a
    block at a time: what is held is 2,432 bytes an image and one block of pixels."""

    def __init__(self, block: int = 4096):
        self.block, self.pending, self.done = block, [], []

    def add(self, image: np.ndarray) -> None:
        self.pending.append(image)
        if len(self.pending) == self.block:
            self.done.append(descriptors(torch.from_numpy(np.stack(self.pending))))
            self.pending = []

    def tensor(self) -> torch.Tensor:
        """(N, VARIANTS, GRID*GRID) float16, in the order the images were given."""
        rest = [descriptors(torch.from_numpy(np.stack(self.pending)))] if self.pending else []
        return torch.cat(self.done + rest) if self.done or rest else descriptors(torch.zeros(0, 1, SIDE, SIDE))


def hash_keys(desc: torch.Tensor, planes: torch.Tensor) -> np.ndarray:
    """(M, tables) int32 keys of float descriptors (M, D): for each table (BITS columns of planes), which side of
    each of its hyperplanes the descriptor is (bit k of the key: the k-th plane); -1 for a zero descriptor (a
    flat image), which matches nothing: its projections, the first one included, are exactly 0."""
    proj = desc @ planes
    bits = (proj > 0).numpy().reshape(len(desc), -1, BITS)
    keys = np.packbits(bits, axis=-1, bitorder="little").view("<u4")[..., 0].astype(np.int32)
    keys[proj[:, 0].numpy() == 0] = -1
    return keys


MIRROR = torch.arange(GRID * GRID).view(GRID, GRID).flip(-1).flatten()  # descriptor index of the mirror image


def _table_keys(desc, planes: torch.Tensor, wholes: torch.Tensor | None = None, chunk: int = 1 << 12
                ) -> tuple[np.ndarray, np.ndarray]:
    """(index keys (N * VARIANTS, tables), query keys (2N, tables)) of the tables of `planes`: every variant is
    an index entry; each image's whole descriptor (query i) and its mirror's (query N + i: the same descriptor
    against the planes mirrored) are the queries. Given `wholes` (N, D), the whole descriptors are copied there
    in the same pass."""
    n, tables = len(desc), planes.shape[1] // BITS
    index = np.empty((n * VARIANTS, tables), np.int32)
    query = np.empty((2 * n, tables), np.int32)
    for i in range(0, n, chunk):
        d = desc[i:i + chunk].float()
        index[i * VARIANTS:(i + len(d)) * VARIANTS] = hash_keys(d.reshape(-1, d.shape[-1]), planes)
        query[i:i + len(d)] = index[i * VARIANTS:(i + len(d)) * VARIANTS:VARIANTS]  # variant 0: the whole image
        query[n + i:n + i + len(d)] = hash_keys(d[:, 0], planes[MIRROR])
        if wholes is not None:
            wholes[i:i + len(d)] = d[:, 0]
    return index, query


def _buckets(keys: np.ndarray, block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(bucket keys, images) of one table: its index entries' distinct (key, image), sorted by key then image;
    entries of flat images (key -1) are left out. Built in place a block at a time: one array of 8 bytes an
    entry, then two of 4."""
    packed = np.empty(len(keys), np.uint64)
    for s in range(0, len(keys), block):  # (key << OWNER_BITS) | image; a flat image's key sorts past all others
        key = np.where(keys[s:s + block] < 0, 1 << BITS, keys[s:s + block]).astype(np.uint64)
        packed[s:s + block] = (key << np.uint64(OWNER_BITS)) | (np.arange(s, s + len(key), dtype=np.uint64)
                                                                 // np.uint64(VARIANTS))
    packed.sort()
    kept, last, real = 0, None, np.searchsorted(packed, np.uint64(1 << (BITS + OWNER_BITS)))
    for s in range(0, real, block):
        part = packed[s:min(real, s + block)]
        new = part[np.concatenate([[last is None or part[0] != last], part[1:] != part[:-1]])]
        last = part[-1]
        packed[kept:kept + len(new)] = new  # the distinct entries, moved forward over those already read
        kept += len(new)
    images, bucket_keys = np.empty(kept, np.int32), np.empty(kept, np.int32)
    for s in range(0, kept, block):
        part = packed[s:min(kept, s + block)]
        images[s:s + block] = part & np.uint64((1 << OWNER_BITS) - 1)
        bucket_keys[s:s + block] = part >> np.uint64(OWNER_BITS)
    return bucket_keys, images


def _candidates(queries: np.ndarray, qkeys: np.ndarray, bucket_keys: np.ndarray, images: np.ndarray, n: int,
                skip: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries, images) paired in one table: each query (numbered, with its key) with every other image of its
    bucket, unless the bucket holds more than BUCKET_CAP images (those queries are returned third: crowded) or
    the query's image is to be skipped. Keys in order make the binary searches walk the buckets in order."""
    lo = np.searchsorted(bucket_keys, qkeys, "left")
    count = np.searchsorted(bucket_keys, qkeys, "right") - lo
    crowded = count > BUCKET_CAP
    count[crowded | (qkeys < 0) | skip[queries % n]] = 0
    q = np.repeat(queries, count)
    j = images[np.repeat(lo - np.cumsum(count) + count, count) + np.arange(count.sum())]
    other = j != q % n
    return q[other], j[other], queries[crowded]


def _similarities(desc, wholes: torch.Tensor, q: np.ndarray, j: np.ndarray, n: int) -> torch.Tensor:
    """The best cosine between query q (the whole descriptor of image q % n in `wholes`, mirrored when q >= n)
    and any variant of image j."""
    whole = wholes[torch.from_numpy(q % n)].float()
    whole = torch.where(torch.from_numpy(q >= n)[:, None], mirrored(whole), whole)
    return (desc[torch.from_numpy(j.astype(np.int64))].float() @ whole[:, :, None]).squeeze(-1).max(1).values


class _Found:
    """The near-copy pairs found so far, one entry per pair with its best cosine. Whenever the pending pairs
    reach 5 N they are merged, and images with more than LOOKALIKE_GROUP near-copies are marked look-alikes with
    every image joined to them, their pairs dropped: the store keeps at most 5 N pairs and 5 N pending."""

    def __init__(self, n: int):
        self.n, self.lookalike = n, np.zeros(n, bool)
        self.i, self.j, self.s = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)], [np.zeros(0, np.float32)]
        self.pending = 0

    def add(self, q: np.ndarray, j: np.ndarray, sims: np.ndarray) -> None:
        a = q % self.n
        self.i.append(np.minimum(a, j).astype(np.int32))
        self.j.append(np.maximum(a, j).astype(np.int32))
        self.s.append(sims.astype(np.float32))
        self.pending += len(sims)
        if self.pending >= 5 * self.n:
            self.merge()

    def merge(self) -> None:
        i, j, s = (np.concatenate(x) for x in (self.i, self.j, self.s))
        order = np.lexsort((-s, j, i))
        i, j, s = i[order], j[order], s[order]
        first = np.ones(len(i), bool)
        first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
        i, j, s = i[first], j[first], s[first]
        flag = self.lookalike | (np.bincount(i, minlength=self.n) + np.bincount(j, minlength=self.n)
                                 > LOOKALIKE_GROUP)
        while len(i):
            touch = flag[i] | flag[j]
            if not touch.any():
                break
            flag[i[touch]] = flag[j[touch]] = True
            i, j, s = i[~touch], j[~touch], s[~touch]
        self.lookalike, self.i, self.j, self.s, self.pending = flag, [i], [j], [s], 0

    def search(self, examined: int, end: End) -> Search:
        self.merge()
        return Search(self.n, np.stack([self.i[0], self.j[0]], 1).astype(np.int64), self.s[0], self.lookalike,
                      examined, end)


def _tables(desc, planes: torch.Tensor, wholes: torch.Tensor):
    """(index keys, query keys) of each hash table in turn (_table_keys), TABLE_GROUP tables keyed at a time; the
    first pass over the descriptors also fills `wholes` before any table is yielded."""
    for first in range(0, planes.shape[1] // BITS, TABLE_GROUP):
        index_keys, query_keys = _table_keys(desc, planes[:, first * BITS:(first + TABLE_GROUP) * BITS],
                                             wholes if first == 0 else None)
        for t in range(index_keys.shape[1]):
            yield index_keys[:, t], query_keys[:, t]


class _Searcher:
    """One search's state as its tables go by: the pairs found, the candidate pairs examined against the cap,
    and how often each image's queries met crowded buckets."""

    def __init__(self, desc, threshold: float, bar: tqdm):
        self.desc, self.threshold, self.n, self.bar = desc, threshold, len(desc), bar
        self.wholes = torch.empty(self.n, GRID * GRID, dtype=torch.float16)  # filled by the first key pass
        self.found, self.examined, self.cap = _Found(self.n), 0, PAIRS_PER_IMAGE * self.n
        self.crowded, self.tables = np.zeros(self.n, np.int32), 0

    def table(self, index_keys: np.ndarray, query_keys: np.ndarray, deadline: float | None) -> End | None:
        """Pair and verify one table's candidates, queries in key order a block at a time; the End that stops the
        search, if one does."""
        bucket_keys, images = _buckets(index_keys)
        order = np.argsort(query_keys)
        for first in range(0, len(order), QUERY_BLOCK):
            queries = order[first:first + QUERY_BLOCK]
            q, j, crowd = _candidates(queries, query_keys[queries], bucket_keys, images, self.n, self.found.lookalike)
            np.add.at(self.crowded, crowd % self.n, 1)
            self.verify(q[:self.cap - self.examined], j[:self.cap - self.examined])
            self.bar.update(len(queries))
            if self.examined >= self.cap:
                return End.PAIR_CAP
            if deadline is not None and time.monotonic() > deadline:
                return End.TIME_CAP
        self.tables += 1
        self.found.lookalike |= self.crowded >= CROWDED_QUERIES
        return End.CROWDED if self.crowded.sum() > CROWDED_SHARE * 2 * self.n * self.tables else None

    def verify(self, q: np.ndarray, j: np.ndarray) -> None:
        """Keep the candidate pairs whose best cosine clears the threshold, PAIR_BLOCK pairs at a time."""
        self.examined += len(q)
        for start in range(0, len(q), PAIR_BLOCK):
            qb, jb = q[start:start + PAIR_BLOCK], j[start:start + PAIR_BLOCK]
            sims = _similarities(self.desc, self.wholes, qb, jb, self.n).numpy()
            hit = sims >= self.threshold
            self.found.add(qb[hit], jb[hit], sims[hit])


def find_near_copies(desc, threshold: float = THRESHOLD, seed: int = 0, deadline: float | None = None,
                     progress: bool = False) -> Search:
    """The near-copies among images given by their descriptors (N, VARIANTS, D) (descriptors(); a tensor or a
    dataset.RowView of a memory map): pairs whose best cosine clears `threshold`. An image whose queries meet
    crowded buckets CROWDED_QUERIES times is a look-alike. It stops early, saying so in Search.end, after a
    table where more than CROWDED_SHARE of the queries so far met crowded buckets, after PAIRS_PER_IMAGE x N
    candidate pairs, or at `deadline` (a time.monotonic() value)."""
    if len(desc) < 2:
        return _Found(len(desc)).search(0, End.DONE)
    planes = torch.randn(GRID * GRID, TABLES * BITS, generator=torch.Generator().manual_seed(seed))
    with tqdm(total=TABLES * 2 * len(desc), desc="near-copies", unit="query", delay=3, leave=False,
              disable=not progress) as bar:
        searcher = _Searcher(desc, threshold, bar)
        for index_keys, query_keys in _tables(desc, planes, searcher.wholes):
            end = searcher.table(index_keys, query_keys, deadline)
            if end is not None:
                return searcher.found.search(searcher.examined, end)
    return searcher.found.search(searcher.examined, End.DONE)


def near_duplicate_pairs(images: torch.Tensor, threshold: float = THRESHOLD, seed: int = 0
                         ) -> list[tuple[int, int, float]]:
    """Pairs (i, j, cosine) of near-copies among uint8 images (N, C, S, S), i < j, most similar first."""
    return find_near_copies(descriptors(images), threshold, seed).pair_list()


@dataclass(frozen=True)
class StartUpCheck:
    """train.py's start-up search among train and val (the first `n_train` images of `found`) and its seconds."""
    found: Search
    n_train: int
    seconds: float

    def counts(self) -> tuple[int, int, int]:
        """(groups within train or val, groups spanning the two: leakage, images not judged: look-alikes)."""
        groups, lookalike = self.found.groups()
        cross, within = cross_and_within(groups, self.n_train)
        return within, cross, lookalike


def start_up_check(train_desc, val_desc, seconds: float = START_UP_SECONDS) -> StartUpCheck:
    """The near-copies within train or val and across them, from their descriptors (N, VARIANTS, D); a search
    still running after `seconds` stops (End.TIME_CAP) and check_data.py gives the full report instead."""
    t0 = time.monotonic()
    found = find_near_copies(Joined(train_desc, val_desc), deadline=t0 + seconds, progress=True)
    return StartUpCheck(found, len(train_desc), time.monotonic() - t0)


def component_labels(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """For each of n images, the smallest image joined to it through the pairs (i, j): connected components by
    spreading the smallest label along the pairs, then following labels to their own."""
    label = np.arange(n)
    while True:
        new = label.copy()
        smaller = np.minimum(label[i], label[j])
        np.minimum.at(new, i, smaller)
        np.minimum.at(new, j, smaller)
        new = new[new]
        if np.array_equal(new, label):
            return label
        label = new


def connected_groups(pairs, n: int) -> list[list[int]]:
    """The groups of images joined by pairs ([(i, j, ...)] or an (P, 2) array), each sorted, largest first."""
    pairs = np.asarray([p[:2] for p in pairs] if isinstance(pairs, list) else pairs, np.int64).reshape(-1, 2)
    members = np.unique(pairs)
    label = component_labels(pairs[:, 0], pairs[:, 1], n)[members]
    order = np.lexsort((members, label))
    cuts = np.flatnonzero(np.diff(label[order])) + 1
    groups = [g.tolist() for g in np.split(members[order], cuts)] if len(members) else []
    return sorted(groups, key=lambda g: (-len(g), g[0]))


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
