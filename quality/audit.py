"""What is wrong with a dataset before training: counts, unreadable files and why, duplicates, leakage; the
report check_data.py and train.py --check-only print, and quarantine (moving files out, never deleting).

Usage (from check_data.py and train.py, which print the text):
    report = data_report(read_layout("Dataset"), max_bad_fraction=0.5, workers=2)   # a plain dict
    text = format_report(report)
    checked = check_data(cfg, quarantine_dir="bad_files")   # DataCheck: code (1: cannot train), text, report
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from config import TrainConfig
from core.common import FORMATS_BY_SUFFIX, IMAGE_EXTENSIONS, UserError
from core.plots import plot_gallery, save_figure
from loading.decode import decode_files, decode_image
from loading.files import walk_files
from loading.carve import split_tags
from loading.layout import EMPTY, Layout, layout_splits, read_layout
from loading.table import NO_TAG, SKIPPED
from loading.near_duplicates import DescriptorBlocks, find_near_copies

TINY_SIDE = 32  # below this many pixels on a side an image carries little for a 64 px model
MIN_TAG_TRAIN = 10  # a tag on fewer train images than this is too rare to learn well
MIN_TAG_VAL = 5  # a tag on fewer val images than this has an AP that is mostly noise
NEAR_LEAKS_PNG = "near_leaks.png"


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
    hidden: list[tuple[str, bool]] = []
    walk_files(str(split_dir), hidden)
    return sorted(Path(p) for p, is_dir in hidden if is_dir), sorted(Path(p) for p, is_dir in hidden if not is_dir)


def data_report(lay: Layout, max_bad_fraction: float = 0.5, workers: int = 0) -> dict:
    """Everything `python check_data.py` shows, as plain data (paths relative to DATA when inside it).

    Keys: layout (the 'layout:' line), problems {kind: [items]} (files the layout leaves out), counts {split:
    {class: readable images}} with carved val/test counted, unreadable [{path, reason}], modes and formats
    {name: n}, sizes {min, max, most_common}, tiny [{path, size}], mismatched [{path, format}] (content is not
    what the extension says), duplicates and leaks [[paths]] (identical bytes within one split / across splits),
    near_duplicates and near_leaks [[paths]] (near-copies within one split / across splits, near_copies),
    near_lookalike_images (too alike in thumbnails to judge), near_search (done, crowded or pair cap),
    near_pairs_examined, near_seconds, empty_classes, hidden_folders, hidden_files, ignored (files skipped for
    their extension), imbalance (largest / smallest train class, None when one is empty), fatal and warnings."""
    rel = _relative_to(lay.root)
    r = _layout_part(lay)
    entries = _image_entries(lay, r)
    r["hidden_folders"], r["hidden_files"] = _hidden_under(lay, rel)
    decoded = decode_files([p for _, _, p in entries], TINY_SIDE, 1, workers, desc="checking")
    seen = _read_images(r, entries, decoded, rel)
    r["modes"], r["formats"] = dict(seen.modes.most_common()), dict(seen.formats.most_common())
    r["sizes"] = _size_summary(seen.sizes)
    r["leaks"], r["duplicates"] = _exact_copies(seen.by_hash)
    r.update(near_copies(seen.near.tensor(), seen.readable))
    _judge(r, seen.files, seen.bad, max_bad_fraction)
    return r


def _relative_to(data_root: str | Path) -> Callable[[str | Path], str]:
    """How the report names a file: its path relative to DATA when inside it, else the path as given (a labels
    table may name files outside DATA)."""
    root = Path(data_root).resolve()  # the layout resolves it too: DATA given as ../x or through a link

    def rel(p: str | Path) -> str:
        try:
            return Path(p).absolute().relative_to(root).as_posix()
        except ValueError:
            return str(p)
    return rel


def _layout_part(lay: Layout) -> dict:
    """The report with what the layout alone says filled in, and every other key empty, in the order --json
    prints them."""
    return {"data": lay.root, "layout": lay.description, "problems": lay.problems, "classes": list(lay.classes),
            "carve": dict(lay.carve), "counts": {}, "unreadable": [], "modes": {}, "formats": {}, "sizes": {},
            "tiny": [], "mismatched": [], "duplicates": [], "leaks": [],
            "empty_classes": [f.rstrip("/") for f in lay.problems.get(EMPTY, [])], "hidden_folders": [],
            "hidden_files": [], "ignored": list(lay.problems.get(SKIPPED, [])), "imbalance": None, "fatal": [],
            "warnings": [], "multi_label": lay.multi_label, "tags": tag_report(lay) if lay.multi_label else None}


def tag_report(lay: Layout, pairs: int = 10) -> dict:
    """For images with several tags: images and tags per image, the tags too rare to learn (under
    MIN_TAG_TRAIN train images) or to measure (under MIN_TAG_VAL val images, carve applied), the `pairs` most
    frequent pairs of tags on one image, and the table rows with no tag."""
    splits = layout_splits(lay)
    sets = {s: [split_tags(c) for _, c in v] for s, v in splits.items()}
    every = [t for v in sets.values() for t in v]
    count = {s: Counter(t for ts in v for t in ts) for s, v in sets.items()}
    together = Counter(pair for ts in every for pair in itertools.combinations(sorted(ts), 2))
    return {"images": len(every), "tags_per_image": round(sum(map(len, every)) / max(1, len(every)), 2),
            "min_train": MIN_TAG_TRAIN, "min_val": MIN_TAG_VAL,
            "rare_to_learn": [t for t in lay.classes if count["train"][t] < MIN_TAG_TRAIN],
            "rare_to_measure": [t for t in lay.classes if count["val"][t] < MIN_TAG_VAL] if sets["val"] else [],
            "pairs": [[a, b, n] for (a, b), n in together.most_common(pairs)],
            "no_tag": len(lay.problems.get(NO_TAG, [])), "untagged_kept": sum(not ts for ts in every)}


def _image_entries(lay: Layout, r: dict) -> list[tuple[str, str, str]]:
    """(split, class, path) of every image file the layout reads; r['counts'] gets a zero per class for each
    split counted (train always, other splits when they hold files)."""
    entries = []
    for split, items in layout_splits(lay).items():
        if not items and split != "train":
            continue
        entries += [(split, c, p) for p, c in items]
        r["counts"][split] = {c: 0 for c in lay.classes}
    return entries


def _hidden_under(lay: Layout, rel: Callable[[str | Path], str]) -> tuple[list[str], list[str]]:
    """(hidden folders, hidden files) in the layout's split folders, which discovery skips."""
    hidden_folders, hidden_files = [], []
    for folder in sorted(set(lay.folder_paths.values())):
        folders, files = hidden_entries(Path(folder))
        hidden_folders += [rel(p) for p in folders]
        hidden_files += [rel(p) for p in files]
    return hidden_folders, hidden_files


