"""Benchmark our training against the plain pipeline, on the same data and machine, in one run.

Usage:
    python -m benchmarks.bench --data PATH/TO/DATA                               # ours (fit into 10 min), then the baseline
    python -m benchmarks.bench --data DATA --time-budget 150 --baseline-seconds 300
    python -m benchmarks.bench --data DATA --skip-baseline --epochs 12 -- --width 32 --lr 3e-3   # train.py flags after --
    python -m benchmarks.bench scale --images 100000                             # memory and speed of the cache at scale
    python -m benchmarks.bench scale --images 100000 --size 128 --channels 3 --work-dir /tmp/bench_data
    python -m benchmarks.bench scale --data ../shared/data/catdog --repeats 2    # map vs in-RAM speed on real data
    python -m benchmarks.bench near-copies --data PATH/TO/DATA --copies 500 --scale 100000   # near-copy recall, precision, time
    python -m benchmarks.bench label-errors --data PATH/TO/DATA --flip 0.05      # label-error precision and recall

Prints one JSON object: train images/s for each, our decode time (cold cache), seconds to reach 80/85/90% val
accuracy for each (null if never; wall time since training started, evaluation included), best val accuracy,
the share of our epochs' time spent on data after the first epoch, and the ratios.
The baseline is baseline.py in this folder (ImageFolder + PIL transforms every epoch, torchvision ResNet-18,
Adam), run after ours in a process of its own, on the same device (--device); bench.py runs train.py,
baseline.py and split_dataset.py as programs and imports none of them. DATA may be any layout train.py reads
(train.py flags such as --labels go after --); the baseline needs DATA/train and DATA/val folders, so other
layouts are first written as hard links to a temporary train/val(/test) copy (split_dataset.py --mode link)
with the same carve our run uses.

`scale` generates N synthetic JPEGs once under --work-dir (reused by later runs), then measures, each step in a
fresh process: the cold decode into an empty cache, the warm load, the near-copy check (train.py's start-up
search without its time cap; memory above the loaded process), and one training epoch (cut at
--train-seconds) reading batches from the memory map and, for comparison, with every image in RAM
(--data-placement device). It prints JSON with seconds, images/s, pixel bytes, and each process's peak RSS and
peak anonymous memory (RssAnon in /proc/self/status, sampled every 10 ms; pages of the map are file pages,
which the kernel can drop, and do not count). The decode's worker processes are not included. The training
step is a whole train.py run: the epoch, validation, and the novelty score fitted at the end (on at most
--novelty-max-images train images; its seconds are reported; `-- --novelty-score none` leaves it out).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from config import TrainConfig, parse_config
from core.common import (PROJECT_DIR, UserError, markdown_source, markdown_table, program, program_env, provenance,
                         reports_user_errors, run_script, split_at_dashes)
from dataset import load_data
from loading.decode import decode_files, preprocess
from loading.layout import Layout, read_layout, layout_splits
from loading.near_duplicates import (SIDE, Joined, altered_copy, connected_groups, cross_and_within, descriptors,
                                     find_near_copies)
from quality.label_errors import confident_learning, out_of_fold_probs, train_split_of
from training.runs import read_summary, unique_run_name

TARGETS = (0.80, 0.85, 0.90)


def training_flags(cfg: TrainConfig, scratch: str | Path) -> tuple[list[str], str]:
    """train.py flags that run exactly cfg (its settings through --config FILE, written under scratch, and a run
    name no earlier run has), and that run name: LOG_DIR/<name>/summary.json is where its summary lands."""
    name = unique_run_name(cfg.run_name or "bench", [cfg.log_dir, cfg.out_dir, cfg.curves_dir])
    config = Path(scratch) / f"{name}.config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(cfg.to_dict()))
    return ["--config", str(config), "--run-name", name], name


def seconds_to(history: list[dict], target: float, acc_key: str, time_key: str) -> float | None:
    """Time of the first epoch whose val accuracy reached `target`, or None."""
    return next((h[time_key] for h in history if h[acc_key] >= target), None)


def bench_ours(cfg: TrainConfig, scratch: str) -> dict:
    # Decode into an empty cache first, so the decode time is the cold one a first run pays.
    t0 = time.time()
    tr, va = load_data(read_layout(cfg.data, **cfg.layout_settings()), cfg.image_size, cfg.channels, cfg.cache_dir, cfg.workers,
                       cfg.max_bad_fraction)
    decode_s = time.time() - t0
    n_images = len(tr.paths) + len(va.paths) + len(tr.bad) + len(va.bad)
    flags, name = training_flags(cfg, scratch)
    run_script("train.py", flags, stdout=sys.__stderr__)  # our stdout: the result only
    summary = read_summary(cfg.log_dir, name)
    hist = summary["history"]
    later = hist[1:] or hist
    data_share = sum(h["data_seconds"] for h in later) / max(1e-9, sum(h["epoch_seconds"] for h in later))
    train_images = sum(h["train_images"] for h in hist)
    return {"train_images_per_s": round(train_images / max(1e-9, hist[-1]["train_seconds"]), 1),
            "decode_seconds": round(decode_s, 1), "decode_images_per_s": round(n_images / decode_s, 1),
            **{f"seconds_to_{round(t * 100)}": seconds_to(hist, t, "val_acc", "elapsed_seconds") for t in TARGETS},
            "best_val_acc": round(summary["best_val_acc"], 4), "epochs": len(hist),
            "wall_seconds": summary["wall_seconds"],
            "data_share_after_first_epoch": round(data_share, 4),
            "val_acc_per_epoch": [round(h["val_acc"], 4) for h in hist]}


def baseline_data(cfg: TrainConfig, lay: Layout, scratch: str) -> str:
    """A folder the baseline's ImageFolder reads (DATA/train and DATA/val of class folders) holding the same
    train and val files as our run: DATA itself when it is that already, else hard links under `scratch`."""
    if lay.source == "folders" and lay.folders.get("train") == "train" and lay.folders.get("val") == "val" \
            and not cfg.classes:
        return cfg.data
    dst = Path(scratch) / "baseline-data"
    ratios = [1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction] + ([cfg.test_fraction] if cfg.test_fraction
                                                                             else [])
    source = {k: getattr(cfg, k) for k in ("labels", "label_columns", "labels_from_name", "name_pattern", "classes")}
    flags = [f"--{k.replace('_', '-')}" for k, v in source.items() if v is True]
    flags += [a for k, v in source.items() if v and v is not True
              for a in [f"--{k.replace('_', '-')}", *(v if isinstance(v, list) else [v])]]
    run_script("split_dataset.py", [cfg.data, str(dst), "--ratios", *map(str, ratios), "--seed", str(cfg.seed),
                                    "--mode", "link", *flags], stdout=sys.stderr)
    return str(dst)


def bench_baseline(data: str, epochs: int, max_seconds: float, workers: int, device: str) -> dict:
    out = run_script("benchmarks.baseline", ["--data", data, "--epochs", str(epochs), "--max-seconds", str(max_seconds),
                                     "--workers", str(workers), "--device", device], stdout=subprocess.PIPE).stdout
    hist = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {"train_images_per_s": round(sum(h["train_images_per_s"] for h in hist) / len(hist), 1),
            **{f"seconds_to_{round(t * 100)}": seconds_to(hist, t, "val_acc", "elapsed_s") for t in TARGETS},
            "best_val_acc": max(h["val_acc"] for h in hist), "epochs": len(hist),
            "wall_seconds": hist[-1]["elapsed_s"], "val_acc_per_epoch": [h["val_acc"] for h in hist]}


def _seconds(s: float | None) -> str:
    return "not reached" if s is None else f"{s:.0f} s"


def _best(r: dict) -> str:
    accs = r["val_acc_per_epoch"]
    return (f"{r['best_val_acc']:.2%} (epoch {accs.index(max(accs)) + 1} of {r['epochs']}; "
            f"{r['wall_seconds']:.0f} s in all)")


def bench_markdown(result: dict) -> str:
    """bench.py's result as the Markdown table BENCHMARKS.md holds, and the line that says where it comes from."""
    ours, base = result["ours"], result.get("baseline")
    ratio = f" ({result['ratios']['train_images_per_s']}x)" if base else ""
    rows = [["train images/s", f"{ours['train_images_per_s']:,}{ratio}"],
            ["decode, cold cache", f"{ours['decode_seconds']} s ({ours['decode_images_per_s']:,.0f} img/s)"],
            ["share of epoch time on data, epochs 2+", f"{ours['data_share_after_first_epoch']:.1%}"],
            *[[f"val acc {round(t * 100)}% reached after", _seconds(ours[f"seconds_to_{round(t * 100)}"])]
              for t in TARGETS],
            ["best val accuracy", _best(ours)]]
    if base:
        extra = [f"{base['train_images_per_s']:,}", "every epoch", "", *[_seconds(base[f"seconds_to_{round(t * 100)}"])
                                                                        for t in TARGETS], _best(base)]
        rows = [r + [e] for r, e in zip(rows, extra)]
    header = ["", "ours (train.py)"] + (["plain pipeline (baseline.py)"] if base else [])
    return markdown_table(header, rows) + "\n\n" + markdown_source(result)


