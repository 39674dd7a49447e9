"""Metrics: pure functions on logits, labels and confusion matrices, used by train.py and evaluate.py.

Usage (from other scripts):
    cm = confusion_matrix(labels, logits.argmax(1), num_classes)
    m = compute_metrics(logits, labels, class_names, temperature)   # what evaluate.py writes to metrics.json
    t = fit_temperature(val_logits, val_labels)                     # softmax temperature for calibration
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: rows are the true classes, columns the predicted ones."""
    flat = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(cm: torch.Tensor, class_names: list[str]) -> dict:
    """Per-class precision, recall, F1 and support from a confusion matrix, with macro and weighted averages.

    A class that is never predicted gets precision 0 and one with no images recall 0 (as scikit-learn's
    zero_division=0), instead of a division by zero.
    """
    cm = cm.double()
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    # tp is 0 wherever a denominator is 0, so clamping the denominator to 1 yields exactly 0 there.
    precision = tp / predicted.clamp(min=1)
    recall = tp / support.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    total = support.sum().item()
    weights = support / max(total, 1)

    def averages(w: torch.Tensor) -> dict:
        return {"precision": (precision * w).sum().item(), "recall": (recall * w).sum().item(),
                "f1": (f1 * w).sum().item(), "support": int(total)}

    per_class = {name: {"precision": p, "recall": r, "f1": f, "support": int(s)}
                 for name, p, r, f, s in zip(class_names, precision.tolist(), recall.tolist(), f1.tolist(),
                                             support.tolist())}
    return {"per_class": per_class, "accuracy": tp.sum().item() / max(total, 1),
            "macro avg": averages(torch.full_like(support, 1 / len(class_names))),
            "weighted avg": averages(weights)}


