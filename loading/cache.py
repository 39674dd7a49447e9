"""The decoded-image cache: one memory-mapped uint8 array per folder of files, plus a small index of the files in it.

Usage (from dataset.py):
    pixels, rows, reasons, stats = update_cache(cache_dir, folder, paths, size, channels, decode)
    # pixels: read-only memory map (rows, C, S, S); path i is pixels[rows[i]] (rows[i] = -1: reasons[i] says why)
    extra = derived_rows(pixels, "near", row_shape, dtype, compute)  # rows computed from those rows, kept

Files, per folder and image size and channels (KEY = <folder>-<size>px-<channels>ch-<hash of the folder>;
the folder is the one that holds every file of the list, e.g. DATA/train for DATA/train/<class>/*):
    KEY.<generation>.npy   uint8 (rows, C, S, S), a plain .npy that numpy.load(mmap_mode="r") opens
    KEY.index.pt          file paths (relative to the folder), size and mtime, row (-1 = unreadable),
                           the reason a file is unreadable, and the array's name, row count and a checksum
    KEY.<generation>.<suffix>.npy   rows derived from the array's rows (derived_rows), as many or fewer

Several lists of files under one folder share its cache (train and the val carved from it, evaluate.py's test
list): loading one list keeps the other lists' entries, and when the index is rewritten anyway (something was
decoded or compacted) an entry of another list is kept only while its file's size and mtime still match.
A changed or new file is decoded and appended as a new row; the old row goes stale. When more than
COMPACT_SHARE of the rows are stale the live rows are copied to a new generation. The array is written and
fsynced before the index, which is replaced atomically and is the only thing that says which rows are valid:
a crash leaves the previous index, whose rows are all still intact. An index or array that is cut short or
does not match (size, row count, checksum of the last rows) is rebuilt with a warning, never trusted.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import pickle
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from core.common import save_atomic

CACHE_VERSION = 2
COMPACT_SHARE = 0.25  # rewrite the array once more than this share of its rows belong to no current file
BLOCK_BYTES = 16 << 20  # pixels decoded, written or copied at a time: bounds memory whatever the split's size
INDEX_EVERY_BYTES = 1 << 30  # a long first decode saves its progress this often, so a killed run resumes
TAIL_BYTES = 1 << 16  # the checksum covers the last this-many bytes of the valid rows

# decode(paths) yields (uint8 (C, S, S) array or None, reason) per path, in order.
Decoder = Callable[[list[str]], Iterable[tuple["np.ndarray | None", str]]]


class CacheWarning(UserWarning):
    """A cache file was damaged or inconsistent and is being rebuilt."""


def cache_key(folder: str | Path, size: int, channels: int) -> str:
    folder = Path(folder).resolve()
    digest = hashlib.sha1(f"{folder}|{size}|{channels}|{CACHE_VERSION}".encode()).hexdigest()[:16]
    return f"{folder.name}-{size}px-{channels}ch-{digest}"


# ---------------------------------------------------------------- the index

def _blob(strings: list[str]) -> np.ndarray:
    return np.frombuffer("\0".join(strings).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def _unblob(blob: np.ndarray, n: int) -> list[str]:
    return blob.tobytes().decode("utf-8", "surrogateescape").split("\0") if n else []


def _checksum(arrays: list[np.ndarray]) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), crc)
    return crc


def write_index(path: Path, meta: dict, names: list[str], sizes: np.ndarray, mtimes: np.ndarray,
                rows: np.ndarray, reasons: list[str]) -> None:
    """Write the index atomically (save_atomic: temp file, fsync, rename), with a checksum of its contents."""
    arrays = {"names": _blob(names), "sizes": np.asarray(sizes, np.int64), "mtimes": np.asarray(mtimes, np.int64),
              "rows": np.asarray(rows, np.int64), "reasons": _blob(reasons)}
    meta = {**meta, "crc": _checksum(list(arrays.values()))}
    save_atomic({"meta": json.dumps(meta), **{k: torch.from_numpy(v.copy()) for k, v in arrays.items()}}, path)


def read_index(path: Path) -> dict:
    """The index as {meta, names, sizes, mtimes, rows, reasons}; raises on anything cut short, malformed or not
    matching its checksum."""
    raw = torch.load(path, weights_only=True)
    meta = json.loads(raw["meta"])
    arrays = {k: raw[k].numpy() for k in ("names", "sizes", "mtimes", "rows", "reasons")}
    if meta.get("version") != CACHE_VERSION or meta.get("crc") != _checksum(list(arrays.values())):
        raise ValueError("the index does not match its checksum")
    n = int(meta["entries"])
    out = {"meta": meta, **arrays, "names": _unblob(arrays["names"], n), "reasons": _unblob(arrays["reasons"], n)}
    if not all(len(out[k]) == n for k in out if k != "meta"):
        raise ValueError("index entries disagree with its header")
    return out


# ---------------------------------------------------------------- the array

def _tail_crc(arr: np.ndarray, rows: int) -> int:
    flat = arr.reshape(-1)[: rows * int(np.prod(arr.shape[1:]))]
    return zlib.crc32(flat[-TAIL_BYTES:].tobytes()) if rows else 0


def _read_header(f) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran order, dtype) of an open .npy file, leaving it at the first data byte."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def map_rows(path: Path, rows: int, dtype: np.dtype = np.uint8) -> np.ndarray:
    """The first `rows` rows of a .npy array file of `dtype`, memory-mapped read-only; raises if the file is
    shorter."""
    with open(path, "rb") as f:
        shape, fortran, found = _read_header(f)
        offset = f.tell()
    if found != dtype or fortran or not shape or shape[0] < rows:
        raise ValueError(f"{path.name} holds {found} {shape}, fewer than the {rows} rows of {np.dtype(dtype)} expected")
    row_shape = tuple(shape[1:])
    if offset + rows * int(np.prod(row_shape)) * found.itemsize > os.path.getsize(path):
        raise ValueError(f"{path.name} is shorter than {rows} rows: cut short")
    if rows == 0:
        return np.zeros((0, *row_shape), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(rows, *row_shape))


def _open_array(path: Path, rows: int, row_shape: tuple, tail_crc: int) -> np.ndarray:
    """The first `rows` rows of a cache array, memory-mapped read-only; raises if it is short or not the one the
    index describes."""
    arr = map_rows(path, rows)
    if tuple(arr.shape[1:]) != row_shape:
        raise ValueError(f"{path.name} holds rows of {arr.shape[1:]}, the index expects {row_shape}")
    if _tail_crc(arr, rows) != tail_crc:
        raise ValueError(f"{path.name}: the checksum of its last rows does not match the index")
    return arr


def _new_array(path: Path, row_shape: tuple, dtype: np.dtype = np.uint8) -> None:
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(0, *row_shape)).flush()


def _generation_name(key: str) -> str:
    """A new generation's array file name."""
    return f"{key}.{uuid.uuid4().hex[:8]}.npy"