def scale_markdown(result: dict) -> str:
    """bench.py scale's result as a Markdown table: one row per training run, and where it comes from."""
    cold, warm = result["cold_decode"], result["warm_load"]
    data = (f"{result['images']:,} images, {result['channels']}x{result['image_size']}x{result['image_size']} "
            f"({result['pixel_bytes'] / 1e9:.2f} GB of pixels)")
    rows = [[f"{placement} #{i + 1}", r["train_images_per_s"], f"{r['peak_rss_mb']:,} / {r['peak_rss_anon_mb']:,} MB",
             "" if r["novelty_seconds"] is None else f"{r['novelty_seconds']:.0f} s"]
            for placement, key in (("memory map", "train_map"), ("in RAM", "train_ram"))
            for i, r in enumerate(result[key])]
    lines = [f"{data}: cold decode {cold['seconds']} s (peak RSS / RssAnon {cold['peak_rss_mb']:,} / "
             f"{cold['peak_rss_anon_mb']:,} MB), warm load {warm['seconds']} s ({warm['peak_rss_mb']:,} / "
             f"{warm['peak_rss_anon_mb']:,} MB)", "", near_copies_sentence(result["near_copies"]), "",
             markdown_table(["training run (1 epoch)", "train img/s", "peak RSS / RssAnon", "novelty fit"], rows)]
    if "map_vs_ram_images_per_s" in result:
        lines.append(f"\nmemory map vs RAM, train img/s: {result['map_vs_ram_images_per_s']}")
    return "\n".join(lines) + "\n\n" + markdown_source(result)