@dataclasses.dataclass
class _Seen:
    """What reading the image files gathers for the later steps: files and unreadable files per split, readable
    files by content hash, near-copy descriptors with (split, path, sha1) of each, and header tallies."""
    files: Counter = dataclasses.field(default_factory=Counter)
    bad: Counter = dataclasses.field(default_factory=Counter)
    by_hash: defaultdict = dataclasses.field(default_factory=lambda: defaultdict(list))
    near: DescriptorBlocks = dataclasses.field(default_factory=DescriptorBlocks)
    readable: list = dataclasses.field(default_factory=list)
    modes: Counter = dataclasses.field(default_factory=Counter)
    formats: Counter = dataclasses.field(default_factory=Counter)
    sizes: Counter = dataclasses.field(default_factory=Counter)


def _read_images(r: dict, entries: list[tuple[str, str, str]], decoded: list, rel: Callable[[str | Path], str]
                 ) -> _Seen:
    """Tally each decoded file: unreadable ones with their reason into r['unreadable'], readable ones into
    r['counts'], hashed, described for the near-copy search, and their headers checked (_note_header)."""
    seen = _Seen()
    for (split, cls, path), (pixels, reason) in zip(entries, decoded):
        seen.files[split] += 1
        if reason:
            seen.bad[split] += 1
            r["unreadable"].append({"path": rel(path), "reason": reason})
            continue
        for c in (split_tags(cls) if r["multi_label"] else (cls,)):
            r["counts"][split][c] += 1
        sha1 = file_sha1(path)
        seen.by_hash[sha1].append((split, rel(path)))
        seen.near.add(pixels)
        seen.readable.append((split, rel(path), sha1))
        _note_header(r, seen, path, rel(path))
    return seen


