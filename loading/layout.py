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

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from core.common import IMAGE_EXTENSIONS, SPLIT_ALIASES, SPLITS, UserError
from loading.carve import carve, narrow_tags, split_tags
from loading.files import abs_path, files_in, is_image, subdirs, walk_files, walk_paths
from loading.table import SKIPPED, from_table, images_text, split_of

# The name before a trailing separator and number: cat.123 -> cat, great_pyrenees_158 -> great_pyrenees, Cat1 -> Cat.
DEFAULT_NAME_RULE = re.compile(r"^(.*[^\d\s._-])[\s._-]*\d+$")

# Problem kinds, each a plural phrase that reads after a count: "3 class folders with no images: ...". Those of a
# labels table, and SKIPPED, are in loading/table.py.
LOOSE = "images outside the class folders"
UNPARSABLE = "file names the rule cannot parse"
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


# ---------------------------------------------------------------- labels from folders and names (a table: table.py)

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
        problems[NOT_READ] += [f"{rel(d)}/ ({images_text(n)})" for d in others if (n := len(walk_paths(d)[0]))]
    single = not split_dirs
    if single:
        split_dirs = {"train": base}
    columns, tagged = "", False
    if source == "table":
        items, columns, tagged = from_table(table, label_columns, split_dirs, others, root, base, problems, rel,
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
        problems[NOT_IN_TRAIN] += [f"{s}: {c} ({images_text(n)})" for c, n in sorted(lacking.items())]
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
