"""Images of no known class, judged by what transfers: leave-one-source-out over a folder of photos of other things.

Usage:
    python -m benchmarks.bench_unknown --checkpoint models/best_model.pth --other ../shared/data/other
    python -m benchmarks.bench_unknown --checkpoint M --data ../shared/data/catdog --other ../shared/data/other \
        --sources scenes=buildings,forest,mountain,sea,street objects=glass,metal,plastic

The known images are the checkpoint's val split (read as training read it), cut in two halves (even and odd
positions): the even half helps choose, the odd half is reported, so no figure is on an image a choice was made
on. The unknown images are --other's subfolders grouped into sources (default: each subfolder a source of its own).
- Every novelty score the checkpoint holds: AUROC of the reported half of val against each source.
- Without a combined score (a frozen backbone's checkpoint), the recipe is which stored score: the one with the
  best mean AUROC on all sources but one, measured on the one left out, beside the checkpoint's own score.
- The combined score's recipe (its parts: each early stage's statistics, the energy of the logits and, with a
  rotation head, the penultimate feature's distance and the head's surprise at the upright image; each part
  weighed 0, 1, 2 or 3) chosen on all sources but one and measured on the one left out, for each source in turn;
  beside it the checkpoint's own recipe on the same source, and both means.
  A recipe that only fits the kinds it was chosen on shows here as a drop on the source left out. --drop PART
  leaves a part out of every recipe (and of the checkpoint's, for the comparison).
Prints Markdown tables with the command, commit, date and machine, then one JSON object with the same figures.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from core.common import UserError, figures_report, markdown_table, reports_user_errors
from dataset import load_items, trained_items
from prediction.checkpoint import config_of, load_checkpoint, model_from_checkpoint, normalization_of, novelty_of
from prediction.novelty import auroc, combined_parts, load_images, needs_turns, scores_by_name
from prediction.predict import extract_features

WEIGHTS = (0, 1, 2, 3)  # what each part of the combined score may weigh in a recipe


def part_names(state: dict) -> list[str]:
    """The combined score's parts, in combined_parts' order."""
    stages = ["stem statistics", "stage 1 statistics", "stage 2 statistics", "stage 3 statistics"]
    late = (["penultimate"] if "penultimate" in state else []) + (["upright"] if state.get("upright", False) else [])
    return stages[:len(state["means"])] + ["energy"] + late + (["rotation"] if state["rotation"] else [])


def standardized_parts(state: dict, features: dict) -> torch.Tensor:
    """(parts, images): each part of the combined score on the training images' scale, unweighted."""
    parts = torch.stack([p.double() for p in combined_parts(state, features)])
    return (parts - state["centre"].double()[:, None]) / state["scale"].double()[:, None]


def recipe_auroc(weights: tuple, known: torch.Tensor, unknown: torch.Tensor) -> float:
    """AUROC of the recipe (part weights) for standardized parts of known (P, N) against unknown (P, M) images."""
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    return auroc((w * known).sum(0), (w * unknown).sum(0))


def best_recipe(known: torch.Tensor, unknown: torch.Tensor) -> tuple:
    """The weights in WEIGHTS per part (not all 0) with the highest AUROC; ties go to the smaller weights."""
    grid = [w for w in itertools.product(WEIGHTS, repeat=known.shape[0]) if any(w)]
    return max(sorted(grid, key=sum), key=lambda w: recipe_auroc(w, known, unknown))


def leave_one_source_out(known_choose: torch.Tensor, known_report: torch.Tensor, by_source: dict[str, torch.Tensor],
                         default: tuple) -> list[dict]:
    """For each source: the recipe chosen on the other sources (against known_choose), and the AUROC of it and of
    `default` on the source left out (against known_report). Parts are (P, images) tensors."""
    rows = []
    for name, held_out in by_source.items():
        others = torch.cat([p for n, p in by_source.items() if n != name], dim=1)
        chosen = best_recipe(known_choose, others)
        rows.append({"left_out": name, "chosen": list(chosen),
                     "chosen_auroc": recipe_auroc(chosen, known_report, held_out),
                     "default_auroc": recipe_auroc(default, known_report, held_out)})
    return rows


def score_loso(known: dict[str, torch.Tensor], unknown: dict[str, dict[str, torch.Tensor]], default: str
               ) -> list[dict]:
    """Leave-one-source-out over whole scores (a checkpoint without the combined score): for each source, the
    score with the highest mean AUROC on the other sources (against the even half of val), and the AUROC of it and
    of the checkpoint's own score on the source left out (against the odd half)."""
    rows = []
    for left in unknown:
        def on_others(name: str) -> float:
            return sum(auroc(known[name][0::2], unknown[s][name]) for s in unknown if s != left) / (len(unknown) - 1)
        chosen = max(sorted(known), key=on_others)
        rows.append({"left_out": left, "chosen": chosen, "chosen_auroc": auroc(known[chosen][1::2],
                                                                                unknown[left][chosen]),
                     "default_auroc": auroc(known[default][1::2], unknown[left][default])})
    return rows


def source_folders(other: Path, specs: list[str]) -> dict[str, list[Path]]:
    """{source: its folders under --other}, from NAME=SUB,SUB specs, or each subfolder a source."""
    if not specs:
        subs = sorted(p for p in other.iterdir() if p.is_dir() and not p.name.startswith("."))
        return {p.name: [p] for p in subs}
    out = {}
    for spec in specs:
        name, _, subs = spec.partition("=")
        if not name or not subs:
            raise UserError(f"--sources {spec!r}: write NAME=SUBFOLDER,SUBFOLDER")
        out[name] = [other / s for s in subs.split(",") if s]
    return out