def near_copies_sentence(near: dict) -> str:
    """bench.py scale's near-copy step in a sentence."""
    stopped = {"crowded": "most queries met crowded buckets", "pair cap": "it reached its pair cap",
               "time cap": "it reached its time cap"}
    verdict = (f"{near['groups_within']} group(s) within train or val, {near['groups_across']} across, "
               f"{near['lookalike_images']:,} images too alike to judge" if near["end"] == "done"
               else f"stopped early ({stopped[near['end']]}): {near['images']:,} images too alike to search")
    return (f"near-copy check (train.py's start-up search, no time cap): {near['seconds']} s "
            f"({near['us_per_image']} us per image), {near['pairs_examined']:,} pairs examined, {verdict}; "
            f"memory above the loaded process: RSS {near['rss_above_mb']:,} MB, RssAnon {near['anon_above_mb']:,} MB "
            f"({near['anon_bytes_per_image']:,} bytes per image)")


# ---------------------------------------------------------------- bench.py scale

class MemoryPeaks:
    """Peak VmRSS and RssAnon of this process, read from /proc/self/status by a thread every `every` s."""

    def __init__(self, every: float = 0.01):
        import threading

        self.peak = {"VmRSS": 0, "RssAnon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    @staticmethod
    def now() -> dict:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.sample()

    def sample(self) -> None:
        now = self.now()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now.get(key, 0))

    def __enter__(self) -> "MemoryPeaks":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.peak["VmRSS"] = max(self.peak["VmRSS"], self.now().get("VmHWM", 0))  # the kernel's exact peak

    def report(self) -> dict:
        return {"peak_rss_mb": round(self.peak["VmRSS"] / 2**20), "peak_rss_anon_mb": round(self.peak["RssAnon"] / 2**20)}


def _write_synthetic_chunk(job: tuple) -> int:
    """Write the images numbered start..stop-1 of a generated set (run in a worker process)."""
    import numpy as np
    from PIL import Image, ImageDraw

    root, start, stop, n_val, side, seed = job
    rng = np.random.default_rng([seed, start])
    for k in range(start, stop):
        label = k % 2
        split, number = ("val", k) if k < n_val else ("train", k - n_val)
        folder = Path(root) / split / ("cat", "dog")[label] / f"{number // 10_000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 90, (side, side, 3), dtype=np.uint8), "RGB")
        cx, cy = rng.uniform(0.35, 0.65, 2) * side
        r, a0, corners = rng.uniform(0.2, 0.33) * side, rng.uniform(0, 2 * np.pi), label + 3
        points = [(cx + r * np.cos(a0 + 2 * np.pi * j / corners), cy + r * np.sin(a0 + 2 * np.pi * j / corners))
                  for j in range(corners)]
        ImageDraw.Draw(img).polygon(points, fill=tuple(int(v) for v in rng.integers(150, 256, 3)))
        img.save(folder / f"{number:07d}.jpg", quality=90)
    return stop - start


