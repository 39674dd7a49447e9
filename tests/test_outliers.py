"""Training for images of no known class: the rotation head (a self-supervised 4-way loss whose head scores
unknown images) and outlier exposure with --other, and evaluate.py's report per folder of an unknown set."""
from __future__ import annotations

import json
import math

import pytest
import torch

import evaluate
import train
from config import TrainConfig
from conftest import load_folder, train_args
from core.metrics import energy_margin_loss
from dataset import Split, random_crops, rotate_quarters
from loading import synthetic
from loading.synthetic import make_synthetic
from model import WithRotationHead, build_model, has_rotation_head
from prediction import novelty as nv
from prediction import predict
from prediction.checkpoint import load_checkpoint, model_from_checkpoint
from training import loop
from training.outliers import blob_masks, other_crops, turn_in_place, zoomed_out


def test_rotate_quarters_turns_each_image_by_its_own_count():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3).repeat(4, 1, 1, 1)  # 8 images
    turns = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    out = rotate_quarters(x, turns)
    for i, k in enumerate(turns.tolist()):
        assert torch.equal(out[i], torch.rot90(x[i], k, (1, 2)))
    assert torch.equal(x, torch.arange(18.).view(2, 1, 3, 3).repeat(4, 1, 1, 1))  # the input is left alone
    # counter-clockwise: the top row becomes the left column, read bottom-up
    assert rotate_quarters(x[:1], torch.tensor([1]))[0, 0, :, 0].tolist() == [2.0, 1.0, 0.0]