def correct_count(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> int:
    """How many images have their true class among the k highest logits (k = 1: the prediction is right); with
    0/1 tags (labels (N, T)), the share of each image's tags right at probability 0.5, summed over the images."""
    if len(labels) == 0:
        return 0
    if labels.dim() == 2:
        return float(((logits > 0) == labels.bool()).float().mean(1).sum().item())
    if k == 1:  # argmax: ties go to the first class, as everywhere else
        return int((logits.argmax(1) == labels).sum().item())
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((top == labels[:, None]).any(1).sum().item())


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of images whose true class is among the k highest logits."""
    return correct_count(logits, labels, k) / len(labels) if len(labels) else float("nan")


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed plain cross-entropy (no label smoothing or class weights): per-process sums add up across ranks; with
    0/1 tags, each image's binary cross-entropy averaged over its tags, summed."""
    if len(labels) and labels.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(1).sum().item()
    return F.cross_entropy(logits.float(), labels, reduction="sum").item() if len(labels) else 0.0


def energy_margin_loss(known_logits: torch.Tensor, other_logits: torch.Tensor, known_margin: float = 3.0,
                       other_margin: float = 1.0) -> torch.Tensor:
    """Squared hinges on logsumexp (minus the energy) of the logits (Liu et al. 2020, energy-based outlier exposure):
    at least known_margin on the known images, at most other_margin on the images of no class; 0 when both hold."""
    known = torch.relu(known_margin - torch.logsumexp(known_logits, dim=1)).pow(2).mean()
    other = torch.relu(torch.logsumexp(other_logits, dim=1) - other_margin).pow(2).mean()
    return known + other


def mixed_loss(loss_fn, logits: torch.Tensor, labels: torch.Tensor, box_labels: torch.Tensor | None = None,
               own: float = 1.0) -> torch.Tensor:
    """loss_fn on a batch's logits; on a CutMix batch (dataset.cutmix) split by area between each image's label
    (weight `own`) and `box_labels`, the label of the image its box came from (labels[perm])."""
    if box_labels is None:
        return loss_fn(logits, labels)
    return own * loss_fn(logits, labels) + (1 - own) * loss_fn(logits, box_labels)


def consistency_loss(strong_logits: torch.Tensor, weak_logits: torch.Tensor, threshold: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's unlabelled loss (Sohn et al., 2020): each weak view's most probable class is the target of its
    strong view where that probability is at least `threshold`; cross-entropy of the strong views towards their
    targets, zero for the others, averaged over all of them. Returns (the loss, the mask of images with a target);
    no gradient flows through the weak views."""
    probs = torch.softmax(weak_logits.detach().float(), 1)
    confidence, target = probs.max(1)
    mask = confidence >= threshold
    loss = F.cross_entropy(strong_logits.float(), target, reduction="none")
    return (loss * mask).mean(), mask


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins by image count."""
    if len(labels) == 0:
        return float("nan")
    conf, pred = probs.double().max(1)
    correct = (pred == labels).double()
    inner_edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(conf, inner_edges)  # bin i holds (edge_i, edge_i+1]
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    correct_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    # sum over bins of n_b/N * |acc_b - conf_b| == sum over bins of |correct_b - conf_b| / N
    return ((conf_sum - correct_sum).abs().sum() / len(labels)).item()


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (cross-entropy) of the softmax of logits / temperature."""
    return F.cross_entropy(logits.double() / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, low: float = 0.01, high: float = 100.0,
                    steps: int = 50) -> float:
    """The softmax temperature T in [low, high] that minimises the NLL of logits / T.

    A golden-section search on log T: the NLL is convex in 1/T, hence has a single minimum along log T,
    which the search brackets without gradients or a learning rate. Dividing by T keeps every argmax.
    """
    if len(labels) == 0:
        return 1.0
    logits = logits.double()
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
    f1, f2 = nll(logits, labels, math.exp(x1)), nll(logits, labels, math.exp(x2))
    for _ in range(steps):
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - ratio * (b - a)
            f1 = nll(logits, labels, math.exp(x1))
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + ratio * (b - a)
            f2 = nll(logits, labels, math.exp(x2))
    return math.exp((a + b) / 2)


def most_confident_wrong(probs: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the (at most n) misclassified images, most confident prediction first."""
    conf, pred = probs.max(1)
    wrong = (pred != labels).nonzero().flatten()
    return wrong[conf[wrong].argsort(descending=True, stable=True)][:n]


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                    temperature: float = 1.0) -> dict:
    """Everything metrics.json holds, in plain types: loss, accuracy, top-5, calibration, per-class figures."""
    k = len(class_names)
    cm = confusion_matrix(labels, logits.argmax(1), k)
    probs = torch.softmax(logits.double() / temperature, 1)
    out = {"images": len(labels), "loss": nll(logits, labels), **classification_report(cm, class_names)}
    if k > 5:
        out["top5_accuracy"] = topk_accuracy(logits, labels, 5)
    out.update(temperature=temperature, loss_calibrated=nll(logits, labels, temperature),
               ece_uncalibrated=expected_calibration_error(torch.softmax(logits.double(), 1), labels),
               ece=expected_calibration_error(probs, labels), classes=list(class_names),
               confusion_matrix=cm.tolist())
    return out


# ---------------------------------------------------------------- several tags per image

def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Average precision of one tag: the mean, over its positive images, of the precision among the images scored
    at least as high (ranked by score, ties in their given order); nan when no image has the tag."""
    positives = int(targets.sum())
    if positives == 0:
        return float("nan")
    hits = targets[torch.argsort(scores, descending=True, stable=True)].float()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / positives)


def tag_average_precisions(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Each tag's average_precision over the images (probs and targets (N, T)); mAP is their mean over the tags
    that some image has."""
    return [average_precision(probs[:, t], targets[:, t]) for t in range(targets.shape[1])]


def mean_ap(aps: list[float]) -> float:
    """The mean of the tags' average precisions, leaving out tags no image has (nan)."""
    known = [a for a in aps if not math.isnan(a)]
    return sum(known) / len(known) if known else float("nan")


def best_f1_thresholds(probs: torch.Tensor, targets: torch.Tensor, default: float = 0.5) -> list[float]:
    """Per tag, the probability threshold with the best F1 on these images (the midpoint between the lowest
    probability kept and the next one down); `default` for a tag no image has."""
    out = []
    for t in range(targets.shape[1]):
        p, y = probs[:, t], targets[:, t].float()
        if y.sum() == 0:
            out.append(default)
            continue
        order = torch.argsort(p, descending=True, stable=True)
        sp, hits = p[order], y[order].cumsum(0)
        f1 = 2 * hits / (torch.arange(1, len(p) + 1) + y.sum())
        k = int(f1.argmax())
        below = sp[k + 1].item() if k + 1 < len(sp) else 0.0
        out.append((sp[k].item() + below) / 2)
    return out


def tag_figures(probs: torch.Tensor, targets: torch.Tensor, thresholds: list[float], tags: list[str]) -> dict:
    """What evaluate.py reports for several tags per image: per tag AP, precision, recall, F1 and support at
    `thresholds`; mAP; micro F1 (over every image-tag pair) and macro F1 (the mean over the tags with support)."""
    predicted = probs >= torch.tensor(thresholds)
    truth = targets.bool()
    aps = tag_average_precisions(probs, targets)
    per_tag, f1s = {}, []
    for t, name in enumerate(tags):
        tp = int((predicted[:, t] & truth[:, t]).sum())
        p_n, support = int(predicted[:, t].sum()), int(truth[:, t].sum())
        precision = tp / p_n if p_n else 0.0
        recall = tp / support if support else float("nan")
        f1 = 2 * tp / (p_n + support) if p_n + support else 0.0
        per_tag[name] = {"ap": aps[t], "precision": precision, "recall": recall, "f1": f1, "support": support,
                         "threshold": thresholds[t]}
        if support:
            f1s.append(f1)
    tp = int((predicted & truth).sum())
    micro = 2 * tp / max(1, int(predicted.sum()) + int(truth.sum()))
    return {"per_tag": per_tag, "map": mean_ap(aps), "micro_f1": micro,
            "macro_f1": sum(f1s) / len(f1s) if f1s else float("nan"), "images": len(targets)}