def _note_header(r: dict, seen: _Seen, path: str | Path, name: str) -> None:
    """Count a readable file's mode, format and size from its header, and list it in r['tiny'] when a side is
    under TINY_SIDE and in r['mismatched'] when its content is not the format its extension names."""
    header = image_header(path)
    if header is None:
        return
    fmt, mode, size = header
    seen.modes[mode] += 1
    seen.formats[fmt] += 1
    seen.sizes[size] += 1
    if min(size) < TINY_SIDE:
        r["tiny"].append({"path": name, "size": list(size)})
    expected = FORMATS_BY_SUFFIX.get(Path(path).suffix.lower())
    if expected and fmt != expected:
        r["mismatched"].append({"path": name, "format": fmt})


def _size_summary(sizes: Counter) -> dict:
    """{min, max, most_common} of the (width, height) tally, min and max by area; {} when nothing was read."""
    if not sizes:
        return {}
    by_area = sorted(sizes, key=lambda s: (s[0] * s[1], s))
    return {"min": list(by_area[0]), "max": list(by_area[-1]),
            "most_common": [[w, h, n] for (w, h), n in sizes.most_common(5)]}


def _exact_copies(by_hash: dict[str, list[tuple[str, str]]]) -> tuple[list[list[str]], list[list[str]]]:
    """(leaks, duplicates): the paths of byte-identical files, groups spanning splits / within one split."""
    leaks, duplicates = [], []
    for group in by_hash.values():
        if len(group) > 1:
            splits = {s for s, _ in group}
            (leaks if len(splits) > 1 else duplicates).append([p for _, p in group])
    return leaks, duplicates


def near_copies(desc: torch.Tensor, readable: list[tuple[str, str, str]]) -> dict:
    """near_leaks and near_duplicates: groups of paths that are the same photo resized, re-encoded, cropped a
    little, mirrored or recolored (loading/near_duplicates.py), across splits / within one, from the descriptors of the
    readable files; groups of byte-identical files only are left to leaks and duplicates; how the search ended
    and its work; near_seconds: its time."""
    t0 = time.time()
    found = find_near_copies(desc)
    # pairs of byte-identical files are reported already, as duplicates or leaks
    other_bytes = np.array([readable[i][2] != readable[j][2] for i, j in found.pairs.tolist()], bool)
    found = dataclasses.replace(found, pairs=found.pairs[other_bytes], sims=found.sims[other_bytes])
    groups, lookalike = found.groups()
    out: dict = {"near_leaks": [], "near_duplicates": [], "near_lookalike_images": lookalike,
                 "near_search": found.end.value, "near_pairs_examined": found.examined, "near_seconds": 0.0}
    for group in groups:
        splits = {readable[i][0] for i in group}
        out["near_leaks" if len(splits) > 1 else "near_duplicates"].append([readable[i][1] for i in group])
    out["near_seconds"] = round(time.time() - t0, 1)
    return out


def _judge(r: dict, files: dict, bad: dict, max_bad_fraction: float) -> None:
    """Fill r['fatal'] (training would stop or be meaningless) and r['warnings'], and the imbalance."""
    classes, counts = r["classes"], r["counts"]
    if len(classes) < 2:
        r["fatal"].append(f"train has {len(classes)} class(es) ({', '.join(classes) or 'none'}); "
                          "a classifier needs at least 2")
    for split in ("train", "val"):
        if split not in counts:
            continue
        no_images = [c for c in classes if counts[split].get(c, 0) == 0]
        if no_images and r["multi_label"] and split == "val":  # that tag's AP cannot be measured; training goes on
            r["warnings"].append(f"val has no readable image for tag(s): {', '.join(no_images)}")
        elif no_images:
            r["fatal"].append(f"{split} has no readable image for class(es): {', '.join(no_images)}")
    for split, n in files.items():
        if n and bad[split] / n > max_bad_fraction:
            message = f"{bad[split]} of {n} image files in {split} cannot be read"
            (r["fatal"] if split != "test" else r["warnings"]).append(message)
    train_counts = [counts["train"][c] for c in classes]
    if r["multi_label"]:
        _judge_tags(r)
    elif len(classes) >= 2 and min(train_counts) > 0:
        r["imbalance"] = round(max(train_counts) / min(train_counts), 2)
        if r["imbalance"] >= 1.5:
            r["warnings"].append(f"classes are imbalanced ({r['imbalance']}x); consider --class-weights auto")
    if "val" not in counts:
        r["warnings"].append("no val split and --val-fraction 0: train.py needs a val folder, a split column "
                             "or --val-fraction above 0")
    elif "val" in r["carve"]:
        r["warnings"].append(f"no val split: train.py holds out --val-fraction {r['carve']['val']:g} of train "
                             "instead (stratified)")
    if r["leaks"]:
        r["warnings"].append(f"{len(r['leaks'])} file(s) appear in more than one split (leakage inflates val/test "
                             "accuracy): remove the copies")
    if r["duplicates"]:
        r["warnings"].append(f"{len(r['duplicates'])} group(s) of identical files within a split")
    if r["near_leaks"]:
        r["warnings"].append(f"{len(r['near_leaks'])} group(s) of near-copies (the same photo resized, re-encoded, "
                             "cropped, mirrored or recolored) span splits: leakage that inflates val/test accuracy")
    if r["unreadable"]:
        r["warnings"].append(f"{len(r['unreadable'])} unreadable file(s) will be skipped "
                             "(move them away with --quarantine DIR)")


