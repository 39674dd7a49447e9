"""Pretrained weights, two-phase fine-tuning, other image sizes and RGB, many classes."""
import urllib.error

import pytest
import torch
import torchvision
from torchvision.transforms.functional import normalize

import inference
import train
from config import UserError
from conftest import train_args
from dataset import Split, image_tensor, make_synthetic, to_float
from model import (SmallResNet, adapt_state_dict, build_model, load_checkpoint, load_pretrained,
                   model_from_checkpoint, predict_logits, pretrained_normalization)


def _imagenet_like_resnet18(path):
    """A torchvision resnet18 state_dict saved to `path`, with non-trivial BatchNorm statistics so that loading
    them (or not) shows in the outputs."""
    torch.manual_seed(5)
    rgb = torchvision.models.resnet18(weights=None)
    for m in rgb.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.normal_(0, 0.1)
    torch.save(rgb.state_dict(), path)
    return rgb.eval()


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def test_gray_adaptation_sums_rgb_weights_and_matches_the_rgb_model(tmp_path):
    rgb = _imagenet_like_resnet18(tmp_path / "r18.pth")
    state = adapt_state_dict(load_pretrained("resnet18", str(tmp_path / "r18.pth")), in_channels=1)
    assert not any(k.startswith("fc.") for k in state)
    assert torch.equal(state["conv1.weight"], rgb.conv1.weight.detach().sum(1, keepdim=True))

    # Same 1000-class head as the RGB model, so the whole outputs can be compared.
    gray = build_model("resnet18", 1000, 1, image_size=224, pretrained_state=state).eval()
    gray.fc.load_state_dict(rgb.fc.state_dict())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_rgb_keeps_the_weights_and_the_head_is_new(tmp_path):
    rgb = _imagenet_like_resnet18(tmp_path / "r18.pth")
    state = adapt_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True), in_channels=3)
    model = build_model("resnet18", 7, 3, image_size=224, pretrained_state=state).eval()
    assert torch.equal(model.conv1.weight, rgb.conv1.weight)
    assert model.fc.out_features == 7
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        feats = torch.nn.Sequential(*list(model.children())[:-1])(x)
        ref = torch.nn.Sequential(*list(rgb.children())[:-1])(x)
    assert torch.allclose(feats, ref, atol=1e-5)


def test_failed_download_points_to_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"--weights PATH") as err:
        load_pretrained("resnet18")
    assert "https://download.pytorch.org/models/resnet18" in str(err.value)


