"""The one forward path: every prediction (validation, calibration, evaluate.py, inference.py, serve.py, the
novelty fit) and every Grad-CAM map goes through the functions here, which normalize, mirror-average (TTA), cast
(amp) and lay out (channels-last) a batch the same way.

Usage:
    logits = predict_logits(model, uint8_images, torch.device("cpu"), tta=True, normalization=ckpt_norm)
    features = extract_features(model, uint8_images, tta=True)   # penultimate, logits, stage statistics
    scores = score_images(model, images, states, tta=True)       # {novelty score name: scores}, chunk by chunk
    results = predict_images(model, ckpt, decoded_images)         # labels, confidences, novelty: what users see
    cam = explain(model, normalize(image[None], norm), "auto", tta=True).cam   # Grad-CAM heatmap
    runtime, note = onnx_runtime(model, ckpt)   # onnxruntime, checked against PyTorch; then runtime=runtime above
No prediction builds an autograd graph (torch.inference_mode; no_grad for the features, which the novelty scores
are fitted on): a batch's activations are freed as soon as it is scored.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from config import NORMALIZATION, NOVELTY_SCORES
from core.common import UserError
from dataset import RowView, rotate_quarters, to_float
from model import (cam_stages, feature_stages, forward_stages, has_rotation_head, head_of, tail_forward, trunk_forward,
                   unwrap)
from prediction.checkpoint import normalization_of, novelty_of, tag_thresholds_of, temperature_of, tta_of
from prediction.novelty import needs_turns, novelty_score, scores_by_name

MAX_STAGE_CHANNELS = 256  # wider stages are averaged over neighbouring channels: a stage adds at most 512 values
FEATURE_BATCH_VALUES = 2**20  # pixel values per forward pass: 256 images at 64 px gray, 21 at 128 px RGB
SCORE_CHUNK = 4096  # images whose features score_images holds at once (about 7 KB each for the default model)
MIN_CAM_CELLS = 8  # the auto layer is the deepest stage whose map has at least this many cells a side


# ---------------------------------------------------------------- the batches a forward pass sees


def batch_size_for(images: torch.Tensor, max_values: int = 2**22, max_images: int = 512) -> int:
    """Images per forward pass: at most `max_images`, and at most `max_values` pixel values, so that a batch's
    floats stay bounded whatever the image size (512 at 64 px gray, 21 at 256 px RGB by default)."""
    return max(1, min(max_images, max_values // max(1, math.prod(images.shape[1:]))))


def feature_batch_size(images: torch.Tensor) -> int:
    """Images per forward pass in extract_features when the caller does not say: at most 256, and at most
    FEATURE_BATCH_VALUES pixel values. Every stage's feature maps of a batch are alive at once (the default
    model's first stage has 48 channels at full resolution: 0.8 MB an image at 64 px), so this bounds memory."""
    return batch_size_for(images, FEATURE_BATCH_VALUES, 256)


