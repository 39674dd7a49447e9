"""Benchmark our training against the plain pipeline, on the same data and machine, in one run.

Usage:
    python bench.py --data ../shared/data/catdog                      # ours (10 min budget), then the baseline
    python bench.py --data DATA --time-budget 150 --baseline-seconds 300
    python bench.py --data DATA --skip-baseline --epochs 12 -- --width 32 --lr 3e-3   # train.py flags after --

Prints one JSON object: train images/s for each, our decode time (cold cache), seconds to reach 80/85/90% val
accuracy for each (null if never; wall time since training started, evaluation included), best val accuracy,
the share of our epochs' time spent on data after the first epoch, and the ratios.
The baseline is baseline.py in this folder (ImageFolder + PIL transforms every epoch, torchvision ResNet-18,
Adam), run in this process after ours. DATA may be any layout train.py reads (train.py flags such as --labels go after --); the baseline needs
DATA/train and DATA/val folders, so other layouts are first written as hard links to a temporary
train/val(/test) copy (split_dataset.py --mode link) with the same carve our run uses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

import torch

import train
from baseline import train_baseline
from common import UserError
from config import TrainConfig, parse_config
from dataset import load_data
from layout import Layout, layout_of
from split_dataset import split_dataset

TARGETS = (0.80, 0.85, 0.90)


def seconds_to(history: list[dict], target: float, acc_key: str, time_key: str) -> float | None:
    """Time of the first epoch whose val accuracy reached `target`, or None."""
    return next((h[time_key] for h in history if h[acc_key] >= target), None)


def bench_ours(cfg: TrainConfig) -> dict:
    # Decode into an empty cache first, so the decode time is the cold one a first run pays.
    t0 = time.time()
    tr, va = load_data(layout_of(cfg), cfg.image_size, cfg.channels, cfg.cache_dir, cfg.workers,
                       cfg.max_bad_fraction)
    decode_s = time.time() - t0
    n_images = len(tr.paths) + len(va.paths) + len(tr.bad) + len(va.bad)
    summary = train.run(cfg)
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
    split_dataset(cfg.data, dst, ratios, cfg.seed, "link", source)
    return str(dst)


def bench_baseline(data: str, epochs: int, max_seconds: float, workers: int) -> dict:
    hist = list(train_baseline(data, epochs, max_seconds, workers))
    return {"train_images_per_s": round(sum(h["train_images_per_s"] for h in hist) / len(hist), 1),
            **{f"seconds_to_{round(t * 100)}": seconds_to(hist, t, "val_acc", "elapsed_s") for t in TARGETS},
            "best_val_acc": max(h["val_acc"] for h in hist), "epochs": len(hist),
            "wall_seconds": hist[-1]["elapsed_s"], "val_acc_per_epoch": [h["val_acc"] for h in hist]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/catdog")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="our planned epochs")
    parser.add_argument("--time-budget", type=float, default=600.0, help="stop our training after this many s")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--baseline-epochs", type=int, default=3)
    parser.add_argument("--baseline-seconds", type=float, default=400.0, help="stop the baseline after this")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work-dir", default="", help="keep our run's cache, models, logs, curves here "
                        "(default: a temporary folder, removed at the end)")
    argv = sys.argv[1:] if argv is None else argv
    train_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:len(argv) - len(train_flags) - (1 if "--" in argv else 0)])
    try:
        with tempfile.TemporaryDirectory() as scratch:
            tmp = args.work_dir or scratch
            cfg = dataclasses.replace(parse_config(train_flags), data=args.data, epochs=args.epochs, time_budget=args.time_budget,
                                      device=args.device, workers=args.workers, cache_dir=f"{tmp}/cache",
                                      out_dir=f"{tmp}/models", log_dir=f"{tmp}/logs", curves_dir=f"{tmp}/curves",
                                      run_name="bench")
            ours = bench_ours(cfg)
            if not args.skip_baseline:
                base_data = baseline_data(cfg, layout_of(cfg), scratch)
                base = bench_baseline(base_data, args.baseline_epochs, args.baseline_seconds, args.workers)
        result = {"machine": {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                              "python": platform.python_version(), "torch": torch.__version__},
                  "data": args.data, "ours": ours}
        if not args.skip_baseline:
            result["baseline"] = base
            result["ratios"] = {"train_images_per_s": round(ours["train_images_per_s"] / base["train_images_per_s"], 2)}
            for t in TARGETS:
                key = f"seconds_to_{round(t * 100)}"
                if ours[key] and base[key]:
                    result["ratios"][key] = round(base[key] / ours[key], 2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
