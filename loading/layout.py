"""Read a dataset as it was downloaded: which image files there are, their labels, and their splits.

Usage (from other scripts):
    lay = read_layout("Dataset")                                    # class folders, with or without split folders
    lay = read_layout("dog-breed", labels_file="dog-breed/labels.csv")   # labels in a CSV or TSV table
    lay = read_layout("dogs-vs-cats", labels_from_name=True)        # cat.0.jpg -> cat
    lay = read_layout("pets", name_pattern=r"^(.+)_\\d+\\.jpg$")      # one group = the label
    lay = read_layout(cfg.data, **cfg.layout_settings())            # the same, from a TrainConfig
    lay.description, format_problems(lay)                           # the 'layout: ...' line; what was left out
    splits = layout_splits(lay)                                     # {"train", "val", "test"}: the carve applied

Recognised (split folder names are case-insensitive; '-' and ' ' read as '_'):
    DATA/<class>/*                              no split folders: val (and test) carved from it, stratified
    DATA/<split>/<class>/*                      train|training|training_set|train_set|trn,
                                                val|valid|validation|val_set|dev, test|testing|test_set|eval
    DATA/training_set/training_set/<class>/*    a repeated level, as zips unpack
    DATA/dataset/training_set/<class>/*         single wrapper folders
    --data catdog/train                         one split folder of classes
    DATA/train/<id>.jpg + --labels labels.csv   labels (and optionally splits) in a table
    DATA/train/cat.0.jpg + --labels-from-name   labels in file names (or --name-pattern REGEX)
Nothing is dropped silently: every file or row left out is named under a kind in Layout.problems.
"""
from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from core.common import IMAGE_EXTENSIONS, SPLIT_ALIASES, SPLITS, UserError, is_hidden
from loading.carve import TAG_SEP, carve, narrow_tags, split_tags
from loading.files import abs_path, files_in, is_image, subdirs, walk_files, walk_paths

# Header names that hold the file and the label, in order of preference (compared as lower_snake_case).
FILE_COLUMNS = ("file", "filename", "file_name", "filepath", "file_path", "path", "image", "image_path",
                "image_name", "image_id", "img", "id")
LABEL_COLUMNS = ("label", "class", "class_name", "category", "breed", "target", "species")
# Header names of a column that holds several tags per row (several labels per image).
TAG_COLUMNS = ("tags", "tag", "labels", "genres", "genre", "attributes", "categories", "keywords", "findings",
               "finding_labels")
SPLIT_COLUMNS = ("split", "fold", "subset")
# The name before a trailing separator and number: cat.123 -> cat, great_pyrenees_158 -> great_pyrenees, Cat1 -> Cat.
DEFAULT_NAME_RULE = re.compile(r"^(.*[^\d\s._-])[\s._-]*\d+$")

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
LOOSE = "images outside the class folders"
UNPARSABLE = "file names the rule cannot parse"
SKIPPED = "files skipped for their extension"
NOT_READ = "folders that are not split folders"
EMPTY = "class folders with no images"
NOT_IN_TRAIN = "val/test classes that train lacks"
SINGLE = "classes with a single image"


@dataclass
class Layout:
    classes: list[str]                            # sorted class names (may contain spaces)
    items: dict[str, list[tuple[str, str]]]       # split -> [(absolute file path, class name)], stable order
    carve: dict[str, float]                       # splits still to carve from train, e.g. {"val": 0.2}
    problems: dict[str, list[str]]                # kind -> offending items (paths relative to root)
    description: str                              # the one "layout: ..." line
    root: str = ""                                # the DATA folder as given
    seed: int = 0                                 # seed of the carve
    source: str = "folders"                       # where the labels come from: folders, names or table
    folders: dict[str, str] = field(default_factory=dict)  # split -> the folder it was read from, as shown
    folder_paths: dict[str, str] = field(default_factory=dict)  # split -> that folder's absolute path
    multi_label: bool = False                     # several tags per image: classes are the tags, and each item's
    # label is its tags joined by loading.carve.TAG_SEP


