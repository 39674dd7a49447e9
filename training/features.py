"""A frozen pretrained backbone: the pooled feature of every image and of its mirror computed once, and kept in the
cache folder so that a second run on the same files starts at once; then the classifier head alone trained on
them (seconds), and the temperature and the novelty score fitted on them. What train.py runs for the backbones of
model.WEIGHT_PACKAGES (--arch efficientnet_lite0).

Usage (from train.py):
    feats, cached = cached_features(model, train, cfg, normalization, "train")   # (N, 2, D): each image, its mirror
    head = HeadTrainer(model, feats, train.labels, val_feats, val.labels, cfg)
    tr, ev = head.epoch()                                          # one pass over the features, then val
    best = head.head_state()                                       # after the best epoch: the head's weights
    fitted = fit_on_features(path, model, feats, train.labels, val_feats, val.labels, cfg)

The features are keyed by the backbone's weights, the input size, the arithmetic (fp32 or an autocast dtype) and
every file's path, size and modification time: a changed file, another size or other weights compute them anew.
They are stored as float16.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import TrainConfig
from core.common import save_atomic
from dataset import Split
from model import head_of, unwrap
from prediction.checkpoint import load_checkpoint, novelty_record, save_checkpoint, with_novelty, with_temperature
from prediction.novelty import fit_states, scores_by_name, threshold_for_accept_rate
from prediction.predict import pooled_features
from training.optimization import class_weight_tensor, warmup_cosine
from training.posthoc import calibration, novelty_figures

FEATURES_VERSION = 1
FEATURE_SCORES = ("knn", "mahalanobis", "msp", "energy")  # the novelty scores the pooled features alone give
DEFAULT_FEATURE_SCORE = "knn"  # a score that needs stage statistics falls back to this one


def weights_digest(model: nn.Module) -> str:
    """A digest of the backbone's weights (everything but the head): features made by other weights differ."""
    head = {id(p) for p in head_of(model).parameters()}
    digest = hashlib.sha1()
    for name, tensor in unwrap(model).state_dict(keep_vars=True).items():
        if id(tensor) not in head:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def features_key(digest: str, image_size: int, channels: int, precision: str, paths: list[str]) -> str:
    """The cache key of a split's features: the weights, the input, the arithmetic, and each file's path, size and
    mtime."""
    files = []
    for p in paths:
        st = os.stat(p)
        files.append([p, st.st_size, st.st_mtime_ns])
    text = json.dumps([FEATURES_VERSION, digest, image_size, channels, precision, files])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def cached_features(model: nn.Module, split: Split, cfg: TrainConfig, normalization: dict, name: str,
                    device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, bool]:
    """(the pooled features of the split's images and their mirrors (N, 2, D) float32, whether they came from the
    cache): read from CACHE_DIR/features/ when this backbone computed them for these very files, else computed
    (with a progress bar labelled `name`; in `amp_dtype` autocast and channels-last memory as the settings say) and
    stored there. No cache folder (''): computed every time."""
    path = None
    if cfg.cache_dir:
        key = features_key(weights_digest(model), cfg.image_size, cfg.channels, str(amp_dtype), split.paths)
        path = Path(cfg.cache_dir) / "features" / f"{cfg.arch}-{name}-{key}.pt"
        if path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)["features"]
                if len(stored) == len(split.labels):
                    return stored.float(), True
            except (OSError, RuntimeError, KeyError, EOFError):
                pass  # a file cut short or of another format: computed again below
    feats = pooled_features(model, split.images, device, cfg.batch_size, normalization, amp_dtype, cfg.channels_last,
                            progress=f"features {name}")
    if path is not None:
        save_atomic({"features": feats.half(), "paths": list(split.paths)}, path)
    return feats, False


