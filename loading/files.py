"""The files under a folder as a dataset reader sees them: image files (by extension) and the rest, recursively,
symlinked folders entered, hidden files and folders left out, quickly on large folders.

Usage (from loading/layout.py, loading/table.py, loading/decode.py and quality/audit.py):
    images, others = walk_files("Dataset/train")        # path strings, in os.walk's order
    images, others = walk_paths(Path("Dataset/train"))  # the same as Paths
"""
from __future__ import annotations

import os
from pathlib import Path

from core.common import IMAGE_EXTENSIONS, UserError, is_hidden


def abs_path(p: str | Path) -> Path:
    """Absolute, without resolving symlinks: the path as the user's folders show it (and as caches key it)."""
    return Path(os.path.abspath(p))


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not is_hidden(p.name))


def files_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and not is_hidden(p.name))


def suffix_of(name: str) -> str:
    """Path(name).suffix, without building a Path: '.JPG' for 'a.JPG', '' for 'a' or 'a.'."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def walk_files(d: str, hidden: list[tuple[str, bool]] | None = None) -> tuple[list[str], list[str]]:
    """(image files, other files) under folder d as path strings that start with d, recursively, in os.walk's
    order (a folder's files by name, then each subfolder by name); hidden files and folders are left out.
    Symlinked folders are entered (a folder of links to class folders reads like the folders themselves); a link
    back to a folder it sits in is a loop, refused with a UserError naming it. One os.scandir per folder and no
    Path per file, so that large folders list quickly. When given, `hidden` gets (path, is a folder) for each
    hidden entry passed over (nothing inside hidden folders): what check_data.py reports as skipped."""
    images, others = [], []
    exts = IMAGE_EXTENSIONS
    inside: set[str] = set()  # real paths of the folders being visited (the current one and those above it)

    def visit(here: str) -> None:
        real = os.path.realpath(here)
        if real in inside:
            raise UserError(f"symlink loop: {here} leads back to {real}, a folder it is inside")
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except OSError:
            return
        inside.add(real)
        files, dirs = [], []
        prefix = here if here.endswith(os.sep) else here + os.sep
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_hidden(e.name):
                if hidden is not None:
                    hidden.append((prefix + e.name, is_dir))
                continue
            (dirs if is_dir else files).append(e.name)
        for n in sorted(files):
            (images if suffix_of(n).lower() in exts else others).append(prefix + n)
        for n in sorted(dirs):
            visit(prefix + n)
        inside.discard(real)

    visit(str(d))
    return images, others


def walk_paths(d: Path) -> tuple[list[Path], list[Path]]:
    """walk_files as Paths."""
    images, others = walk_files(str(d))
    return [Path(f) for f in images], [Path(f) for f in others]