def synthetic_set(work_dir: Path, n: int, side: int, workers: int, seed: int = 0) -> Path:
    """N generated JPEGs of side x side (2% of them in val/, two classes, 10,000 per folder), made once: a set
    with its 'complete' marker is reused."""
    from concurrent.futures import ProcessPoolExecutor

    root = work_dir / f"synthetic-{n}-{side}px"
    if (root / "complete").is_file():
        return root
    n_val = max(2, n // 50)
    jobs = [(str(root), i, min(n, i + 2000), n_val, side, seed) for i in range(0, n, 2000)]
    t0 = time.time()
    with ProcessPoolExecutor(max(1, workers)) as pool:
        written = sum(pool.map(_write_synthetic_chunk, jobs))
    (root / "complete").write_text(f"{written} images\n")
    print(f"generated {written} images in {root} in {time.time() - t0:.0f}s", file=sys.stderr)
    return root


def measure_near_copies(cfg: TrainConfig) -> dict:
    """The near-copy search over train and val as train.py's start-up line runs it, from the descriptors the
    cache keeps, but without its time cap: seconds, how it ended, what it found, and the peaks of memory above
    the process's own once the data is loaded (the kernel's peak is reset first where Linux allows)."""
    train, val = load_data(read_layout(cfg.data, **cfg.layout_settings()), cfg.image_size, cfg.channels, cfg.cache_dir, cfg.workers,
                           cfg.max_bad_fraction)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    before = MemoryPeaks.now()
    with MemoryPeaks() as peaks:
        t0 = time.time()
        found = find_near_copies(Joined(train.near_descriptors(), val.near_descriptors()))
        seconds = time.time() - t0
    groups, lookalike = found.groups()
    cross, within = cross_and_within(groups, len(train.paths))
    rss, anon = peaks.peak["VmRSS"] - before["VmRSS"], peaks.peak["RssAnon"] - before["RssAnon"]
    return {"seconds": round(seconds, 1), "images": found.n, "end": found.end.value,
            "pairs_examined": found.examined, "groups_within": within, "groups_across": cross,
            "lookalike_images": lookalike, "rss_above_mb": round(rss / 2**20), "anon_above_mb": round(anon / 2**20),
            "anon_bytes_per_image": round(anon / max(1, found.n)),
            "us_per_image": round(seconds * 1e6 / max(1, found.n), 1)}


def measure(step: str, cfg: TrainConfig) -> dict:
    """One step of `scale` in this process: 'load' (load_data), 'near' (measure_near_copies) or 'train' (one
    epoch); seconds, memory peaks."""
    if step == "near":
        return measure_near_copies(cfg)
    with MemoryPeaks() as peaks:
        t0 = time.time()
        if step == "load":
            tr, va = load_data(read_layout(cfg.data, **cfg.layout_settings()), cfg.image_size, cfg.channels, cfg.cache_dir, cfg.workers,
                               cfg.max_bad_fraction)
            out = {"seconds": round(time.time() - t0, 2), "images": len(tr.paths) + len(va.paths),
                   "pixel_bytes": sum(math.prod(s.images.shape) for s in (tr, va))}
        else:
            # train.py run as a program in this process (runpy, not an import), so that the peaks are its own
            flags, name = training_flags(cfg, Path(cfg.log_dir).parent / "configs")
            sys.argv = [str(PROJECT_DIR / "train.py"), *flags]
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as e:
                if e.code:
                    raise UserError(f"train.py failed (exit {e.code})") from None
            summary = read_summary(cfg.log_dir, name)
            h = summary["history"][0]
            out = {"train_images_per_s": h["train_images_per_s"], "train_images": h["train_images"],
                   "train_seconds": h["train_seconds"], "novelty_seconds": summary.get("novelty_seconds"),
                   "wall_seconds": round(time.time() - t0, 1)}
    return {**out, **peaks.report()}


def _measure_in_subprocess(step: str, cfg: TrainConfig) -> dict:
    cmd = [*program("benchmarks.bench"), "_measure", step, json.dumps(cfg.to_dict())]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=program_env())
    if proc.returncode != 0:
        raise UserError(f"bench.py scale: the {step} step failed (exit {proc.returncode}; its output is above)")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{step} ({cfg.data_placement}): {json.dumps(result)}", file=sys.stderr)  # kept if a later step fails
    return result


