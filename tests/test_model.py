import pickle

import pytest
import torch

from config import UserError
from model import (SmallResNet, build_model, load_checkpoint, model_from_checkpoint, predict_logits, save_atomic,
                   unwrap)


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


def _checkpoint(model, arch="resnet_small"):
    return {"format_version": 1, "model_state": model.state_dict(), "arch": arch, "classes": ["cat", "dog"],
            "image_size": 32, "channels": 1, "normalization": {"mean": 0.5, "std": 0.5}, "config": {"width": 8}}


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = SmallResNet(2, 1, 8).eval()
    save_atomic(_checkpoint(model), tmp_path / "m.pth")
    assert not list(tmp_path.glob(".*tmp"))
    raw = torch.load(tmp_path / "m.pth", weights_only=True)
    assert raw["classes"] == ["cat", "dog"]
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "m.pth"))
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    dev = torch.device("cpu")
    assert torch.allclose(predict_logits(model, x, dev), predict_logits(loaded, x, dev))


class Payload:
    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_malicious_checkpoint_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    p = Payload()
    p.target = str(marker)
    evil = _checkpoint(SmallResNet(2, 1, 8))
    evil["extra"] = p
    torch.save(evil, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_not_a_checkpoint_and_missing_and_wrong_arch(tmp_path):
    with pytest.raises(UserError, match="run train.py first"):
        load_checkpoint(tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")
    torch.save({"a": 1}, tmp_path / "dict.pth")
    with pytest.raises(UserError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "dict.pth")
    wrong = _checkpoint(SmallResNet(3, 1, 8))  # 3 outputs, but 2 class names
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="do not fit"):
        model_from_checkpoint(load_checkpoint(tmp_path / "wrong.pth"))
    newer = {**_checkpoint(SmallResNet(2, 1, 8)), "format_version": 99}
    torch.save(newer, tmp_path / "newer.pth")
    with pytest.raises(UserError, match="format version 99"):
        load_checkpoint(tmp_path / "newer.pth")


def test_save_atomic_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "m.pth"
    save_atomic({"v": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises((RuntimeError, pickle.PicklingError)):
        save_atomic({"v": Boom()}, path)
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]