def measure(args: argparse.Namespace, drop: list[str]) -> dict:
    """The features of val and of every source, then both tables' figures."""
    ckpt = load_checkpoint(args.checkpoint)
    novelty = novelty_of(ckpt, needed_by="bench_unknown")
    model, size, channels = model_from_checkpoint(ckpt), ckpt["image_size"], ckpt["channels"]
    options = {"tta": novelty["tta"], "normalization": normalization_of(ckpt)}
    val_items = trained_items(config_of(ckpt), list(ckpt["classes"]), args.data).get("val", [])
    val = load_items(val_items, list(ckpt["classes"]), "val", size, channels, workers=args.workers)
    if len(val.labels) < 2:
        raise UserError("the checkpoint's val split has fewer than 2 readable images")
    sources = source_folders(Path(args.other), args.sources)
    if len(sources) < 2:
        raise UserError(f"leave-one-source-out needs at least 2 sources in {args.other}, not {len(sources)}")
    options["turns"] = needs_turns(novelty["states"])
    known = extract_features(model, val.images, **options)
    unknown = {name: extract_features(model, torch.cat([load_images(f, size, channels, args.workers)[0]
                                                        for f in folders]), **options)
               for name, folders in sources.items()}
    states = novelty["states"]
    known_scores = {k: v[1::2] for k, v in scores_by_name(states, known).items()}
    by_score = {name: {src: auroc(known_scores[name], scores_by_name(states, f)[name]) for src, f in unknown.items()}
                for name in known_scores}
    if states.get("combined") is None:  # a frozen backbone's scores: the recipe is which one
        rows = score_loso(scores_by_name(states, known), {src: scores_by_name(states, f) for src, f in unknown.items()},
                          novelty["score"])
        return {"val_images": {"choose": (len(val.labels) + 1) // 2, "report": len(val.labels) // 2},
                "images": {src: len(f["logits"]) for src, f in unknown.items()}, "by_score": by_score,
                "parts": ["one of the stored scores"], "default_recipe": novelty["score"], "loso": rows,
                "loso_mean": {k: sum(r[k] for r in rows) / len(rows) for k in ("chosen_auroc", "default_auroc")}}
    combined = states["combined"]
    names = part_names(combined)
    unknown_parts = [d for d in drop if d not in names]
    if unknown_parts:
        raise UserError(f"--drop {', '.join(unknown_parts)}: the combined score's parts are {', '.join(names)}")
    keep = [i for i, name in enumerate(names) if name not in drop]
    parts = {src: standardized_parts(combined, f)[keep] for src, f in unknown.items()}
    known_parts = standardized_parts(combined, known)[keep]
    weights = combined.get("weights", torch.ones(len(names)))
    default = tuple(float(weights[i]) for i in keep)
    rows = leave_one_source_out(known_parts[:, 0::2], known_parts[:, 1::2], parts, default)
    return {"val_images": {"choose": known_parts[:, 0::2].shape[1], "report": known_parts[:, 1::2].shape[1]},
            "images": {src: int(p.shape[1]) for src, p in parts.items()}, "by_score": by_score,
            "parts": [names[i] for i in keep], "default_recipe": list(default), "loso": rows,
            "loso_mean": {k: sum(r[k] for r in rows) / len(rows) for k in ("chosen_auroc", "default_auroc")}}


def tables(r: dict) -> str:
    sources = list(r["images"])
    lines = [markdown_table(["score"] + [f"{s} ({r['images'][s]})" for s in sources],
                            [[name] + [f"{v[s]:.3f}" for s in sources] for name, v in r["by_score"].items()]),
             f"\nAUROC against the reported half of val ({r['val_images']['report']} images). Recipes weigh the parts "
             f"({', '.join(r['parts'])}); the checkpoint's: {r['default_recipe']}.\n"]
    rows = [[x["left_out"], str(x["chosen"]), f"{x['chosen_auroc']:.3f}", f"{x['default_auroc']:.3f}"]
            for x in r["loso"]]
    rows.append(["mean", "", f"{r['loso_mean']['chosen_auroc']:.3f}", f"{r['loso_mean']['default_auroc']:.3f}"])
    lines.append(markdown_table(["source left out", "recipe chosen on the others", "its AUROC there",
                                 "the checkpoint's recipe there"], rows))
    return "\n".join(lines)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/best_model.pth", help="checkpoint written by train.py")
    parser.add_argument("--data", help="dataset whose val split is the known images (default: the one the model "
                        "trained on)")
    parser.add_argument("--other", required=True, help="photos of no known class, in subfolders")
    parser.add_argument("--sources", nargs="+", default=[], metavar="NAME=SUB,SUB",
                        help="group --other's subfolders into sources (default: each subfolder a source)")
    parser.add_argument("--drop", nargs="+", default=[], metavar="PART",
                        help="parts of the combined score left out of every recipe, e.g. penultimate upright "
                             "(what a rotation head adds)")
    parser.add_argument("--workers", type=int, default=2, help="processes that decode images (default: 2)")
    args = parser.parse_args(argv)
    result = measure(args, args.drop)
    print(figures_report("benchmarks.bench_unknown", argv, tables(result), result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
