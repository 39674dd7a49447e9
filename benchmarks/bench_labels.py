"""Few labels, many photos, measured on real photos: training with an unlabeled folder, and which photos to label
next.

Usage:
    python -m benchmarks.bench_labels semi --data ../shared/data/catdog --per-class 500 --time-budget 1800
    python -m benchmarks.bench_labels semi --data DATA --per-class 500 --tune 1000 --skip-supervised -- --pseudo-threshold 0.8
    python -m benchmarks.bench_labels label-next --data ../shared/data/catdog --per-class 100 --add 800 --seeds 0 1

`semi`: --per-class train photos of each class (stratified, --seed) keep their labels; the rest of train becomes
the unlabeled folder (links named by number: no labels, no class names). train.py runs on the labelled photos
alone and with --unlabeled, with the same flags (those after --) and --time-budget, and the val accuracy of
both is measured on DATA's val. With --tune N, N of the would-be unlabeled photos (stratified) keep their labels
and are the val instead, and DATA's val is never read: the way to choose flags without looking at the photos
the figures are reported on.

`label-next`: for each seed, a model trained on --per-class photos of each class ranks the rest of train
(check_data.py --label-next); the labelled photos plus the --add photos it picks, with their true labels, and
plus --add photos picked at random train one model each, the same way; the val accuracy of each and the means
over the seeds. With --seed-unlabeled SECONDS the seed model also trains on the rest of train as --unlabeled,
in that --time-budget; with --arms-unlabeled SECONDS each arm also trains on the photos of the rest it did not add
as --unlabeled (the same number for both arms), in that --time-budget.

Both print JSON, or with --markdown a table with the command, commit, date and machine.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench import train_config, training_flags
from config import TrainConfig
from core.common import (UserError, markdown_source, markdown_table, provenance, reports_user_errors, run_script,
                         split_at_dashes)
from loading.cache import forget_folder
from loading.layout import layout_splits, read_layout
from model import WEIGHT_PACKAGES
from training.runs import read_summary


def stratified(labels: list[str], per_class: int, generator: torch.Generator) -> list[int]:
    """`per_class` indices of each class of `labels` (all of a class that has fewer), drawn at random."""
    picked = []
    for c in sorted(set(labels)):
        members = [i for i, label in enumerate(labels) if label == c]
        order = torch.randperm(len(members), generator=generator)[:per_class]
        picked += [members[i] for i in order.tolist()]
    return sorted(picked)


def link_labelled(items: list[tuple[str, str]], folder: Path) -> None:
    """Links to the (path, class) items in class folders under `folder` (a name already there gets its number)."""
    for i, (path, c) in enumerate(items):
        dest = folder / c / Path(path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest = dest.with_name(f"{i:05d}-{dest.name}")
        dest.symlink_to(path)


def link_unlabelled(items: list[tuple[str, str]], folder: Path) -> dict[str, str]:
    """Links to the items' files in one folder, named by number (no label shows); returns link name -> class."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, (path, c) in enumerate(items):
        name = f"{i:05d}{Path(path).suffix.lower()}"
        (folder / name).symlink_to(path)
        truth[name] = c
    return truth