# ---------------------------------------------------------------- names

def split_of(name: str) -> str | None:
    """'train', 'val' or 'test' when a folder or table value names a split (Training_Set -> train), else None."""
    key = re.sub(r"[\s-]+", "_", name.strip().lower())
    return next((s for s, aliases in SPLIT_ALIASES.items() if key in aliases), None)


def _column_key(name: str) -> str:
    return re.sub(r"[\s-]+", "_", name.strip().lower())


def name_rule(pattern: str | None = None):
    """A function file name -> label or None: the default rule, or `pattern` searched in the file name
    (e.g. 'cat.12.jpg') whose one group (or group named 'label') is the label."""
    if not pattern:
        return lambda filename: _match_label(DEFAULT_NAME_RULE.match(Path(filename).stem))
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise UserError(f"--name-pattern {pattern!r} is not a valid regular expression: {e}") from None
    if "label" not in regex.groupindex and regex.groups != 1:
        raise UserError(f"--name-pattern {pattern!r} has {regex.groups} groups; it needs one group (or one named "
                        r"'label') for the label, e.g. '^(.+)_\d+\.jpg$'")
    group = "label" if "label" in regex.groupindex else 1
    return lambda filename: _match_label(regex.search(filename), group)


def _match_label(m: re.Match | None, group: int | str = 1) -> str | None:
    label = (m.group(group) or "").strip() if m else ""
    return label or None


# ---------------------------------------------------------------- folders

def _unwrap(root: Path) -> Path:
    """Descend single wrapper folders (DATA/dataset/...) that hold no images of their own."""
    d = root
    while True:
        dirs = subdirs(d)
        if len(dirs) != 1 or split_of(dirs[0].name) or any(is_image(f) for f in files_in(d)) \
                or any(is_image(f) for f in files_in(dirs[0])):
            return d
        d = dirs[0]


def _collapse(split_dir: Path) -> Path:
    """training_set/training_set/ -> the inner folder: a split folder whose only content is one of its kind."""
    d = split_dir
    while True:
        dirs = subdirs(d)
        if len(dirs) != 1 or split_of(dirs[0].name) != split_of(split_dir.name) \
                or any(is_image(f) for f in files_in(d)):
            return d
        d = dirs[0]