class HeadTrainer:
    """The classifier head trained alone on frozen features, from zero weights: AdamW with warmup and a cosine to 0
    over --epochs, --label-smoothing and --class-weights as the full run has them, each image and its mirror as two
    samples; val on the mean of both (the mirror TTA), or on the image alone without --tta."""

    def __init__(self, model: nn.Module, train: torch.Tensor, labels: torch.Tensor, val: torch.Tensor,
                 val_labels: torch.Tensor, cfg: TrainConfig):
        self.cfg, self.labels, self.val_labels = cfg, labels.long(), val_labels.long()
        self.x, self.y = train.reshape(-1, train.shape[-1]), self.labels.repeat_interleave(train.shape[1])
        self.val = val.mean(1) if cfg.tta else val[:, 0]
        self.head = copy.deepcopy(head_of(model)).float().train()
        for p in self.head.parameters():  # from zero: every class equally likely (timm's init gives logits of tens)
            nn.init.zeros_(p)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps = math.ceil(len(self.x) / cfg.batch_size)
        schedule = warmup_cosine(round(cfg.warmup_epochs * self.steps), cfg.epochs * self.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.weights = class_weight_tensor(self.labels, self.head.out_features, cfg.class_weights)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def epoch(self) -> tuple[dict, dict]:
        """One pass over the training features, then val: (train figures, val figures) as the full loop's."""
        started, total, correct = time.time(), 0.0, 0
        order = torch.randperm(len(self.x), generator=self.generator)
        for i in range(0, len(order), self.cfg.batch_size):
            idx = order[i:i + self.cfg.batch_size]
            logits = self.head(self.x[idx])
            loss = F.cross_entropy(logits, self.y[idx], weight=self.weights,
                                   label_smoothing=self.cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(1) == self.y[idx]).sum().item()
        tr = {"loss": total / len(self.x), "acc": correct / len(self.x), "images": len(self.x),
              "skipped_steps": 0, "data_seconds": 0.0, "seconds": time.time() - started}
        with torch.no_grad():
            logits = self.head(self.val)
        acc = (logits.argmax(1) == self.val_labels).double().mean().item() if len(self.val) else float("nan")
        ev = {"loss": F.cross_entropy(logits, self.val_labels).item() if len(self.val) else float("nan"), "acc": acc}
        return tr, ev

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def head_state(self) -> dict:
        """A copy of the head's weights now (what the model's head takes, once an epoch is the best)."""
        return copy.deepcopy(self.head.state_dict())


def feature_logits(model: nn.Module, feats: torch.Tensor, tta: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of the images as predict_images sees them: the mean over the image and its
    mirror with tta, the image alone without."""
    pen = feats.mean(1) if tta else feats[:, 0]
    with torch.no_grad():
        return pen, head_of(model).float()(pen)


def fit_on_features(path: Path, model: nn.Module, train: torch.Tensor, labels: torch.Tensor, val: torch.Tensor,
                    val_labels: torch.Tensor, cfg: TrainConfig) -> dict:
    """The softmax temperature (fitted on val) and the novelty score (fitted on train, its threshold accepting
    --accept-rate of val), from the features, stored in the checkpoint at `path`; what was fitted. A score that
    needs the stages' statistics (combined, layer_mahalanobis, rotation) is replaced by DEFAULT_FEATURE_SCORE."""
    started = time.time()
    ckpt = load_checkpoint(path)
    val_pen, val_logits = feature_logits(model, val, cfg.tta)
    out = calibration(val_logits, val_labels)
    temperature = out["temperature"]
    ckpt = with_temperature(ckpt, temperature)
    if cfg.novelty_score != "none":
        chosen = cfg.novelty_score if cfg.novelty_score in FEATURE_SCORES else DEFAULT_FEATURE_SCORE
        pen, logits = feature_logits(model, train, cfg.tta)
        states = fit_states({"penultimate": pen, "logits": logits}, labels, len(ckpt["classes"]), chosen,
                            temperature, names=FEATURE_SCORES)
        val_scores = scores_by_name(states, {"penultimate": val_pen, "logits": val_logits})
        threshold = threshold_for_accept_rate(val_scores[chosen], cfg.accept_rate)
        seconds = time.time() - started
        ckpt = with_novelty(ckpt, novelty_record(states, chosen, threshold, cfg.accept_rate, cfg.tta, seconds,
                                                 len(labels)))
        out.update(novelty_figures(states, chosen, threshold, seconds, len(labels), val_scores))
    save_checkpoint(ckpt, path)
    return out