def normalize(images: torch.Tensor, normalization: dict | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (N, C, S, S) as the network takes them: floats normalized with the checkpoint's {"mean", "std"}
    (default: config.NORMALIZATION), in channels-last memory when asked."""
    norm = normalization or NORMALIZATION
    x = to_float(images, norm["mean"], norm["std"])
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def normalized_batches(images: torch.Tensor, batch_size: int, device: torch.device, normalization: dict | None,
                       channels_last: bool) -> Iterator[torch.Tensor]:
    """The images, batch_size at a time, moved to the device and normalized (a RowView is read a batch at a time)."""
    for i in range(0, len(images), batch_size):
        yield normalize(images[i:i + batch_size].to(device, non_blocking=True), normalization, channels_last)


def views(x: torch.Tensor, tta: bool) -> list[torch.Tensor]:
    """What test-time augmentation averages over: the batch, and with tta its mirror image."""
    return [x, x.flip(-1)] if tta else [x]


PREDICTION_DIGITS = 4  # decimals a Prediction keeps of each probability and score; every printout rounds from them
ONE_PASS_IMAGES = 16  # up to this many images, all their views go through the network as one batch


def per_view(run, x: torch.Tensor, tta: bool) -> list:
    """run(batch) for each view of x (views()). A small batch's views go through as one batch, then are split
    again: on a CPU one pass of 2 images costs about what one pass of 1 does, far less than two passes, so a
    lone request's mirror TTA comes almost free. `run` returns a tensor or a (tensor, list of tensors) whose
    first dimension is the images."""
    vs = views(x, tta)
    if len(vs) == 1 or len(x) > ONE_PASS_IMAGES:
        return [run(v) for v in vs]
    out, n = run(torch.cat(vs)), len(x)
    split = (lambda t: [t[i * n:(i + 1) * n] for i in range(len(vs))])
    if isinstance(out, torch.Tensor):
        return split(out)
    first, rest = out
    rests = [split(t) for t in rest]
    return [(part, [r[i] for r in rests]) for i, part in enumerate(split(first))]


def amp(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to amp_dtype on the device, or nothing for plain fp32."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int | None = None,
                   tta: bool = False, channels_last: bool = False,
                   amp_dtype: torch.dtype | None = None, normalization: dict | None = None) -> torch.Tensor:
    """Logits (N, classes) on the CPU for uint8 images (N, C, S, S); with tta, averaged with the mirror image.
    Runs under inference mode: no autograd graph is built, so a batch's activations are freed as soon as it is
    scored, even for a model whose parameters require grad (the EMA model in training).
    `normalization` is the checkpoint's {"mean", "std"}; `batch_size` defaults to batch_size_for(images)."""
    model.eval()
    out = []
    for x in normalized_batches(images, batch_size or batch_size_for(images), device, normalization, channels_last):
        with amp(device, amp_dtype):
            out.append(torch.stack([y.float() for y in per_view(model, x, tta)]).mean(0).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


class PredictionFacts(NamedTuple):
    """What predict_images reads from a checkpoint, read once: a caller that predicts again and again (serve.py,
    prediction/classifier.py) passes it to every call, so that no call reads the checkpoint again."""
    classes: tuple[str, ...]
    normalization: dict
    tta: bool
    temperature: float
    novelty: dict | None
    tag_thresholds: tuple[float, ...] | None = None  # several tags per image: each tag's threshold

    @classmethod
    def of(cls, ckpt: dict) -> PredictionFacts:
        tags = tag_thresholds_of(ckpt)
        return cls(tuple(ckpt["classes"]), normalization_of(ckpt), tta_of(ckpt), temperature_of(ckpt),
                   novelty_of(ckpt), None if tags is None else tuple(tags))


@dataclass(frozen=True)
class Prediction:
    """One image's prediction, as users see it. `label` is a class, or 'unknown' below the confidence threshold
    or (with reject) when the novelty score says the image is of no known class; `confidence` and
    `probabilities` (by class, in the checkpoint's class order) are the softmax of the logits over the
    checkpoint's temperature, rounded to 4 decimals. `novelty_score` and `known` (score <= the stored threshold)
    are None for a checkpoint without a novelty score. For a model with several tags per image, `labels` are the
    tags whose sigmoid probability reaches their threshold, most probable first; `label` is them joined by spaces
    ('' for none), `probabilities` each tag's and `confidence` the largest."""
    label: str
    confidence: float
    probabilities: dict[str, float]
    novelty_score: float | None = None
    known: bool | None = None
    labels: tuple[str, ...] | None = None

    def as_dict(self) -> dict:
        """inference.py --json's object and serve.py's answer: the novelty fields only when there is a score,
        `labels` only for several tags per image."""
        out = {"label": self.label, "confidence": self.confidence, "probabilities": dict(self.probabilities)}
        if self.labels is not None:
            out["labels"] = list(self.labels)
        if self.novelty_score is not None:
            out.update(novelty_score=self.novelty_score, known=self.known)
        return out


def tag_predictions(logits: torch.Tensor, tags: tuple[str, ...], thresholds: tuple[float, ...]) -> list[Prediction]:
    """Predictions of a model with several tags per image: each tag's sigmoid probability, and the tags that reach
    their threshold, most probable first."""
    results = []
    for pr in torch.sigmoid(logits.float()):
        probabilities = {t: round(v, PREDICTION_DIGITS) for t, v in zip(tags, pr.tolist())}
        chosen = sorted((t for t, v, th in zip(tags, pr.tolist(), thresholds) if v >= th),
                        key=lambda t: -probabilities[t])
        results.append(Prediction(" ".join(chosen), round(pr.max().item(), PREDICTION_DIGITS), probabilities,
                                  labels=tuple(chosen)))
    return results


def predict_images(model: torch.nn.Module, ckpt: dict | None, images: list, threshold: float = 0.0,
                   tta: bool | None = None, reject: bool = False, runtime: OnnxFeatures | None = None,
                   facts: PredictionFacts | None = None) -> list[Prediction]:
    """One Prediction per decoded uint8 (C, S, S) image, all in one batch.

    The prediction inference.py prints and serve.py answers: the checkpoint's softmax temperature is applied,
    below `threshold` the label is 'unknown', and with `reject` also when the image is of no known class (a
    checkpoint without a novelty score is then a UserError that says to retrain). tta=None uses the training
    run's setting; the novelty score always uses the setting its threshold was chosen with. With `runtime`
    (OnnxFeatures) the network runs in onnxruntime. `facts` (PredictionFacts.of(ckpt)) are the checkpoint's
    facts read beforehand; without them they are read from `ckpt`.
    """
    facts = PredictionFacts.of(ckpt) if facts is None else facts
    novelty = facts.novelty
    if reject and novelty is None:
        novelty_of({}, needed_by="--reject")  # the UserError that says to retrain
    if not images:
        return []
    classes, norm = facts.classes, facts.normalization
    tta = facts.tta if tta is None else tta
    batch = torch.stack([torch.as_tensor(im) for im in images])
    scores = None
    if novelty is not None:
        state = novelty["states"][novelty["score"]]
        features = extract_features(model, batch, tta=novelty["tta"], normalization=norm, runtime=runtime,
                                    turns=needs_turns({novelty["score"]: state}))
        scores = novelty_score(state, features).tolist()
    if novelty is not None and tta == novelty["tta"]:
        logits = features["logits"]  # the same numbers predict_logits gives, without a second pass
    elif runtime is not None:
        logits = extract_features(model, batch, tta=tta, normalization=norm, runtime=runtime)["logits"]
    else:
        logits = predict_logits(model, batch, torch.device("cpu"), tta=tta, normalization=norm)
    if facts.tag_thresholds is not None:
        return tag_predictions(logits, classes, facts.tag_thresholds)
    results = []
    for i, pr in enumerate(torch.softmax(logits / facts.temperature, dim=1)):
        conf, k = pr.max(0)
        known = scores is None or scores[i] <= novelty["threshold"]
        label = classes[k] if conf.item() >= threshold and (known or not reject) else "unknown"
        probabilities = {c: round(v, PREDICTION_DIGITS) for c, v in zip(classes, pr.tolist())}
        results.append(Prediction(label, round(conf.item(), PREDICTION_DIGITS), probabilities,
                                  None if scores is None else round(scores[i], PREDICTION_DIGITS),
                                  None if scores is None else known))
    return results


# ---------------------------------------------------------------- features for the novelty scores


def stage_statistics(maps: torch.Tensor, max_channels: int = MAX_STAGE_CHANNELS) -> torch.Tensor:
    """Per-channel mean and standard deviation over space of feature maps (N, C, H, W) -> (N, 2 * min(C, max)),
    float32; beyond `max_channels`, neighbouring channels' statistics are averaged."""
    maps = maps.float()
    mean = maps.mean((2, 3))
    # E[x^2] - E[x]^2: on a CPU far cheaper than Tensor.std over small maps, which would dominate the features' cost
    stats = [mean, ((maps * maps).mean((2, 3)) - mean * mean).clamp(min=0).sqrt()]
    if maps.shape[1] > max_channels:
        stats = [F.adaptive_avg_pool1d(s[:, None], max_channels)[:, 0] for s in stats]
    return torch.cat(stats, 1)


@torch.no_grad()  # not inference mode: the scores are fitted on these tensors, which may need autograd
def extract_features(model: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu",
                     batch_size: int | None = None, tta: bool = False, normalization: dict | None = None,
                     amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                     runtime: OnnxFeatures | None = None, turns: bool = False) -> dict:
    """What every score needs, float32 on the CPU, for uint8 images (N, C, S, S):
    {"penultimate": (N, D), "logits": (N, classes), "stages": [(N, d_s) per stage]}; for a model with a rotation
    head also "upright" (N,), its surprise that the image is upright (from the penultimate feature: no extra pass),
    and with `turns` "rotation" (N,), its surprise over all four quarter turns (three more passes per view).

    The stages are called in turn (forward_stages), exactly as the model's forward does; the logits are the head
    applied to the penultimate feature. With tta everything is averaged over the image and its mirror; the head
    being linear, the logits are then exactly the average of both images' logits, as predict_logits gives.
    The features of every image are kept: for a whole split use score_images, and fit on a fit_sample.
    With `runtime` (OnnxFeatures of this model) the network's passes run in onnxruntime instead of PyTorch.
    """
    device = torch.device(device)
    head, stages = head_of(model), feature_stages(model)
    rot = unwrap(model).rot if has_rotation_head(model) else None
    model.eval()
    penultimate, stats, surprise = [], [], []

    def features(v: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with amp(device, amp_dtype):
            maps, pen = forward_stages(model, v)
        return pen.float(), [stage_statistics(m) for m in maps]  # the feature maps are freed on return

    for x in normalized_batches(images, batch_size or feature_batch_size(images), device, normalization,
                                channels_last):
        passes = per_view(runtime or features, x, tta)  # (penultimate, [statistics per stage]) of each view
        penultimate.append(torch.stack([p for p, _ in passes]).mean(0).cpu())
        stats.append([torch.stack([st[i] for _, st in passes]).mean(0).cpu() for i in range(len(stages))])
        if rot is not None and turns:
            surprise.append(torch.stack([rotation_surprise(model, rot, v, p, amp_dtype, runtime)
                                         for v, (p, _) in zip(views(x, tta), passes)]).mean(0).cpu())
    if not penultimate:
        empty = torch.zeros(0)
        head_parts = {} if rot is None else {"upright": empty, **({"rotation": empty} if turns else {})}
        return {"penultimate": torch.zeros(0, head.in_features), "logits": torch.zeros(0, head.out_features),
                "stages": [torch.zeros(0, 0) for _ in stages], **head_parts}
    penultimate = torch.cat(penultimate)
    logits = F.linear(penultimate, head.weight.float().cpu(),
                      None if head.bias is None else head.bias.float().cpu())
    out = {"penultimate": penultimate, "logits": logits,
           "stages": [torch.cat([batch[i] for batch in stats]) for i in range(len(stages))]}
    if rot is not None:
        out["upright"] = -F.log_softmax(F.linear(penultimate, rot.weight.float().cpu(), rot.bias.float().cpu()),
                                        dim=1)[:, 0]
    if surprise:
        out["rotation"] = torch.cat(surprise)
    return out


@torch.inference_mode()
def pooled_features(model: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu",
                    batch_size: int | None = None, normalization: dict | None = None,
                    amp_dtype: torch.dtype | None = None, channels_last: bool = False, progress: str = "",
                    before_last: int = 0) -> torch.Tensor:
    """The penultimate (pooled) feature of each uint8 image and of its mirror, (N, 2, D) float32 on the CPU: what
    a head on a frozen backbone trains on (the mirror an augmentation) and predicts from (their mean is the
    penultimate feature extract_features gives with tta). With `before_last` k > 0, the feature map before the
    last k stages instead, (N, 2, C, H, W) float16: what a fine-tuning of those stages trains on.
    `progress`: a progress bar's label ('' = none)."""
    device = torch.device(device)
    unwrap(model).eval()
    size = batch_size or feature_batch_size(images)
    out = []
    batches = normalized_batches(images, size, device, normalization, channels_last)
    for x in tqdm(batches, total=math.ceil(len(images) / size), desc=progress, disable=not progress, leave=False,
                  mininterval=1.0):
        with amp(device, amp_dtype):
            both = [trunk_forward(model, v, before_last) if before_last else forward_stages(model, v)[1]
                    for v in views(x, True)]
        out.append(torch.stack([v.cpu().half() if before_last else v.float().cpu() for v in both], 1))
    return torch.cat(out) if out else torch.zeros(0, 2, head_of(model).in_features)


def maps_input(maps: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Stored feature maps (float16, on the CPU) as the stages after them take them: float, on the device,
    channels-last."""
    return maps.to(device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def maps_pooled(model: nn.Module, maps: torch.Tensor, tail: int, device: torch.device | str = "cpu",
                amp_dtype: torch.dtype | None = None, batch_size: int = 256) -> torch.Tensor:
    """(N, 2, D) float32 pooled features of stored feature maps (N, 2, C, H, W: an image and its mirror, before the
    last `tail` stages, as pooled_features gives them with before_last) through those stages as they are now: the
    same features as pooled_features of the images, without a second pass of the stages before."""
    device = torch.device(device)
    unwrap(model).eval()
    out = []
    for i in range(0, len(maps), batch_size):
        with amp(device, amp_dtype):
            both = [tail_forward(model, maps_input(maps[i:i + batch_size, s], device), tail) for s in (0, 1)]
        out.append(torch.stack([f.float().cpu() for f in both], 1))
    return torch.cat(out) if out else torch.zeros(0, 2, head_of(model).in_features)


def rotation_surprise(model: nn.Module, rot: nn.Linear, x: torch.Tensor, upright: torch.Tensor,
                      amp_dtype: torch.dtype | None, runtime: OnnxFeatures | None = None) -> torch.Tensor:
    """Mean over the four quarter turns of the rotation head's negative log-probability of the right turn, for a
    normalized batch x whose upright penultimate features are `upright` (its other three turns take a forward
    pass each). Low on images like the training ones, whose upright side the model learned to see."""
    n = len(x)
    turns = torch.arange(1, 4).repeat_interleave(n)
    turned_images = rotate_quarters(x.repeat(3, 1, 1, 1), turns)
    if runtime is not None:
        turned = runtime(turned_images)[0]
    else:
        with amp(x.device, amp_dtype):
            turned = forward_stages(model, turned_images)[1].float()
    logp = F.log_softmax(F.linear(torch.cat([upright, turned]), rot.weight.float(), rot.bias.float()), dim=1)
    right = torch.cat([torch.zeros(n, dtype=torch.long), turns]).to(logp.device)
    return -logp.gather(1, right[:, None])[:, 0].view(4, n).mean(0)


def score_images(model: nn.Module, images: torch.Tensor, states: dict[str, dict], chunk: int = SCORE_CHUNK,
                 **options) -> dict[str, torch.Tensor]:
    """scores_by_name of every image, from the features of `chunk` images at a time: only the scores are kept,
    so a split of any size (a uint8 tensor or a RowView of the cache's map) can be scored. `options` go to
    extract_features (device, tta, normalization, ...)."""
    def rows(i: int) -> RowView:  # lazy: indexing the whole chunk at once would read all its pixels
        return RowView.of(images, torch.arange(i, min(i + chunk, len(images))))

    turns = needs_turns(states)
    parts = [scores_by_name(states, extract_features(model, rows(i), turns=turns, **options))
             for i in range(0, len(images), chunk)]
    return {name: torch.cat([p[name] for p in parts]) if parts else torch.zeros(0)
            for name in NOVELTY_SCORES if name in states}


# ---------------------------------------------------------------- onnxruntime


class FeatureNet(nn.Module):
    """What extract_features takes from one pass of the network, as one module to export: a normalized batch ->
    (logits, penultimate feature, each stage's statistics...). The logits come first, so that the file answers
    like export.py's plain ONNX model for code that reads only its first output ('logits')."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = unwrap(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps, pen = forward_stages(self.model, x)
        return (head_of(self.model)(pen), pen, *[stage_statistics(m) for m in maps])

    @staticmethod
    def output_names(stages: int) -> list[str]:
        return ["logits", "penultimate"] + [f"stage{i}" for i in range(stages)]


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, output_names: list[str]) -> Path:
    """The model as one self-contained ONNX file (weights inside) through torch.export, batch size free."""
    try:
        torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=output_names,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                          external_data=False, verbose=False)
    except ModuleNotFoundError as e:
        raise UserError(f"ONNX export needs the {e.name!r} package: pip install onnx onnxscript") from None
    return Path(path)


def export_features(model: nn.Module, image_size: int, channels: int, path: str | Path) -> Path:
    """FeatureNet of a model as an ONNX file (what OnnxFeatures runs and prediction/quantize.py quantizes)."""
    unwrap(model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        return export_onnx(FeatureNet(model).eval(), torch.zeros(2, channels, image_size, image_size), path,
                           FeatureNet.output_names(len(feature_stages(model))))


class OnnxFeatures:
    """A FeatureNet ONNX file (export_features; or its INT8 version) run by onnxruntime on the CPU: called like
    extract_features' PyTorch pass, on a normalized batch, it returns (penultimate, [statistics per stage]) as
    float32 tensors. `threads` is onnxruntime's intra-op thread count. OnnxFeatures.of(model, ...) exports the
    model first (the slow part) into a temporary folder; the session keeps the graph in memory."""

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs() if o.name != "logits"]

    @classmethod
    def of(cls, model: nn.Module, image_size: int, channels: int, threads: int = 1) -> OnnxFeatures:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            return cls(export_features(model, image_size, channels, Path(folder) / "features.onnx"), threads)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pen, *stats = self.session.run(self.outputs, {"image": x.float().contiguous().numpy()})
        return torch.from_numpy(pen), [torch.from_numpy(s) for s in stats]


def runtime_difference(model: nn.Module, ckpt: dict, runtime: OnnxFeatures, images: torch.Tensor) -> float:
    """Max |difference| between the softmax probabilities (TTA as trained) of PyTorch and of `runtime` on uint8
    images."""
    options = {"tta": tta_of(ckpt), "normalization": normalization_of(ckpt)}
    probs = [torch.softmax(extract_features(model, images, runtime=r, **options)["logits"] / temperature_of(ckpt), 1)
             for r in (None, runtime)]
    return (probs[0] - probs[1]).abs().max().item()


def onnx_runtime(model: nn.Module, ckpt: dict, threads: int = 1, tolerance: float = 1e-4
                 ) -> tuple[OnnxFeatures | None, str]:
    """OnnxFeatures for a checkpoint's model, checked against PyTorch on 8 generated images (softmax
    probabilities, TTA as trained, within `tolerance`), and a line saying so; (None, why) when it cannot be
    exported or does not match, so that the caller falls back to PyTorch."""
    try:
        runtime = OnnxFeatures.of(model, ckpt["image_size"], ckpt["channels"], threads)
    except Exception as e:  # a missing package, an operator the exporter cannot take...
        return None, f"onnxruntime unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); using PyTorch"
    images = torch.randint(0, 256, (8, ckpt["channels"], ckpt["image_size"], ckpt["image_size"]),
                           generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    diff = runtime_difference(model, ckpt, runtime, images)
    if not diff <= tolerance:
        return None, f"onnxruntime's probabilities differ from PyTorch's by {diff:.1e} (> {tolerance}); using PyTorch"
    return runtime, f"onnxruntime (probabilities within {diff:.1e} of PyTorch's)"


# ---------------------------------------------------------------- Grad-CAM
# Grad-CAM written out rather than taken from the grad-cam package (pytorch-grad-cam): that would add opencv,
# scikit-learn, scipy and ttach; its smoothing runs six passes (mirror x three brightnesses), each explaining its
# own argmax of a raw logit, not one class of mirror-averaged logits; and it returns no probabilities. Here one
# forward and one backward pass give the map and the very prediction inference.py prints.


class GradCam(NamedTuple):
    """What explain() returns: the heatmap (H, W) in [0, 1] at the input's size, the class it explains, that
    class's probability and all probabilities (softmax of the logits / temperature, as inference.py), the layer."""
    cam: torch.Tensor
    class_idx: int
    probability: float
    probabilities: torch.Tensor
    layer: str
    cells: tuple[int, int]


def feature_sizes(model: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """(height, width) of each named layer's output for input x."""
    sizes = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: sizes.__setitem__(n, tuple(out.shape[-2:])))
             for n, m in layers.items()]
    try:
        with torch.no_grad():
            unwrap(model).eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def pick_cam_layer(model: nn.Module, x: torch.Tensor, name: str = "auto") -> tuple[str, nn.Module]:
    """(name, module) of the layer Grad-CAM weighs for input x: `name` as in model.named_modules(), or 'auto', the
    deepest residual stage with at least MIN_CAM_CELLS cells a side (resnet_small at 64x64: layers.1, 8x8; its
    last stage is 2x2, a single blob), or the first stage when none is that fine."""
    stages = cam_stages(model)
    if name != "auto":
        modules = dict(unwrap(model).named_modules())
        if not name or name not in modules:
            raise UserError(f"--cam-layer {name!r} is not a layer of this {type(unwrap(model)).__name__}; "
                            f"its stages: {', '.join(stages)} (or auto)")
        return name, modules[name]
    sizes = feature_sizes(model, x, stages)
    fine = [n for n in stages if min(sizes[n]) >= MIN_CAM_CELLS]
    chosen = fine[-1] if fine else next(iter(stages))
    return chosen, stages[chosen]


def gradcam_layer(model: nn.Module, x: torch.Tensor | None = None, name: str = "auto") -> nn.Module:
    """The module pick_cam_layer chooses; without x, for a 64x64 input."""
    if x is None:
        in_channels = next(m for m in unwrap(model).modules() if isinstance(m, nn.Conv2d)).in_channels
        x = torch.zeros(1, in_channels, 64, 64)
    return pick_cam_layer(model, x, name)[1]


def gradcam(model: nn.Module, x: torch.Tensor, target_layer: nn.Module, class_idx: int | None = None,
            tta: bool = False) -> torch.Tensor:
    """Grad-CAM heatmap (H, W) in [0, 1] at the size of x (1, C, H, W), for class_idx (default: the predicted one).
    Same as explain(...).cam for a layer given as a module."""
    return _gradcam(model, x, target_layer, class_idx, tta)[0]


def explain(model: nn.Module, x: torch.Tensor, layer: str = "auto", tta: bool = False, temperature: float = 1.0,
            class_idx: int | None = None) -> GradCam:
    """Grad-CAM of a normalized image x (1, C, H, W) with the prediction it explains, as inference.py makes it:
    with tta the logits are averaged with the mirror image's and the two heatmaps too (the mirror's flipped back);
    probabilities are the softmax of the logits / temperature. `layer`: a module name or 'auto' (pick_cam_layer)."""
    name, module = pick_cam_layer(model, x, layer)
    cam, logits, class_idx, cells = _gradcam(model, x, module, class_idx, tta)
    probs = torch.softmax(logits[0] / temperature, 0)
    return GradCam(cam, class_idx, probs[class_idx].item(), probs, name, cells)


def _gradcam(model: nn.Module, x: torch.Tensor, target_layer: nn.Module, class_idx: int | None, tta: bool
             ) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, int]]:
    """(heatmap, logits (1, K), explained class, cells of the layer's map).

    The layer's activations are caught by a forward hook and their gradients by a hook on that output; each
    channel is weighted by its mean gradient, the weighted sum is ReLU'd, upsampled and scaled to [0, 1].
    The score explained is the class's logit minus the mean logit, which is what the softmax decides on: a raw
    logit that all classes share a negative offset in would leave the predicted class an all-zero map.
    The logits are computed as predict_logits computes them, so the probabilities equal inference.py's.
    """
    caught: list[dict[str, torch.Tensor]] = []

    def on_forward(module, inputs, output):
        entry = {"act": output}
        output.register_hook(lambda grad: entry.__setitem__("grad", grad))
        caught.append(entry)

    handle = target_layer.register_forward_hook(on_forward)
    model.eval()
    try:
        with torch.enable_grad():
            logits = torch.stack([model(v).float() for v in views(x, tta)]).mean(0)
            if class_idx is None:
                class_idx = int(logits[0].argmax())
            model.zero_grad(set_to_none=True)
            (logits[0, class_idx] - logits[0].mean()).backward()
    finally:
        handle.remove()
    if not caught or caught[0]["act"].dim() != 4:
        raise UserError("Grad-CAM needs a layer whose output is a feature map (N, C, H, W), such as a residual stage")
    cams = []
    for i, entry in enumerate(caught):  # the image, then (with tta) its mirror, whose map is flipped back
        act, grad = entry["act"].detach(), entry["grad"].detach()
        cam = torch.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
        cams.append(cam.flip(-1) if i else cam)
    cam = torch.stack(cams).mean(0)
    cells = tuple(cam.shape[-2:])
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    span = cam.max() - cam.min()
    cam = (cam - cam.min()) / span if span > 0 else torch.zeros_like(cam)
    return cam, logits.detach(), class_idx, cells

