"""What is fitted on the best model once training ends, and stored in its checkpoint: the softmax temperature
(calibration on val) and the novelty score with its threshold (fitted on train, threshold chosen on val).

Usage (from train.py):
    calibrate_best_model(Path("models/best_model.pth"), val, device, tta=True, writer=None)
    fit_novelty(Path("models/best_model.pth"), train, val, cfg, device)
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from config import TrainConfig
from core.metrics import best_f1_thresholds, confusion_matrix, expected_calibration_error, fit_temperature, tag_figures
from core.plots import plot_confusion_matrix
from dataset import Split, load_items
from loading.layout import read_layout
from prediction.checkpoint import (load_checkpoint, model_from_checkpoint, normalization_of, novelty_record,
                                   save_checkpoint, temperature_of, tta_of, with_novelty, with_tag_thresholds,
                                   with_temperature)
from prediction.novelty import (OTHER_ENERGY_WEIGHT, accepted, fit_sample, fit_states, state_bytes,
                                threshold_for_accept_rate, unknown_report)
from prediction.predict import extract_features, predict_logits, score_images


def calibrate_best_model(path: Path, val: Split, device: torch.device, tta: bool, writer) -> dict:
    """Fit a softmax temperature for the best model on val and store it in its checkpoint (inference and
    evaluate.py divide the logits by it); also log the val confusion matrix to TensorBoard.

    Returns the temperature and the expected calibration error on val before and after it.
    """
    ckpt = load_checkpoint(path)
    logits = predict_logits(model_from_checkpoint(ckpt).to(device), val.images, device, tta=tta,
                            normalization=normalization_of(ckpt))
    fitted = calibration(logits, val.labels)
    save_checkpoint(with_temperature(ckpt, fitted["temperature"]), path)
    cm = confusion_matrix(val.labels, logits.argmax(1), len(ckpt["classes"]))
    if writer is not None:
        writer.add_figure("confusion_matrix/val", plot_confusion_matrix(cm, ckpt["classes"]), ckpt["epoch"])
    return fitted


def store_tag_thresholds(path: Path, probs: torch.Tensor, labels: torch.Tensor, tags: list[str]) -> dict:
    """Each tag's threshold (its best F1 on these val probabilities) stored in the checkpoint at `path`; the
    thresholds and the val figures at them (mAP, micro and macro F1)."""
    thresholds = best_f1_thresholds(probs, labels)
    save_checkpoint(with_tag_thresholds(load_checkpoint(path), thresholds), path)
    figures = tag_figures(probs, labels, thresholds, tags)
    return {"tag_thresholds": dict(zip(tags, thresholds)), "val_map": figures["map"],
            "val_micro_f1": figures["micro_f1"], "val_macro_f1": figures["macro_f1"]}


def tag_thresholds_of_best_model(path: Path, val: Split, device: torch.device, tta: bool) -> dict:
    """store_tag_thresholds for the best model of a full run, from its predictions on val."""
    ckpt = load_checkpoint(path)
    logits = predict_logits(model_from_checkpoint(ckpt).to(device), val.images, device, tta=tta,
                            normalization=normalization_of(ckpt))
    return store_tag_thresholds(path, torch.sigmoid(logits.float().cpu()), val.labels.cpu(), list(ckpt["classes"]))


def calibration(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The softmax temperature fitted on labelled logits, and the expected calibration error before and after."""
    temperature = fit_temperature(logits, labels)
    return {"temperature": temperature,
            "val_ece_before": expected_calibration_error(torch.softmax(logits, 1), labels),
            "val_ece_after": expected_calibration_error(torch.softmax(logits / temperature, 1), labels)}


def novelty_figures(states: dict, chosen: str, threshold: float, seconds: float, n_fit: int,
                    val_scores: dict) -> dict:
    """What the run's summary holds of a fitted novelty score: its name, threshold, cost, size, the images it was
    fitted on, the scores stored and the share of val its threshold accepts."""
    return {"novelty_score": chosen, "novelty_threshold": threshold, "novelty_seconds": round(seconds, 1),
            "novelty_bytes": sum(state_bytes(s) for s in states.values()), "novelty_train_images": n_fit,
            "novelty_scores": list(states),
            "novelty_val_accepted": accepted(val_scores[chosen], threshold).double().mean().item()}


def left_out_images(cfg: TrainConfig, classes: list[str]) -> tuple[Split | None, list[str]]:
    """With --classes, the images of the other classes in val (else train), read as the run read its data:
    images of no class the model knows, for the report at the end of training only (never trained on, never
    used to choose the threshold)."""
    if not cfg.classes:
        return None, []
    everything = read_layout(cfg.data, **dataclasses.replace(cfg, classes=[]).layout_settings(need=None))
    for name in ("val", "train"):
        items = [(p, c) for p, c in everything.items[name] if c not in classes]
        if items:
            others = sorted({c for _, c in items})
            split = load_items(items, others, name, cfg.image_size, cfg.channels, cfg.cache_dir, cfg.workers)
            return (split if len(split.labels) else None), others
    return None, []


def fit_novelty(path: Path, train: Split, val: Split, cfg: TrainConfig, device: torch.device) -> dict:
    """Fit the novelty scores on the best model's features of (a stratified sample of) the train images, choose
    the threshold that accepts --accept-rate of val, store both in its checkpoint; report on the left-out classes
    when there are some. Only the sample's features are held at once, so memory does not grow with the data."""
    started = time.time()
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt).to(device)
    tta = tta_of(ckpt)
    options = {"device": device, "tta": tta, "normalization": normalization_of(ckpt),
               "channels_last": cfg.channels_last, "batch_size": cfg.batch_size}  # no bigger than training's
    sample = train.subset(fit_sample(train.labels.cpu(), cfg.novelty_max_images, cfg.seed))
    turns = cfg.novelty_score == "rotation"  # the four turns' three extra passes only for the score that needs them
    states = fit_states(extract_features(model, sample.images, turns=turns, **options), sample.labels.cpu(),
                        len(ckpt["classes"]), cfg.novelty_score, temperature_of(ckpt),
                        energy_weight=OTHER_ENERGY_WEIGHT if cfg.other else 1.0)
    val_scores = score_images(model, val.images, states, **options)
    threshold = threshold_for_accept_rate(val_scores[cfg.novelty_score], cfg.accept_rate)
    seconds = time.time() - started
    n_fit = len(sample.labels)
    save_checkpoint(with_novelty(ckpt, novelty_record(states, cfg.novelty_score, threshold, cfg.accept_rate, tta,
                                                      seconds, n_fit)), path)
    out = novelty_figures(states, cfg.novelty_score, threshold, seconds, n_fit, val_scores)
    left_out, left_out_names = left_out_images(cfg, ckpt["classes"])
    if left_out is not None:
        report = unknown_report(cfg.novelty_score, threshold, val_scores,
                                score_images(model, left_out.images, states, **options))
        out["known_unknowns"] = {"classes": left_out_names, "images": len(left_out.labels), **report}
    return out