def _judge_tags(r: dict) -> None:
    """The warnings of a multi-label report: tags too rare to learn or to measure, rows with no tag."""
    t = r["tags"]
    if t["rare_to_learn"]:
        r["warnings"].append(f"tag(s) on fewer than {t['min_train']} train images, too rare to learn well: "
                             f"{', '.join(t['rare_to_learn'])}")
    if t["rare_to_measure"]:
        r["warnings"].append(f"tag(s) on fewer than {t['min_val']} val images, too rare to measure (their AP is "
                             f"noise): {', '.join(t['rare_to_measure'])}")
    if t["no_tag"]:
        r["warnings"].append(f"{t['no_tag']} table row(s) give no tag: left out (--untagged keeps them as images "
                             "with none of the tags)")


def format_tags(t: dict) -> list[str]:
    """The report lines on tags: how many per image, and the most frequent pairs."""
    lines = [f"tags: {t['images']} images, {t['tags_per_image']} tags per image on average (the counts above are "
             "images per tag)" + (f"; {t['untagged_kept']} with no tag, kept" if t["untagged_kept"] else "")]
    if t["pairs"]:
        lines.append("tags seen together most: " + ", ".join(f"{a}+{b} {n}" for a, b, n in t["pairs"]))
    return lines


def format_report(r: dict, limit: int = 20) -> str:
    """The report as text for a terminal; long lists are cut at `limit` lines (--json has everything)."""
    lines = [r["layout"], f"data: {r['data']}"]
    splits = list(r["counts"])
    names = sorted(set(r["classes"]).union(*(r["counts"][s] for s in splits)))
    width = max([len(n) for n in names] + [5])
    lines.append(f"  {'class':<{width}}" + "".join(f"{s:>8}" for s in splits))
    for name in names:
        lines.append(f"  {name:<{width}}" + "".join(f"{r['counts'][s].get(name, '-'):>8}" for s in splits))
    total = "tag total" if r.get("multi_label") else "total"  # an image with 3 tags counts 3 times
    lines.append(f"  {total:<{width}}" + "".join(f"{sum(r['counts'][s].values()):>8}" for s in splits))
    if r["imbalance"] is not None:
        lines.append(f"class imbalance in train (largest / smallest): {r['imbalance']}x")
    if r.get("tags"):
        lines += format_tags(r["tags"])
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

    section("layout problems (files left out)", [f"{len(v)} {k}: " + ", ".join(v[:10])
                                                 + (f", ... ({len(v) - 10} more)" if len(v) > 10 else "")
                                                 for k, v in r["problems"].items()])
    section("unreadable files, skipped by training", [f"{u['path']}: {u['reason']}" for u in r["unreadable"]])
    section(f"tiny images (a side under {TINY_SIDE} px)", [f"{t['path']} ({t['size'][0]}x{t['size'][1]})"
                                                           for t in r["tiny"]])
    section("content differs from the extension (read by content, fine)",
            [f"{m['path']}: {m['format']}" for m in r["mismatched"]])
    section("identical files in more than one split (leakage)", [" = ".join(g) for g in r["leaks"]])
    section("identical files within a split", [" = ".join(g) for g in r["duplicates"]])
    section("near-copies in more than one split (leakage)" + (f", pictured in {r['near_leaks_gallery']}"
                                                              if r.get("near_leaks_gallery") else ""),
            [" ~ ".join(g) for g in r["near_leaks"]])
    if r["near_duplicates"]:
        lines.append(f"near-copies within a split: {len(r['near_duplicates'])} group(s) of "
                     f"{sum(map(len, r['near_duplicates']))} images (see --json)")
    if r["near_lookalike_images"]:
        lines.append(f"near-copies not judged: {r['near_lookalike_images']} images look alike in small thumbnails "
                     "(one shape on a plain ground?), too many to be copies of one photo")
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


