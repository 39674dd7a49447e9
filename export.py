"""Export a trained checkpoint to TorchScript, ONNX and INT8 ONNX, and check the exported model against PyTorch.

Usage:
    python export.py                                          # models/best_model.pth -> models/model.pt, .onnx
    python export.py --checkpoint models/best_model.pth --format onnx --out models/catdog
    python export.py --format torchscript --no-check
    python export.py --format onnx-int8                       # -> models/model.int8.onnx, for --runtime onnx-int8
    python export.py --format onnx-int8 --data PATH --calibration 500 --int8-tolerance 0.5

Writes OUT.pt (TorchScript), OUT.onnx (ONNX, batch size free) and OUT.json (class names and preprocessing).
The exported model maps a normalized float tensor (N, C, S, S) to logits (N, classes); it does not decode,
resize or normalize. Feed it what training fed the network:
    1. decode the image; grayscale ('L') for C = 1, RGB for C = 3 (transparency composited onto white),
    2. resize to S x S (bilinear, no crop),
    3. x = pixels / 255 as float32, in (C, S, S) order,
    4. x = (x - mean) / std with the checkpoint's per-channel mean and std (printed and in OUT.json),
    5. probabilities = softmax(logits / temperature); label = classes[argmax].
Flip test-time augmentation is not part of the exported model. The check (on by default) runs both exported
files on sample inputs and compares with PyTorch (max |difference| <= 1e-4); ONNX needs `pip install onnx
onnxscript`, and its check onnxruntime (skipped with a note when absent).

--format onnx-int8 writes OUT.int8.onnx: the network with INT8 convolutions (onnxruntime's static quantization,
prediction/quantize.py), calibrated on --calibration training images of --data (default: the data the model
trained on), read as training read them. Its first output is 'logits', as OUT.onnx's; the others are the
features the novelty score needs. It is checked against the float model on the val split (never used for
calibration): agreement of the predicted labels and both accuracies, printed and kept in the file. When INT8
loses more than --int8-tolerance points of val accuracy, it is not written: the float OUT.onnx is kept instead,
and the export exits with status 1. `inference.py --runtime onnx-int8`, `serve.py --runtime onnx-int8` and
`Classifier.load(..., runtime="onnx-int8")` read it from beside the checkpoint (--int8-model elsewhere).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from core.common import UserError, reports_user_errors
from dataset import to_float
from prediction.checkpoint import (DEFAULT_PATH, load_checkpoint, model_from_checkpoint, normalization_of,
                                   tag_thresholds_of, temperature_of)
from prediction.predict import export_onnx
from prediction.quantize import Int8Check, int8_images, quantize

FORMATS = ("torchscript", "onnx", "onnx-int8")
DEFAULT_FORMATS = ["torchscript", "onnx"]  # INT8 needs the training images, so it is asked for by name
TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Int8Settings:
    """What --format onnx-int8 reads: the dataset (None: the one the model trained on), how many training images
    calibrate, the val accuracy it may lose (points), the sample's seed and the decoding processes."""
    data: str | None = None
    calibration: int = 300
    tolerance: float = 0.5
    seed: int = 0
    workers: int = 2


def preprocessing(ckpt: dict) -> dict:
    """What a deployment must do to an image before the exported model: everything the checkpoint knows."""
    norm = normalization_of(ckpt)
    channels = ckpt["channels"]
    mean = norm["mean"] if isinstance(norm["mean"], list) else [norm["mean"]] * channels
    std = norm["std"] if isinstance(norm["std"], list) else [norm["std"]] * channels
    pre = {"classes": list(ckpt["classes"]), "input_shape": [1, channels, ckpt["image_size"], ckpt["image_size"]],
           "color": "grayscale" if channels == 1 else "RGB", "resize": "bilinear, whole image, no crop",
           "scale": "1/255", "mean": mean, "std": std, "temperature": temperature_of(ckpt)}
    thresholds = tag_thresholds_of(ckpt)
    if thresholds is not None:  # several tags per image: one sigmoid per class, each with its threshold
        pre["tag_thresholds"] = dict(zip(ckpt["classes"], thresholds))
    return pre


def describe(pre: dict) -> str:
    s = pre["input_shape"][-1]
    return (f"input: float32 {tuple(pre['input_shape'])} (batch size free) = {pre['color']}, resized to {s}x{s}, "
            f"x/255, (x - {pre['mean']}) / {pre['std']}; output: logits for {pre['classes']}, "
            + (f"probabilities = sigmoid(logits), a tag when its probability reaches its threshold "
               f"{pre['tag_thresholds']}" if "tag_thresholds" in pre else
               f"probabilities = softmax(logits / {pre['temperature']})"))


def sample_inputs(ckpt: dict, n: int = 4, seed: int = 0) -> torch.Tensor:
    """Random images, normalized the way the checkpoint expects: (n, C, S, S) float32."""
    g = torch.Generator().manual_seed(seed)
    s, c = ckpt["image_size"], ckpt["channels"]
    pixels = torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)
    norm = normalization_of(ckpt)
    return to_float(pixels, norm["mean"], norm["std"])


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    # PyTorch marks TorchScript deprecated, but LibTorch (C++) and many serving stacks still load it.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(model, example).save(str(path))
    return path


def with_suffix(out: Path, suffix: str) -> Path:
    """OUT + suffix; unlike Path.with_suffix this keeps dots in the name (models/model.v2 -> model.v2.onnx)."""
    return out.with_name(out.name + suffix)