def train_config(train_flags: list[str], **set_here) -> TrainConfig:
    """train.py's settings from the flags after `--`, with the fields `set_here` set by bench.py itself. One of
    those given after `--` would be replaced without a word (`-- --epochs 80` would run bench.py's --epochs), so
    it is an error that says where it goes instead."""
    flags = [f"--{name.replace('_', '-')}" for name in set_here]
    given = [flag for flag in flags if any(arg == flag or arg.startswith(flag + "=") for arg in train_flags)]
    if given:
        raise UserError(f"{' and '.join(given)} after --: bench.py sets {'it' if len(given) == 1 else 'them'} for "
                        "its run; bench.py's own flags (--help lists them) go before --")
    return dataclasses.replace(parse_config(train_flags), **set_here)


def scale_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="how many synthetic images to generate")
    parser.add_argument("--size", type=int, default=TrainConfig.image_size, help="training image side")
    parser.add_argument("--channels", type=int, default=TrainConfig.channels)
    parser.add_argument("--file-size", type=int, default=0, help="side of the generated JPEGs (default 1.5 x size)")
    parser.add_argument("--data", default="", help="measure this dataset instead of generated images")
    parser.add_argument("--work-dir", default="bench_data", help="generated images and caches, kept between runs")
    parser.add_argument("--train-seconds", type=float, default=60.0, help="cut each training epoch after this")
    parser.add_argument("--repeats", type=int, default=1, help="training runs per placement (they alternate)")
    parser.add_argument("--skip-ram", action="store_true", help="do not train with every image in RAM")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--markdown", action="store_true", help="print the result as a Markdown table (with the "
                        "command, commit, date and machine) instead of JSON")
    ours, train_flags = split_at_dashes(argv)
    args = parser.parse_args(ours)
    source = provenance("benchmarks.bench", ["scale", *argv])  # the code as it was when the measuring began
    work = Path(args.work_dir)
    cfg = train_config(train_flags, data="", image_size=args.size, channels=args.channels, workers=args.workers,
                       cache_dir="", epochs=1, time_budget=args.train_seconds, out_dir=str(work / "models"),
                       log_dir=str(work / "logs"), curves_dir=str(work / "curves"), run_name="scale")
    data = Path(args.data) if args.data else synthetic_set(work, args.images, args.file_size or
                                                           round(args.size * 1.5), args.workers)
    cache = work / f"cache-{data.name}-{args.size}px-{args.channels}ch"
    cfg = dataclasses.replace(cfg, data=str(data), cache_dir=str(cache))
    shutil.rmtree(cache, ignore_errors=True)
    cold = _measure_in_subprocess("load", cfg)
    warm = _measure_in_subprocess("load", cfg)
    near = _measure_in_subprocess("near", cfg)
    runs: dict[str, list] = {"map": [], "ram": []}
    for _ in range(args.repeats):
        for placement in ("map",) if args.skip_ram else ("map", "ram"):
            step_cfg = dataclasses.replace(cfg, data_placement="map" if placement == "map" else "device")
            runs[placement].append(_measure_in_subprocess("train", step_cfg))
    result = {**source, "data": str(data), "images": cold["images"],
              "image_size": args.size, "channels": args.channels,
              "pixel_bytes": cold["pixel_bytes"], "cold_decode": cold, "warm_load": warm, "near_copies": near,
              "train_map": runs["map"], "train_ram": runs["ram"]}
    if runs["ram"]:
        speed = {k: sum(r["train_images_per_s"] for r in v) / len(v) for k, v in runs.items()}
        result["map_vs_ram_images_per_s"] = round(speed["map"] / speed["ram"], 3)
    print(scale_markdown(result) if args.markdown else json.dumps(result, indent=2))
    return 0


