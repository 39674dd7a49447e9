"""ImageFolder-style data: discovery, decoding once into a cache, and batch augmentation on tensors.

Usage:
    python dataset.py check DATA [--quarantine DIR]   # data report: counts, unreadable files, duplicates
    python dataset.py check DATA --json               # the same report as JSON; exit 1 on fatal problems
    python dataset.py demo DIR                        # write a small synthetic cat/dog-like set for a smoke test

Layout: DATA/train/<class>/*, optionally DATA/val/<class>/* and DATA/test/<class>/*. Each image is decoded
once (grayscale, IMAGE_SIZE x IMAGE_SIZE, uint8) and kept in CACHE_DIR keyed by path, size and mtime, so
later epochs and later runs skip JPEG decoding; augmentation then runs on whole batches of tensors.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from config import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
CACHE_VERSION = 1
# The cache stores pixels as uint8 and training sees (x / 127.5 - 1), i.e. mean 0.5 and std 0.5 of [0, 1].
NORMALIZATION = {"mean": 0.5, "std": 0.5}


# ---------------------------------------------------------------- discovery

def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def find_classes(split_dir: str | Path, wanted: list[str] | None = None) -> list[str]:
    """Sorted class folder names under split_dir; hidden folders (.ipynb_checkpoints) are not classes."""
    split_dir = Path(split_dir)
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not is_hidden(p.name))
    if not wanted:
        return found
    missing = [c for c in wanted if c not in found]
    if missing:
        raise UserError(f"--classes {' '.join(missing)} not found in {split_dir} (it has: {', '.join(found)})")
    return sorted(wanted)


def list_images(split_dir: str | Path, classes: list[str]) -> tuple[list[str], list[int], list[str]]:
    """(image paths, labels, files skipped for their extension) for the given classes, in a stable order."""
    paths, labels, ignored = [], [], []
    for label, name in enumerate(classes):
        folder = Path(split_dir) / name
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if not p.is_file() or any(is_hidden(part) for part in p.relative_to(folder).parts):
                continue  # .DS_Store, ._resource forks, files in hidden folders
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(p))
                labels.append(label)
            else:
                ignored.append(str(p))  # Thumbs.db, notes.txt, but also photo.jfif or a name without a dot
    return paths, labels, ignored


def skipped_note(ignored: list[str], limit: int = 5) -> str:
    """One line that counts and names the files skipped for their extension ('' when there are none)."""
    if not ignored:
        return ""
    names = ", ".join(ignored[:limit]) + (f" and {len(ignored) - limit} more" if len(ignored) > limit else "")
    return (f"skipped {len(ignored)} file(s) whose extension is not one of {' '.join(sorted(IMAGE_EXTENSIONS))}: "
            f"{names} (rename any that are images)")


# ---------------------------------------------------------------- decoding

class BadImage(Exception):
    """An image file that cannot be used; the message says why."""


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode (L, RGB, RGBA, P, CMYK, I;16, F...) to 'L' or 'RGB'; transparency goes onto white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float64)
        if arr.max(initial=0) > 255:  # 16-bit: scale the full range instead of clipping at 255
            arr = arr * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if img.mode == "CMYK":
        img = img.convert("RGB")
    return img.convert("L" if channels == 1 else "RGB")


def preprocess(img: Image.Image, size: int, channels: int = 1) -> np.ndarray:
    """A decoded PIL image to a (channels, size, size) uint8 array: EXIF orientation, mode, square resize."""
    img = ImageOps.exif_transpose(img)
    img = to_mode(img, channels).resize((size, size), Image.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def decode_image(path: str | Path, size: int, channels: int = 1) -> np.ndarray:
    """Read one image file (type by content, not extension) to uint8 (channels, size, size), or raise BadImage."""
    try:
        with warnings.catch_warnings():
            # Beyond PIL's pixel limit an image may be a decompression bomb: refuse it rather than fill memory.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format == "JPEG":
                    # Decode at a reduced scale straight to the target mode: several times faster on large photos.
                    img.draft("L" if channels == 1 else "RGB", (size, size))
                img.load()
                return preprocess(img, size, channels)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadImage("larger than PIL's decompression-bomb pixel limit") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image PIL can identify (empty, corrupt or another file type)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise BadImage(f"cannot decode: {e}") from None


def _decode_or_reason(args: tuple) -> tuple[np.ndarray | None, str]:
    path, size, channels = args
    try:
        return decode_image(path, size, channels), ""
    except BadImage as e:
        return None, str(e)


def to_float(x: torch.Tensor, mean: float | list[float] = 0.5, std: float | list[float] = 0.5) -> torch.Tensor:
    """uint8 pixels (..., C, H, W) to floats (x / 255 - mean) / std; mean and std are one value or one per channel.

    The default (0.5, 0.5) maps to [-1, 1]; other statistics (ImageNet's, for pretrained weights) come from the
    checkpoint's "normalization" so training, inference and export agree.
    """
    if mean == 0.5 and std == 0.5:
        return x.float().div_(127.5).sub_(1.0)
    shape = (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(shape)
    return x.float().div_(255.0).sub_(m).div_(s)


def image_tensor(path: str | Path, size: int, channels: int = 1, normalization: dict | None = None) -> torch.Tensor:
    """One file to a normalized (1, channels, size, size) float tensor, as the model sees it at evaluation."""
    norm = normalization or NORMALIZATION
    return to_float(torch.from_numpy(decode_image(path, size, channels)), norm["mean"], norm["std"])[None]


# ---------------------------------------------------------------- cache and splits

@dataclass
class Split:
    """A decoded split: uint8 images (N, C, S, S), int64 labels, their paths, and the files that failed."""
    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(self.images[idx], self.labels[idx], [self.paths[i] for i in idx.tolist()])


def _stat_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def cache_file(cache_dir: str | Path, split_dir: str | Path, size: int, channels: int) -> Path:
    key = f"{Path(split_dir).resolve()}|{size}|{channels}|{CACHE_VERSION}"
    return Path(cache_dir) / f"{Path(split_dir).name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def _read_cache(path: Path) -> dict[str, tuple]:
    """{file path: ((size, mtime_ns), pixels or None, reason)} from a cache file; {} if absent or unreadable."""
    try:
        c = torch.load(path, weights_only=True)
        stats = c["stats"].tolist()
        return {p: (tuple(stats[i]), c["images"][c["rows"][i]] if c["rows"][i] >= 0 else None, c["reasons"][i])
                for i, p in enumerate(c["paths"])}
    except Exception:  # absent, from an older version, or damaged: decode again
        return {}


def _write_cache(path: Path, paths: list[str], stats: list, pixels: list, reasons: list[str]) -> None:
    from model import save_atomic  # model imports config only; late import keeps dataset.py light to import

    rows, good = [], []
    for p in pixels:
        rows.append(len(good) if p is not None else -1)
        if p is not None:
            good.append(p)
    images = torch.stack(good) if good else torch.zeros(0, dtype=torch.uint8)
    save_atomic({"version": CACHE_VERSION, "paths": paths, "stats": torch.tensor(stats, dtype=torch.int64),
                 "rows": rows, "reasons": reasons, "images": images}, path)


def decode_files(paths: list[str], size: int, channels: int, workers: int,
                 desc: str = "decoding") -> list[tuple[np.ndarray | None, str]]:
    """Decode many files, in `workers` processes when there are enough of them to pay for starting those."""
    from tqdm import tqdm

    jobs = [(p, size, channels) for p in paths]
    show = len(jobs) >= 500
    if workers <= 0 or len(jobs) < 200:
        return [_decode_or_reason(j) for j in tqdm(jobs, desc=desc, disable=not show, leave=False)]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(_decode_or_reason, jobs, chunksize=64), total=len(jobs), desc=desc,
                         disable=not show, leave=False))


def load_split(split_dir: str | Path, classes: list[str], size: int, channels: int = 1,
               cache_dir: str = "", workers: int = 0) -> Split:
    """Decode every image of a split, reusing cached pixels for files whose size and mtime are unchanged."""
    paths, labels, ignored = list_images(split_dir, classes)
    stats = [_stat_key(p) for p in paths]
    cfile = cache_file(cache_dir, split_dir, size, channels) if cache_dir else None
    cached = _read_cache(cfile) if cfile else {}
    results: list = [None] * len(paths)
    todo = []
    for i, (p, st) in enumerate(zip(paths, stats)):
        hit = cached.get(p)
        if hit is not None and hit[0] == st:
            results[i] = (hit[1], hit[2])
        else:
            todo.append(i)
    if todo:
        fresh = decode_files([paths[i] for i in todo], size, channels, workers,
                             desc=f"decoding {Path(split_dir).name}")
        for i, r in zip(todo, fresh):
            results[i] = (torch.from_numpy(r[0]) if r[0] is not None else None, r[1])
        if cfile:
            _write_cache(cfile, paths, stats, [r[0] for r in results], [r[1] for r in results])
    keep = [i for i, r in enumerate(results) if r[0] is not None]
    images = (torch.stack([results[i][0] for i in keep]) if keep
              else torch.zeros(0, channels, size, size, dtype=torch.uint8))
    return Split(images=images, labels=torch.tensor([labels[i] for i in keep], dtype=torch.int64),
                 paths=[paths[i] for i in keep], bad=[(paths[i], results[i][1]) for i in range(len(paths))
                                                      if results[i][0] is None], ignored=ignored)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): `fraction` of each class goes to val, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = min(len(idx) - 1, max(1, round(len(idx) * fraction))) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def stratified_split_k(labels: torch.Tensor, ratios: list[float], seed: int) -> list[torch.Tensor]:
    """Sorted index tensors, one per ratio (e.g. train/val/test = 0.7/0.15/0.15), with every class divided in
    those ratios; counts are rounded by largest remainder so each image is used exactly once, and a split with
    a share gets at least one image of every class that has enough. Same seed, same split.
    """
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in ratios]
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        exact = [len(idx) * r / sum(ratios) for r in ratios]
        counts = [math.floor(e) for e in exact]
        by_remainder = sorted(range(len(ratios)), key=lambda k: (counts[k] - exact[k], k))
        for k in by_remainder[:len(idx) - sum(counts)]:
            counts[k] += 1
        for k, r in enumerate(ratios):
            largest = max(range(len(counts)), key=lambda j: counts[j])
            if r > 0 and counts[k] == 0 and counts[largest] > 1:
                counts[k], counts[largest] = 1, counts[largest] - 1
        start = 0
        for k, n in enumerate(counts):
            parts[k].append(idx[start:start + n])
            start += n
    return [torch.cat(p).sort().values if p else torch.zeros(0, dtype=torch.int64) for p in parts]


LAYOUT_HELP = ("expected DATA/train/<class>/<images> (e.g. Dataset/train/cat/1.jpg, Dataset/train/dog/2.jpg), "
               "optionally with DATA/val/<class>/ and DATA/test/<class>/")


def check_layout(data: str | Path, split: str = "train") -> Path:
    """The split folder, or a UserError that says which layout is expected."""
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"no dataset at {root}: {LAYOUT_HELP}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(f"no {split}/ folder in {root}: {LAYOUT_HELP}")
    return split_dir


def check_split(split: Split, classes: list[str], where: str, max_bad_fraction: float) -> None:
    """Refuse splits that cannot train: a class with no readable image, or mostly unreadable files."""
    total = len(split.paths) + len(split.bad)
    if total and len(split.bad) / total > max_bad_fraction:
        raise UserError(f"{len(split.bad)} of {total} image files in {where} cannot be read "
                        f"(more than {max_bad_fraction:.0%}); run `python dataset.py check` on the data "
                        f"(first: {split.bad[0][0]}: {split.bad[0][1]})")
    counts = torch.bincount(split.labels, minlength=len(classes))
    empty = [c for c, n in zip(classes, counts.tolist()) if n == 0]
    if empty:
        raise UserError(f"class folder(s) with no readable images in {where}: {', '.join(empty)}")


def load_data(data: str, classes: list[str] | None, size: int, channels: int, val_fraction: float, seed: int,
              cache_dir: str = "", workers: int = 0, max_bad_fraction: float = 0.5
              ) -> tuple[Split, Split, list[str]]:
    """(train, val, class names) from DATA/train and DATA/val, or a stratified split of train when no val/."""
    train_dir = check_layout(data, "train")
    names = find_classes(train_dir, classes)
    if len(names) < 2:
        raise UserError(f"found {len(names)} class folder(s) in {train_dir} ({', '.join(names) or 'none'}); "
                        f"a classifier needs at least 2: {LAYOUT_HELP}")
    train = load_split(train_dir, names, size, channels, cache_dir, workers)
    check_split(train, names, str(train_dir), max_bad_fraction)
    val_dir = Path(data) / "val"
    if val_dir.is_dir():
        val = load_split(val_dir, names, size, channels, cache_dir, workers)
        check_split(val, names, str(val_dir), max_bad_fraction)
    else:
        train_idx, val_idx = stratified_split(train.labels, val_fraction, seed)
        bad, ignored = train.bad, train.ignored
        train, val = train.subset(train_idx), train.subset(val_idx)
        train.bad, train.ignored = bad, ignored
    note = skipped_note(train.ignored + val.ignored)
    if note:
        print(note)
    return train, val, names


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


def batch_affine(x: torch.Tensor, degrees: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate each image of a float (N, C, H, W) batch by degrees[i] (counter-clockwise) about its centre and
    shift it by shifts[i] = (dx, dy) in fractions of its side; borders are filled by reflection."""
    rad = degrees.to(x.device, torch.float32) * (math.pi / 180)
    cos, sin = torch.cos(rad), torch.sin(rad)
    shifts = shifts.to(x.device, torch.float32)
    # affine_grid maps output coordinates to input ones, in [-1, 1]: the inverse rotation, then the shift.
    theta = torch.stack([torch.stack([cos, -sin, -2 * shifts[:, 0]], 1),
                         torch.stack([sin, cos, -2 * shifts[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def random_affine(x: torch.Tensor, max_degrees: float, max_shift: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """batch_affine with angles uniform in [-max_degrees, max_degrees] and shifts in [-max_shift, max_shift]."""
    if max_degrees <= 0 and max_shift <= 0:
        return x
    n = x.shape[0]
    degrees = (torch.rand(n, generator=generator) * 2 - 1) * max_degrees
    shifts = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    return batch_affine(x, degrees, shifts)


def augment(x: torch.Tensor, flip: bool, max_degrees: float, max_shift: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Training augmentation of a normalized float batch: random mirror, rotation and shift."""
    if flip:
        x = batch_flip_lr(x, generator)
    return random_affine(x, max_degrees, max_shift, generator)


# ---------------------------------------------------------------- synthetic data and the command line

def make_synthetic(root: str | Path, n_per_class: dict[str, int] | int = 60, size: int = 80, seed: int = 0,
                   classes: tuple[str, ...] = ("cat", "dog"), splits: tuple[str, ...] = ("train", "val", "test"),
                   fmt: str = "png") -> Path:
    """Write a small learnable ImageFolder set: class k draws a bright shape with k+3 corners on a noisy
    background (3 = triangle 'cat', 4 = square 'dog', ...), at random places, sizes and angles."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    root = Path(root)
    counts = n_per_class if isinstance(n_per_class, dict) else {c: n_per_class for c in classes}
    for split in splits:
        for k, name in enumerate(counts):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            n = counts[name] if split == "train" else max(2, counts[name] // 4)
            for i in range(n):
                bg = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                img = Image.fromarray(bg, "RGB")
                cx, cy = rng.uniform(0.35, 0.65, 2) * size
                r, a0 = rng.uniform(0.2, 0.33) * size, rng.uniform(0, 2 * np.pi)
                corners = k + 3
                pts = [(cx + r * np.cos(a0 + 2 * np.pi * j / corners), cy + r * np.sin(a0 + 2 * np.pi * j / corners))
                       for j in range(corners)]
                color = tuple(int(v) for v in rng.integers(150, 256, 3))
                ImageDraw.Draw(img).polygon(pts, fill=color)
                img.save(folder / f"{name}_{i:04d}.{fmt}")
    return root


# ---------------------------------------------------------------- data report (python dataset.py check)

SPLITS = ("train", "val", "test")
TINY_SIDE = 32  # below this many pixels on a side an image carries little for a 64 px model
FORMATS_BY_SUFFIX = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".gif": "GIF",
                     ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM"}


def file_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_header(path: str | Path) -> tuple[str, str, tuple[int, int]] | None:
    """(format, mode, (width, height)) read from the header only, without decoding pixels; None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.format or "", img.mode, img.size
    except Exception:  # any failure is reported by the full decode, with its reason
        return None


def hidden_entries(split_dir: Path) -> tuple[list[Path], list[Path]]:
    """(hidden folders, hidden files) under split_dir, which discovery skips; nothing inside hidden folders."""
    folders, files = [], []
    for here, dirs, names in os.walk(split_dir):
        folders += [Path(here) / d for d in dirs if is_hidden(d)]
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        files += [Path(here) / n for n in names if is_hidden(n)]
    return sorted(folders), sorted(files)


def data_report(data_dir: str | Path, max_bad_fraction: float = 0.5, workers: int = 0) -> dict:
    """Everything `python dataset.py check` shows, as plain data (paths relative to data_dir).

    Keys: counts {split: {class: readable images}}, unreadable [{path, reason}], modes and formats {name: n},
    sizes {min, max, most_common}, tiny [{path, size}], mismatched [{path, format}] (content is not what the
    extension says), duplicates and leaks [[paths]] (identical bytes within one split / across splits),
    empty_classes, hidden_folders, hidden_files, ignored (files skipped for their extension), imbalance (largest /
    smallest train class, None when one is empty), fatal and warnings [messages].
    """
    from collections import Counter, defaultdict

    root = Path(data_dir)
    check_layout(root, "train")

    def rel(p: str | Path) -> str:
        return Path(p).relative_to(root).as_posix()

    r: dict = {"data": str(root), "classes": find_classes(root / "train"), "counts": {}, "unreadable": [],
               "modes": {}, "formats": {}, "sizes": {}, "tiny": [], "mismatched": [], "duplicates": [],
               "leaks": [], "empty_classes": [], "hidden_folders": [], "hidden_files": [], "ignored": [],
               "imbalance": None, "fatal": [], "warnings": []}
    entries = []  # (split, class, path) of every image file
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        classes = find_classes(split_dir)
        paths, labels, ignored = list_images(split_dir, classes)
        entries += [(split, classes[k], p) for p, k in zip(paths, labels)]
        r["counts"][split] = {c: 0 for c in classes}
        present = set(labels)
        r["empty_classes"] += [f"{split}/{c}" for k, c in enumerate(classes) if k not in present]
        folders, files = hidden_entries(split_dir)
        r["hidden_folders"] += [rel(p) for p in folders]
        r["hidden_files"] += [rel(p) for p in files]
        r["ignored"] += [rel(p) for p in ignored]

    decoded = decode_files([p for _, _, p in entries], TINY_SIDE, 1, workers, desc="checking")
    modes, formats, sizes = Counter(), Counter(), Counter()
    by_hash, bad_per_split, files_per_split = defaultdict(list), Counter(), Counter()
    for (split, cls, path), (_, reason) in zip(entries, decoded):
        files_per_split[split] += 1
        if reason:
            bad_per_split[split] += 1
            r["unreadable"].append({"path": rel(path), "reason": reason})
            continue
        r["counts"][split][cls] += 1
        by_hash[file_sha1(path)].append((split, rel(path)))
        header = image_header(path)
        if header is None:
            continue
        fmt, mode, size = header
        modes[mode] += 1
        formats[fmt] += 1
        sizes[size] += 1
        if min(size) < TINY_SIDE:
            r["tiny"].append({"path": rel(path), "size": list(size)})
        expected = FORMATS_BY_SUFFIX.get(Path(path).suffix.lower())
        if expected and fmt != expected:
            r["mismatched"].append({"path": rel(path), "format": fmt})
    r["modes"], r["formats"] = dict(modes.most_common()), dict(formats.most_common())
    if sizes:
        by_area = sorted(sizes, key=lambda s: (s[0] * s[1], s))
        r["sizes"] = {"min": list(by_area[0]), "max": list(by_area[-1]),
                      "most_common": [[w, h, n] for (w, h), n in sizes.most_common(5)]}
    for group in by_hash.values():
        if len(group) > 1:
            splits = {s for s, _ in group}
            (r["leaks"] if len(splits) > 1 else r["duplicates"]).append([p for _, p in group])

    _judge(r, files_per_split, bad_per_split, max_bad_fraction)
    return r


def _judge(r: dict, files: dict, bad: dict, max_bad_fraction: float) -> None:
    """Fill r['fatal'] (training would stop or be meaningless) and r['warnings'], and the imbalance."""
    classes, counts = r["classes"], r["counts"]
    if len(classes) < 2:
        r["fatal"].append(f"train/ has {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); "
                          "a classifier needs at least 2")
    for split in ("train", "val"):
        if split not in counts:
            continue
        no_images = [c for c in classes if counts[split].get(c, 0) == 0]
        if no_images:
            r["fatal"].append(f"{split}/ has no readable image for class(es): {', '.join(no_images)}")
    for split, n in files.items():
        if n and bad[split] / n > max_bad_fraction:
            message = f"{bad[split]} of {n} image files in {split}/ cannot be read"
            (r["fatal"] if split != "test" else r["warnings"]).append(message)
    train_counts = [counts["train"][c] for c in classes]
    if len(classes) >= 2 and min(train_counts) > 0:
        r["imbalance"] = round(max(train_counts) / min(train_counts), 2)
        if r["imbalance"] >= 1.5:
            r["warnings"].append(f"classes are imbalanced ({r['imbalance']}x); consider --class-weights auto")
    for split in ("val", "test"):
        extra = sorted(set(counts.get(split, {})) - set(classes))
        if extra:
            r["warnings"].append(f"{split}/ has class folder(s) not in train/, which are ignored: {', '.join(extra)}")
    if "val" not in counts:
        r["warnings"].append("no val/ folder: train.py holds out --val-fraction of train/ instead")
    if r["leaks"]:
        r["warnings"].append(f"{len(r['leaks'])} file(s) appear in more than one split (leakage inflates val/test "
                             "accuracy): remove the copies")
    if r["duplicates"]:
        r["warnings"].append(f"{len(r['duplicates'])} group(s) of identical files within a split")
    if r["unreadable"]:
        r["warnings"].append(f"{len(r['unreadable'])} unreadable file(s) will be skipped "
                             "(move them away with --quarantine DIR)")


def format_report(r: dict, limit: int = 20) -> str:
    """The report as text for a terminal; long lists are cut at `limit` lines (--json has everything)."""
    lines = [f"data: {r['data']}"]
    splits = list(r["counts"])
    names = sorted(set(r["classes"]).union(*(r["counts"][s] for s in splits)))
    width = max([len(n) for n in names] + [5])
    lines.append(f"  {'class':<{width}}" + "".join(f"{s:>8}" for s in splits))
    for name in names:
        lines.append(f"  {name:<{width}}" + "".join(f"{r['counts'][s].get(name, '-'):>8}" for s in splits))
    lines.append(f"  {'total':<{width}}" + "".join(f"{sum(r['counts'][s].values()):>8}" for s in splits))
    if r["imbalance"] is not None:
        lines.append(f"class imbalance in train (largest / smallest): {r['imbalance']}x")
    if r["modes"]:
        lines.append("image modes: " + ", ".join(f"{m} {n}" for m, n in r["modes"].items()))
        lines.append("file types: " + ", ".join(f"{m} {n}" for m, n in r["formats"].items()))
    if r["sizes"]:
        s = r["sizes"]
        lines.append(f"sizes: smallest {s['min'][0]}x{s['min'][1]}, largest {s['max'][0]}x{s['max'][1]}, "
                     "most common " + ", ".join(f"{w}x{h} ({n})" for w, h, n in s["most_common"]))

    def section(title: str, items: list[str]) -> None:
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {item}" for item in items[:limit])
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more (see --json)")

    section("unreadable files, skipped by training", [f"{u['path']}: {u['reason']}" for u in r["unreadable"]])
    section(f"tiny images (a side under {TINY_SIDE} px)", [f"{t['path']} ({t['size'][0]}x{t['size'][1]})"
                                                           for t in r["tiny"]])
    section("content differs from the extension (read by content, fine)",
            [f"{m['path']}: {m['format']}" for m in r["mismatched"]])
    section("identical files in more than one split (leakage)", [" = ".join(g) for g in r["leaks"]])
    section("identical files within a split", [" = ".join(g) for g in r["duplicates"]])
    section("class folders without image files", r["empty_classes"])
    section("hidden folders, ignored", r["hidden_folders"])
    section(f"skipped for their extension, not one of {' '.join(sorted(IMAGE_EXTENSIONS))} (rename any that are "
            "images)", r["ignored"])
    if r["hidden_files"]:
        lines.append(f"hidden files, ignored: {len(r['hidden_files'])} (.DS_Store and the like)")
    section("quarantined", [f"{src} -> {dst}" for src, dst in r.get("quarantined", [])])
    lines += [f"warning: {w}" for w in r["warnings"]]
    lines += [f"FATAL: {f}" for f in r["fatal"]]
    lines.append("verdict: " + ("cannot train on this data" if r["fatal"] else "ok to train"))
    return "\n".join(lines)


def quarantine(data_dir: str | Path, rel_paths: list[str], dest: str | Path) -> list[tuple[str, str]]:
    """Move files (paths relative to data_dir) under dest with the same relative paths; never overwrites."""
    import shutil

    root, dest = Path(data_dir).resolve(), Path(dest).resolve()
    if any(dest.is_relative_to(root / s) for s in SPLITS):
        raise UserError(f"--quarantine {dest} is inside the data's split folders; pick a folder outside them")
    moved = []
    for rel_path in rel_paths:
        src, dst = root / rel_path, dest / rel_path
        n = 1
        while dst.exists():  # a file quarantined by an earlier check keeps its place
            dst = dest / Path(rel_path).with_name(f"{Path(rel_path).stem}.{n}{Path(rel_path).suffix}")
            n += 1
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)
        moved.append((str(src), str(dst)))
    return moved


def check_command(data: str, quarantine_dir: str = "", as_json: bool = False, max_bad_fraction: float = 0.5,
                  workers: int = 2) -> int:
    """`python dataset.py check`: print the report; 1 when training on this data would fail, else 0."""
    import json

    report = data_report(data, max_bad_fraction, workers)
    if quarantine_dir and report["unreadable"]:
        report["quarantined"] = quarantine(data, [u["path"] for u in report["unreadable"]], quarantine_dir)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 1 if report["fatal"] else 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="write a small synthetic dataset")
    p_demo.add_argument("dir")
    p_demo.add_argument("--per-class", type=int, default=150)
    p_demo.add_argument("--seed", type=int, default=0)
    p_check = sub.add_parser("check", help="report on a dataset before training")
    p_check.add_argument("data")
    p_check.add_argument("--quarantine", metavar="DIR", default="",
                         help="move unreadable files into DIR, keeping their paths relative to DATA")
    p_check.add_argument("--json", action="store_true", help="print the full report as JSON")
    p_check.add_argument("--max-bad-fraction", type=float, default=0.5,
                         help="a split with more unreadable files than this share is fatal")
    p_check.add_argument("--workers", type=int, default=2, help="processes that decode images")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return check_command(args.data, args.quarantine, args.json, args.max_bad_fraction, args.workers)
        if args.command == "demo":
            make_synthetic(args.dir, args.per_class, seed=args.seed)
            print(f"wrote a synthetic dataset to {args.dir} (train/val/test, classes cat and dog)")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
