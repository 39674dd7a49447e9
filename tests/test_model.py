"""model.py: the networks and pretrained weights for a gray stem."""
import urllib.error

import pytest
import torch
import torchvision
from torchvision.transforms.functional import normalize

from conftest import imagenet_like_resnet18
from core.common import UserError
from dataset import to_float
from model import (SmallResNet, adapt_state_dict, build_model, cam_stages, feature_stages, forward_stages, head_of,
                   load_pretrained, pretrained_normalization, resnet_parts, unwrap)


@pytest.mark.parametrize("arch,channels,classes", [("resnet_small", 1, 2), ("resnet_small", 3, 5),
                                                   ("resnet18", 1, 2), ("resnet50", 1, 3)])


def test_output_shape(arch, channels, classes):
    model = build_model(arch, classes, channels, width=8).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, 64, 64)).shape == (2, classes)


def test_small_resnet_has_a_one_channel_stem_and_skip_connections():
    model = SmallResNet(2, 1, width=8)
    assert model.stem[0].in_channels == 1 and model.stem[0].stride == (2, 2)
    assert model.stem(torch.zeros(1, 1, 64, 64)).shape == (1, 8, 16, 16)  # two stride-2 convs, no pooling
    assert any(len(b.shortcut) for b in model.layers)  # projection shortcuts where the shape changes


def test_torchvision_variants_get_gray_stem_and_head():
    m = build_model("resnet18", 4, 1, image_size=64)
    assert m.conv1.in_channels == 1 and m.fc.out_features == 4
    assert isinstance(m.maxpool, torch.nn.Identity)
    assert not isinstance(build_model("resnet18", 4, 1, image_size=224).maxpool, torch.nn.Identity)


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="unknown --arch"):
        build_model("vgg", 2)


def test_unwrap_removes_wrappers():
    model = SmallResNet(2, 1, 8)

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert unwrap(Wrapper(model)) is model



@pytest.mark.parametrize("arch,image_size,names,widths", [
    ("resnet_small", 64, ["layers.0", "layers.1", "layers.2", "layers.3"], [8, 16, 32, 64]),
    ("resnet18", 224, ["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512])])  # 224: a real max-pool
def test_resnet_parts_chain_from_the_stem_through_the_stages_to_the_head(arch, image_size, names, widths):
    """resnet_parts names both kinds of ResNet the same way: run in turn, stem, stages, pool and head give the
    model's own logits; the head is the class layer (not the rotation head); the stages are the model's modules
    under their own names; head_of, feature_stages, cam_stages and forward_stages all read these parts."""
    torch.manual_seed(0)
    model = build_model(arch, 3, 1, width=8, image_size=image_size, rotation_head=True).eval()
    parts = resnet_parts(model)
    assert isinstance(parts.head, torch.nn.Linear) and parts.head.out_features == 3 and parts.head is model.fc
    modules = dict(model.named_modules())
    assert list(parts.stages) == names and all(modules[n] is m for n, m in parts.stages.items())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        y = x
        for module in parts.stem:
            y = module(y)
        maps = [y]
        for stage in parts.stages.values():
            y = stage(y)
            maps.append(y)
        assert [m.shape[1] for m in maps[1:]] == widths
        assert torch.allclose(parts.head(torch.flatten(parts.pool(y), 1)), model(x), atol=1e-5)
        ref_maps, penultimate = forward_stages(model, x)
        assert len(ref_maps) == len(maps) and all(torch.equal(a, b) for a, b in zip(maps, ref_maps))
        assert torch.allclose(model.fc(penultimate), model(x), atol=1e-5)
        caught = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: caught.append(out)) for m in feature_stages(model)]
        model(x)  # the model's own forward: feature_stages' modules output forward_stages' maps
        for h in hooks:
            h.remove()
    assert len(caught) == len(maps) and all(torch.equal(a, b) for a, b in zip(caught, maps))
    assert head_of(model) is model.fc and cam_stages(model) == parts.stages


def test_resnet_parts_see_through_wrappers_and_refuse_other_networks():
    model = SmallResNet(2, 1, 8)

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert resnet_parts(Wrapper(model)).head is model.fc
    with pytest.raises(UserError, match=r"parts of Sequential for Grad-CAM"):
        cam_stages(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten()))
    model.fc = torch.nn.Identity()
    with pytest.raises(UserError, match="expected a Linear layer named fc"):
        head_of(model)


@pytest.mark.slow
def test_gray_adaptation_sums_rgb_weights_and_matches_the_rgb_model(tmp_path):
    rgb = imagenet_like_resnet18(tmp_path / "r18.pth")
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
    rgb = imagenet_like_resnet18(tmp_path / "r18.pth")
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


def test_bad_weights_and_archs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="resnet18, resnet50 or efficientnet_lite0"):
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


def test_pretrained_normalization_is_imagenet_and_to_float_applies_it():
    assert pretrained_normalization(1) == {"mean": [0.449], "std": [0.226]}
    norm = pretrained_normalization(3)
    assert norm == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    assert torch.allclose(to_float(x, norm["mean"], norm["std"]), normalize(x.float() / 255, **norm), atol=1e-6)
    gray = torch.randint(0, 256, (1, 5, 5), dtype=torch.uint8)  # one unbatched image
    assert torch.allclose(to_float(gray, [0.449], [0.226]), (gray.float() / 255 - 0.449) / 0.226, atol=1e-6)

