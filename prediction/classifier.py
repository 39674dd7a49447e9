"""A trained checkpoint as an object your own code predicts with: the one way to predict from a checkpoint, which
inference.py and serve.py use too.

Usage:
    from prediction import Classifier
    clf = Classifier.load("models/best_model.pth", runtime="onnx")     # or "torch", "onnx-int8"
    result = clf.predict("photo.jpg")               # Prediction(label='dog', confidence=0.97, probabilities=...)
    results = clf.predict([pil_image, numpy_array, "b.png"])         # one Prediction each, in one batched pass
    clf.classes, clf.image_size, clf.runtime        # the class names, the side images are resized to, what scores
    clf.runtime_note                                # ... and why: "onnxruntime (probabilities within 3.0e-07 ...)"

Inputs: a path (str or Path; any format PIL reads), a PIL image, or a numpy array of pixels (H, W) gray or
(H, W, 3|4) RGB(A), uint8 or floats in [0, 1]. Each is read exactly as train.py read its images (loading/decode.py:
mode, EXIF orientation, bilinear resize to image_size). An input that cannot be used raises BadImage with the
reason inference.py prints for it ("photo.jpg: file not found").
Runtimes: "torch" (PyTorch), "onnx" (onnxruntime, exported at load and checked against PyTorch within 1e-4;
PyTorch when that fails, and `runtime_note` says why), "onnx-int8" (the INT8 file export.py --format onnx-int8
wrote, by default model.int8.onnx beside the checkpoint).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.common import UserError
from loading.decode import BadImage, decode_image, preprocess
from prediction.checkpoint import DEFAULT_PATH, load_checkpoint, model_from_checkpoint, novelty_of
from prediction.predict import OnnxFeatures, Prediction, PredictionFacts, onnx_runtime, predict_images
from prediction.quantize import int8_runtime

RUNTIMES = ("torch", "onnx", "onnx-int8")
INT8_NAME = "model.int8.onnx"  # where export.py's defaults put the INT8 model: beside models/best_model.pth
BATCH = 256  # images per forward pass in predict


def default_int8_path(checkpoint: str | Path) -> Path:
    """Where runtime 'onnx-int8' looks unless told: model.int8.onnx in the checkpoint's folder (export.py's
    --out models/model, the default, writes models/model.int8.onnx beside models/best_model.pth)."""
    return Path(checkpoint).parent / INT8_NAME


def add_runtime_flags(parser: argparse.ArgumentParser, default: str, note: str = "") -> None:
    """--runtime and --int8-model, as inference.py and serve.py take them (Classifier's runtime and int8_model)."""
    parser.add_argument("--runtime", choices=RUNTIMES, default=default,
                        help=f"what scores the images (default: {default}{note}): torch, PyTorch; onnx, "
                             "onnxruntime, exported at start and checked against PyTorch within 1e-4 (PyTorch when "
                             "that fails); onnx-int8, the INT8 model export.py --format onnx-int8 wrote "
                             "(see --int8-model)")
    parser.add_argument("--int8-model", metavar="FILE",
                        help="with --runtime onnx-int8: the INT8 file (default: model.int8.onnx beside the checkpoint)")


class Classifier:
    """A checkpoint's network, ready to predict: Classifier.load(path), or Classifier(ckpt) for a checkpoint
    already loaded. `threshold` (0-1): 'unknown' below that confidence; `reject`: 'unknown' when the novelty
    score says the image is of no known class; `tta`: mirror averaging (None: as trained); `threads`: cores
    onnxruntime uses per call; `int8_model`: the INT8 file for runtime 'onnx-int8'."""

    def __init__(self, ckpt: dict, runtime: str = "torch", threshold: float = 0.0, reject: bool = False,
                 tta: bool | None = None, threads: int | None = None, int8_model: str | Path | None = None):
        if runtime not in RUNTIMES:
            raise UserError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"--threshold must be between 0 and 1, not {threshold}")
        novelty_of(ckpt, needed_by="--reject" if reject else "")  # before anything is loaded or decoded
        if runtime == "onnx-int8" and int8_model is None:
            raise UserError("runtime 'onnx-int8' needs the INT8 file (int8_model=...), or Classifier.load(path), "
                            f"which looks for {INT8_NAME} beside the checkpoint")
        self.ckpt, self.facts = ckpt, PredictionFacts.of(ckpt)
        self.threshold, self.reject, self.tta = threshold, reject, tta
        self.model = model_from_checkpoint(ckpt)
        self.onnx, self.runtime_note = self.runtime_of(runtime, threads or torch.get_num_threads(), int8_model)
        self.runtime = runtime if self.onnx is not None else "torch"  # what scores: onnx falls back to PyTorch

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PATH, runtime: str = "torch", **options) -> Classifier:
        """The checkpoint at `path` (train.py's best_model.pth), with Classifier's options."""
        if runtime == "onnx-int8" and options.get("int8_model") is None:
            options["int8_model"] = default_int8_path(path)
        return cls(load_checkpoint(path), runtime, **options)

    def runtime_of(self, runtime: str, threads: int, int8_model: str | Path | None
                   ) -> tuple[OnnxFeatures | None, str]:
        if runtime == "onnx":
            return onnx_runtime(self.model, self.ckpt, threads)
        if runtime == "onnx-int8":
            return int8_runtime(self.model, self.ckpt, int8_model, threads)
        return None, "PyTorch"

    @property
    def classes(self) -> list[str]:
        return list(self.facts.classes)

    @property
    def image_size(self) -> int:
        return int(self.ckpt["image_size"])

    @property
    def channels(self) -> int:
        return int(self.ckpt["channels"])

    def decode(self, item) -> np.ndarray:
        """One input as the network takes it: uint8 (channels, image_size, image_size); BadImage if unusable."""
        if isinstance(item, (str, Path)):
            if not Path(item).is_file():
                raise BadImage(f"{item}: file not found")
            try:
                return decode_image(item, self.image_size, self.channels)
            except BadImage as e:
                raise BadImage(f"{item}: {e}") from None
        if isinstance(item, Image.Image):
            return preprocess(item, self.image_size, self.channels)
        if isinstance(item, np.ndarray):
            return preprocess(array_image(item), self.image_size, self.channels)
        raise BadImage(f"cannot read a {type(item).__name__} as an image: give a path, a PIL image or a numpy "
                       f"array")

    def predict(self, items) -> Prediction | list[Prediction]:
        """A Prediction for one input, or a list of them, in order, for a list (or tuple) of inputs."""
        if isinstance(items, (list, tuple)):
            images = [self.decode(item) for item in items]
            return [p for i in range(0, len(images), BATCH) for p in self.predict_decoded(images[i:i + BATCH])]
        return self.predict_decoded([self.decode(items)])[0]

    def predict_decoded(self, images: list) -> list[Prediction]:
        """Predictions of images already decoded (Classifier.decode, loading/decode.py), in one forward pass."""
        return predict_images(self.model, self.ckpt, images, self.threshold, self.tta, self.reject,
                              runtime=self.onnx, facts=self.facts)


def array_image(pixels: np.ndarray) -> Image.Image:
    """A numpy array of pixels as a PIL image: (H, W) gray or (H, W, 1|3|4), uint8 or floats in [0, 1]."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)) or min(pixels.shape[:2]) < 1:
        raise BadImage(f"an array image must be (H, W) gray or (H, W, 3) RGB / (H, W, 4) RGBA pixels, not shape "
                       f"{tuple(pixels.shape)}")
    if pixels.dtype != np.uint8:
        if not np.issubdtype(pixels.dtype, np.floating) or not np.isfinite(pixels).all() \
                or pixels.min(initial=0) < 0 or pixels.max(initial=0) > 1:
            raise BadImage(f"an array image must hold uint8 pixels or floats in [0, 1], not {pixels.dtype} "
                           f"values from {pixels.min():g} to {pixels.max():g}")
        pixels = np.round(pixels * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels))
