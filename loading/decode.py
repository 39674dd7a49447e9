"""Image files to pixels: finding the image files of a folder, decoding one file (any format and mode PIL reads)
to a square uint8 array, and decoding many in worker processes, lazily and in order.

Usage:
    paths = expand_inputs(["photos/", "more/*.jpg", "one.png"])   # files, folders (recursively) and patterns
    pixels = decode_image("cat.jpg", 64, channels=1)               # uint8 (1, 64, 64), or raises BadImage(reason)
    for pixels, reason in decode_files(paths, 64, 1, workers=2):   # (None, reason) for a file that cannot be used
        ...
"""
from __future__ import annotations

import glob
import io
import itertools
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from core.common import UserError
from loading.files import walk_files


def image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under folder, recursively (symlinked folders too) and sorted; hidden files
    and folders are neither. The listing is loading/files.py's walk_files."""
    images, others = walk_files(str(folder))
    return sorted(map(Path, images)), sorted(map(Path, others))


def expand_inputs(items: list[str]) -> list[Path]:
    """Files as given, image files inside folders (recursively), and glob patterns, in order, without repeats."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = image_files(p)[0]
            if not found:
                raise UserError(f"no image files in folder {p}")
            out.extend(found)
        elif any(ch in item for ch in "*?[") and not p.exists():
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"no files match {item!r}")
            out.extend(matches)
        else:
            out.append(p)  # a missing file is reported per image, so the others are still answered
    return list(dict.fromkeys(out))


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


def decode_image(path: str | Path | BinaryIO, size: int, channels: int = 1) -> np.ndarray:
    """Read one image file (type by content, not extension) to uint8 (channels, size, size), or raise BadImage."""
    try:
        with warnings.catch_warnings():
            # Beyond PIL's pixel limit an image may be a decompression bomb: refuse it rather than fill memory.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                    # The warning filter above is process-wide, so in a threaded server another thread may
                    # have reset it: check the limit here too.
                    raise Image.DecompressionBombError(f"{img.width * img.height} pixels")
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


def decode_bytes(data: bytes, size: int, channels: int = 1) -> np.ndarray:
    """An image file's bytes (an upload) as decode_image decodes the file: same result, same BadImage reasons."""
    return decode_image(io.BytesIO(data), size, channels)


def _decode_or_reason(args: tuple) -> tuple[np.ndarray | None, str]:
    path, size, channels = args
    try:
        return decode_image(path, size, channels), ""
    except BadImage as e:
        return None, str(e)


def _decode_chunk(jobs: list[tuple]) -> list[tuple[np.ndarray | None, str]]:
    return [_decode_or_reason(j) for j in jobs]


def decode_files(paths: list[str], size: int, channels: int, workers: int,
                 desc: str = "decoding") -> Iterator[tuple[np.ndarray | None, str]]:
    """Decode many files lazily and in order, in `workers` processes when there are enough of them to pay for
    starting those. Only a few chunks of about 4 MiB of pixels are in flight at a time, so however many files
    there are, memory holds what the caller keeps, not every decoded image."""
    jobs = [(p, size, channels) for p in paths]
    bar = tqdm(total=len(jobs), desc=desc, disable=len(jobs) < 500, leave=False)
    if workers <= 0 or len(jobs) < 200:
        for job in jobs:
            yield _decode_or_reason(job)
            bar.update()
        bar.close()
        return
    step = max(1, min(64, (4 << 20) // (size * size * channels)))
    chunks = (jobs[i:i + step] for i in range(0, len(jobs), step))
    pool = ProcessPoolExecutor(workers)
    try:
        pending = deque(pool.submit(_decode_chunk, c) for c in itertools.islice(chunks, 4 * workers))
        while pending:
            done = pending.popleft().result()
            pending.extend(pool.submit(_decode_chunk, c) for c in itertools.islice(chunks, 1))
            bar.update(len(done))
            yield from done
    finally:
        pool.shutdown(cancel_futures=True)
        bar.close()


def mapped_tensor(pixels: np.ndarray) -> torch.Tensor:
    """A read-only numpy memory map as a tensor sharing its pages (writing to it would fault, so nothing may)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(pixels)
