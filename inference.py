"""Predict the class of images with a trained checkpoint.

Usage:
    python inference.py --image Dataset/test/dog/sample.jpg        # -> "dog  0.97"
    python inference.py --image a.jpg b.png photos/ "more/*.jpg"   # several files, folders, globs
    python inference.py --image photos/ --json                     # one JSON object per image
    python inference.py --image photos/ --csv predictions.csv
    python inference.py --image test/ --csv submission.csv --csv-columns id,label   # Kaggle-style: file stem, label
    python inference.py --image test/ --csv submission.csv --csv-columns id,dog     # id and P(dog)
    python inference.py --image x.jpg --threshold 0.8              # "unknown" below 80% confidence
    python inference.py --image photos/ --reject --json            # "unknown" when of no known class
    python inference.py --image x.jpg --checkpoint models/best_model.pth
    python inference.py --image photos/ --runtime onnx-int8         # the INT8 model export.py --format onnx-int8 wrote

Needs nothing but the checkpoint: class names, image size, channels and normalization travel inside it, and
the novelty score and threshold that --reject uses (fitted at the end of training; see prediction/novelty.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from core.common import UserError, reports_user_errors
from loading.decode import BadImage, expand_inputs
from prediction.checkpoint import DEFAULT_PATH, load_checkpoint, novelty_of
from prediction.classifier import BATCH, Classifier, add_runtime_flags, default_int8_path


def classify(paths: list[Path], clf: Classifier) -> list[dict]:
    """One result per path: {'path', 'label', 'confidence', 'probabilities'[, 'novelty_score', 'known']} or
    {'path', 'error'}; the readable images are scored together (Classifier.predict_decoded)."""
    results, images, good = [], [], []
    for p in paths:
        results.append({"path": str(p)})
        try:
            images.append(clf.decode(p))
            good.append(len(results) - 1)
        except BadImage as e:
            results[-1]["error"] = str(e).removeprefix(f"{p}: ")
    for i in range(0, len(images), BATCH):
        for k, prediction in zip(good[i:i + BATCH], clf.predict_decoded(images[i:i + BATCH])):
            results[k].update(prediction.as_dict())
    return results


FIXED_COLUMNS = ("id", "path", "label", "confidence", "error")
NOVELTY_COLUMNS = ("novelty_score", "known")  # only with a checkpoint that has a novelty score


def csv_columns(spec: str, classes: list[str], novelty: bool = False) -> list[str]:
    """The --csv-columns list (default: path, label, confidence, one probability per class, the novelty score and
    verdict when the checkpoint has them, error), checked."""
    extra = list(NOVELTY_COLUMNS) if novelty else []
    if not spec:
        return ["path", "label", "confidence", *classes, *extra, "error"]
    columns = [c.strip() for c in spec.split(",") if c.strip()]
    allowed = [*FIXED_COLUMNS, *extra, *classes]
    unknown = [c for c in columns if c not in allowed]
    if unknown or not columns:
        raise UserError(f"--csv-columns: unknown column(s) {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(allowed)} (a class name gives that class's probability)")
    return columns


def csv_row(r: dict, columns: list[str]) -> list:
    """One result as the cells of `columns`; id is the file name without its extension."""
    values = {"id": Path(r["path"]).stem, "path": r["path"], "label": r.get("label", ""),
              "confidence": r.get("confidence", ""), "error": r.get("error", ""),
              **{k: r.get(k, "") for k in NOVELTY_COLUMNS}}
    probs = r.get("probabilities", {})
    return [values[c] if c in values else probs.get(c, "") for c in columns]


def answer(r: dict) -> str:
    """'dog  0.97', or for several tags per image each tag with its probability: 'people 0.94, portrait 0.88'."""
    if "labels" not in r:
        return f"{r['label']}  {r['confidence']:.2f}"
    return ", ".join(f"{t} {r['probabilities'][t]:.2f}" for t in r["labels"]) or "(no tag)"


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", nargs="+", required=True, help="image files, folders or glob patterns")
    parser.add_argument("--checkpoint", default=DEFAULT_PATH, help="checkpoint written by train.py")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--csv", metavar="FILE", help="also write path,label,confidence,... rows to FILE")
    parser.add_argument("--csv-columns", metavar="LIST", default="",
                        help="comma list of --csv columns from id (the file stem), path, label, confidence, error "
                        "and class names (their probability), e.g. id,label for a submission (default: path, "
                        "label, confidence, every class, error)")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="answer 'unknown' when the top probability is below this (0-1)")
    parser.add_argument("--reject", action="store_true",
                        help="answer 'unknown' when the image's novelty score says it is of no known class "
                             "(the score and threshold stored at the end of training)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average with the mirrored image (default: as in training)")
    add_runtime_flags(parser, "torch", "; onnx's export takes a few seconds, paid back on large folders")
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be between 0 and 1, not {args.threshold}")
    ckpt = load_checkpoint(args.checkpoint)
    columns = csv_columns(args.csv_columns, ckpt["classes"], novelty_of(ckpt) is not None)
    paths = expand_inputs(args.image)
    clf = Classifier(ckpt, args.runtime, args.threshold, args.reject, args.tta, torch.get_num_threads(),
                     args.int8_model or default_int8_path(args.checkpoint))
    if args.runtime != "torch":
        print(f"scoring with {clf.runtime_note}", file=sys.stderr)
    results = classify(paths, clf)
    for r in results:
        # With --reject: "dog  0.97  novelty 1.52 known" or "unknown  0.91  novelty 9.80 no known class".
        novelty = (f"  novelty {r['novelty_score']:.2f} {'known' if r['known'] else 'no known class'}"
                   if args.reject and "novelty_score" in r else "")
        if args.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"error: {r['path']}: {r['error']}", file=sys.stderr)
        elif len(results) == 1:
            print(f"{answer(r)}{novelty}")
        else:
            print(f"{r['path']}  {answer(r)}{novelty}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(csv_row(r, columns) for r in results)
    bad = [r for r in results if "error" in r]
    if bad and len(results) > 1 and not args.json:
        print(f"{len(bad)} of {len(results)} images could not be read", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