def max_difference(expected: torch.Tensor, got) -> float:
    return (expected - torch.as_tensor(got, dtype=torch.float32)).abs().max().item()


def check_torchscript(path: Path, model: nn.Module, inputs: torch.Tensor) -> float:
    """Max |exported - PyTorch| over the logits of `inputs`, with the file loaded back from disk."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path))
    with torch.no_grad():
        return max_difference(model(inputs), loaded(inputs))


def check_onnx(path: Path, model: nn.Module, inputs: torch.Tensor) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": inputs.numpy()})
    with torch.no_grad():
        return max_difference(model(inputs), got)


def export_int8(ckpt: dict, model: nn.Module, out: Path, settings: Int8Settings) -> tuple[Path, Int8Check]:
    """OUT.int8.onnx (quantize.quantize), and its check against the float model on val."""
    calibration, val = int8_images(ckpt, settings.data, settings.calibration, settings.seed, settings.workers)
    path = with_suffix(out, ".int8.onnx")
    return path, quantize(model, ckpt, calibration, val.images, val.labels, path, settings.tolerance)


def export(ckpt: dict, out: Path, formats: list[str], check: bool = True, int8: Int8Settings | None = None) -> dict:
    """Write the exported files (and OUT.json); returns {format: path} and, when checked, {format_diff: value};
    with onnx-int8, {"int8_check": Int8Check} and {"onnx-int8": path, or None when INT8 lost more than the
    tolerance, in which case the float ONNX model is written too}."""
    model = model_from_checkpoint(ckpt)  # eval mode: BatchNorm uses its running statistics
    example = sample_inputs(ckpt, n=2, seed=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if "onnx-int8" in formats:  # first: it is the one that can fail on the data
        path, result["int8_check"] = export_int8(ckpt, model, out, int8 or Int8Settings())
        within = (int8 or Int8Settings()).tolerance >= -result["int8_check"].accuracy_change
        result["onnx-int8"] = str(path) if within else None
        if not within and "onnx" not in formats:
            formats = [*formats, "onnx"]
    with_suffix(out, ".json").write_text(json.dumps(preprocessing(ckpt), indent=2))
    result["json"] = str(with_suffix(out, ".json"))
    writers = {"torchscript": (export_torchscript, ".pt", check_torchscript),
               "onnx": (lambda m, x, path: export_onnx(m, x, path, ["logits"]), ".onnx", check_onnx)}
    inputs = sample_inputs(ckpt, n=4, seed=2)
    for fmt in (f for f in formats if f in writers):
        write, suffix, verify = writers[fmt]
        path = write(model, example, with_suffix(out, suffix))
        result[fmt] = str(path)
        if not check:
            continue
        if fmt == "onnx":
            try:
                import onnxruntime  # noqa: F401  (only to know whether the check can run)
            except ModuleNotFoundError:
                print("note: onnxruntime is not installed; skipped the ONNX check (pip install onnxruntime)")
                continue
        diff = verify(path, model, inputs)
        result[f"{fmt}_diff"] = diff
        if not diff <= TOLERANCE:
            raise UserError(f"{path}: exported outputs differ from PyTorch's by {diff:.2e} (> {TOLERANCE})")
    return result


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_PATH, help="checkpoint written by train.py")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=DEFAULT_FORMATS,
                        help="what to write (default: torchscript onnx)")
    parser.add_argument("--out", default="models/model",
                        help="output path without suffix (.pt, .onnx, .int8.onnx, .json; default: models/model)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare the exported model's outputs with PyTorch's on sample inputs")
    parser.add_argument("--data", help="onnx-int8: dataset whose train images calibrate and whose val images check "
                        "(default: the one the model trained on)")
    parser.add_argument("--calibration", type=int, default=Int8Settings.calibration,
                        help=f"onnx-int8: training images to calibrate on (default: {Int8Settings.calibration})")
    parser.add_argument("--int8-tolerance", type=float, default=Int8Settings.tolerance,
                        help="onnx-int8: most val accuracy INT8 may lose, in points; beyond it the float model is "
                             f"kept (default: {Int8Settings.tolerance})")
    parser.add_argument("--workers", type=int, default=Int8Settings.workers,
                        help=f"onnx-int8: processes that decode images (default: {Int8Settings.workers})")
    args = parser.parse_args(argv)
    if args.calibration < 1 or args.int8_tolerance < 0 or args.workers < 0:
        raise UserError("--calibration must be at least 1, --int8-tolerance at least 0 and --workers at least 0")
    ckpt = load_checkpoint(args.checkpoint)
    formats = list(dict.fromkeys(args.format))
    result = export(ckpt, Path(args.out), formats, args.check,
                    Int8Settings(args.data, args.calibration, args.int8_tolerance, workers=args.workers))
    for fmt in (f for f in FORMATS if result.get(f)):
        diff = result.get(f"{fmt}_diff")
        print(f"wrote {result[fmt]}" + (f"  (max |difference| to PyTorch {diff:.1e})" if diff is not None else ""))
    print(f"wrote {result['json']}")
    print(describe(preprocessing(ckpt)))
    if "int8_check" in result:
        print(f"INT8: {result['int8_check'].describe()}")
        if result["onnx-int8"] is None:
            print(f"INT8 not written: it loses more than --int8-tolerance {args.int8_tolerance} points of val "
                  f"accuracy; kept the float model {result['onnx']}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