def split_train(data: str, cfg: TrainConfig, per_class: int, tune: int, seed: int
                ) -> tuple[list, list, list]:
    """(labelled, unlabelled, val) (path, class) items: per_class of each class of DATA's train, the rest of
    train, and DATA's val, or with `tune`, that many of the rest (stratified) as val instead."""
    splits = layout_splits(read_layout(data, **cfg.layout_settings()))
    train, generator = splits["train"], torch.Generator().manual_seed(seed)
    keep = set(stratified([c for _, c in train], per_class, generator))
    labelled = [item for i, item in enumerate(train) if i in keep]
    rest = [item for i, item in enumerate(train) if i not in keep]
    if not tune:
        return labelled, rest, splits["val"]
    n_classes = len({c for _, c in rest})
    held = set(stratified([c for _, c in rest], max(1, tune // n_classes), generator))
    return labelled, [it for i, it in enumerate(rest) if i not in held], [it for i, it in enumerate(rest) if i in held]


def train_run(cfg: TrainConfig, scratch: Path, **changes) -> dict:
    """train.py with cfg's settings and `changes`, in a process of its own; its summary."""
    run_cfg = dataclasses.replace(cfg, **changes)
    flags, name = training_flags(run_cfg, scratch)
    run_script("train.py", flags, stdout=sys.__stderr__)  # our stdout: the result only
    return read_summary(run_cfg.log_dir, name)


def pseudo_share(summary: dict, prefix: str = "") -> dict:
    """{prefix + "pseudo_share_last_epoch": the last epoch's pseudo-labelled share} for a run that learnt from
    --unlabeled, else {}."""
    last = summary["history"][-1]
    return {f"{prefix}pseudo_share_last_epoch": last["pseudo_share"]} if "pseudo_share" in last else {}


def run_row(summary: dict) -> dict:
    """A run's figures: best val accuracy, its epoch, epochs run, seconds, and the last pseudo-label share."""
    return {"best_val_acc": round(summary["best_val_acc"], 4), "best_epoch": summary["best_epoch"],
            "epochs": len(summary["history"]), "train_seconds": round(summary["history"][-1]["train_seconds"], 1),
            **pseudo_share(summary)}


def command_parser(command: str, per_class: int, per_class_help: str) -> argparse.ArgumentParser:
    """The flags both commands take."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.bench_labels {command}")
    parser.add_argument("--data", required=True, metavar="PATH/TO/DATA")
    parser.add_argument("--per-class", type=int, default=per_class, help=per_class_help)
    parser.add_argument("--tune", type=int, default=0, metavar="N", help="measure on N of the train photos that "
                        "are not labelled (stratified) instead of DATA's val, which is then never read")
    parser.add_argument("--work-dir", default="", help="keep the links, cache and runs here")
    parser.add_argument("--cache-dir", default="", help="the runs' cache folder (default: one in the work folder); "
                        "a shared one lets a frozen backbone's runs read the features earlier runs computed")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table with the command, commit, "
                        "date and machine")
    return parser


def semi_main(argv: list[str]) -> int:
    """`semi`: train.py on --per-class labelled photos alone and with the rest as --unlabeled."""
    parser = command_parser("semi", 500, "labelled train photos kept of each class")
    parser.add_argument("--time-budget", type=float, default=1800.0, help="each run's train.py --time-budget")
    parser.add_argument("--epochs", type=int, default=None, help="each run's train.py --epochs (default: 1000, and "
                        "the budget ends the run sooner, so that both use the whole budget; on a frozen backbone, "
                        "its head's own)")
    parser.add_argument("--seed", type=int, default=0, help="which photos keep their labels")
    parser.add_argument("--skip-supervised", action="store_true")
    parser.add_argument("--skip-semi", action="store_true", help="the labelled photos alone: no --unlabeled run")
    ours, train_flags = split_at_dashes(argv)
    args = parser.parse_args(ours)
    source = provenance("benchmarks.bench_labels", ["semi", *argv])
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        cfg = train_config(train_flags, time_budget=args.time_budget, cache_dir=args.cache_dir or str(work / "cache"),
                           out_dir=str(work / "models"), log_dir=str(work / "logs"), curves_dir=str(work / "curves"))
        if any(a == "--epochs" or a.startswith("--epochs=") for a in train_flags):
            raise UserError("--epochs after --: semi sets it for its runs; its own --epochs goes before --")
        if args.epochs or cfg.arch not in WEIGHT_PACKAGES:
            cfg = dataclasses.replace(cfg, epochs=args.epochs or 1000)
        labelled, rest, val = split_train(args.data, cfg, args.per_class, args.tune, args.seed)
        link_labelled(labelled, work / "labelled" / "train")
        link_labelled(val, work / "labelled" / "val")
        link_unlabelled(rest, work / "unlabeled")
        result = {**source, "data": args.data, "labelled": len(labelled), "unlabeled": len(rest), "val": len(val),
                  "val_from": "train (--tune)" if args.tune else "val"}
        base = dict(data=str(work / "labelled"), val_fraction=0.0)
        if not args.skip_supervised:
            result["supervised"] = run_row(train_run(cfg, work, **base, run_name="supervised"))
        if not args.skip_semi:
            result["semi_supervised"] = run_row(train_run(cfg, work, **base, unlabeled=str(work / "unlabeled"),
                                                          run_name="semi"))
        forget_decoded(cfg, work)
    print(semi_markdown(result) if args.markdown else json.dumps(result, indent=2))
    return 0


def semi_markdown(result: dict) -> str:
    rows = [[name, f"{r['best_val_acc']:.2%}", r["best_epoch"], r["epochs"], f"{r['train_seconds']:.0f}",
             f"{r['pseudo_share_last_epoch']:.0%}" if "pseudo_share_last_epoch" in r else "-"]
            for name, r in (("supervised, labelled only", result.get("supervised")),
                            ("semi-supervised, + unlabeled", result.get("semi_supervised"))) if r]
    head = (f"{result['labelled']} labelled train photos, {result['unlabeled']} unlabeled, val: {result['val']} "
            f"photos of {result['val_from']}")
    return "\n\n".join([head, markdown_table(["run", "best val acc", "best epoch", "epochs", "train s",
                                              "pseudo-labelled share, last epoch"], rows), markdown_source(result)])


def forget_decoded(cfg: TrainConfig, work: Path) -> None:
    """Drop from the runs' cache folder the decoded images of every folder under `work` (temporary links no run
    reads again), so that a shared --cache-dir keeps the features the runs computed and not a copy of the pixels
    of each temporary folder."""
    for folder in [work, *(d for d in work.rglob("*") if d.is_dir() and not d.is_symlink())]:
        forget_folder(cfg.cache_dir, folder, cfg.image_size, cfg.channels)


def arm_folder(work: Path, labelled: list, added: list, val: list) -> Path:
    """A train/val folder of links: the labelled items plus `added`, each in its class's folder, and val."""
    link_labelled(labelled + added, work / "train")
    link_labelled(val, work / "val")
    return work


def semi_changes(unlabeled: Path, seconds: float) -> dict:
    """train_run's changes for a run that also learns from `unlabeled` for `seconds` (none when 0)."""
    return dict(unlabeled=str(unlabeled), time_budget=seconds, epochs=1000) if seconds else {}


def label_next_seed(args, cfg: TrainConfig, seed: int, work: Path) -> dict:
    """One seed of `label-next`: the seed model, its picks, and the val accuracy of the ranked and random arms."""
    labelled, rest, val = split_train(args.data, cfg, args.per_class, args.tune, seed)
    truth = link_unlabelled(rest, work / "pool")
    by_name = {name: item for name, item in zip(truth, rest)}
    seed_run = train_run(cfg, work, data=str(arm_folder(work / "seed", labelled, [], val)), val_fraction=0.0,
                         seed=seed, run_name=f"seed{seed}", out_dir=str(work / "seed_models"),
                         **semi_changes(work / "pool", args.seed_unlabeled))
    run_script("check_data.py", [str(work / "pool"), "--label-next", str(args.add), "--checkpoint",
                                 seed_run["checkpoint"], "--out-dir", str(work / "picks"), "--cache-dir",
                                 cfg.cache_dir], stdout=sys.__stderr__)
    with open(work / "picks" / "label_next.csv", newline="") as f:
        ranked = [by_name[row["path"]] for row in csv.DictReader(f)]
    shuffled = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:args.add]
    row = {"seed": seed, "seed_val_acc": round(seed_run["best_val_acc"], 4), **pseudo_share(seed_run, "seed_")}
    for arm, added in (("ranked", ranked), ("random", [rest[i] for i in shuffled.tolist()])):
        row[f"{arm}_picked_per_class"] = {c: sum(1 for _, k in added if k == c) for c in sorted({k for _, k in rest})}
        if args.arms_unlabeled:
            taken = set(added)
            link_unlabelled([item for item in rest if item not in taken], work / f"{arm}_pool")
        run = train_run(cfg, work, data=str(arm_folder(work / arm, labelled, added, val)), val_fraction=0.0,
                        seed=seed, run_name=f"{arm}{seed}", out_dir=str(work / f"{arm}_models"),
                        **semi_changes(work / f"{arm}_pool", args.arms_unlabeled))
        row.update({f"{arm}_val_acc": round(run["best_val_acc"], 4), **pseudo_share(run, f"{arm}_")})
    forget_decoded(cfg, work)
    return row


def label_next_main(argv: list[str]) -> int:
    """`label-next`: the ranking's picks against random picks, each added to a small labelled seed."""
    parser = command_parser("label-next", 100, "labelled seed photos of each class")
    parser.add_argument("--add", type=int, default=800, help="photos the ranking (or chance) adds to the seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="which photos are the seed, and the "
                        "runs' seeds")
    parser.add_argument("--seed-unlabeled", type=float, default=0.0, metavar="SECONDS", help="train the seed "
                        "model with the rest of train as --unlabeled, for this --time-budget (0: labelled only)")
    parser.add_argument("--arms-unlabeled", type=float, default=0.0, metavar="SECONDS", help="train each arm "
                        "with the photos of the rest it did not add as --unlabeled, for this --time-budget "
                        "(0: labelled only)")
    ours, train_flags = split_at_dashes(argv)
    args = parser.parse_args(ours)
    source = provenance("benchmarks.bench_labels", ["label-next", *argv])
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        cfg = train_config(train_flags, cache_dir=args.cache_dir or str(work / "cache"), log_dir=str(work / "logs"),
                           curves_dir=str(work / "curves"))
        rows = [label_next_seed(args, cfg, seed, work / f"seed{seed}") for seed in args.seeds]
    mean = {arm: round(sum(r[f"{arm}_val_acc"] for r in rows) / len(rows), 4) for arm in ("ranked", "random")}
    result = {**source, "data": args.data, "per_class": args.per_class, "added": args.add,
              "seed_unlabeled_seconds": args.seed_unlabeled, "arms_unlabeled_seconds": args.arms_unlabeled,
              "val_from": "train (--tune)" if args.tune else "val", "seeds": rows, "mean_val_acc": mean,
              "ranked_minus_random_points": round(100 * (mean["ranked"] - mean["random"]), 2)}
    print(label_next_markdown(result) if args.markdown else json.dumps(result, indent=2))
    return 0


def label_next_markdown(result: dict) -> str:
    rows = [[r["seed"], f"{r['seed_val_acc']:.2%}", f"{r['ranked_val_acc']:.2%}", f"{r['random_val_acc']:.2%}",
             " / ".join(map(str, r["ranked_picked_per_class"].values()))] for r in result["seeds"]]
    mean = result["mean_val_acc"]
    rows.append(["mean", "", f"{mean['ranked']:.2%}", f"{mean['random']:.2%}", ""])
    semi = (f" (its model also trained on the rest as --unlabeled, {result['seed_unlabeled_seconds']:g} s)"
            if result["seed_unlabeled_seconds"] else "")
    arms = (f" (each arm also trained on the rest it did not add as --unlabeled, "
            f"{result['arms_unlabeled_seconds']:g} s)" if result.get("arms_unlabeled_seconds") else "")
    head = (f"{result['per_class']} labelled photos per class as the seed{semi}, +{result['added']} picked{arms}; val: "
            f"photos of {result['val_from']}; ranked minus random: {result['ranked_minus_random_points']:+.2f} points")
    return "\n\n".join([head, markdown_table(["seed", "seed model", "seed + ranked", "seed + random",
                                              "ranked picks per class"], rows), markdown_source(result)])


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["semi"]:
        return semi_main(argv[1:])
    if argv[:1] == ["label-next"]:
        return label_next_main(argv[1:])
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