def test_bad_weights_and_archs_are_user_errors(tmp_path, tiny_data, capsys):
    with pytest.raises(UserError, match="resnet18 or resnet50"):
        load_pretrained("resnet_small")
    with pytest.raises(UserError, match="no such file"):
        load_pretrained("resnet18", str(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read"):
        load_pretrained("resnet18", str(tmp_path / "junk.pth"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a torchvision ResNet"):
        load_pretrained("resnet18", str(tmp_path / "other.pth"))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="do not fit"):
        build_model("resnet50", 2, pretrained_state=adapt_state_dict(
            torch.load(tmp_path / "r18.pth", weights_only=True), 1))
    code = train.main(train_args(tiny_data, tmp_path, "--pretrained"))  # arch resnet_small
    err = capsys.readouterr().err
    assert code != 0 and "resnet18 or resnet50" in err and "Traceback" not in err


def test_pretrained_normalization_is_imagenet_and_to_float_applies_it():
    assert pretrained_normalization(1) == {"mean": [0.449], "std": [0.226]}
    norm = pretrained_normalization(3)
    assert norm == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    assert torch.allclose(to_float(x, norm["mean"], norm["std"]), normalize(x.float() / 255, **norm), atol=1e-6)
    gray = torch.randint(0, 256, (1, 5, 5), dtype=torch.uint8)  # one unbatched image
    assert torch.allclose(to_float(gray, [0.449], [0.226]), (gray.float() / 255 - 0.449) / 0.226, atol=1e-6)


def test_param_groups_freeze_and_frozen_batchnorm():
    model = SmallResNet(3, 1, 8)
    groups = train.finetune_param_groups(model, 1e-2, 0.05, 0.1)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert {id(p) for g in groups[2:] for p in g["params"]} == {id(model.fc.weight), id(model.fc.bias)}

    train.set_backbone_trainable(model, False)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    train.train_mode(model)
    assert model.training and model.fc.training
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    train.set_backbone_trainable(model, True)
    train.train_mode(model)
    assert all(p.requires_grad for p in model.parameters()) and all(m.training for m in model.modules())


def test_two_phase_fine_tuning_from_a_weights_file(tmp_path, capsys):
    """Phase 1 leaves the pretrained backbone exactly as loaded; phase 2 (after --resume) changes it."""
    data = make_synthetic(tmp_path / "d", 8, size=24, seed=1)
    weights = tmp_path / "r18.pth"
    _imagenet_like_resnet18(weights)
    expected = adapt_state_dict(torch.load(weights, weights_only=True), 1)
    # 16 px keeps resnet18 quick on a CPU: 8x8 after its stem.
    argv = train_args(data, tmp_path, "--arch", "resnet18", "--weights", str(weights), "--freeze-epochs", "1",
                      "--lr", "1e-2", "--image-size", "16", "--no-tta")
    assert train.main(argv) == 0
    assert "training the head only" in capsys.readouterr().out
    phase1 = torch.load(tmp_path / "models" / "last.pth", weights_only=True)
    assert phase1["normalization"] == {"mean": [0.449], "std": [0.226]}
    state1 = phase1["model_state"]
    for k, v in _backbone(state1).items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, expected[k]), k  # weights and BatchNorm statistics untouched
    assert not torch.equal(state1["fc.weight"], build_model("resnet18", 2, 1, image_size=16).fc.weight)

    # The resumed run starts in phase 2 (the unfreezing within one run is tested with torchrun, in
    # test_distributed.py, where DDP must be rebuilt).
    assert train.main(["--resume", "--out-dir", str(tmp_path / "models"), "--epochs", "2"]) == 0
    assert "epoch 2/2" in capsys.readouterr().out
    phase2 = torch.load(tmp_path / "models" / "last.pth", weights_only=True)
    changed = [k for k, v in _backbone(phase2["model_state"]).items() if not torch.equal(v, state1[k])]
    assert "conv1.weight" in changed and "layer4.1.conv2.weight" in changed
    lrs = [g["lr"] for g in phase2["optimizer_state"]["param_groups"]]
    assert lrs[0] == pytest.approx(lrs[2] * 0.1) and lrs[2] > 0

    # Inference normalizes with the checkpoint's statistics, not the [-1, 1] default.
    ckpt = load_checkpoint(tmp_path / "models" / "last.pth")
    image = next((data / "test" / "cat").iterdir())
    result = inference.classify([image], ckpt, tta=False)[0]
    x = image_tensor(image, 16, 1, ckpt["normalization"])
    with torch.no_grad():
        probs = torch.softmax(model_from_checkpoint(ckpt)(x), 1)[0]
    assert result["confidence"] == pytest.approx(probs.max().item(), abs=1e-4)


def test_image_size_48_and_rgb_end_to_end(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", 8, size=56, seed=3)
    assert train.main(train_args(data, tmp_path, "--image-size", "48", "--channels", "3")) == 0
    ckpt = load_checkpoint(tmp_path / "models" / "best_model.pth")
    assert (ckpt["image_size"], ckpt["channels"]) == (48, 3)
    assert model_from_checkpoint(ckpt).stem[0].in_channels == 3
    capsys.readouterr()
    image = next((data / "test" / "dog").iterdir())
    assert inference.main(["--image", str(image), "--checkpoint", str(tmp_path / "models" / "best_model.pth")]) == 0
    label, conf = capsys.readouterr().out.split()
    assert label in ("cat", "dog") and 0.5 <= float(conf) <= 1


def test_many_classes_report_top5(tmp_path, capsys):
    classes = {f"shape{k:02d}": 4 for k in range(12)}
    data = make_synthetic(tmp_path / "d", classes, size=40, seed=4)
    assert train.main(train_args(data, tmp_path)) == 0
    assert " top5 " in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "models" / "last.pth")
    assert ckpt["classes"] == sorted(classes)
    h = ckpt["history"][0]
    assert 0 <= h["val_acc"] <= h["val_top5"] <= 1
    results = inference.classify(sorted((data / "test").rglob("*.png"))[:3], ckpt)
    assert all(r["label"] in classes for r in results)


class _Lookup(torch.nn.Module):
    """Returns preset logits for images whose pixels all hold their row number."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.fc = torch.nn.Linear(1, logits.shape[1])

    def forward(self, x):
        rows = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
        return self.logits[rows]


def test_evaluate_top5_counts_a_label_among_the_five_best():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3],    # label 0: top-1
                           [9.0, 8, 7, 6, 5, 4, 3],    # label 4: top-5 only
                           [9.0, 8, 7, 6, 5, 4, 3],    # label 6: neither
                           [0.0, 0, 0, 0, 0, 0, 9]])   # label 6: top-1
    images = torch.arange(4, dtype=torch.uint8)[:, None, None, None].expand(4, 1, 2, 2).clone()
    data = Split(images, torch.tensor([0, 4, 6, 6]), ["a", "b", "c", "d"])
    ev = train.evaluate(_Lookup(logits), data, torch.device("cpu"))
    assert ev["acc"] == 0.5 and ev["top5"] == 0.75
    assert "top5" not in train.evaluate(_Lookup(logits[:, :5]), Split(images, torch.tensor([0, 4, 1, 1]),
                                                                       ["a", "b", "c", "d"]), torch.device("cpu"))


def test_predict_logits_default_normalization_is_unchanged():
    model = SmallResNet(2, 1, 8).eval()
    x = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    cpu = torch.device("cpu")
    with torch.no_grad():
        ref = model(x.float() / 127.5 - 1)
    assert torch.allclose(predict_logits(model, x, cpu), ref, atol=1e-6)
    assert torch.allclose(predict_logits(model, x, cpu, normalization={"mean": [0.5], "std": [0.5]}), ref,
                          atol=1e-5)
