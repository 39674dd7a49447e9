"""Evaluate a trained checkpoint: metrics, confusion matrix, most confidently wrong images, Grad-CAM heatmaps.

Usage:
    python evaluate.py --data Dataset                      # the test split, with models/best_model.pth
    python evaluate.py --data ../shared/data/catdog --split val
    python evaluate.py --split val                         # the data, labels and carved val the model trained on
    python evaluate.py --data Dataset --checkpoint models/best_model.pth --out-dir curves --gallery 32
    python evaluate.py --gradcam photo.jpg more/*.jpg       # heatmaps of what the predicted class looked at
    python evaluate.py --gradcam photo.jpg --cam-layer layers.0    # a finer map (16x16 at 64x64), from stage 1
    python evaluate.py --data ../shared/data/catdog --split val --unknown-dir other_photos/   # novelty scores

Writes OUT_DIR/metrics.json, confusion_matrix.png (counts and row-normalized), most_confident_wrong.png and
most_confident_wrong.csv; with --gradcam, OUT_DIR/gradcam_<image name>.png. The class names, image size,
channels and softmax temperature come from the checkpoint. The data is read as train.py read it (loading/layout.py,
with the checkpoint's --labels/--labels-from-name/--name-pattern unless given), so a val or test split that
train.py carved out of train (--val-fraction, --test-fraction, --seed) is carved again, file for file.
OUT_DIR defaults to curves/<run name>/ (the training run's curves folder and name, from the checkpoint).

--unknown-dir DIR (images of no known class, any layout or a flat folder) tells them apart from the split's
images by the checkpoint's novelty scores: AUROC and the false-positive rate at 95% true-positive rate of each
score, and at the stored threshold the shares of known images rejected and of unknown images accepted, in
metrics.json under "unknown", and OUT_DIR/unknown_scores.png (both histograms and the threshold).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from config import SOURCE_FIELDS, TrainConfig, add_flags
from core.common import SPLITS, UserError, markdown_source, markdown_table, pick_device, provenance, reports_user_errors
from core.metrics import compute_metrics, most_confident_wrong, tag_figures
from core.plots import (plot_confusion_matrix, plot_gallery, plot_gradcam, plot_pr_curves, plot_unknown_scores,
                        save_figure)
from dataset import load_items
from loading.carve import narrow_tags
from loading.decode import BadImage, decode_image, expand_inputs
from loading.layout import read_layout, layout_splits
from loading.table import split_of
from prediction.checkpoint import (DEFAULT_PATH, config_of, load_checkpoint, model_from_checkpoint, normalization_of,
                                   novelty_of, run_name_of, tag_thresholds_of, temperature_of, tta_of)
from prediction.novelty import folder_groups, load_images, report_by_group, split_by_group, unknown_report
from prediction.predict import PREDICTION_DIGITS, explain, normalize, predict_logits, score_images


def format_report(m: dict) -> str:
    """The metrics as a table in the style of scikit-learn's classification_report."""
    width = max(12, *(len(c) for c in m["per_class"]))
    head = f"{'':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>8}"

    def row(name: str, r: dict) -> str:
        return f"{name:<{width}}  {r['precision']:>9.4f}  {r['recall']:>9.4f}  {r['f1']:>9.4f}  {r['support']:>8}"

    lines = [head, *(row(c, r) for c, r in m["per_class"].items()), ""]
    lines.append(f"{'accuracy':<{width}}  {'':>9}  {'':>9}  {m['accuracy']:>9.4f}  {m['images']:>8}")
    lines += [row("macro avg", m["macro avg"]), row("weighted avg", m["weighted avg"]), ""]
    if "top5_accuracy" in m:
        lines.append(f"top-5 accuracy {m['top5_accuracy']:.4f}")
    lines.append(f"loss {m['loss']:.4f}; with temperature {m['temperature']:.3f}: loss {m['loss_calibrated']:.4f}, "
                 f"ECE {m['ece_uncalibrated']:.4f} -> {m['ece']:.4f}")
    if len(m["classes"]) <= 10:
        cw = max(6, width)
        lines += ["", "confusion matrix (rows: true class, columns: predicted)",
                  " " * cw + "".join(f"{c[:8]:>9}" for c in m["classes"])]
        lines += [f"{c:<{cw}}" + "".join(f"{v:>9}" for v in r) for c, r in zip(m["classes"], m["confusion_matrix"])]
    return "\n".join(lines)