def _images(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")


def _has_images(d: Path) -> bool:
    return any(is_image(f) for f in files_in(d))


def _find_split_dirs(base: Path, by_folder: bool) -> tuple[dict[str, Path], list[Path]]:
    """({split: folder}, other folders next to them); {} when base holds no split folders."""
    named, others = defaultdict(list), []
    for d in subdirs(base):
        s = split_of(d.name)
        (named[s] if s else others).append(d)
    if not named:
        return {}, []
    if by_folder and any(_has_images(d) for d in others) and \
            all(_has_images(d) and not subdirs(d) for ds in named.values() for d in ds):
        return {}, []  # class folders, one of them named like a split (e.g. the class 'train' among vehicles)
    for s, ds in named.items():
        if len(ds) > 1:
            raise UserError(f"ambiguous layout in {base}: {' and '.join(d.name + '/' for d in ds)} both look like "
                            f"the {s} split; point --data at the one to use, or move the other out of {base}")
    return {s: _collapse(named[s][0]) for s in SPLITS if s in named}, others


# ---------------------------------------------------------------- labels from folders, names, a table

def _from_folders(split_dirs: dict[str, Path], problems, rel) -> dict[str, list[tuple[str, str]]]:
    items: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    flat = []  # (split folder, its images) without any class folder
    for s, d in split_dirs.items():
        class_dirs = subdirs(d)
        loose = [f for f in files_in(d) if is_image(f)]
        if loose and not class_dirs:
            flat.append((d, loose))
            continue
        problems[LOOSE] += [rel(f) for f in loose]
        for c in class_dirs:
            images, others = walk_files(str(abs_path(c)))  # absolute already: no Path per file
            problems[SKIPPED] += [rel(f) for f in others]
            if not images:
                problems[EMPTY].append(rel(c) + "/")
            items[s] += [(f, c.name) for f in images]
    if flat and not any(items.values()):
        d, loose = flat[0]
        tables = sorted({t for t in files_in(Path(rel.root)) + files_in(d) if t.suffix.lower() in (".csv", ".tsv")})
        table_hint = f"--labels {tables[0]}" if tables else "--labels FILE.csv"
        raise UserError(f"{d} holds {len(loose)} images and no class folders, so nothing says their labels: if the "
                        f"label is in the file name (as in {loose[0].name}), add --labels-from-name (or --name-pattern "
                        f"REGEX); if it is in a table, add {table_hint}; or put each class in its own folder "
                        f"({d.name}/cat/, {d.name}/dog/)")
    for d, loose in flat:
        problems[LOOSE] += [rel(f) for f in loose]
    return items


def _from_names(split_dirs: dict[str, Path], rule, tops: set[Path], problems, rel) -> dict[str, list[tuple[str, str]]]:
    items: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for s, d in split_dirs.items():
        images, others = walk_files(str(abs_path(d)))  # absolute already: no Path per file
        top_dirs = {str(abs_path(t)) for t in tops}
        problems[SKIPPED] += [rel(f) for f in others if os.path.dirname(f) not in top_dirs]  # DATA/labels.csv
        for f in images:
            label = rule(os.path.basename(f))
            if label is None:
                problems[UNPARSABLE].append(rel(f))
            else:
                items[s].append((f, label))
    return items


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


def _from_table(table: Path, label_columns, split_dirs: dict[str, Path], others: list[Path], root: Path,
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
                  split_dirs: dict[str, Path], problems: dict[str, list[str]], rel: _relative_to,
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
                      problems: dict[str, list[str]], rel: _relative_to) -> None:
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
            problems[UNLABELED_FOLDERS].append(f"{rel(folder)}/ ({_images(len(files))})")


# ---------------------------------------------------------------- the layout

def _checked_settings(root: Path, labels_file: str | Path | None, by_name: bool, val_fraction: float,
                      test_fraction: float, multi_label: bool) -> Path | None:
    """The labels table (None without one), once the settings are known to fit together and the folders exist;
    else the UserError that says what to change."""
    if not root.is_dir():
        raise UserError(f"no dataset folder at {root}: expected DATA/<class>/<images> or DATA/train/<class>/<images>"
                        f" (see the README's 'Your data')")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"--val-fraction {val_fraction:g} and --test-fraction {test_fraction:g} must each lie in "
                        f"[0, 1) and leave some of train: their sum must be below 1")
    if labels_file and by_name:
        raise UserError("give the labels one way: --labels FILE or --labels-from-name/--name-pattern, not both")
    table = Path(labels_file) if labels_file else None
    if table is not None and not table.is_file():
        raise UserError(f"no labels table at {table}")
    if multi_label and table is None:
        raise UserError("--multi-label reads several tags per image from a labels table: give it with --labels FILE")
    return table


