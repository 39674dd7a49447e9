"""Mixed precision: which autocast dtype each device gets, and fp16 training through a GradScaler (CPU tests;
the CUDA queries are replaced by stand-ins for the GPUs in question)."""
import pytest
import torch

import train
from conftest import train_args

CUDA = torch.device("cuda")


def fake_gpu(native_bf16: bool, emulated_bf16: bool):
    """A torch.cuda.is_bf16_supported for a GPU that computes bf16 natively (A100, H100...), only emulates it
    (T4, V100: counted by the default including_emulation=True), or has none."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or (including_emulation and emulated_bf16)
    return is_bf16_supported


@pytest.mark.parametrize("native, emulated, expected", [(True, True, torch.bfloat16), (False, True, torch.float16),
                                                        (False, False, torch.float16)])
def test_cuda_uses_bf16_only_where_it_is_native(monkeypatch, native, emulated, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_gpu(native, emulated))
    assert train.pick_amp_dtype(CUDA, enabled=True) is expected
    assert train.pick_amp_dtype(CUDA, enabled=False) is None


@pytest.mark.parametrize("native_cpu, expected", [(True, torch.bfloat16), (False, None)])
def test_cpu_uses_bf16_where_native_else_fp32(monkeypatch, native_cpu, expected):
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: native_cpu)
    assert train.pick_amp_dtype(torch.device("cpu"), enabled=True) is expected
    assert train.pick_amp_dtype(torch.device("mps"), enabled=True) is None


def test_only_fp16_needs_a_grad_scaler_and_the_start_up_line_says_which():
    assert [train.needs_grad_scaler(d) for d in (torch.float16, torch.bfloat16, None)] == [True, False, False]
    assert train.precision_name(torch.float16) == "fp16 autocast + GradScaler"
    assert train.precision_name(torch.bfloat16) == "bf16 autocast"
    assert train.precision_name(None) == "fp32"


def test_fp16_training_steps_go_through_the_grad_scaler(tiny_data, tmp_path, monkeypatch, capsys):
    """fp16 as on a GPU without native bf16 (CPU autocast computes fp16 too): every step is scaled, stepped by the
    scaler and followed by its update, and the run trains and saves as usual."""
    calls = {"scale": 0, "step": 0, "update": 0}
    for name in calls:
        original = getattr(torch.amp.GradScaler, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.amp.GradScaler, name, spy)
    monkeypatch.setattr(train, "pick_amp_dtype", lambda device, enabled: torch.float16 if enabled else None)
    assert train.main(train_args(tiny_data, tmp_path, "--epochs", "2")) == 0
    out = capsys.readouterr().out
    assert "fp16 autocast + GradScaler" in out.split("device: ", 1)[1].splitlines()[0]
    steps = 2 * (32 // 8)  # 16 train images per class, batch 8
    assert calls == {"scale": steps, "step": steps, "update": steps}
    assert (tmp_path / "models" / "best_model.pth").is_file()


def test_without_fp16_there_is_no_grad_scaler(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", lambda *a, **k: pytest.fail("GradScaler built"))
    assert train.main(train_args(tiny_data, tmp_path, "--no-amp")) == 0
    assert "fp32" in capsys.readouterr().out.split("device: ", 1)[1].splitlines()[0]