def composites(thumbs: torch.Tensor, count: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` distinct thumbnails, each of four quarters of random thumbnails, each quarter mirrored or not."""
    quarter = SIDE // 2
    pick = torch.from_numpy(rng.integers(0, len(thumbs), (count, 4)))
    flips = torch.from_numpy(rng.random((count, 4)) < 0.5)
    parts = [torch.where(flips[:, k, None, None, None], thumbs[pick[:, k]].flip(-1), thumbs[pick[:, k]])
             [..., (k // 2) * quarter:(k // 2 + 1) * quarter, (k % 2) * quarter:(k % 2 + 1) * quarter]
             for k in range(4)]
    return torch.cat([torch.cat(parts[:2], -1), torch.cat(parts[2:], -1)], -2)


def near_copies_main(argv: list[str]) -> int:
    """`near-copies`: --copies val photos altered (near_duplicates.altered_copy) are added to the set's 32 px
    thumbnails; recall (copies matched to their original), precision (pairs with a copy that are right: its
    original or a near-copy the untouched set already has of it), the pairs among the untouched photos (named:
    judge them by eye), the copies the report groups with their original (groups of at most LOOKALIKE_GROUP)
    and the images it leaves not judged, seconds; with --scale N, the search's seconds on N distinct images
    (composites), its pairs and how it ended."""
    parser = argparse.ArgumentParser(prog="bench.py near-copies")
    parser.add_argument("--data", required=True, metavar="PATH/TO/DATA")
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("--scale", type=int, default=0, help="also time the search on this many images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    source = provenance("benchmarks.bench", ["near-copies", *argv])  # the code as it was when the measuring began
    splits = layout_splits(read_layout(args.data, **TrainConfig(data=args.data).layout_settings(need=None)))
    order = ["train", "val"] + [name for name in splits if name not in ("train", "val")]
    paths = [p for name in order for p, _ in splits.get(name, [])]
    t0 = time.time()
    thumbs = torch.stack([torch.from_numpy(a) for a, _ in decode_files(paths, SIDE, 1, args.workers)])
    decode_seconds = time.time() - t0
    rng = np.random.default_rng(args.seed)
    n, first_val = len(paths), len(splits["train"])
    val = list(range(first_val, first_val + len(splits.get("val", []))))
    chosen = rng.choice(val or list(range(n)), min(args.copies, len(val or paths)), replace=False).tolist()
    copies = torch.stack([torch.from_numpy(preprocess(altered_copy(Image.open(paths[i]), rng), SIDE, 1))
                          for i in chosen])
    t0 = time.time()
    search = find_near_copies(descriptors(torch.cat([thumbs, copies])))
    search_seconds = time.time() - t0
    pairs, (groups, not_judged) = search.pair_list(), search.groups()
    in_group = {i: g for g, members in enumerate(groups) for i in members}
    untouched = [(i, j, s) for i, j, s in pairs if j < n]
    group = {i: g for g in connected_groups(untouched, n) for i in g}
    right = {(o, n + k) for k, orig in enumerate(chosen) for o in group.get(orig, [orig])}
    with_copy = [(i, j) for i, j, _ in pairs if j >= n]
    found = {(i, j) for i, j in with_copy if (i, j) in right}
    result = {**source, "data": args.data, "images": n,
              "copies": len(chosen), "recall": round(len({j for _, j in found}) / max(1, len(chosen)), 4),
              "precision": round(len(found) / max(1, len(with_copy)), 4),
              "wrong_pairs": [[paths[i] if i < n else f"copy of {paths[chosen[i - n]]}",
                               f"copy of {paths[chosen[j - n]]}"] for i, j in with_copy if (i, j) not in right],
              "untouched_pairs": [[paths[i], paths[j], s] for i, j, s in untouched],
              "copies_grouped_with_original": sum(in_group.get(orig, -1) == in_group.get(n + k, -2)
                                                  for k, orig in enumerate(chosen)),
              "images_not_judged": not_judged,
              "decode_seconds": round(decode_seconds, 1), "search_seconds": round(search_seconds, 1)}
    if args.scale:
        many = composites(thumbs, args.scale, rng)
        t0 = time.time()
        found_many = find_near_copies(descriptors(many))
        result["scale"] = {"images": args.scale, "search_seconds": round(time.time() - t0, 1),
                           "pairs": len(found_many.pairs), "end": found_many.end.value}
    print(json.dumps(result, indent=2))
    return 0


def label_errors_main(argv: list[str]) -> int:
    """`label-errors`: --flip of the train labels changed to another class at random (--seed), then the label
    check (label_errors.py) as check_data.py --label-errors runs it; precision and recall against the flipped
    images, the seconds, and how many unflipped images it names (real errors, or hard images)."""
    parser = argparse.ArgumentParser(prog="bench.py label-errors")
    parser.add_argument("--data", required=True, metavar="PATH/TO/DATA")
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-probs", default="", metavar="FILE",
                        help="also save the out-of-fold probabilities, the given labels and the flipped images")
    ours, train_flags = split_at_dashes(argv)
    args = parser.parse_args(ours)
    source = provenance("benchmarks.bench", ["label-errors", *argv])  # the code as it was when the measuring began
    cfg = train_config(train_flags, data=args.data)
    lay, train = train_split_of(cfg)
    generator = torch.Generator().manual_seed(args.seed)
    flipped = torch.randperm(len(train.labels), generator=generator)[:round(args.flip * len(train.labels))]
    k = len(lay.classes)
    train.labels[flipped] = (train.labels[flipped] + torch.randint(1, k, (len(flipped),), generator=generator)) % k
    probs, seconds, ran = out_of_fold_probs(train, k, cfg, cfg.label_error_folds, cfg.label_error_epochs,
                                            lambda line: print(line, file=sys.stderr), cfg.label_error_budget)
    if args.save_probs:
        torch.save({"probs": probs, "labels": train.labels, "flipped": flipped}, args.save_probs)
    named = {f["index"] for f in confident_learning(probs, train.labels)}
    truth = set(flipped.tolist())
    result = {**source, "data": args.data, "images": len(train.labels),
              "flipped": len(truth), "named": len(named),
              "precision": round(len(named & truth) / max(1, len(named)), 4),
              "recall": round(len(named & truth) / max(1, len(truth)), 4), "unflipped_named": len(named - truth),
              "folds": cfg.label_error_folds, "epochs": ran, "seconds": round(seconds, 1),
              "out_of_fold_accuracy_on_given_labels":
                  round((probs.argmax(1) == train.labels).float().mean().item(), 4)}
    print(json.dumps(result, indent=2))
    return 0


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["scale"]:
        return scale_main(argv[1:])
    if argv[:1] == ["near-copies"]:
        return near_copies_main(argv[1:])
    if argv[:1] == ["label-errors"]:
        return label_errors_main(argv[1:])
    if argv[:1] == ["_measure"]:  # one step of `scale`, in its own process
        print(json.dumps(measure(argv[1], TrainConfig.from_dict(json.loads(argv[2])))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, metavar="PATH/TO/DATA",
                        help="a dataset train.py reads (any layout), e.g. Kaggle's Dogs vs Cats photos")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="our planned epochs")
    parser.add_argument("--time-budget", type=float, default=600.0, help="fit our run into this many s (train.py's "
                        "--time-budget)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--baseline-epochs", type=int, default=3)
    parser.add_argument("--baseline-seconds", type=float, default=400.0, help="stop the baseline after this")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work-dir", default="", help="keep our run's cache, models, logs, curves here "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--markdown", action="store_true", help="print the result as a Markdown table (with the "
                        "command, commit, date and machine) instead of JSON")
    ours, train_flags = split_at_dashes(argv)
    args = parser.parse_args(ours)
    source = provenance("benchmarks.bench", argv)  # the code as it was when the measuring began
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.work_dir or scratch
        cfg = train_config(train_flags, data=args.data, epochs=args.epochs, time_budget=args.time_budget,
                           device=args.device, workers=args.workers, cache_dir=f"{tmp}/cache", out_dir=f"{tmp}/models",
                           log_dir=f"{tmp}/logs", curves_dir=f"{tmp}/curves", run_name="bench")
        ours = bench_ours(cfg, scratch)
        if not args.skip_baseline:
            base_data = baseline_data(cfg, read_layout(cfg.data, **cfg.layout_settings()), scratch)
            base = bench_baseline(base_data, args.baseline_epochs, args.baseline_seconds, args.workers,
                                  args.device)
    result = {**source, "data": args.data, "ours": ours}
    if not args.skip_baseline:
        result["baseline"] = base
        result["ratios"] = {"train_images_per_s": round(ours["train_images_per_s"] / base["train_images_per_s"], 2)}
        for t in TARGETS:
            key = f"seconds_to_{round(t * 100)}"
            if ours[key] and base[key]:
                result["ratios"][key] = round(base[key] / ours[key], 2)
    print(bench_markdown(result) if args.markdown else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