def test_turn_in_place_turns_the_first_share_of_the_batch_and_leaves_at_least_one_image_as_it_was():
    x = torch.randn(8, 1, 5, 5)
    out, turns = turn_in_place(x, 0.25, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and turns.shape == (2,) and torch.equal(out[2:], x[2:])
    for i, k in enumerate(turns.tolist()):
        assert torch.equal(out[i], torch.rot90(x[i], k, (1, 2)))
    g = torch.Generator().manual_seed(1)
    assert [len(turn_in_place(x[:n], 0.9, g)[1]) for n in (2, 3, 8)] == [1, 2, 7]  # never the whole batch


def test_a_step_with_the_head_trains_the_class_on_the_images_it_did_not_turn():
    """Turned in place (without --rotation-copies), the turned rows teach the turn and never the class; with --rotation-copies every
    row teaches its class and the copies the turn. Eval mode, so that each row's logits are its own."""
    data = Split(torch.zeros(8, 1, 16, 16, dtype=torch.uint8), torch.tensor([0, 1] * 4),
                 [f"{i}.png" for i in range(8)])
    x, y = torch.randn(8, 1, 16, 16), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    for copies, rows in ((False, slice(2, 8)), (True, slice(0, 8))):
        cfg = TrainConfig(image_size=16, width=4, epochs=1, rotation_weight=0.5, rotation_share=0.25,
                          rotation_copies=copies, channels_last=False)
        t = loop.build_trainer(cfg, data, 2, torch.device("cpu"), None, None)
        net = WithRotationHead(t.model).eval()  # what training calls: both heads' logits
        same_draws = torch.Generator().set_state(t.generator.get_state())
        turned, turns = turn_in_place(x, 0.25, same_draws)
        with torch.no_grad():
            loss, class_loss, logits, labels, _ = loop.step_loss(t, net, x, y, cfg, None)
            class_logits = net(x)[0]
            rot_logits = net(turned)[1][:2]
        assert torch.equal(labels, y[rows]) and torch.allclose(logits, class_logits[rows], atol=1e-5)
        assert class_loss.item() == pytest.approx(t.loss_fn(class_logits[rows], y[rows]).item(), abs=1e-5)
        if not copies:  # the rotation loss: the turns the step drew, named from the turned rows
            want = 0.5 * torch.nn.functional.cross_entropy(rot_logits, turns)
            assert (loss - class_loss).item() == pytest.approx(want.item(), abs=1e-5)
            with torch.no_grad():  # a batch of one image: it teaches its class, and a turned copy the head
                one = loop.step_loss(t, net, x[:1], y[:1], cfg, None)
            assert torch.equal(one[3], y[:1]) and one[0] > one[1]


def test_random_crops_take_a_part_of_each_image_at_the_asked_size():
    x = torch.randn(5, 1, 16, 16)
    assert torch.allclose(random_crops(x, 16, 1.0), x, atol=1e-5)  # the whole area at the same size: unchanged
    ramp = torch.arange(32.0).repeat(32, 1)[None, None].repeat(50, 1, 1, 1)  # value = column
    crops = random_crops(ramp, 16, 0.1, torch.Generator().manual_seed(0))
    assert crops.shape == (50, 1, 16, 16)
    width = crops[:, 0, 0, -1] - crops[:, 0, 0, 0]  # the span of columns each crop covers, 32 for the whole image
    assert width.min() > 32 * 0.1 ** 0.5 * 15 / 16 - 1 and width.max() < 32 and width.std() > 2  # areas vary


def test_zoomed_out_puts_a_blob_of_each_image_on_a_plain_ground_of_its_own():
    norm = {"mean": 0.5, "std": 0.5}
    masks = blob_masks(20, 32, torch.Generator().manual_seed(0))
    assert masks.shape == (20, 1, 32, 32) and masks.min() >= 0 and masks.max() <= 1
    assert (masks[:, 0, 16, 16] == 1).all() and (masks[:, 0, 0, 0] == 0).all()  # centre in, corners out
    area = masks.mean((1, 2, 3))
    assert area.min() > 0.15 and area.max() < 0.8 and area.std() > 0.02  # shapes of their own, not one disc
    x = torch.full((20, 1, 32, 32), 1.0)  # white images: what is not 1.0 is ground or edge
    out = zoomed_out(x, norm, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    white = (out > 0.999).float().mean((1, 2, 3))
    assert white.max() < 0.64 * 0.8 and white.min() > 0  # each image shrunk to at most 0.8 of the side
    corners = out[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    grounds = out[:, 0].flatten(1).mode(1).values  # the commonest value: the ground
    assert grounds.unique().numel() > 10  # a level per image
    assert ((corners == grounds[:, None]).sum(1) >= 3).all()  # the image sits inside, the corners are ground
    crops = other_crops(torch.randint(0, 256, (6, 1, 64, 64), dtype=torch.uint8), 10, 32, norm,
                        torch.Generator().manual_seed(2), zoom_out=0.5)
    assert crops.shape == (10, 1, 32, 32)


def test_energy_margin_loss_is_zero_inside_both_margins_and_squared_outside():
    known_ok = torch.tensor([[5.0, 0.0]])          # logsumexp ~5.007 >= 3
    other_ok = torch.tensor([[-3.0, -3.0]])        # logsumexp = -3 + log 2 <= 1
    assert energy_margin_loss(known_ok, other_ok).item() == 0.0
    known_low = torch.zeros(2, 2)                  # logsumexp = log 2: short of 3 by 3 - log 2
    other_high = torch.tensor([[2.0, 2.0]])        # logsumexp = 2 + log 2: over 1 by 1 + log 2
    want = (3 - math.log(2)) ** 2 + (1 + math.log(2)) ** 2
    assert energy_margin_loss(known_low, other_high).item() == pytest.approx(want, rel=1e-5)


def test_rotation_head_is_extra_weights_that_checkpoints_carry_and_forward_ignores(tmp_path):
    model = build_model("resnet_small", 3, 1, 8, rotation_head=True).eval()
    plain = build_model("resnet_small", 3, 1, 8)
    assert has_rotation_head(model) and not has_rotation_head(plain)
    assert set(model.state_dict()) - set(plain.state_dict()) == {"rot.weight", "rot.bias"}
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        logits, rot_logits = WithRotationHead(model)(x)
        assert torch.allclose(logits, model(x), atol=1e-6) and rot_logits.shape == (4, 4)
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    feats = predict.extract_features(model, images, turns=True)
    assert feats["rotation"].shape == feats["upright"].shape == (4,)
    assert "rotation" not in predict.extract_features(model, images)  # the four turns only when asked for
    assert not {"rotation", "upright"} & set(predict.extract_features(plain, images, turns=True))


def test_upright_surprise_is_the_nll_of_no_turn_from_the_classifying_pass():
    model = build_model("resnet_small", 2, 1, 8, rotation_head=True).eval()
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    feats = predict.extract_features(model, images, tta=True, turns=True)
    x = images.float() / 127.5 - 1
    with torch.no_grad():  # the head is linear: its logits on the mean feature of the image and its mirror
        rot = (WithRotationHead(model)(x)[1] + WithRotationHead(model)(torch.flip(x, (3,)))[1]) / 2
    assert torch.allclose(feats["upright"], -torch.log_softmax(rot, 1)[:, 0], atol=1e-4)
    assert not torch.allclose(feats["upright"], feats["rotation"], atol=1e-3)
    assert predict.extract_features(model, images[:0])["upright"].shape == (0,)


def test_rotation_surprise_is_the_mean_nll_of_the_right_turn():
    model = build_model("resnet_small", 2, 1, 8, rotation_head=True).eval()
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    got = predict.extract_features(model, images, turns=True)["rotation"]
    x = images.float() / 127.5 - 1
    want = torch.zeros(3)
    with torch.no_grad():
        for k in range(4):
            logp = torch.log_softmax(WithRotationHead(model)(torch.rot90(x, k, (2, 3)))[1], 1)
            want += -logp[:, k] / 4
    assert torch.allclose(got, want, atol=1e-4)


def test_training_with_a_rotation_head_saves_it_and_stores_the_rotation_score(tiny_data, tmp_path):
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "2", "--rotation-weight", "0.5",
                                 "--novelty-score", "rotation")) == 0
    ckpt = load_checkpoint(tmp_path / "models" / "best_model.pth")
    assert "rot.weight" in ckpt["model_state"] and has_rotation_head(model_from_checkpoint(ckpt))
    assert ckpt["novelty"]["score"] == "rotation" and "rotation" in ckpt["novelty"]["states"]


def test_a_rotation_head_gives_the_combined_score_its_two_parts_without_the_four_turns(tiny_data, tmp_path):
    assert train.main(train_args(tiny_data, tmp_path, "--rotation-weight", "0.5")) == 0
    states = load_checkpoint(tmp_path / "models" / "best_model.pth")["novelty"]["states"]
    combined = states["combined"]
    assert combined["upright"] and not combined["rotation"] and combined["weights"].tolist() == [1.0] * 5
    assert "rotation" not in states and not nv.needs_turns(states)  # the four turns are fitted only when chosen


@pytest.mark.slow
def test_other_images_score_higher_than_without(tmp_path):
    """--other: the same run with and without outlier exposure; the --other images' evidence for every class
    falls (their energy novelty score rises, against the val images' too) and they never become a class."""
    data = make_synthetic(tmp_path / "data", 48, size=40, seed=3)  # the classes are drawn shapes on noise
    other = tmp_path / "other" / "drawn"
    other.mkdir(parents=True)
    for i, (kind, img) in enumerate(synthetic.make_unknown_images(60, 40, seed=4, kinds=("text", "stripes", "checkers",
                                                                                   "gradient"))):
        img.save(other / f"{kind}_{i}.png")
    gap = {}
    for name, extra in (("plain", ()), ("other", ("--other", str(other.parent), "--other-synthetic", "0"))):
        out = tmp_path / name
        assert train.main(train_args(data, out, "--epochs", "12", "--batch-size", "16", "--novelty-score",
                                     "energy", "--no-amp", *extra)) == 0  # fp32: the same numbers on every CPU
        ckpt = load_checkpoint(out / "models" / "best_model.pth")
        assert ckpt["classes"] == ["cat", "dog"]
        model = model_from_checkpoint(ckpt)
        val = load_folder(data / "val", ckpt["classes"], 32)
        scores = [nv.novelty_score({"score": "energy"}, predict.extract_features(model, images, tta=True))
                  for images in (nv.load_images(other, 32, 1)[0], val.images)]
        gap[name] = (scores[0].mean() - scores[1].mean()).item()
    # measured in fp32: without --other the drawn images get more evidence (a lower energy) than val (gap -1.02),
    # with it less (+0.48); an --other that did nothing would leave the gaps equal (in bf16: -2.41 and +2.55)
    assert gap["other"] > 0 > gap["plain"] and gap["other"] > gap["plain"] + 1, gap


def test_a_model_trained_with_other_weights_the_energy_in_its_combined_score(tiny_data, tmp_path):
    other = tmp_path / "other"
    synthetic.write_unknown_set(other, count=6, size=40, seed=1)
    for name, extra, weight in (("plain", (), 1.0), ("other", ("--other", str(other)), nv.OTHER_ENERGY_WEIGHT)):
        out = tmp_path / name
        assert train.main(train_args(tiny_data, out, "--other-synthetic", "4", *extra)) == 0
        state = load_checkpoint(out / "models" / "best_model.pth")["novelty"]["states"]["combined"]
        # stem, stage 1, energy, penultimate, the default rotation head's upright surprise
        assert state["weights"].tolist() == [1.0, 1.0, weight, nv.PENULTIMATE_WEIGHT, 1.0] and state["upright"]


def test_other_must_be_a_folder_with_images(tiny_data, tmp_path):
    assert train.main(train_args(tiny_data, tmp_path, "--other", str(tmp_path / "missing"))) == 2
    (tmp_path / "empty").mkdir()
    assert train.main(train_args(tiny_data, tmp_path, "--other", str(tmp_path / "empty"))) == 2


def test_unknown_dir_is_reported_per_folder(trained, tmp_path, capsys):
    unknown = tmp_path / "unknown"
    synthetic.write_unknown_set(unknown / "drawn", count=9, size=40, seed=5)
    synthetic.write_unknown_set(unknown / "more", count=5, size=40, seed=6)
    synthetic.write_unknown_set(unknown, count=3, size=40, seed=7)  # loose files at the top
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(trained["checkpoint"]), "--data", str(trained["data"]),
                          "--split", "val", "--unknown-dir", str(unknown), "--out-dir", str(out),
                          "--workers", "0", "--markdown"]) == 0
    report = json.loads((out / "metrics.json").read_text())["unknown"]
    folders = report["by_folder"]
    assert list(folders) == [".", "drawn", "more"]
    assert [f["images"] for f in folders.values()] == [3, 9, 5]
    assert all(set(f) == {"images", "auroc", "fpr_at_95_tpr", "unknown_accepted"} for f in folders.values())
    # the folders together are the whole set: image-weighted acceptance equals the overall share
    accepted = sum(f["unknown_accepted"] * f["images"] for f in folders.values()) / 17
    assert accepted == pytest.approx(report["unknown_accepted"])
    printed = capsys.readouterr().out
    assert "drawn" in printed and "more" in printed
    assert (out / "unknown_scores.png").stat().st_size > 0
    # every score per folder too, and --markdown prints them as BENCHMARKS.md's table, with where they come from
    for score, r in report["by_score"].items():
        assert list(r["by_folder"]) == [".", "drawn", "more"]
        assert all(0 <= f["auroc"] <= 1 for f in r["by_folder"].values())
    assert report["by_score"][report["score"]]["by_folder"]["drawn"]["auroc"] == folders["drawn"]["auroc"]
    table = printed[printed.index("| score: AUROC / FPR at 95% TPR |"):].splitlines()
    assert table[0] == "| score: AUROC / FPR at 95% TPR | all 17 | . 3 | drawn 9 | more 5 |"
    chosen = report["by_score"][report["score"]]
    assert table[2 + list(report["by_score"]).index(report["score"])] == (
        f"| **{report['score']}** (stored) | {chosen['auroc']:.3f} / {chosen['fpr_at_95_tpr']:.1%} | "
        + " | ".join(f"{f['auroc']:.3f} / {f['fpr_at_95_tpr']:.1%}" for f in chosen["by_folder"].values()) + " |")
    assert report["command"].startswith("python evaluate.py --checkpoint") and report["machine"]["cpu_cores"]
    assert printed.rstrip().endswith(f"torch {torch.__version__}")