# ---------------------------------------------------------------- commands

def check_classes(found: list[str], expected: list[str], where: str, subset_ok: bool = False) -> None:
    """Refuse data whose classes differ from the checkpoint's classes, naming the differences.

    Extra classes are allowed when the model was trained on chosen classes (--classes): training ignored them too.
    """
    missing = [c for c in expected if c not in found]
    extra = [] if subset_ok else [c for c in found if c not in expected]
    if missing or extra:
        parts = ([f"missing from the data: {', '.join(missing)}"] if missing else []) + \
                ([f"not in the checkpoint: {', '.join(extra)}"] if extra else [])
        raise UserError(f"the classes in {where} do not match the checkpoint's classes "
                        f"({', '.join(expected)}): {'; '.join(parts)}")


def data_settings(args: argparse.Namespace, saved: dict) -> TrainConfig:
    """The training run's data settings (label source, classes, carve fractions, seed) with --data and the
    label-source flags given here on top."""
    data = args.data or saved.get("data")
    if not data:
        raise UserError("give the dataset with --data DIR")
    given = {k: getattr(args, k) for k in SOURCE_FIELDS if hasattr(args, k)}
    return dataclasses.replace(TrainConfig.from_dict(saved), data=data, **given)


def out_dir_of(out_dir: str | None, ckpt: dict) -> Path:
    """--out-dir, else the training run's curves folder and run name (curves/<run name>/), so evaluating one run
    never overwrites another's figures; plain curves/ for a checkpoint that records no run name."""
    if out_dir:
        return Path(out_dir)
    cfg = config_of(ckpt)
    return Path(cfg.get("curves_dir") or "curves") / run_name_of(ckpt)


