"""INT8 models for CPUs: the network quantized by onnxruntime's static quantization, calibrated on training
images, checked against the float model, and loaded back to score images in place of PyTorch.

Usage:
    train_images, val = int8_images(ckpt, "PATH/TO/DATA", calibration=300)   # as training read them
    check = quantize(model, ckpt, train_images, val.images, val.labels, "models/model.int8.onnx", tolerance=0.5)
    check.describe()      # label agreement with the float model on val, both accuracies (written only if within 0.5)
    runtime, note = int8_runtime(model, ckpt, "models/model.int8.onnx")        # runtime= for predict_images

The file is predict.FeatureNet's graph (outputs: logits, penultimate feature, stage statistics; input 'image', a
normalized float batch of any size), so it answers like export.py's float ONNX model to code that reads only
'logits', and gives predict_images everything the novelty score needs. Convolutions and the head are INT8
(per-channel weights, activations from the calibration images' min-max, the QDQ format that onnxruntime fuses
into integer kernels); the stage statistics stay float. The weights keep 7 bits (reduce_range, |w| <= 64): on x86
CPUs without VNNI (AVX2 only) onnxruntime multiplies uint8 activations by int8 weights in pairs summed into int16,
and with full 8-bit weights a pair of bright pixels under two large weights passes 32,767 and saturates (the
first convolution, which sees the image itself, most of all); 2 x 255 x 64 cannot. A file is made on one machine
and run on others, so it is made to be exact on all of them. Its metadata holds the fingerprint of the checkpoint it
was made from (checkpoint.fingerprint_of) and the check made at export (compare), so that a reader refuses a
file made from another checkpoint and can say how close to the float model it is.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from core.common import UserError
from dataset import Split, load_items, trained_items
from prediction.checkpoint import config_of, fingerprint_of, tag_thresholds_of
from prediction.predict import OnnxFeatures, export_features, normalize, predict_images

CALIBRATION_BATCH = 32  # images per batch fed to the calibrator
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Add", "Relu", "GlobalAveragePool"]  # INT8; the statistics stay float
FINGERPRINT_KEY, CHECK_KEY = "checkpoint_fingerprint", "int8_check"  # the file's metadata


@dataclass(frozen=True)
class Int8Check:
    """How the INT8 model answers against the float one on labelled images it was not calibrated on: the share of
    predicted labels they agree on, each one's accuracy, and (with a novelty score) the share of known/unknown
    verdicts they agree on."""
    images: int
    agreement: float
    float_accuracy: float
    int8_accuracy: float
    known_agreement: float | None

    @property
    def accuracy_change(self) -> float:
        """INT8 accuracy minus float accuracy, in percentage points."""
        return 100 * (self.int8_accuracy - self.float_accuracy)

    def describe(self) -> str:
        known = "" if self.known_agreement is None else f", known/unknown verdicts {100 * self.known_agreement:.1f}%"
        return (f"on {self.images} val images INT8 agrees with float on {100 * self.agreement:.1f}% of labels"
                f"{known}; accuracy {100 * self.int8_accuracy:.2f}% vs {100 * self.float_accuracy:.2f}% "
                f"({self.accuracy_change:+.2f} points)")


def int8_images(ckpt: dict, data: str | None = None, calibration: int = 300, seed: int = 0, workers: int = 2
                ) -> tuple[torch.Tensor, Split]:
    """A seeded sample of `calibration` training images of `data` (None: the data the model trained on) and its
    labelled val split (never calibrated on), read as train.py read them (layout, labels, carve and classes from
    the checkpoint's config)."""
    classes = list(ckpt["classes"])
    splits = trained_items(config_of(ckpt), classes, data)
    train, val = splits.get("train", []), splits.get("val", [])
    if not train or not val:
        raise UserError(f"INT8 needs train images to calibrate on and labelled val images to check on; "
                        f"{data or config_of(ckpt).get('data')} has {len(train)} and {len(val)} of the checkpoint's "
                        f"classes ({', '.join(classes)})")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:calibration]
    size, channels = ckpt["image_size"], ckpt["channels"]
    tags = tag_thresholds_of(ckpt) is not None
    sample = load_items([train[i] for i in sorted(pick.tolist())], classes, "calibration", size, channels,
                        workers=workers, tags=tags)
    return sample.images, load_items(val, classes, "val", size, channels, workers=workers, tags=tags)