def read_layout(data: str | Path, *, labels_file: str | Path | None = None, label_columns: list[str] | None = None,
                labels_from_name: bool = False, name_pattern: str | None = None, val_fraction: float = 0.2,
                test_fraction: float = 0.0, seed: int = 0, classes: list[str] | None = None,
                need: str | None = "train", multi_label: bool = False, untagged: bool = False) -> Layout:
    """What DATA holds: class names, files per split, what is still to carve from train, and the problems.

    Labels come from class folders (the default), from a table (labels_file, columns by header name or
    label_columns), or from file names (labels_from_name / name_pattern). A table may give several tags per
    image (a column of tags, or one 0/1 column per tag; multi_label reads the label column as tags): the
    classes are then the tags, and the carve spreads every tag; a row with no tag is left out and counted, or with
    `untagged` kept as an image with none of them. `need` is the split the caller
    reads ('train' for training); a UserError says what to change when it would have no images, or when
    there are fewer than 2 classes.
    """
    root = Path(data)
    table = _checked_settings(root, labels_file, labels_from_name or bool(name_pattern), val_fraction,
                              test_fraction, multi_label)
    source = "table" if table else "names" if (labels_from_name or name_pattern) else "folders"
    rule = name_rule(name_pattern) if source == "names" else None

    problems: dict[str, list[str]] = defaultdict(list)
    rel = _relative_to(root)
    base = _unwrap(root)
    split_dirs, others = _find_split_dirs(base, source == "folders")
    if source != "table":  # a table may name files anywhere; its unlabelled images are reported instead
        problems[NOT_READ] += [f"{rel(d)}/ ({_images(n)})" for d in others if (n := len(walk_paths(d)[0]))]
    single = not split_dirs
    if single:
        split_dirs = {"train": base}
    columns, tagged = "", False
    if source == "table":
        items, columns, tagged = _from_table(table, label_columns, split_dirs, others, root, base, problems, rel,
                                             multi_label, untagged)
    elif source == "names":
        items = _from_names(split_dirs, rule, {root, base}, problems, rel)
    else:
        items = _from_folders(split_dirs, problems, rel)

    names = _choose_classes(items, classes, problems, tagged)
    carve = {}
    if items["train"]:
        if not items["val"] and val_fraction > 0:
            carve["val"] = val_fraction
        if not items["test"] and test_fraction > 0:
            carve["test"] = test_fraction
    lay = Layout(classes=names, items=items, carve=carve, problems={k: v for k, v in problems.items() if v},
                 description="", root=str(root), seed=seed, source=source,
                 folders={s: rel(d) for s, d in split_dirs.items()},
                 folder_paths={s: str(abs_path(d)) for s, d in split_dirs.items()}, multi_label=tagged)
    lay.description = describe(lay, single, table, columns, name_pattern)
    _check_usable(lay, need, table, columns, rule is not None, rel(base))
    return lay


class _relative_to:
    """Paths as the user would type them: relative to DATA when inside it."""

    def __init__(self, root: Path):
        self.root = str(root)
        self.absolute = abs_path(root)

    def __call__(self, p: Path) -> str:
        try:
            r = abs_path(p).relative_to(self.absolute).as_posix()
            return r if r != "." else self.absolute.name
        except ValueError:
            return str(p)


def _choose_classes(items: dict[str, list[tuple[str, str]]], wanted: list[str] | None, problems,
                    tagged: bool = False) -> list[str]:
    """Sorted class names of train (of every split when there is no train), narrowed to `wanted`; items of
    other classes are removed, and val/test images of a class train lacks, and classes on a single image, are
    reported. With `tagged` (several tags per image) the classes are the tags: other tags are dropped from every
    image, and an image left with none of its tags is dropped (carve.narrow_tags)."""
    def labels_of(c: str) -> set[str]:
        return split_tags(c) if tagged else {c}

    def narrowed(c: str, keep: set[str]) -> str:
        return narrow_tags(c, keep) if tagged else c if c in keep else ""

    every = {s: [labels_of(c) for _, c in v] for s, v in items.items()}
    found = sorted(set().union(*(every["train"] if items["train"] else [ls for v in every.values() for ls in v])))
    known = set(found)
    for s in ("val", "test"):
        lacking = defaultdict(int)
        for c in (c for ls in every[s] for c in ls if c not in known):
            lacking[c] += 1
        problems[NOT_IN_TRAIN] += [f"{s}: {c} ({_images(n)})" for c, n in sorted(lacking.items())]
    names = found
    if wanted:
        missing = [c for c in wanted if c not in known]
        if missing:
            raise UserError(f"--classes {' '.join(missing)} not found in the data (it has: {', '.join(found)})")
        names = sorted(set(wanted))
    keep = set(names)
    totals = defaultdict(int)
    for s in SPLITS:
        items[s] = [(p, n) for p, c in items[s] if (n := narrowed(c, keep))]
        for c in (c for _, label in items[s] for c in labels_of(label)):
            totals[c] += 1
    problems[SINGLE] += [c for c in names if totals[c] == 1]
    return names