def write_gallery(idx: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                  paths: list[str], classes: list[str], out: Path) -> None:
    """most_confident_wrong.png (a captioned grid) and most_confident_wrong.csv for the images at idx."""
    rows, captions = [], []
    for i in idx.tolist():
        conf, pred = probs[i].max(0)
        true, pred = classes[int(labels[i])], int(pred)
        rows.append([paths[i], true, classes[pred], f"{conf.item():.4f}", f"{probs[i, labels[i]].item():.4f}"])
        captions.append(f"{Path(paths[i]).name[:18]}\ntrue {true[:14]}\npred {classes[pred][:14]} {conf.item():.2f}")
    with open(out / "most_confident_wrong.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "confidence", "p_true"])
        w.writerows(rows)
    save_figure(plot_gallery(images[idx], captions), out / "most_confident_wrong.png")


def unknown_section(ckpt: dict, model: nn.Module, known_images: torch.Tensor, args: argparse.Namespace,
                    device: torch.device, out: Path) -> dict:
    """metrics.json's "unknown": the split's images (known) against those under --unknown-dir, for every novelty
    score the checkpoint holds; also writes unknown_scores.png for the score --reject uses."""
    novelty = novelty_of(ckpt, needed_by="--unknown-dir")
    images, paths, bad = load_images(args.unknown_dir, ckpt["image_size"], ckpt["channels"], args.workers)
    for path, reason in bad:
        print(f"skipped unreadable image {path}: {reason}")

    options = {"device": device, "batch_size": args.batch_size, "tta": novelty["tta"],
               "normalization": normalization_of(ckpt)}
    known = score_images(model, known_images, novelty["states"], **options)
    unknown = score_images(model, images, novelty["states"], **options)
    name, threshold = novelty["score"], novelty["threshold"]
    groups = folder_groups(paths, args.unknown_dir)
    report = unknown_report(name, threshold, known, unknown, groups)
    by_folder = split_by_group(unknown[name], groups)
    report["by_folder"] = report_by_group(known[name], by_folder, threshold)
    save_figure(plot_unknown_scores(known[name], unknown[name], threshold, name, by_folder), out / "unknown_scores.png")
    print(f"\nunknown images: {len(images)} from {args.unknown_dir}"
          + (f" ({len(bad)} unreadable skipped)" if bad else "") + f" against {len(known_images)} known")
    print(f"{'score':<18}  {'AUROC':>6}  {'FPR at 95% TPR':>14}")
    for score, r in report["by_score"].items():
        used = "  (--reject)" if score == name else ""
        print(f"{score:<18}  {r['auroc']:>6.3f}  {r['fpr_at_95_tpr']:>14.1%}{used}")
    if len(report["by_folder"]) > 1:
        print(f"\n{'folder (' + name + ')':<24}  {'images':>6}  {'AUROC':>6}  {'FPR at 95% TPR':>14}  "
              f"{'accepted at threshold':>21}")
        for g, r in report["by_folder"].items():
            print(f"{g:<24}  {r['images']:>6}  {r['auroc']:>6.3f}  {r['fpr_at_95_tpr']:>14.1%}  "
                  f"{r['unknown_accepted']:>21.1%}")
    print(f"at the stored threshold {threshold:.4g} ({name}): {report['known_rejected']:.1%} of the known images "
          f"rejected, {report['unknown_accepted']:.1%} of the unknown ones accepted; "
          f"wrote {out / 'unknown_scores.png'}")
    return report


def unknown_markdown(report: dict, known: str) -> str:
    """--unknown-dir's figures as the Markdown table BENCHMARKS.md holds: AUROC / FPR at 95% TPR of every
    stored score on the whole unknown set and on each of its folders, then the shares at the stored threshold."""
    u = report["unknown"]
    folders = u["by_folder"] if len(u["by_folder"]) > 1 else {}
    header = ["score: AUROC / FPR at 95% TPR", f"all {u['unknown_images']:,}",
              *(f"{g} {r['images']:,}" for g, r in folders.items())]
    rows = [[f"**{score}** (stored)" if score == u["score"] else score,
             *(f"{c['auroc']:.3f} / {c['fpr_at_95_tpr']:.1%}" for c in [r, *(r["by_folder"][g] for g in folders)])]
            for score, r in u["by_score"].items()]
    accepted = "".join(f", {g} {r['unknown_accepted']:.1%}" for g, r in folders.items())
    return (f"known: {u['known_images']:,} images of {known}, accuracy {report['accuracy']:.2%}\n\n"
            + markdown_table(header, rows) + f"\n\nAt the stored threshold ({u['score']}): {u['known_rejected']:.1%}"
            f" of the known images rejected; unknown images accepted: all {u['unknown_accepted']:.1%}{accepted}")


def evaluate_split(args: argparse.Namespace, device: torch.device, prov: dict) -> dict:
    """Metrics of the checkpoint on DATA/SPLIT, printed and written to OUT_DIR with the plots and the gallery;
    `prov` (common.provenance) goes with the --unknown-dir figures."""
    ckpt = load_checkpoint(args.checkpoint)
    if args.unknown_dir:
        novelty_of(ckpt, needed_by="--unknown-dir")  # before the work, not after it
    classes, cfg = ckpt["classes"], config_of(ckpt)
    split_name = split_of(args.split)
    if split_name is None:
        raise UserError(f"--split {args.split!r}: choose one of {', '.join(SPLITS)}")
    settings = data_settings(args, cfg)
    lay = read_layout(settings.data, **settings.layout_settings(need=split_name))
    print(lay.description)
    check_classes(lay.classes, classes, settings.data, subset_ok=bool(settings.classes))
    thresholds = tag_thresholds_of(ckpt)
    items = [(p, c) for p, c in layout_splits(lay)[split_name]
             if (narrow_tags(c, set(classes)) if thresholds is not None else c in classes)]
    where = f"{settings.data} ({split_name}" + (", carved from train" if split_name in lay.carve else "") + ")"
    split = load_items(items, classes, split_name, ckpt["image_size"], ckpt["channels"], args.cache_dir, args.workers,
                       tags=thresholds is not None)
    for path, reason in split.bad:
        print(f"skipped unreadable image {path}: {reason}")
    if len(split.labels) == 0:
        raise UserError(f"no readable images in {where}")

    tta = tta_of(ckpt) if args.tta is None else args.tta
    temperature = temperature_of(ckpt)
    model = model_from_checkpoint(ckpt).to(device)
    logits = predict_logits(model, split.images, device, args.batch_size, tta=tta,
                            normalization=normalization_of(ckpt))
    print(f"{args.checkpoint} on {where}: {len(split.labels)} images"
          + (f", {len(split.bad)} unreadable skipped" if split.bad else "") + f", tta {tta}\n")
    out = out_dir_of(args.out_dir, ckpt)
    out.mkdir(parents=True, exist_ok=True)
    if thresholds is not None:
        return evaluate_tags(torch.sigmoid(logits.float()), split, classes, thresholds, out,
                             {"checkpoint": str(args.checkpoint), "data": str(settings.data), "split": split_name,
                              "layout": lay.description, "tta": tta, "skipped": [list(b) for b in split.bad]},
                             args.gallery)
    metrics = compute_metrics(logits, split.labels, classes, temperature)
    print(format_report(metrics))
    report = {"checkpoint": str(args.checkpoint), "data": str(settings.data), "split": split_name,
              "layout": lay.description, "tta": tta,
              "skipped": [list(b) for b in split.bad], **metrics}
    if args.unknown_dir:
        report["unknown"] = unknown_section(ckpt, model, split.images, args, device, out)
        report["unknown"].update(prov)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    save_figure(plot_confusion_matrix(torch.tensor(metrics["confusion_matrix"]), classes),
                out / "confusion_matrix.png")
    probs = torch.softmax(logits.double() / temperature, 1)
    wrong = most_confident_wrong(probs, split.labels, args.gallery)
    write_gallery(wrong, probs, split.labels, split.images, split.paths, classes, out)
    print(f"\nwrote {out / 'metrics.json'}, {out / 'confusion_matrix.png'}, {out / 'most_confident_wrong.png'} "
          f"and .csv ({len(wrong)} of {int((probs.argmax(1) != split.labels).sum())} misclassified images)")
    if args.markdown and args.unknown_dir:
        print("\n" + unknown_markdown(report, where) + "\n\n" + markdown_source(report["unknown"]))
    return report


def format_tags(figures: dict) -> str:
    """The per-tag table (AP, precision, recall, F1, support, threshold), most frequent tag first, then mAP and
    the micro and macro F1."""
    per_tag = figures["per_tag"]
    width = max(len(t) for t in per_tag) + 2
    lines = [f"{'tag':<{width}}{'AP':>7}{'prec':>7}{'recall':>8}{'F1':>7}{'support':>9}{'threshold':>11}"]
    for tag, f in sorted(per_tag.items(), key=lambda kv: -kv[1]["support"]):
        lines.append(f"{tag:<{width}}{f['ap']:>7.3f}{f['precision']:>7.3f}{f['recall']:>8.3f}{f['f1']:>7.3f}"
                     f"{f['support']:>9}{f['threshold']:>11.3f}")
    lines.append(f"\nmAP {figures['map']:.4f}  micro F1 {figures['micro_f1']:.4f}  macro F1 {figures['macro_f1']:.4f}  "
                 f"({figures['images']} images; each tag predicted at its stored threshold)")
    return "\n".join(lines)


def evaluate_tags(probs: torch.Tensor, split, tags: list[str], thresholds: list[float], out: Path, report: dict,
                  gallery: int) -> dict:
    """evaluate_split for several tags per image: the per-tag figures printed and in metrics.json, a precision-
    recall curve per tag (pr_curves.png), and the images whose predicted tags are furthest from theirs
    (worst_misses.png and .csv)."""
    figures = tag_figures(probs, split.labels, thresholds, tags)
    print(format_tags(figures))
    report = {**report, **figures}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    aps = [figures["per_tag"][t]["ap"] for t in tags]
    save_figure(plot_pr_curves(probs, split.labels, tags, aps), out / "pr_curves.png")
    predicted = probs >= torch.tensor(thresholds)
    wrong = (predicted != split.labels.bool()).float() * (probs - split.labels).abs()
    worst = wrong.sum(1).argsort(descending=True)[:gallery]
    worst = worst[wrong.sum(1)[worst] > 0]
    rows, captions = [], []
    for i in worst.tolist():
        truth = {t for t, y in zip(tags, split.labels[i].tolist()) if y}
        said = {t for t, p in zip(tags, predicted[i].tolist()) if p}
        rows.append([split.paths[i], " ".join(sorted(truth)), " ".join(sorted(said))])
        captions.append(f"{Path(split.paths[i]).name[:18]}\nmissed {' '.join(sorted(truth - said))[:22]}\n"
                        f"extra {' '.join(sorted(said - truth))[:22]}")
    with open(out / "worst_misses.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "tags", "predicted"], *rows])
    save_figure(plot_gallery(split.images[worst], captions), out / "worst_misses.png")
    print(f"\nwrote {out / 'metrics.json'}, {out / 'pr_curves.png'}, {out / 'worst_misses.png'} and .csv")
    return report


def gradcam_images(args: argparse.Namespace) -> int:
    """A Grad-CAM PNG per image for its predicted class; unreadable images are reported and skipped.

    Preprocessing, mirror averaging (--tta, default as in training) and temperature are inference.py's, so the
    label and confidence printed are the ones `python inference.py --image` prints."""
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt)
    classes, temperature, norm = ckpt["classes"], temperature_of(ckpt), normalization_of(ckpt)
    tta = tta_of(ckpt) if args.tta is None else args.tta
    out, used, failed, told = out_dir_of(args.out_dir, ckpt), set(), 0, False
    for path in expand_inputs(args.gradcam):
        try:
            image = torch.from_numpy(decode_image(path, ckpt["image_size"], ckpt["channels"]))
        except BadImage as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        result = explain(model, normalize(image[None], norm), args.cam_layer, tta, temperature)
        if not told:
            print(f"Grad-CAM on {result.layer} ({result.cells[0]}x{result.cells[1]} cells at "
                  f"{ckpt['image_size']}x{ckpt['image_size']} input), tta {tta}")
            told = True
        label = classes[result.class_idx]
        name, n = f"gradcam_{path.stem}.png", 1
        while name in used:  # two photos with the same name in different folders
            n += 1
            name = f"gradcam_{path.stem}_{n}.png"
        used.add(name)
        confidence = round(result.probability, PREDICTION_DIGITS)  # as a Prediction holds it: both print alike
        fig = plot_gradcam(image, result.cam, f"Grad-CAM ({result.layer}): {label} {confidence:.2f}")
        print(f"{path}  {label}  {confidence:.2f}  -> {save_figure(fig, out / name)}")
    return 1 if failed else 0


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset folder, any layout train.py reads (default: the one the model "
                        "trained on)")
    parser.add_argument("--split", default="test", help="train, val or test (default: test); a split train.py "
                        "carved from train is carved again the same way")
    parser.add_argument("--checkpoint", default=DEFAULT_PATH, help="checkpoint written by train.py")
    parser.add_argument("--out-dir", help="where metrics.json and the PNGs go (default: curves/<run name>/, from "
                        "the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    parser.add_argument("--gallery", type=int, default=32,
                        help="how many most confidently wrong images to show (default: 32)")
    parser.add_argument("--cache-dir", default="", help="reuse/keep decoded images here, as train.py (default: off)")
    parser.add_argument("--workers", type=int, default=2, help="processes that decode images (default: 2)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average with the mirrored image (default: as in training)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    parser.add_argument("--unknown-dir", metavar="DIR",
                        help="images of no known class (any layout): how well the novelty scores tell them apart")
    parser.add_argument("--markdown", action="store_true", help="with --unknown-dir: also print its figures as a "
                        "Markdown table, with the command, commit, date and machine")
    parser.add_argument("--gradcam", nargs="+", metavar="IMAGE",
                        help="instead of evaluating: write Grad-CAM heatmaps of these images, folders or globs")
    parser.add_argument("--cam-layer", default="auto", metavar="NAME",
                        help="layer Grad-CAM weighs, e.g. layers.0-layers.3 (resnet_small) or layer1-layer4 "
                             "(resnet18/50); auto: the deepest stage with at least 8x8 cells (default: auto)")
    add_flags(parser, SOURCE_FIELDS, default_note=" (default: as in training)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.gallery < 0:
        raise UserError("--batch-size must be at least 1 and --gallery at least 0")
    if args.gradcam:
        return gradcam_images(args)
    evaluate_split(args, pick_device(args.device), provenance("evaluate.py", sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
