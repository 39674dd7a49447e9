"""Read the labels (and splits) of a dataset from a CSV or TSV table: which columns hold the file, the label or
tags and the split, which image each row names, and every row or image left out. It is layout.py's reader for
--labels FILE, kept apart from the folder and file-name layouts; layout.py imports it, never the other way.

Usage (from loading/layout.py and evaluate.py):
    header, rows = read_table(Path("dog-breed/labels.csv"))    # the delimiter: the one of , ; tab the header uses
    file_col, label_col, split_col = find_columns(header, None, table)         # by header name, or --label-columns
    items, columns, tagged = from_table(table, None, split_dirs, others, root, base, problems, rel)
    split_of("Training_Set"), parse_tags("a|b", "|")                           # 'train', ['a', 'b']
"""
from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.common import SPLIT_ALIASES, SPLITS, UserError, is_hidden
from loading.carve import TAG_SEP
from loading.files import abs_path, is_image, walk_paths

# Header names that hold the file and the label, in order of preference (compared as lower_snake_case).
FILE_COLUMNS = ("file", "filename", "file_name", "filepath", "file_path", "path", "image", "image_path",
                "image_name", "image_id", "img", "id")
LABEL_COLUMNS = ("label", "class", "class_name", "category", "breed", "target", "species")
# Header names of a column that holds several tags per row (several labels per image).
TAG_COLUMNS = ("tags", "tag", "labels", "genres", "genre", "attributes", "categories", "keywords", "findings",
               "finding_labels")
SPLIT_COLUMNS = ("split", "fold", "subset")

# Problem kinds, each a plural phrase that reads after a count: "3 table rows whose file is missing: ...".
MISSING = "table rows whose file is missing"
NO_LABEL = "table rows with no label"
NO_TAG = "table rows with no tag"
NO_FILE = "table rows with no file"
BAD_SPLIT = "table rows with an unknown split"
SEVERAL = "table rows matching several files"
CONFLICT = "files with two different labels"
UNLABELED = "images with no label in the table"
UNLABELED_FOLDERS = "folders with no labelled image"
SKIPPED = "files skipped for their extension"


# ---------------------------------------------------------------- names

def split_of(name: str) -> str | None:
    """'train', 'val' or 'test' when a folder or table value names a split (Training_Set -> train), else None."""
    key = re.sub(r"[\s-]+", "_", name.strip().lower())
    return next((s for s, aliases in SPLIT_ALIASES.items() if key in aliases), None)


def _column_key(name: str) -> str:
    return re.sub(r"[\s-]+", "_", name.strip().lower())