def describe(lay: Layout, single: bool, table: Path | None, columns: str, name_pattern: str | None) -> str:
    """The one 'layout: ...' line that says what was understood."""
    if single:
        where = f"{lay.folders['train']}/ (no split folders)"
    else:
        parts = [f"{lay.folders[s]}/ ({s})" for s in SPLITS if s in lay.folders and lay.items[s]] or \
                [f"{lay.folders[s]}/ ({s})" for s in SPLITS if s in lay.folders]
        where = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if lay.source == "table":
        text = f"labels from {table.name} ({columns}) for the files in {where}"
    elif lay.source == "names":
        rule = f"pattern {name_pattern!r}" if name_pattern else "the name before its number"
        text = f"labels from file names ({rule}) in {where}"
    else:
        text = f"classes from folders in {where}"
    if lay.carve:
        shares = " and ".join(f"{s} = {f:.0%}" for s, f in lay.carve.items())
        how = "every tag spread by iterative stratification" if lay.multi_label else "stratified"
        text += f"; {shares} of train ({how}, seed {lay.seed})"
    return f"layout: {text}"


def _check_usable(lay: Layout, need: str | None, table: Path | None, columns: str, by_name: bool, where: str) -> None:
    """Stop only when training cannot go on: no images, or fewer than 2 classes; say which rule or column to use."""
    if not any(lay.items.values()):
        hint = {"table": f"no row of {table} names a file found under {lay.root} (tried relative to the table's "
                         "folder, DATA and the split folders, with and without the extension)",
                "names": "no file name gave a label; give --name-pattern REGEX with one group for the label",
                "folders": f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in class folders under {lay.root}"}
        raise UserError(f"no labelled images: {hint[lay.source]}" + _first_problems(lay))
    if len(lay.classes) < 2:
        found = f"{len(lay.classes)} class ({', '.join(lay.classes)})"
        hint = {"table": f"check the label column ({columns}), or choose it with --label-columns FILE_COL LABEL_COL",
                "names": "give --name-pattern REGEX whose one group is the label (e.g. '^([a-z]+)[._]')",
                "folders": f"put each class in its own folder under {where}/ (cat/, dog/), or take the labels from "
                           "a table (--labels FILE) or the file names (--labels-from-name)"}
        raise UserError(f"found {found}; a classifier needs at least 2: {hint[lay.source]}" + _first_problems(lay))
    if need and not lay.items.get(need) and need not in lay.carve:
        there = ", ".join(f"{f}/ ({s})" for s, f in lay.folders.items()) or "none"
        aliases = "|".join(SPLIT_ALIASES[need])
        carved = f", or one carved from train (train.py --{need}-fraction 0.1)" if need in ("val", "test") else ""
        raise UserError(f"no {need} images in {lay.root}: found {there}; a {need} split is a folder named "
                        f"{aliases}, or a split column in --labels{carved}")


def _first_problems(lay: Layout) -> str:
    text = format_problems(lay, limit=3)
    return f" ({text.replace(chr(10), '; ')})" if text else ""


def format_problems(lay: Layout, limit: int = 10) -> str:
    """One line per kind of problem: the count and the first `limit` items; '' when there are none."""
    lines = []
    for kind, entries in lay.problems.items():
        shown = ", ".join(entries[:limit]) + (f", ... ({len(entries) - limit} more)" if len(entries) > limit else "")
        lines.append(f"{len(entries)} {kind}: {shown}")
    return "\n".join(lines)


# ---------------------------------------------------------------- carving val/test from train

def layout_splits(lay: Layout) -> dict[str, list[tuple[str, str]]]:
    """Every split's (path, class) items with lay.carve applied to train, by lay.seed."""
    out = {s: list(v) for s, v in lay.items.items()}
    if lay.carve:
        out.update(carve(lay.items["train"], lay.carve, lay.seed, tags=lay.multi_label))
    return out