def calibration_reader(images: torch.Tensor, normalization: dict):
    """onnxruntime's CalibrationDataReader over uint8 images, normalized as the network takes them."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.start = 0

        def get_next(self) -> dict | None:
            if self.start >= len(images):
                return None
            batch = normalize(torch.as_tensor(images[self.start:self.start + CALIBRATION_BATCH]), normalization)
            self.start += CALIBRATION_BATCH
            return {"image": batch.numpy()}

    return Reader()


def quantize(model: nn.Module, ckpt: dict, calibration: torch.Tensor, val_images: torch.Tensor,
             val_labels: torch.Tensor, path: str | Path, tolerance: float) -> Int8Check:
    """Quantize the checkpoint's network, calibrated on `calibration` (uint8 images read as training reads them),
    check it against the float model on the labelled val images (compare), and write it to `path` (atomically,
    with the checkpoint's fingerprint and the check in its metadata) when its accuracy is at most `tolerance`
    points below the float model's; otherwise remove any older file at `path`. Returns the check."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    if len(calibration) == 0:
        raise UserError("INT8 calibration needs training images; none were readable")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's and quantizer's notes on their own internals
        float_file = export_features(model, ckpt["image_size"], ckpt["channels"], Path(folder) / "float.onnx")
        prepared = Path(folder) / "prepared.onnx"  # shapes inferred and BatchNorm folded: what quantization expects
        quant_pre_process(str(float_file), str(prepared))
        try:
            quantize_static(str(prepared), str(partial), calibration_reader(calibration, ckpt["normalization"]),
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=QUANTIZED_OPS)
            check = compare(model, ckpt, OnnxFeatures(partial), val_images, val_labels)
            if check.accuracy_change < -tolerance:
                path.unlink(missing_ok=True)
                return check
            write_metadata(partial, {FINGERPRINT_KEY: fingerprint_of(ckpt), CHECK_KEY: json.dumps(asdict(check))})
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
    return check


def write_metadata(path: str | Path, values: dict[str, str]) -> None:
    """Set metadata entries of an ONNX file (kept with the graph; onnxruntime shows them as custom metadata)."""
    import onnx

    graph = onnx.load(str(path))
    kept = [p for p in graph.metadata_props if p.key not in values]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    for key, value in values.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def read_metadata(runtime: OnnxFeatures) -> dict[str, str]:
    return dict(runtime.session.get_modelmeta().custom_metadata_map)


def compare(model: nn.Module, ckpt: dict, runtime: OnnxFeatures, images: torch.Tensor, labels: torch.Tensor,
            batch: int = 256) -> Int8Check:
    """The INT8 runtime's predictions against PyTorch's float ones on labelled uint8 images (as predict_images
    makes them: TTA and temperature as trained)."""
    pairs = []
    for start in range(0, len(images), batch):
        chunk = list(torch.as_tensor(images[start:start + batch]))
        pairs += zip(predict_images(model, ckpt, chunk), predict_images(model, ckpt, chunk, runtime=runtime))
    if not pairs:
        raise UserError("the INT8 check needs labelled val images; none were readable")
    classes = list(ckpt["classes"])
    if labels.dim() == 2:  # several tags per image: a prediction is its set of tags, right when it is the true set
        truth = [frozenset(c for c, y in zip(classes, row) if y) for row in labels.tolist()]
        pairs = [(frozenset(f.labels), frozenset(q.labels), f.known, q.known) for f, q in pairs]
    else:
        truth = [classes[k] for k in labels.tolist()]
        pairs = [(f.label, q.label, f.known, q.known) for f, q in pairs]
    n = len(pairs)
    known = None if pairs[0][2] is None else sum(fk == qk for _, _, fk, qk in pairs) / n
    return Int8Check(n, sum(f == q for f, q, _, _ in pairs) / n,
                     sum(f == t for (f, _, _, _), t in zip(pairs, truth)) / n,
                     sum(q == t for (_, q, _, _), t in zip(pairs, truth)) / n, known)


def int8_runtime(model: nn.Module, ckpt: dict, path: str | Path, threads: int = 1) -> tuple[OnnxFeatures, str]:
    """The INT8 file at `path` as a runtime for predict_images, and a line saying what it is; a UserError when
    there is no such file or it was made from another checkpoint (INT8 cannot match PyTorch to 1e-4, so unlike
    predict.onnx_runtime it is trusted on the check made at export, not checked again)."""
    path = Path(path)
    redo = (f"python export.py --checkpoint CHECKPOINT --format onnx-int8 --out "
            f"{path.with_name(path.name.removesuffix('.int8.onnx'))}")
    if not path.is_file():
        raise UserError(f"no INT8 model at {path}: write it with `{redo}`")
    try:
        runtime = OnnxFeatures(path, threads)
    except Exception as e:
        raise UserError(f"cannot load the INT8 model {path}: {type(e).__name__}: {str(e)[:200]}") from None
    meta = read_metadata(runtime)
    if meta.get(FINGERPRINT_KEY) != fingerprint_of(ckpt):
        raise UserError(f"{path} was not made from this checkpoint (its weights or classes differ): "
                        f"write it again with `{redo}`")
    check = meta.get(CHECK_KEY)
    known = f"; at export {Int8Check(**json.loads(check)).describe()}" if check else ""
    return runtime, f"onnxruntime INT8 ({path}{known})"