def images_text(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")


# ---------------------------------------------------------------- labels from a table

def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV or TSV file; the delimiter is the one of , ; tab that the header line uses."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)
            delimiter = "\t" if path.suffix.lower() == ".tsv" else max(",;\t", key=first.count)
            rows = [r for r in csv.reader(f, delimiter=delimiter) if any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read the labels table {path}: {e}") from None
    if not rows:
        raise UserError(f"the labels table {path} is empty")
    return [h.strip() for h in rows[0]], rows[1:]


def find_columns(header: list[str], label_columns: list[str] | tuple[str, ...] | None, table: Path
                 ) -> tuple[int, int, int | None]:
    """(file column, label column, split column or None) by header name, or as given by --label-columns."""
    keys = [_column_key(h) for h in header]

    def pick(wanted: tuple[str, ...]) -> int | None:
        return next((keys.index(w) for w in wanted if w in keys), None)

    if label_columns:
        if len(label_columns) != 2:
            raise UserError(f"--label-columns takes two column names, FILE_COL LABEL_COL, not {list(label_columns)}")
        found = [pick((_column_key(c),)) for c in label_columns]
        if None in found:
            missing = [c for c, i in zip(label_columns, found) if i is None]
            raise UserError(f"--label-columns: no column {' or '.join(map(repr, missing))} in {table} "
                            f"(its columns: {', '.join(header)})")
        file_col, label_col = found
    else:
        file_col, label_col = pick(FILE_COLUMNS), pick(LABEL_COLUMNS)
        label_col = pick(TAG_COLUMNS) if label_col is None else label_col
        if file_col is None or label_col is None:
            raise UserError(f"cannot tell which columns of {table} hold the file and the label (its columns: "
                            f"{', '.join(header)}); name them with --label-columns FILE_COL LABEL_COL")
    split_col = pick(SPLIT_COLUMNS)
    return file_col, label_col, None if split_col in (file_col, label_col) else split_col


class _Resolver:
    """File cells to files: relative to several folders, with or without the image extension; one directory
    listing per folder, then dictionary look-ups per cell, whatever the table's length."""

    def __init__(self, bases: list[Path], anywhere: Path | None = None):
        self.bases = list(dict.fromkeys(bases))
        self.listings: dict[Path, tuple[set[str], dict[str, list[str]]]] = {}
        self.anywhere = anywhere  # a bare name not found beside the bases: looked up under this folder's tree
        self.by_name: dict[str, list[Path]] | None = None

    def _listing(self, d: Path) -> tuple[set[str], dict[str, list[str]]]:
        if d not in self.listings:
            try:
                names = {n for n in os.listdir(d) if not is_hidden(n)}
            except OSError:
                names = set()
            stems = defaultdict(list)
            for n in sorted(names):
                if is_image(Path(n)):
                    stems[n[:n.rfind(".")]].append(n)
            self.listings[d] = names, stems
        return self.listings[d]

    def __call__(self, cell: str) -> list[Path]:
        cell = cell.strip().replace("\\", "/")
        rel = Path(cell)
        for base in ([Path(rel.anchor)] if rel.is_absolute() else self.bases):
            p = base / rel
            names, stems = self._listing(p.parent)
            if p.name in names and (p.parent / p.name).is_file():
                return [p]
            if p.name in stems:
                return [p.parent / n for n in stems[p.name]]
        return self._by_name(rel) if self.anywhere is not None and len(rel.parts) == 1 else []

    def _by_name(self, rel: Path) -> list[Path]:
        """The images under `anywhere` whose name (or name without its extension) is rel's: one walk of the tree,
        then look-ups. Several found: all of them (the row is then reported, not guessed)."""
        if self.by_name is None:
            self.by_name = defaultdict(list)
            for f in walk_paths(self.anywhere)[0]:
                self.by_name[f.name].append(f)
                self.by_name[f.name[:f.name.rfind(".")]].append(f)
        return list(self.by_name.get(rel.name, []))


@dataclass(frozen=True)
class _Tags:
    """How a table gives several tags per image: a cell of tags (split on `sep`; None: on white space), or one
    0/1 column per tag (`columns`: (index, tag))."""
    sep: str | None = None
    columns: tuple[tuple[int, str], ...] = ()
    keep_untagged: bool = False  # a row with no tag is an image with none of the tags (else it is left out)


def binary_columns(header: list[str], rows: list[list[str]], skip: set[int]) -> list[int]:
    """The columns (not in `skip`) whose every value is 0 or 1 and some value 1: one tag each, when there are at
    least two of them (as tables of genres or findings come: Id,Action,Comedy,...)."""
    found = []
    for c in range(len(header)):
        values = {_cell(r, c) for r in rows} - {""}
        if c not in skip and values and values <= {"0", "1"} and "1" in values:
            found.append(c)
    return found if len(found) >= 2 else []


def tag_separator(cells: list[str]) -> str | None:
    """The separator of a column of tags: the first of | ; , that some cell holds, else white space (None)."""
    return next((sep for sep in "|;," if any(sep in c for c in cells)), None)


def parse_tags(cell: str, sep: str | None) -> list[str]:
    """The distinct tags of a cell, in order ('a, b,a' -> ['a', 'b'] with sep ',')."""
    return list(dict.fromkeys(t.strip() for t in cell.split(sep) if t.strip()))


def _row_label(row: list[str], label_col: int | None, tags: _Tags | None) -> str:
    """A row's label: the cell, or with tags its tags sorted and joined by TAG_SEP ('' when there is none)."""
    if tags is None:
        return _cell(row, label_col)
    if tags.columns:
        names = [name for c, name in tags.columns if _cell(row, c) == "1"]
    else:
        names = [t.replace(TAG_SEP, "_") for t in parse_tags(_cell(row, label_col), tags.sep)]
    return TAG_SEP.join(sorted(set(names))) or (TAG_SEP if tags.keep_untagged else "")


def _table_reading(header: list[str], rows: list[list[str]], label_columns, table: Path, multi_label: bool,
                   untagged: bool = False) -> tuple[tuple[int, int | None, int | None], _Tags | None]:
    """(file, label and split columns; how tags are read, None for one label per row). 0/1 tag columns are read
    when there are two or more and no column is named as one label's (LABEL_COLUMNS) nor given by --label-columns;
    a column of tags is read as several tags per row when its header says tags (TAG_COLUMNS) and some row has
    several, or with multi_label."""
    keys = [_column_key(h) for h in header]
    if not label_columns and not any(k in LABEL_COLUMNS for k in keys):
        file_col = next((keys.index(w) for w in FILE_COLUMNS if w in keys), None)
        split_col = next((keys.index(w) for w in SPLIT_COLUMNS if w in keys), None)
        binary = binary_columns(header, rows, {file_col, split_col}) if file_col is not None else []
        if binary:
            if split_col is not None and not any(split_of(r[split_col]) for r in rows if len(r) > split_col):
                split_col = None
            return (file_col, None, split_col), _Tags(columns=tuple((c, header[c]) for c in binary),
                                                      keep_untagged=untagged)
    columns = _table_columns(header, rows, label_columns, table)
    cells = [_cell(r, columns[1]) for r in rows]
    sep = tag_separator(cells)
    several = any(len(parse_tags(c, sep)) > 1 for c in cells)
    if multi_label or (_column_key(header[columns[1]]) in TAG_COLUMNS and several):
        return columns, _Tags(sep=sep, keep_untagged=untagged)
    return columns, None


def from_table(table: Path, label_columns, split_dirs: dict[str, Path], others: list[Path], root: Path,
                base: Path, problems, rel, multi_label: bool = False, untagged: bool = False
                ) -> tuple[dict[str, list[tuple[str, str]]], str, bool]:
    """Labels (and splits) from the table's rows, for the files they name relative to the table's folder, DATA or
    the split folders, or by a name found once anywhere under DATA: (items per split, the 'columns ...' text that
    says which columns were read, whether rows carry several tags). The rows left out, and the images no row
    names, are named in `problems`."""
    header, rows = read_table(table)
    columns, tags = _table_reading(header, rows, label_columns, table, multi_label, untagged)
    resolve = _Resolver([table.parent, root, base, *split_dirs.values()], root)
    labels, named = _table_labels(rows, columns, resolve, split_dirs, problems, rel, tags)
    _report_unlabeled([*split_dirs.values(), *others], named, root, base, table, problems, rel)
    items: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for path, (split, label) in sorted(labels.items()):
        items[split].append((str(path), label))
    return items, _columns_text(header, columns, tags), tags is not None


def _table_columns(header: list[str], rows: list[list[str]], label_columns: list[str] | tuple[str, ...] | None,
                   table: Path) -> tuple[int, int, int | None]:
    """find_columns, less a split column where no value names a split (e.g. a k-fold column 0..4)."""
    file_col, label_col, split_col = find_columns(header, label_columns, table)
    if split_col is not None and not any(split_of(r[split_col]) for r in rows if len(r) > split_col):
        split_col = None
    return file_col, label_col, split_col


def _columns_text(header: list[str], columns: tuple[int, int | None, int | None], tags: _Tags | None) -> str:
    """'columns FILE -> LABEL', with how tags are read and ', split from column SPLIT' when there is one."""
    file_col, label_col, split_col = columns
    if tags is not None and tags.columns:
        text = f"columns {header[file_col]} -> {len(tags.columns)} tag columns of 0/1 ({header[tags.columns[0][0]]}" \
               f"{', ...' if len(tags.columns) > 1 else ''})"
    else:
        text = f"columns {header[file_col]} -> {header[label_col]}"
        if tags is not None:
            text += f" (several tags per image, separated by {repr(tags.sep) if tags.sep else 'spaces'})"
    if split_col is not None:
        text += f", split from column {header[split_col]}"
    return text


def _cell(row: list[str], col: int) -> str:
    """A cell of a table row, stripped; '' when the row is shorter."""
    return row[col].strip() if len(row) > col else ""


def _table_labels(rows: list[list[str]], columns: tuple[int, int | None, int | None], resolve: _Resolver,
                  split_dirs: dict[str, Path], problems: dict[str, list[str]], rel: Callable[[Path], str],
                  tags: _Tags | None = None) -> tuple[dict[Path, tuple[str, str]], set[Path]]:
    """({file: (split, label)} from the rows, every file a row names, used or not: not reported again as
    unlabelled). A file that rows give two different labels is left out and named with its labels."""
    folder_split = {abs_path(d): s for s, d in split_dirs.items()}
    labels: dict[Path, tuple[str, str]] = {}
    conflicts: dict[Path, set[str]] = {}
    named: set[Path] = set()
    for n, row in enumerate(rows, start=2):
        entry = _read_row(row, n, columns, resolve, folder_split, named, problems, tags)
        if entry is None:
            continue
        path, split, label = entry
        if path in labels and labels[path][1] != label:
            conflicts.setdefault(path, {labels[path][1]}).add(label)
        else:
            labels[path] = (split, label)
    for path, names in conflicts.items():
        del labels[path]
        problems[CONFLICT].append(f"{rel(path)} ({', '.join(sorted(names))})")
    return labels, named


def _read_row(row: list[str], n: int, columns: tuple[int, int | None, int | None], resolve: _Resolver,
              folder_split: dict[Path, str], named: set[Path], problems: dict[str, list[str]],
              tags: _Tags | None = None) -> tuple[Path, str, str] | None:
    """(file, split, label) of the row on line n of the table; None, with the row named under its problem, when
    it gives none. The split is the split column's, else that of the split folder holding the file, else train."""
    file_col, label_col, split_col = columns
    cell, label = _cell(row, file_col), _row_label(row, label_col, tags)
    if not cell:
        problems[NO_FILE].append(f"line {n}")
        return None
    path = _row_file(cell, n, resolve, named, problems)
    if path is None:
        return None
    if not label:
        problems[NO_LABEL if tags is None else NO_TAG].append(f"{cell} (line {n})")
        return None
    if split_col is None:
        return path, next((s for d, s in folder_split.items() if d in path.parents), "train"), label
    value = _cell(row, split_col)
    split = split_of(value)
    if split is None:
        problems[BAD_SPLIT].append(f"{cell} (line {n}: {value!r})")
        return None
    return path, split, label


def _row_file(cell: str, n: int, resolve: _Resolver, named: set[Path], problems: dict[str, list[str]]
              ) -> Path | None:
    """The image file (absolute) that a file cell on line n names; None, with the row named under its problem,
    when it names no file, several, or one that is not an image. Every file it names goes into `named`."""
    found = resolve(cell)
    named.update(abs_path(p) for p in found)
    if not found:
        problems[MISSING].append(f"{cell} (line {n})")
        return None
    if len(found) > 1:
        problems[SEVERAL].append(f"{cell} (line {n}: {', '.join(p.name for p in found)})")
        return None
    path = abs_path(found[0])
    if not is_image(path):
        problems[SKIPPED].append(f"{cell} (line {n})")
        return None
    return path


def _report_unlabeled(folders: list[Path], named: set[Path], root: Path, base: Path, table: Path,
                      problems: dict[str, list[str]], rel: Callable[[Path], str]) -> None:
    """Name the images under `folders` that no row names: each one in a folder beside a file that a row names,
    else the folder with its count; and the other files there, skipped for their extension (but the table and
    whatever sits directly in DATA)."""
    unlabeled = defaultdict(list)  # folder -> images there that the table does not name
    holders = {p.parent for p in named}
    for d in folders:
        images, non_images = walk_paths(d)
        problems[SKIPPED] += [rel(f) for f in non_images
                              if f.parent not in (root, base) and abs_path(f) != abs_path(table)]
        for f in images:
            if abs_path(f) not in named:
                unlabeled[f.parent].append(f)
    for folder, files in sorted(unlabeled.items()):
        if abs_path(folder) in holders:
            problems[UNLABELED] += [rel(f) for f in files]
        else:
            problems[UNLABELED_FOLDERS].append(f"{rel(folder)}/ ({images_text(len(files))})")