def _append_rows(path: Path, start: int, blocks: Iterator[np.ndarray], row_shape: tuple,
                 dtype: np.dtype = np.uint8) -> int:
    """Write blocks of rows after row `start` (dropping anything beyond it), fsync, then rewrite the .npy header's
    row count; returns the new row count. numpy pads .npy headers so the row count can grow in place."""
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    with open(path, "r+b") as f:
        _read_header(f)
        offset = f.tell()
        f.seek(offset + start * row_bytes)
        rows = start
        for block in blocks:
            f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
            rows += len(block)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": (rows, *row_shape)})
        if f.tell() != offset:
            raise RuntimeError("the .npy header changed length")  # numpy's padding makes this impossible
        f.flush()
        os.fsync(f.fileno())
    return rows


# ---------------------------------------------------------------- building and updating

def _load_index(index_file: Path, row_shape: tuple) -> dict | None:
    """The index when it and its array are present and consistent; None for a new cache. A damaged or
    inconsistent pair is dropped with a CacheWarning, so that it gets rebuilt."""
    if not index_file.exists():
        return None
    try:
        index = read_index(index_file)
        meta = index["meta"]
        if tuple(meta["row_shape"]) != row_shape:
            raise ValueError(f"rows of {meta['row_shape']}, expected {list(row_shape)}")
        _open_array(index_file.parent / meta["array"], int(meta["rows"]), row_shape, int(meta["tail_crc"]))
        if len(index["rows"]) and int(index["rows"].max()) >= int(meta["rows"]):
            raise ValueError("the index points past the end of the array")
        return index
    except (OSError, ValueError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        warnings.warn(f"decoded-image cache {index_file} is damaged or incomplete ({e}); rebuilding it",
                      CacheWarning, stacklevel=3)
        index_file.unlink(missing_ok=True)
        return None


def _remove_orphans(cache_dir: Path, key: str, keep: str) -> None:
    """Arrays of this key that the index no longer names (an old generation, or one a crash left behind), and the
    arrays derived from them (derived_rows)."""
    for p in cache_dir.glob(f"{key}.*.npy"):
        if p.name != keep and not p.name.startswith(keep.removesuffix(".npy") + "."):
            p.unlink(missing_ok=True)
    for p in cache_dir.glob(f".{key}.index.pt.*.tmp"):
        p.unlink(missing_ok=True)


def _compact(cache_dir: Path, key: str, arr: np.ndarray, live_rows: np.ndarray,
             row_shape: tuple) -> tuple[str, np.ndarray]:
    """Copy the live rows, in their order in `arr`, into a new generation; (its file name, old row -> new row)."""
    name, kept = _generation_name(key), np.sort(live_rows)
    step = max(1, BLOCK_BYTES // math.prod(row_shape))
    _new_array(cache_dir / name, row_shape)
    _append_rows(cache_dir / name, 0, (arr[kept[i:i + step]] for i in range(0, len(kept), step)), row_shape)
    remap = np.full(len(arr), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    return name, remap


def forget_folder(cache_dir: str | Path, folder: str | Path, size: int, channels: int) -> int:
    """Delete what the cache keeps for `folder` at this size and channels (its arrays, index and lock), for a
    folder that will not be read again, such as a benchmark's temporary links; how many files went."""
    gone = 0
    for f in Path(cache_dir).glob(f"{cache_key(folder, size, channels)}.*"):
        f.unlink(missing_ok=True)
        gone += 1
    return gone


def update_cache(cache_dir: str | Path, folder: str | Path, paths: list[str], size: int, channels: int,
                 decode: Decoder) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Bring the cache of `folder` up to date with `paths` (files under it) and return (the array, memory-mapped
    read-only; the row of each path in it, -1 when unreadable; the reason per path, '' when readable; stats
    {decoded, reused, stale_rows, compacted}).

    A file is reused when its path, size and mtime match the index; every other file is decoded (by `decode`)
    and appended. Nothing but one block of rows is held in memory at a time.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(folder, size, channels)
    with _locked(cache_dir / f"{key}.lock"):  # torchrun's ranks load at once: one decodes, the others reuse
        return _update(cache_dir, key, str(folder), paths, size, channels, decode)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` for as long as the block runs (a no-op where fcntl is missing: Windows)."""
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def file_stats(paths: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, mtimes in ns) of the files; -1 and -1 for a file that cannot be stat'ed (missing). A block of
    files at a time, so that memory holds one block's stat results, never the whole list's."""
    paths = list(paths)
    sizes, mtimes = np.empty(len(paths), np.int64), np.empty(len(paths), np.int64)
    for start in range(0, len(paths), 1 << 14):
        block = paths[start:start + (1 << 14)]
        try:
            found = list(map(os.stat, block))  # the usual case, at C speed: every file is there
        except OSError:
            found = [_stat_or_none(p) for p in block]
        end = start + len(block)
        sizes[start:end] = [st.st_size if st else -1 for st in found]
        mtimes[start:end] = [st.st_mtime_ns if st else -1 for st in found]
    return sizes, mtimes


def match_entries(known: list[str], names: list[str]) -> np.ndarray:
    """For each name, its position in `known` (-1 when absent). A list is stored in one run in the index, so the
    usual warm start is one C-speed comparison of that run; otherwise a dictionary look-up per name."""
    if names:
        try:
            k = known.index(names[0])
        except ValueError:
            k = -1
        if k >= 0 and known[k:k + len(names)] == names:
            return np.arange(k, k + len(names), dtype=np.int64)
    where = {name: j for j, name in enumerate(known)}
    return np.fromiter((where.get(name, -1) for name in names), np.int64, len(names))


def _live(n_rows: int, *row_lists: np.ndarray) -> np.ndarray:
    """Sorted rows of the array that some entry uses."""
    used = np.zeros(n_rows, dtype=bool)
    for rows in row_lists:
        used[rows[rows >= 0]] = True
    return np.flatnonzero(used)


def _update(cache_dir: Path, key: str, folder: str, paths: list[str], size: int, channels: int,
            decode: Decoder) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """update_cache's work, under its lock: match the files to the index, decode what is new or changed into the
    array, compact it when enough of it is stale, then write the index (the array always first)."""
    row_shape = (channels, size, size)
    names = relative_names(folder, paths)
    sizes, mtimes = file_stats(paths)
    index = _load_index(cache_dir / f"{key}.index.pt", row_shape)
    rows, reasons, todo, other = match_rows(index, names, sizes, mtimes)
    store = _store_of(cache_dir, key, row_shape, index)
    _remove_orphans(cache_dir, key, store.array_name)
    mine, others = _Entries(names, sizes, mtimes, rows, reasons), _OtherLists(index, folder, other)
    if todo:
        others.check()  # the index is rewritten anyway, so the other lists' files are checked (once)
        _decode_new(store, mine, todo, [paths[i] for i in todo], decode,
                    save=lambda pending: _save_index(store, mine, others, pending))
    compacted, stale = _compact_if_stale(store, mine, others)
    if todo or compacted or index is None:
        _save_index(store, mine, others)
    if compacted:
        _remove_orphans(cache_dir, key, store.array_name)
    return store.pixels(), mine.rows, mine.reasons, {
        "decoded": len(todo), "reused": len(paths) - len(todo), "stale_rows": 0 if compacted else stale,
        "compacted": compacted}


def relative_names(folder: str, paths: list[str]) -> list[str]:
    """The paths as the index names them: relative to the folder when under it, else as given."""
    prefix = folder.rstrip(os.sep) + os.sep
    return [p.removeprefix(prefix) for p in paths]


def match_rows(index: dict | None, names: list[str], sizes: np.ndarray, mtimes: np.ndarray
               ) -> tuple[np.ndarray, list[str], list[int], np.ndarray]:
    """This list's files against the index: (the row of each file, -1 when unreadable or still to decode; the
    reason of each unreadable one, kept while its file is unchanged; the positions of the files to decode, those
    whose name, size or mtime matches no entry; the index's entries of files not in this list). No index: every
    file is to decode."""
    rows, reasons = np.full(len(names), -1, dtype=np.int64), [""] * len(names)
    if index is None:
        return rows, reasons, list(range(len(names))), np.zeros(0, np.int64)
    j = match_entries(index["names"], names)
    known = np.maximum(j, 0)
    same = (j >= 0) & (index["sizes"][known] == sizes) & (index["mtimes"][known] == mtimes)
    rows[same] = index["rows"][j[same]]
    for i in np.flatnonzero(same & (rows < 0)).tolist():  # unreadable in the index and unchanged: same reason
        reasons[i] = index["reasons"][j[i]]
    listed = np.zeros(len(index["names"]), dtype=bool)
    listed[j[j >= 0]] = True
    return rows, reasons, np.flatnonzero(~same).tolist(), np.flatnonzero(~listed)


@dataclass
class _Store:
    """The files of one cache: its folder and key, the row shape, the array's file name and its valid rows."""
    cache_dir: Path
    key: str
    row_shape: tuple
    array_name: str
    n_rows: int

    @property
    def array(self) -> Path:
        return self.cache_dir / self.array_name

    @property
    def index_file(self) -> Path:
        return self.cache_dir / f"{self.key}.index.pt"

    def pixels(self) -> np.ndarray:
        """The valid rows, memory-mapped read-only."""
        return map_rows(self.array, self.n_rows)


def _store_of(cache_dir: Path, key: str, row_shape: tuple, index: dict | None) -> _Store:
    """The array the index names, or a new empty generation when there is no index."""
    if index is not None:
        return _Store(cache_dir, key, row_shape, index["meta"]["array"], int(index["meta"]["rows"]))
    store = _Store(cache_dir, key, row_shape, _generation_name(key), 0)
    _new_array(store.array, row_shape)
    return store


@dataclass
class _Entries:
    """This list's files as the index records them: name (relative to the folder), size, mtime, row, reason."""
    names: list[str]
    sizes: np.ndarray
    mtimes: np.ndarray
    rows: np.ndarray
    reasons: list[str]


class _OtherLists:
    """The index's entries of files not in this list (another list's under the folder: train's val) and their rows.
    They are kept as they are until check(), which the first rewrite of the index calls: a file deleted or changed
    then drops out, and its row goes stale."""

    def __init__(self, index: dict | None, folder: str, entries: np.ndarray):
        self.index, self.folder, self.entries = index, folder, entries
        self.rows = self.column("rows")  # follows the rows when the array is compacted
        self.checked = False

    def column(self, field: str) -> np.ndarray:
        """A number column of the index read at the start, for the entries kept."""
        return self.index[field][self.entries] if len(self.entries) else np.zeros(0, np.int64)

    def strings(self, field: str) -> list[str]:
        """A text column (names, reasons) of the index read at the start, for the entries kept."""
        return [self.index[field][k] for k in self.entries.tolist()]

    def check(self) -> None:
        """Keep only the entries whose file is still there with the size and mtime the index gives (once)."""
        if self.checked:
            return
        sizes, mtimes = file_stats(os.path.join(self.folder, name) for name in self.strings("names"))
        ok = (sizes >= 0) & (sizes == self.column("sizes")) & (mtimes == self.column("mtimes"))
        self.entries, self.rows, self.checked = self.entries[ok], self.rows[ok], True


def _decode_new(store: _Store, mine: _Entries, todo: list[int], paths: list[str], decode: Decoder,
                save: Callable[[list[int]], None]) -> None:
    """Decode `paths` (the files at positions `todo`: new or changed) and append them to the array block by block;
    a file that fails gets row -1 and its reason. A long decode calls save(positions not decoded yet) every
    INDEX_EVERY_BYTES, so that a run killed during it keeps its progress."""
    block_rows = max(1, BLOCK_BYTES // math.prod(store.row_shape))
    decoded = iter(decode(paths))
    for start in range(0, len(todo), block_rows):
        chunk = todo[start:start + block_rows]
        block = []
        for i, (pixels, reason) in zip(chunk, itertools.islice(decoded, len(chunk))):
            mine.reasons[i] = reason
            if pixels is not None:
                mine.rows[i] = store.n_rows + len(block)
                block.append(pixels)
        if block:
            store.n_rows = _append_rows(store.array, store.n_rows, iter([np.stack(block)]), store.row_shape)
        done = start + len(chunk)
        if done % (INDEX_EVERY_BYTES // BLOCK_BYTES * block_rows) < block_rows and done < len(todo):
            save(todo[done:])


def _compact_if_stale(store: _Store, mine: _Entries, others: _OtherLists) -> tuple[bool, int]:
    """(whether the array was compacted, its stale rows). Rows no entry uses are stale: replaced files, and (once
    checked) other lists' files changed or gone. When more than COMPACT_SHARE of the rows are stale, the live rows
    are copied to a new generation and every entry's row follows."""
    live = _live(store.n_rows, mine.rows, others.rows)
    stale = store.n_rows - len(live)
    if not (store.n_rows > 0 and stale / store.n_rows > COMPACT_SHARE):
        return False, stale
    if not others.checked:
        others.check()  # entries about to be rewritten: drop the other lists' gone files
        live = _live(store.n_rows, mine.rows, others.rows)
    store.array_name, remap = _compact(store.cache_dir, store.key, store.pixels(), live, store.row_shape)
    mine.rows, others.rows = _remapped(mine.rows, remap), _remapped(others.rows, remap)
    store.n_rows = len(live)
    return True, stale


def _remapped(rows: np.ndarray, remap: np.ndarray) -> np.ndarray:
    """Rows through old row -> new row, -1 staying -1."""
    return np.where(rows >= 0, remap[np.maximum(rows, 0)], -1)


def _save_index(store: _Store, mine: _Entries, others: _OtherLists, pending: Iterable[int] = ()) -> None:
    """Write the index for every file of this list but the `pending` ones (not decoded yet), and for the other
    lists' unchanged files, with the array's row count and the checksum of its last rows."""
    others.check()
    keep = np.ones(len(mine.names), dtype=bool)
    keep[list(pending)] = False
    pick = np.flatnonzero(keep).tolist()
    meta = {"version": CACHE_VERSION, "row_shape": list(store.row_shape), "array": store.array_name,
            "rows": store.n_rows, "entries": len(pick) + len(others.entries),
            "tail_crc": _tail_crc(store.pixels(), store.n_rows)}
    write_index(store.index_file, meta, [mine.names[i] for i in pick] + others.strings("names"),
                np.concatenate([mine.sizes[keep], others.column("sizes")]),
                np.concatenate([mine.mtimes[keep], others.column("mtimes")]),
                np.concatenate([mine.rows[keep], others.rows]),
                [mine.reasons[i] for i in pick] + others.strings("reasons"))


# ---------------------------------------------------------------- arrays derived from the rows

def derived_rows(pixels: np.ndarray, suffix: str, row_shape: tuple, dtype: np.dtype,
                 compute: Callable[[np.ndarray], np.ndarray], desc: str = "") -> np.ndarray:
    """Rows computed from a cache array's rows (compute(block of rows) -> block of `row_shape`, `dtype`), kept
    beside it as <array>.<suffix>.npy and memory-mapped read-only, one row per pixel row. Rows of an array are
    never rewritten (a changed file gets a new row), so each is computed once, and a grown array adds only its
    new rows; a compacted array's new generation starts anew and the old one's derived files go with it. `desc`
    labels a progress bar shown while the computing takes more than a few seconds."""
    n = len(pixels)
    if not isinstance(pixels, np.memmap):  # no file to keep them beside: an empty array
        return compute(pixels)
    array = Path(pixels.filename)
    path = array.with_name(f"{array.name.removesuffix('.npy')}.{suffix}.npy")
    with _locked(array.with_name(f"{array.name.rsplit('.', 2)[0]}.lock")):
        try:
            have = min(n, _rows_in(path, row_shape, dtype))
        except (OSError, ValueError, EOFError):
            _new_array(path, row_shape, dtype)
            have = 0
        step = max(1, BLOCK_BYTES // math.prod(pixels.shape[1:]))
        if have < n:
            with tqdm(total=n - have, desc=desc, delay=3, leave=False, disable=not desc) as bar:
                def blocks() -> Iterator[np.ndarray]:
                    for i in range(have, n, step):
                        yield compute(pixels[i:i + step])
                        bar.update(min(step, n - i))
                _append_rows(path, have, blocks(), row_shape, dtype)
        return map_rows(path, n, dtype)


def _rows_in(path: Path, row_shape: tuple, dtype: np.dtype) -> int:
    """How many rows a derived array holds; raises when it is missing, cut short or of another shape or type."""
    with open(path, "rb") as f:
        shape, _, found = _read_header(f)
    if found != dtype or tuple(shape[1:]) != tuple(row_shape):
        raise ValueError(f"{path.name} holds {found} {shape}")
    map_rows(path, shape[0], dtype)
    return int(shape[0])
