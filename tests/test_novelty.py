"""novelty.py: scores, thresholds and metrics on tiny tensors; features of real models; a small trained model that
must rank synthetic unknown images above known ones."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataset
from config import NOVELTY_SCORES
from conftest import load_folder
from core.common import UserError
from dataset import RowView
from loading import synthetic
from loading.decode import decode_image
from loading.synthetic import make_synthetic
from model import build_model
from prediction import novelty as nv
from prediction import predict


def brute_auroc(known: torch.Tensor, unknown: torch.Tensor) -> float:
    diff = unknown.double()[:, None] - known.double()[None, :]
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()


# ---------------------------------------------------------------- metrics and thresholds

def test_auroc_extremes_ties_and_brute_force():
    known, unknown = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.9])
    assert nv.auroc(known, unknown) == 1.0
    assert nv.auroc(unknown, known) == 0.0
    assert nv.auroc(torch.ones(4), torch.ones(3)) == 0.5
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 20, (57,), generator=g).float()   # many ties
    u = torch.randint(5, 25, (31,), generator=g).float()
    assert nv.auroc(k, u) == pytest.approx(brute_auroc(k, u), abs=1e-12)
    assert math.isnan(nv.auroc(torch.zeros(0), u))


def test_threshold_accepts_the_asked_share():
    scores = torch.arange(20.0).flip(0)               # order must not matter
    t = nv.threshold_for_accept_rate(scores, 0.95)
    assert t == 18.0 and nv.accepted(scores, t).sum() == 19
    assert nv.accepted(scores, nv.threshold_for_accept_rate(scores, 1.0)).all()
    assert nv.accepted(scores, nv.threshold_for_accept_rate(scores, 0.5)).sum() == 10
    assert nv.accepted(scores, nv.threshold_for_accept_rate(scores, 0.51)).sum() == 11  # at least the share
    with pytest.raises(UserError, match="accept-rate"):
        nv.threshold_for_accept_rate(scores, 0.0)
    with pytest.raises(UserError, match="accept-rate"):
        nv.threshold_for_accept_rate(scores, 1.5)


def test_fpr_at_95_tpr_counts_unknowns_under_the_known_threshold():
    known = torch.arange(100.0)                       # 95% accepted below or at 94
    unknown = torch.tensor([10.0, 94.0, 94.5, 200.0])
    assert nv.fpr_at_tpr(known, unknown, 0.95) == 0.5
    r = nv.separation_report(known, unknown, threshold=50.0)
    assert r["known_rejected"] == pytest.approx(0.49) and r["unknown_accepted"] == 0.25
    assert r["fpr_at_95_tpr"] == 0.5 and r["auroc"] == pytest.approx(brute_auroc(known, unknown))


# ---------------------------------------------------------------- scores and their state

def test_msp_and_energy_score_confident_logits_lower():
    logits = torch.tensor([[8.0, 0.0], [0.2, 0.0], [-3.0, -3.1]])
    feats = {"logits": logits}
    msp = nv.novelty_score(nv.fit_score("msp", feats, None, 2), feats)
    assert msp[0] < msp[1] and torch.allclose(msp, 1 - torch.softmax(logits, 1).max(1).values)
    energy = nv.novelty_score(nv.fit_score("energy", feats, None, 2, temperature=2.0), feats)
    assert torch.allclose(energy, -2.0 * torch.logsumexp(logits / 2.0, 1))
    assert energy[0] < energy[1] < energy[2]
    with pytest.raises(UserError, match="unknown novelty score 'odin'"):
        nv.fit_score("odin", feats, None, 2)


def test_knn_distance_matches_brute_force_and_bank_fits_the_budget():
    g = torch.Generator().manual_seed(1)
    train, query = torch.randn(300, 16, generator=g), torch.randn(7, 16, generator=g)
    state = nv.fit_score("knn", {"penultimate": train}, torch.zeros(300), 2, k=5)
    assert state["bank"].dtype == torch.float16 and state["bank"].shape == (300, 16)
    assert torch.allclose(state["bank"].float().norm(dim=1), torch.ones(300), atol=1e-3)
    d = torch.cdist(F.normalize(query, dim=1), F.normalize(train, dim=1)).sort(1).values[:, 4]
    assert torch.allclose(nv.novelty_score(state, {"penultimate": query}), d, atol=2e-3)
    # a training point itself is at distance ~0 with k=1
    one = nv.fit_knn(train, k=1)
    assert nv.knn_distance(one["bank"], train[:3], 1).max() < 2e-2
    small = nv.fit_knn(train, k=50, max_bytes=100 * 16 * 2)
    assert small["bank"].shape == (100, 16) and nv.state_bytes(small) == 100 * 16 * 2
    assert nv.fit_knn(train[:3], k=10)["k"] == 3


def test_mahalanobis_is_the_distance_to_the_nearest_class_mean():
    g = torch.Generator().manual_seed(2)
    feats = torch.cat([torch.randn(50, 4, generator=g) + 5 * torch.eye(4)[0],
                       torch.randn(50, 4, generator=g) + 5 * torch.eye(4)[1]])
    labels = torch.tensor([0] * 50 + [1] * 50)
    state = nv.fit_score("mahalanobis", {"penultimate": feats}, labels, 2, shrinkage=0.0)
    x = F.normalize(feats.double(), dim=1)
    means = torch.stack([x[:50].mean(0), x[50:].mean(0)])
    centred = x - means[labels]
    precision = torch.linalg.inv(centred.T @ centred / 100)
    q = F.normalize(torch.randn(5, 4, generator=g).double(), dim=1)
    want = torch.stack([((q - m) @ precision * (q - m)).sum(1) for m in means], 1).min(1).values
    assert torch.allclose(nv.novelty_score(state, {"penultimate": q.float()}).double(), want, rtol=1e-3)
    # more dimensions than images: shrinkage keeps the covariance invertible
    wide = nv.fit_mahalanobis(torch.randn(10, 32, generator=g), torch.arange(10) % 2, 2, shrinkage=0.1)
    assert torch.isfinite(wide["precision"]).all()


def test_layer_mahalanobis_takes_the_most_unusual_stage():
    g = torch.Generator().manual_seed(4)
    labels = torch.arange(200) % 2
    stages = [torch.randn(200, 6, generator=g) + 3, torch.randn(200, 10, generator=g) + 3]
    state = nv.fit_score("layer_mahalanobis", {"stages": stages}, labels, 2)
    assert len(state["means"]) == len(state["precisions"]) == 2 and state["centre"].shape == (2,)
    train_scores = nv.novelty_score(state, {"stages": stages})
    # each stage is standardised on the training images: their scores are centred, a few units wide
    assert train_scores.median().abs() < 1.5 and train_scores.max() < 10
    odd = [s[:4].clone() for s in stages]
    odd[1][:2] = -odd[1][:2]                         # unusual in the second stage only
    scores = nv.novelty_score(state, {"stages": odd})
    assert scores[:2].min() > train_scores.max() and scores[2:].max() < train_scores.max()
    with pytest.raises(UserError, match="does not match"):
        nv.novelty_score(state, {"stages": stages[:1]})


def small_features(n: int = 40, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"penultimate": torch.randn(n, 8, generator=g), "logits": torch.randn(n, 2, generator=g),
            "stages": [torch.randn(n, 4, generator=g), torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)],
            "upright": torch.rand(n, generator=g), "rotation": torch.rand(n, generator=g)}


@pytest.mark.parametrize("with_rotation", [False, True])
def test_combined_adds_the_early_stages_energy_penultimate_and_heads_part_each_on_the_training_images_scale(
        with_rotation):
    train = small_features(40)
    query = small_features(7, seed=5)
    if not with_rotation:
        for f in (train, query):
            del f["upright"], f["rotation"]
    labels = torch.arange(40) % 2
    state = nv.fit_score("combined", train, labels, 2, temperature=2.0)
    assert state["upright"] is with_rotation and len(state["means"]) == nv.COMBINED_STAGES == 2
    assert state["rotation"] is False and not nv.needs_turns({"combined": state})  # no part needs the four turns

    def parts(f, penultimate=True):  # by hand: the Mahalanobis distance of stages 0 and 1, energy at T = 2, the
        out = [nv.mahalanobis_distance(*nv.class_gaussians(train["stages"][i], labels, 2), f["stages"][i])
               for i in range(2)]  # penultimate feature's distance, then with a rotation head the upright surprise
        out.append(-2.0 * torch.logsumexp(f["logits"] / 2.0, 1))
        if penultimate:
            out.append(nv.mahalanobis_distance(*nv.class_gaussians(train["penultimate"], labels, 2), f["penultimate"]))
        return out + ([f["upright"]] if with_rotation else [])

    ref = [p.double() for p in parts(train)]
    want = sum((p.double() - r.mean()) / r.std(correction=0) for p, r in zip(parts(query), ref))
    assert torch.allclose(nv.novelty_score(state, query).double(), want, atol=1e-4)
    # on the training images each part has mean 0 and spread 1, so the sum has mean 0
    assert abs(nv.novelty_score(state, train).mean().item()) < 1e-4
    # a model trained with --other: the energy part (the third) counts OTHER_ENERGY_WEIGHT times; a state saved
    # before the weights existed adds the parts as they are
    weighted = nv.fit_states(train, labels, 2, "combined", 2.0, energy_weight=nv.OTHER_ENERGY_WEIGHT)["combined"]
    scaled = [(p.double() - r.mean()) / r.std(correction=0) for p, r in zip(parts(query), ref)]
    assert torch.allclose(nv.novelty_score(weighted, query).double(),
                          want + (nv.OTHER_ENERGY_WEIGHT - 1) * scaled[2], atol=1e-4)
    del weighted["weights"]
    assert torch.allclose(nv.novelty_score(weighted, query).double(), want, atol=1e-4)
    # the penultimate part counts PENULTIMATE_WEIGHT times
    assert state["weights"].tolist() == [1.0, 1.0, 1.0, nv.PENULTIMATE_WEIGHT] + [1.0] * with_rotation
    if not with_rotation:  # a state saved before the penultimate part (no head): the first three parts, as before
        old = {k: v for k, v in state.items() if k != "penultimate"}
        old.update(centre=state["centre"][:3], scale=state["scale"][:3], weights=state["weights"][:3])
        three = sum((p.double() - r.mean()) / r.std(correction=0) for p, r in zip(parts(query, False), ref))
        assert torch.allclose(nv.novelty_score(old, query).double(), three, atol=1e-4)
    if with_rotation:
        del query["upright"]
        with pytest.raises(UserError, match="rotation head"):
            nv.novelty_score(state, query)


def test_a_combined_state_with_the_four_turn_part_still_scores_and_asks_for_the_turns():
    """Checkpoints whose combined score has the rotation surprise over four turns as its fourth part."""
    train, query = small_features(40), small_features(7, seed=5)
    for f in (train, query):
        del f["upright"]
    labels = torch.arange(40) % 2
    state = nv.fit_score("combined", train, labels, 2)
    del state["penultimate"]  # such states had the early stages, the energy and the four turns
    parts = [p.double() for p in nv.combined_parts(state, train)] + [train["rotation"].double()]
    state.update(rotation=True, centre=torch.stack([p.mean() for p in parts]).float(),
                 scale=torch.stack([p.std(correction=0) for p in parts]).float(), weights=torch.ones(4))
    del state["upright"]
    assert nv.needs_turns({"combined": state}) and nv.needs_turns({"rotation": {"score": "rotation"}})
    want = sum((p.double() - r.mean()) / r.std(correction=0) for p, r in
               zip([*nv.combined_parts({**state, "rotation": False}, query), query["rotation"]], parts))
    assert torch.allclose(nv.novelty_score(state, query).double(), want, atol=1e-4)
    del query["rotation"]
    with pytest.raises(UserError, match="rotation head"):
        nv.novelty_score(state, query)


@pytest.mark.parametrize("name", NOVELTY_SCORES)
def test_state_round_trips_through_weights_only_load(name):
    state = nv.fit_score(name, small_features(), torch.arange(40) % 2, 2, temperature=1.5)
    buf = io.BytesIO()
    torch.save({"novelty": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["novelty"]
    assert loaded["score"] == name and loaded["version"] == nv.STATE_VERSION
    query = small_features(6, seed=9)
    assert torch.equal(nv.novelty_score(loaded, query), nv.novelty_score(state, query))


# ---------------------------------------------------------------- features of the project's models

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet_small", "resnet18"])
@pytest.mark.parametrize("tta", [False, True])
def test_features_are_the_head_input_and_give_the_models_logits(arch, tta):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3, in_channels=1, width=8, image_size=32).eval()
    images = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    feats = predict.extract_features(model, images, tta=tta, batch_size=2)
    assert feats["penultimate"].shape == (5, model.fc.in_features) and feats["logits"].shape == (5, 3)
    want = predict.predict_logits(model, images, torch.device("cpu"), tta=tta)
    assert torch.allclose(feats["logits"], want, atol=1e-4)
    assert torch.allclose(model.fc(feats["penultimate"]), want, atol=1e-4)
    # mean and spread per channel of the stem's and each stage's maps
    channels = [8, 8, 16, 32, 64] if arch == "resnet_small" else [64, 64, 128, 256, 512]
    assert [f.shape for f in feats["stages"]] == [(5, 2 * min(c, predict.MAX_STAGE_CHANNELS)) for c in channels]
    assert all(torch.isfinite(f).all() for f in feats["stages"])
    # the last stage's channel means are the penultimate feature (global average pooling)
    if channels[-1] <= predict.MAX_STAGE_CHANNELS:
        assert torch.allclose(feats["stages"][-1][:, :channels[-1]], feats["penultimate"], atol=1e-5)
    assert predict.extract_features(model, images[:0])["penultimate"].shape == (0, model.fc.in_features)


def test_fit_sample_keeps_every_class_and_its_share():
    labels = torch.tensor([0] * 990 + [1] * 9 + [2])[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    rows = nv.fit_sample(labels, 100, seed=0)
    assert torch.equal(rows, rows.unique())  # sorted, no repeats
    counts = torch.bincount(labels[rows], minlength=3).tolist()
    assert counts == [99, 1, 1]  # each class's share of 100, rounded up: the single class-2 image is kept
    assert torch.equal(nv.fit_sample(labels, 100, seed=0), rows)
    assert not torch.equal(nv.fit_sample(labels, 100, seed=1), rows)
    assert torch.equal(nv.fit_sample(labels, 1000), torch.arange(1000))
    assert torch.equal(nv.fit_sample(labels, 0), torch.arange(1000))


def test_feature_batches_hold_a_bounded_number_of_pixel_values():
    assert predict.feature_batch_size(torch.zeros(1, 1, 32, 32, dtype=torch.uint8)) == 256
    assert predict.feature_batch_size(torch.zeros(1, 1, 64, 64, dtype=torch.uint8)) == 256
    assert predict.feature_batch_size(torch.zeros(1, 3, 128, 128, dtype=torch.uint8)) == 21
    assert predict.feature_batch_size(torch.zeros(1, 3, 256, 256, dtype=torch.uint8)) == 5
    assert predict.feature_batch_size(torch.zeros(1, 3, 4096, 4096, dtype=torch.uint8)) == 1


def test_scoring_in_chunks_gives_the_scores_of_one_pass():
    torch.manual_seed(0)
    model = build_model("resnet_small", num_classes=2, in_channels=1, width=8, image_size=16).eval()
    images = torch.randint(0, 256, (11, 1, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 5 + [0])
    states = nv.fit_states(predict.extract_features(model, images), labels, 2)
    at_once = nv.scores_by_name(states, predict.extract_features(model, images, tta=True))
    chunked = predict.score_images(model, RowView(images, torch.arange(11)), states, chunk=4, tta=True, batch_size=3)
    stored = [n for n in NOVELTY_SCORES if n != "rotation"]  # no rotation head on this model
    assert list(chunked) == list(at_once) == stored
    for name in stored:
        assert chunked[name].shape == (11,) and torch.allclose(chunked[name], at_once[name], atol=1e-5), name
    assert all(len(v) == 0 for v in predict.score_images(model, images[:0], states).values())


def test_stage_statistics_average_neighbouring_channels_of_wide_stages():
    maps = torch.arange(2 * 6 * 2 * 2, dtype=torch.float32).reshape(2, 6, 2, 2)
    stats = predict.stage_statistics(maps, max_channels=3)
    assert stats.shape == (2, 6)
    assert torch.allclose(stats[:, :3], maps.mean((2, 3)).reshape(2, 3, 2).mean(2))
    assert torch.allclose(predict.stage_statistics(maps[:, :, :1, :1])[:, 6:], torch.zeros(2, 6))  # 1x1 maps: spread 0


def test_features_need_a_known_model_layout():
    with pytest.raises(UserError, match="classifier head"):
        predict.extract_features(torch.nn.Conv2d(1, 2, 3), torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


# ---------------------------------------------------------------- the synthetic unknown set

def test_unknown_images_are_deterministic_and_cover_every_kind(tmp_path):
    a = synthetic.make_unknown_images(2 * len(synthetic.UNKNOWN_KINDS), size=48, seed=5)
    b = synthetic.make_unknown_images(2 * len(synthetic.UNKNOWN_KINDS), size=48, seed=5)
    assert [k for k, _ in a] == list(synthetic.UNKNOWN_KINDS) * 2
    assert all(img.size == (48, 48) and img.mode == "RGB" for _, img in a)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(a, b))
    assert not np.array_equal(np.asarray(a[0][1]), np.asarray(synthetic.make_unknown_images(1, 48, seed=6)[0][1]))
    assert dataset.main(["unknown", str(tmp_path / "u"), "--count", "12", "--size", "40"]) == 0
    files = sorted((tmp_path / "u").iterdir())
    assert len(files) == 12 and decode_image(files[0], 32, 1).shape == (1, 32, 32)
    with pytest.raises(ValueError, match="unknown kind"):
        synthetic.make_unknown_images(1, kinds=("horses",))


@pytest.mark.parametrize("size", [12, 16, 24, 32])
def test_unknown_images_draw_on_small_sides(size):
    """--other draws them at twice the image size: charts of many bars on a small side once failed (PIL: 'x1 must
    be greater than or equal to x0'), so `--other DIR --image-size 16` could not start."""
    drawn = synthetic.make_unknown_images(60, size, seed=0, kinds=("chart",)) + synthetic.make_unknown_images(18, size, seed=1)
    assert all(img.size == (size, size) for _, img in drawn)
    assert {k for k, _ in drawn} == set(synthetic.UNKNOWN_KINDS)


# ---------------------------------------------------------------- a small trained model

@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """resnet_small (width 8, 32 px) trained on make_synthetic's triangles and squares: model, train and val splits."""
    root = make_synthetic(tmp_path_factory.mktemp("novelty") / "data", 120, size=32, seed=4, splits=("train", "val"))
    train = load_folder(root / "train", ["cat", "dog"], 32)
    val = load_folder(root / "val", ["cat", "dog"], 32)
    torch.manual_seed(0)
    model = build_model("resnet_small", 2, 1, width=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x_all = train.images.float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(10):
        for idx in torch.randperm(len(x_all), generator=g).split(32):
            x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5, x_all[idx].flip(-1), x_all[idx])
            loss = F.cross_entropy(model(x), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    unknown = torch.stack([torch.from_numpy(np.asarray(img.convert("L").resize((32, 32)))[None].copy())
                           for _, img in synthetic.make_unknown_images(90, size=32, seed=7)])
    return model, train, val, unknown


@pytest.mark.slow  # its fixture trains 10 epochs
def test_trained_model_ranks_synthetic_unknowns_above_known_images(small_model):
    model, train, val, unknown = small_model
    ftr, fval, fun = (predict.extract_features(model, x, tta=True) for x in (train.images, val.images, unknown))
    assert (fval["logits"].argmax(1) == val.labels).double().mean() >= 0.7  # the model did learn the two classes
    state = nv.fit_score(nv.DEFAULT_SCORE, ftr, train.labels, 2)
    known, unk = nv.novelty_score(state, fval), nv.novelty_score(state, fun)
    msp = nv.fit_score("msp", ftr, train.labels, 2)
    assert nv.auroc(known, unk) > nv.auroc(nv.novelty_score(msp, fval), nv.novelty_score(msp, fun)) + 0.1
    assert nv.auroc(known, unk) >= 0.95
    assert nv.fpr_at_tpr(known, unk, 0.95) <= 0.25
    # the threshold chosen on val accepts the asked share of val, and rejects most unknowns
    for rate in (0.95, 0.8):
        t = nv.threshold_for_accept_rate(known, rate)
        share = nv.accepted(known, t).double().mean().item()
        assert rate <= share < rate + 1.5 / len(known)
    assert nv.accepted(unk, nv.threshold_for_accept_rate(known, 0.95)).double().mean() <= 0.25
