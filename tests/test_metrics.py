"""metrics.py: confusion matrix, per-class report, top-k, calibration error and temperature, on tiny tensors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fixed_confusion_matrix
from core import metrics
from core.metrics import consistency_loss, mixed_loss

NAMES = ["a", "b", "c", "d"]


def test_confusion_matrix_counts():
    assert fixed_confusion_matrix().tolist() == [[3, 1, 0, 0], [1, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


def test_report_against_hand_computed_values_without_division_by_zero():
    r = metrics.classification_report(fixed_confusion_matrix(), NAMES)
    a, b, c, d = (r["per_class"][n] for n in NAMES)
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((3 / 5, 3 / 4, 2 / 3, 4))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((2 / 4, 2 / 3, 4 / 7, 3))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 2)
    assert (d["precision"], d["recall"], d["f1"], d["support"]) == (0.0, 0.0, 0.0, 0)
    assert r["accuracy"] == pytest.approx(5 / 9)
    macro, weighted = r["macro avg"], r["weighted avg"]
    assert (macro["precision"], macro["recall"], macro["f1"]) == pytest.approx(
        ((3 / 5 + 2 / 4) / 4, (3 / 4 + 2 / 3) / 4, (2 / 3 + 4 / 7) / 4))
    assert (weighted["precision"], weighted["recall"], weighted["f1"]) == pytest.approx(
        ((4 * 3 / 5 + 3 * 2 / 4) / 9, 5 / 9, (4 * 2 / 3 + 3 * 4 / 7) / 9))
    assert macro["support"] == weighted["support"] == 9
    assert json.loads(json.dumps(r)) == r  # plain types, no NaN


def test_topk_accuracy_and_most_confident_wrong():
    logits = torch.tensor([[5.0, 4, 0, 0, 0, 0], [0, 0, 0, 0, 0, 9], [3, 0, 0, 0, 0, 1], [0, 2, 0, 0, 0, 0]])
    labels = torch.tensor([1, 0, 0, 1])
    assert metrics.topk_accuracy(logits, labels, 1) == pytest.approx(2 / 4)
    assert metrics.topk_accuracy(logits, labels, 2) == pytest.approx(3 / 4)
    assert "top5_accuracy" in metrics.compute_metrics(logits, labels, list("uvwxyz"))
    probs = logits.softmax(1)
    assert metrics.most_confident_wrong(probs, labels, 10).tolist() == [1, 0]
    assert metrics.most_confident_wrong(probs, labels, 1).tolist() == [1]


def test_expected_calibration_error_hand_computed():
    probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.65, 0.35], [0.25, 0.75]])
    labels = torch.tensor([0, 1, 0, 1])  # right, wrong, right, right; each in its own bin of 10
    assert metrics.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(
        (0.05 + 0.85 + 0.35 + 0.25) / 4)
    # One bin holding 0.85 and 0.65 confidence, half right: |0.5 - 0.75| = 0.25.
    assert metrics.expected_calibration_error(probs[1:3], labels[1:3], n_bins=1) == pytest.approx(0.25)


def test_temperature_scaling_keeps_argmax_and_lowers_nll_on_overconfident_logits():
    # 100 two-class predictions with a logit gap of 10 (99.995% sure) of which only 70 are right: the best
    # temperature makes sigmoid(10 / T) = 0.7, i.e. T = 10 / ln(7/3).
    labels = torch.zeros(100, dtype=torch.long)
    labels[70:] = 1
    logits = torch.tensor([[10.0, 0.0]]).repeat(100, 1)
    t = metrics.fit_temperature(logits, labels)
    assert t == pytest.approx(10 / math.log(7 / 3), rel=1e-4)
    assert metrics.nll(logits, labels, t) < metrics.nll(logits, labels) - 1
    probs_after = torch.softmax(logits / t, 1)
    assert torch.equal(probs_after.argmax(1), logits.argmax(1))
    assert metrics.expected_calibration_error(probs_after, labels) < \
        metrics.expected_calibration_error(logits.softmax(1), labels)


def test_temperature_keeps_argmax_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=g) * 6
    labels = torch.randint(0, 5, (200,), generator=g)
    t = metrics.fit_temperature(logits, labels)
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))
    assert metrics.nll(logits, labels, t) <= metrics.nll(logits, labels)
    assert metrics.fit_temperature(logits[:0], labels[:0]) == 1.0


def test_mixed_loss_splits_by_the_share_each_image_keeps():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    ce = torch.nn.CrossEntropyLoss()
    assert mixed_loss(ce, logits, labels) == ce(logits, labels)  # no CutMix: the plain loss
    perm = torch.tensor([1, 2, 0])  # boxes from images 1, 2 and 0: their labels 1, 1, 0
    expected = 0.75 * ce(logits, labels) + 0.25 * ce(logits, torch.tensor([1, 1, 0]))
    assert mixed_loss(ce, logits, labels, labels[perm], 0.75).item() == pytest.approx(expected.item())
    assert mixed_loss(ce, logits, labels, labels[perm], 0.0).item() == pytest.approx(ce(logits, labels[perm]).item())


def test_consistency_loss_targets_only_the_weak_views_above_the_threshold():
    weak = torch.log(torch.tensor([[0.97, 0.03], [0.6, 0.4], [0.02, 0.98], [0.95, 0.05]]))
    strong = torch.tensor([[0.0, 0.0], [3.0, -3.0], [1.0, -1.0], [2.0, 0.0]], requires_grad=True)
    loss, mask = consistency_loss(strong, weak, threshold=0.95)
    assert mask.tolist() == [True, False, True, True]  # 0.6 is below 0.95: no target, no loss
    expected = (F.cross_entropy(strong[0:1], torch.tensor([0])) + F.cross_entropy(strong[2:3], torch.tensor([1]))
                + F.cross_entropy(strong[3:4], torch.tensor([0]))) / 4  # averaged over all four
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert strong.grad[1].abs().sum() == 0  # the image without a target pulls nothing
    assert consistency_loss(strong, weak, threshold=1.0)[1].sum() == 0