def quarantine(data_dir: str | Path, rel_paths: list[str], dest: str | Path,
               split_folders: list[str] = ()) -> list[tuple[str, str]]:
    """Move files (paths relative to data_dir, or absolute) under dest with the same relative paths (absolute
    ones by name); never overwrites. None of `split_folders` (absolute) may hold dest."""
    root, dest = Path(data_dir).resolve(), Path(dest).resolve()
    if any(dest.is_relative_to(Path(s).resolve()) for s in split_folders):
        raise UserError(f"--quarantine {dest} is inside the data's split folders; pick a folder outside them")
    missing = [p for p in rel_paths if not (root / p).is_file()]
    if missing:  # checked before anything moves: a stale list moves nothing
        raise UserError(f"{len(missing)} file(s) to quarantine are not under {root}: {', '.join(missing[:5])}")
    moved = []
    for rel_path in rel_paths:
        src = root / rel_path
        rel_path = Path(rel_path).name if Path(rel_path).is_absolute() else rel_path
        dst = dest / rel_path
        n = 1
        while dst.exists():  # a file quarantined by an earlier check keeps its place
            dst = dest / Path(rel_path).with_name(f"{Path(rel_path).stem}.{n}{Path(rel_path).suffix}")
            n += 1
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)
        moved.append((str(src), str(dst)))
    return moved


def near_leak_gallery(root: str | Path, groups: list[list[str]], path: Path, limit: int = 8) -> Path:
    """A PNG of the first `limit` cross-split groups of near-copies, two images of each side by side."""
    shown = groups[:limit]
    images = [torch.from_numpy(decode_image(Path(root) / p, 96, 3)) for g in shown for p in g[:2]]  # absolute p: p
    captions = [p if len(p) < 30 else "..." + p[-27:] for g in shown for p in g[:2]]
    return save_figure(plot_gallery(torch.stack(images) if images else torch.zeros(0, 3, 8, 8, dtype=torch.uint8),
                                    captions, columns=4), path)


@dataclasses.dataclass
class DataCheck:
    """The outcome of check_data: code, the exit code (1 when training on the data would fail, else 0); text,
    what the script prints (the report for a terminal, or its JSON); report, data_report's dict with the
    sections, near_leaks_gallery and quarantined added, or only {data, fatal} when DATA cannot be read as a
    dataset at all."""
    code: int
    text: str
    report: dict


def check_data(cfg: TrainConfig, quarantine_dir: str = "", as_json: bool = False, listed: list[str] | None = None,
               sections: dict | None = None, sections_text: str = "", out_dir: str = "") -> DataCheck:
    """The report of cfg.data read with cfg's label source and carve, and quarantine when asked: the unreadable
    files, or the files `listed` (paths relative to DATA, e.g. label_errors.csv's). `sections` (e.g.
    {"label_errors": ...}) join the JSON and `sections_text` the text before the verdict. A folder the layout
    cannot read is a fatal finding, reported as text even for JSON; no folder at all raises UserError."""
    try:
        lay = read_layout(cfg.data, **cfg.layout_settings(need=None))
    except UserError as e:
        if not Path(cfg.data).is_dir():
            raise
        return DataCheck(1, f"data: {cfg.data}\nFATAL: {e}\nverdict: cannot train on this data",
                         {"data": cfg.data, "fatal": [str(e)]})
    report = data_report(lay, cfg.max_bad_fraction, cfg.workers)
    report.update(sections or {})
    if out_dir and report["near_leaks"]:
        report["near_leaks_gallery"] = str(near_leak_gallery(lay.root, report["near_leaks"],
                                                             Path(out_dir) / NEAR_LEAKS_PNG))
    to_move = listed if listed is not None else [u["path"] for u in report["unreadable"]]
    if quarantine_dir and to_move:
        report["quarantined"] = quarantine(lay.root, to_move, quarantine_dir, list(lay.folder_paths.values()))
    text = json.dumps(report, indent=2) if as_json else _with_sections(format_report(report), sections_text)
    return DataCheck(1 if report["fatal"] else 0, text, report)


def _with_sections(text: str, sections_text: str) -> str:
    """format_report's text with sections_text put in before its last line, the verdict."""
    if not sections_text:
        return text
    head, verdict = text.rsplit("\n", 1)
    return f"{head}\n{sections_text}\n{verdict}"
