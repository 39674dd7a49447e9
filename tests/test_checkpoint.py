"""checkpoint.py: the format's one owner: build, atomic save, safe load with checks, version 1, accessors."""
import pytest
import torch

from training import loop
from config import TrainConfig
from core import common
from core.common import UserError, save_atomic
from dataset import load_data
from loading.layout import read_layout
from model import SmallResNet
from prediction.checkpoint import (FORMAT_VERSION, LAST, blocks_of, build_checkpoint, load_checkpoint,
                                   load_resume_checkpoint, model_from_checkpoint, normalization_of, on_cpu,
                                   save_checkpoint, temperature_of, tta_of, val_accuracy_of, width_of, with_temperature)
from prediction.predict import predict_logits


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


def test_checkpoint_is_self_sufficient_and_holds_the_trained_model(trained):
    raw = torch.load(trained["checkpoint"], weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["classes"] == ["cat", "dog"] and raw["image_size"] == 32 and raw["channels"] == 1
    assert raw["normalization"] == {"mean": 0.5, "std": 0.5} and raw["width"] == 8 and raw["tta"] is True
    assert isinstance(raw["config"], dict) and raw["config"]["arch"] == "resnet_small"
    assert 1 <= raw["epoch"] <= 3 and raw["best"]["epoch"] == raw["epoch"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in raw["model_state"])
    # The loaded network scores on val what the trained one scored when this checkpoint was saved.
    ckpt = load_checkpoint(trained["checkpoint"])
    model = model_from_checkpoint(ckpt).to(memory_format=torch.channels_last)
    _, val = load_data(read_layout(trained["data"]), 32, 1)
    cpu = torch.device("cpu")
    ev = loop.validate(model, val, cpu, tta=True, channels_last=True, amp_dtype=common.pick_amp_dtype(cpu, True),
                        normalization=normalization_of(ckpt))
    assert ev["acc"] == raw["metrics"]["val"]["acc"] == raw["best"]["acc"]
    assert ev["loss"] == pytest.approx(raw["metrics"]["val"]["loss"], rel=1e-3)


def test_build_save_load_and_the_accessors(tmp_path):
    cfg = TrainConfig(width=8, image_size=32, tta=False)
    ckpt = build_checkpoint(SmallResNet(2, 1, 8), cfg, ["cat", "dog"], 3, {}, [], {"acc": 0.5, "epoch": 3})
    save_checkpoint(with_temperature(ckpt, 1.7), tmp_path / "m.pth")
    loaded = load_checkpoint(tmp_path / "m.pth")
    assert (width_of(loaded), tta_of(loaded), temperature_of(loaded)) == (8, False, 1.7)
    assert normalization_of(loaded) == {"mean": 0.5, "std": 0.5}
    assert val_accuracy_of(loaded) == 0.5  # no val metrics saved: the best recorded
    assert val_accuracy_of({**loaded, "metrics": {"val": {"acc": 0.75}}}) == 0.75
    assert val_accuracy_of({**loaded, "best": {"acc": -1.0, "epoch": 0}}) is None
    assert model_from_checkpoint(loaded).stem[1].num_features == 4  # width 8: a stem of 4, then 8 channels
    pretrained = build_checkpoint(SmallResNet(2, 1, 8), TrainConfig(weights="w.pth"), ["a", "b"], 1, {}, [], {})
    assert normalization_of(pretrained) == {"mean": [0.449], "std": [0.226]}


def test_a_deeper_resnet_small_round_trips_and_files_from_before_blocks_have_one_per_stage(tmp_path):
    cfg = TrainConfig(width=8, image_size=32, blocks=[1, 2, 2, 1])
    model = SmallResNet(2, 1, 8, (1, 2, 2, 1)).eval()
    ckpt = build_checkpoint(model, cfg, ["cat", "dog"], 1, {}, [], {"acc": 0.5, "epoch": 1})
    save_checkpoint(ckpt, tmp_path / "m.pth")
    loaded = load_checkpoint(tmp_path / "m.pth")
    assert blocks_of(loaded) == (1, 2, 2, 1)
    rebuilt = model_from_checkpoint(loaded)
    assert len(rebuilt.layers) == 6  # 1 + 2 + 2 + 1 blocks
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    dev = torch.device("cpu")
    assert torch.equal(predict_logits(model, x, dev), predict_logits(rebuilt, x, dev))
    before = {k: v for k, v in build_checkpoint(SmallResNet(2, 1, 8), TrainConfig(width=8, image_size=32), ["a", "b"],
                                                1, {}, [], {}).items() if k != "blocks"}  # written before the field
    assert blocks_of(before) == (1, 1, 1, 1) and len(model_from_checkpoint(before).layers) == 4


def test_version_1_checkpoints_load_with_the_values_version_1_readers_used(tmp_path):
    model = SmallResNet(2, 1, 8).eval()
    save_atomic(_checkpoint(model), tmp_path / "plain.pth")  # no tta, no temperature
    old = load_checkpoint(tmp_path / "plain.pth")
    assert old["format_version"] == FORMAT_VERSION
    assert (width_of(old), tta_of(old), temperature_of(old)) == (8, False, 1.0)
    model_from_checkpoint(old)  # width 8 from the config, not the default 48
    save_atomic({**_checkpoint(model), "config": {"width": 8, "tta": True}, "temperature": 2.5}, tmp_path / "t.pth")
    assert (tta_of(load_checkpoint(tmp_path / "t.pth")), temperature_of(load_checkpoint(tmp_path / "t.pth"))) == \
        (True, 2.5)
    save_atomic({**_checkpoint(SmallResNet(2, 1, 48).eval()), "config": {}}, tmp_path / "w.pth")
    assert width_of(load_checkpoint(tmp_path / "w.pth")) == 48 != TrainConfig().width  # the default of that time
    incomplete = {**_checkpoint(model), "format_version": FORMAT_VERSION}  # version 2 without width, tta...
    save_atomic(incomplete, tmp_path / "v2.pth")
    with pytest.raises(UserError, match="missing width, tta, temperature"):
        load_checkpoint(tmp_path / "v2.pth")


def test_resume_needs_the_optimizer_state(tmp_path):
    save_atomic(_checkpoint(SmallResNet(2, 1, 8)), tmp_path / LAST)
    with pytest.raises(UserError, match="no optimizer state to resume from"):
        load_resume_checkpoint(tmp_path)
    with pytest.raises(UserError, match="nothing to resume"):
        load_resume_checkpoint(tmp_path / "elsewhere")


def test_on_cpu_keeps_the_structure_and_copies_the_tensors():
    """What build_checkpoint and with_resume_state apply to state dicts written on a GPU (checked there by hand:
    a last.pth trained on CUDA loads with a plain torch.load on a machine without one)."""
    w = torch.ones(2, requires_grad=True)
    state = {"a": w * 2, "b": [torch.zeros(1), (torch.ones(1), 3)], "c": "x", "d": None}
    out = on_cpu(state)
    assert set(out) == set(state) and out["c"] == "x" and out["d"] is None
    assert isinstance(out["b"], list) and isinstance(out["b"][1], tuple) and out["b"][1][1] == 3
    assert torch.equal(out["a"], torch.full((2,), 2.0)) and not out["a"].requires_grad
    model = SmallResNet(2, 1, 8)
    ckpt = build_checkpoint(model, TrainConfig(width=8), ["a", "b"], 1, {}, [], {})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ckpt["model_state"].items())
