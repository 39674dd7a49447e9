"""A frozen pretrained backbone: the pooled feature of every image and of its mirror computed once, and kept in the
cache folder so that a second run on the same files starts at once; then the classifier head alone trained on
them (seconds), and the temperature and the novelty score fitted on them. What train.py runs for the backbones of
model.WEIGHT_PACKAGES (--arch efficientnet_lite0).

Usage (from train.py):
    feats, computed = cached_features(model, train.images, train.paths, cfg.arch, cfg.cache_dir, normalization)
        # (N, 2, D): each image and its mirror; computed: how many files were not in the store
    head = HeadTrainer(model, feats, train.labels, val_feats, val.labels, cfg)
    tr, ev = head.epoch()                                          # one pass over the features, then val
    best = head.head_state()                                       # after the best epoch: the head's weights
    fitted = fit_on_features(path, model, feats, train.labels, val_feats, val.labels, cfg)

One store per backbone (a digest of its weights), input size and arithmetic (fp32 or an autocast dtype) holds the
features of every file version it has seen (real path, size and modification time), as float16: a changed file,
another size or other weights compute them anew, and a link to a file already seen, or a subset of a folder already
seen, computes nothing.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import TrainConfig
from core.common import save_atomic
from core.metrics import correct_count, loss_sum
from dataset import Split
from model import head_of, unwrap
from prediction.checkpoint import load_checkpoint, novelty_record, save_checkpoint, with_novelty, with_temperature
from prediction.novelty import fit_states, scores_by_name, threshold_for_accept_rate
from prediction.predict import maps_pooled, pooled_features
from training.loop import tag_validation
from training.optimization import class_weight_tensor, tag_pos_weight, warmup_cosine
from training.posthoc import calibration, novelty_figures

FEATURES_VERSION = 2
FEATURE_SCORES = ("knn", "mahalanobis", "msp", "energy")  # the novelty scores the pooled features alone give
DEFAULT_FEATURE_SCORE = "knn"  # a score that needs stage statistics falls back to this one
PROPAGATION_NEIGHBOURS = 10  # --unlabeled: each image's neighbours in the label-spreading graph


def weights_digest(model: nn.Module) -> str:
    """A digest of the backbone's weights (everything but the head): features made by other weights differ."""
    head = {id(p) for p in head_of(model).parameters()}
    digest = hashlib.sha1()
    for name, tensor in unwrap(model).state_dict(keep_vars=True).items():
        if id(tensor) not in head:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def file_version(path: str) -> str:
    """A file's identity for the feature store: its real path (links to one file share it), size and mtime."""
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def store_path(cache_dir: str | Path, arch: str, digest: str, image_size: int, channels: int, precision: str,
               before_last: int = 0) -> Path:
    """The one file holding this backbone's features at this input and arithmetic, for every file it has seen (with
    `before_last`, its feature maps before the last stages: another file)."""
    key = [FEATURES_VERSION, digest, image_size, channels, precision] + ([before_last] if before_last else [])
    name = f"{arch}-maps{before_last}" if before_last else arch
    return Path(cache_dir) / "features" / f"{name}-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]}.pt"


def read_store(path: Path) -> tuple[list[str], torch.Tensor | None]:
    """(file versions, their features (M, 2, D) float16) of a store, or nothing when absent or unreadable."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("version") == FEATURES_VERSION and len(stored["keys"]) == len(stored["features"]):
            return list(stored["keys"]), stored["features"]
    except (OSError, RuntimeError, KeyError, EOFError, AttributeError):
        pass  # absent, cut short or of another format: its features are computed again
    return [], None


def cached_features(model: nn.Module, images: torch.Tensor, paths: list[str], arch: str, cache_dir: str,
                    normalization: dict, device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                    channels_last: bool = False, batch_size: int | None = None, label: str = "",
                    before_last: int = 0, from_maps: tuple[torch.Tensor, int] | None = None
                    ) -> tuple[torch.Tensor, int]:
    """(the pooled features of the images (uint8, N x C x S x S, read from `paths`) and of their mirrors, (N, 2, D)
    float32; how many were computed). Each file version's features are kept in CACHE_DIR/features/, one store per
    backbone, input and arithmetic: any later run, on any folder or link to the same files, reads them there and
    computes (with a progress bar labelled `label`) only the files it has not seen. No cache folder (''):
    computed every time. With `before_last` k > 0: the feature maps before the last k stages, (N, 2, C, H, W)
    float16, in a store of their own. `from_maps` (maps, k), these images' maps before the last k stages: the
    features the store lacks are computed from them through those stages (one pass of the stages before serves
    both stores)."""
    def compute(rows: torch.Tensor) -> torch.Tensor:
        if from_maps is not None:
            return maps_pooled(model, from_maps[0][rows], from_maps[1], device, amp_dtype)
        return pooled_features(model, images[rows], device, batch_size, normalization, amp_dtype, channels_last,
                               progress=f"{'feature maps' if before_last else 'features'} {label}" if label else "",
                               before_last=before_last)
    if not cache_dir:
        rows = compute(torch.arange(len(paths)))
        return (rows if before_last else rows.float()), len(paths)
    path = store_path(cache_dir, arch, weights_digest(model), images.shape[-1], images.shape[1], str(amp_dtype),
                      before_last)
    rows, computed = stored_rows(path, [file_version(p) for p in paths], compute)
    return (rows if before_last else rows.float()), computed


def stored_rows(path: Path, wanted: list[str], compute: Callable[[torch.Tensor], torch.Tensor]
                ) -> tuple[torch.Tensor, int]:
    """(the rows of the store at `path` for the file versions `wanted`; how many were computed): those the store
    lacks are computed (`compute(indices into wanted)`) and added to it, written atomically."""
    keys, stored = read_store(path)
    row_of = {k: i for i, k in enumerate(keys)}
    todo: dict[str, int] = {}  # a file version not stored yet -> its first index among the wanted
    for i, k in enumerate(wanted):
        if k not in row_of and k not in todo:
            todo[k] = i
    if todo:
        fresh = compute(torch.tensor(list(todo.values()), dtype=torch.int64)).half()
        row_of.update({k: len(keys) + j for j, k in enumerate(todo)})
        keys += list(todo)
        stored = fresh if stored is None else torch.cat([stored, fresh])
        save_atomic({"version": FEATURES_VERSION, "keys": keys, "features": stored}, path)
    return stored[[row_of[k] for k in wanted]], len(todo)


def head_losses(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, smoothing: float
                ) -> torch.Tensor:
    """Each image's loss: cross-entropy (class `weights`, label `smoothing`), or with 0/1 tags (y of floats) the
    binary cross-entropy averaged over the tags (`weights`: each tag's positives' weight)."""
    if y.is_floating_point():
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=weights, reduction="none").mean(1)
    return F.cross_entropy(logits, y, weight=weights, reduction="none", label_smoothing=smoothing)


def as_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels on the CPU as the losses take them: 0/1 tags (N, T) as floats, class indices (N,) as integers."""
    return labels.to("cpu", torch.float32 if labels.dim() == 2 else torch.int64)


def loss_weights(labels: torch.Tensor, num_classes: int, class_weights: str) -> torch.Tensor | None:
    """What head_losses weighs by: each tag's positives (tag_pos_weight) for 0/1 tags (N, T), else --class-weights."""
    if labels.dim() == 2:
        return tag_pos_weight(labels)
    return class_weight_tensor(labels, num_classes, class_weights)


def val_figures(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """A head's figures on val as the full loop's validate gives them: the plain loss (no weights or smoothing)
    and accuracy, and with tags (float labels) mAP and F1 at 0.5 (loop.tag_validation)."""
    if labels.is_floating_point():
        return tag_validation(logits, labels)
    n = len(labels)
    return {"loss": loss_sum(logits, labels) / n if n else float("nan"),
            "acc": correct_count(logits, labels) / n if n else float("nan")}


class HeadTrainer:
    """The classifier head trained alone on frozen features, from zero weights: AdamW with warmup and a cosine to 0
    over --epochs, --label-smoothing and --class-weights as the full run has them, each image and its mirror as two
    samples (each image's loss times its `sample_weights`, 1 without); val on the mean of both (the mirror TTA), or
    on the image alone without --tta. Labels (N, T) of 0/1 tags train one sigmoid per tag (binary cross-entropy,
    each tag's positives weighed by tag_pos_weight); val then also gives mAP and F1 at 0.5."""

    def __init__(self, model: nn.Module, train: torch.Tensor, labels: torch.Tensor, val: torch.Tensor,
                 val_labels: torch.Tensor, cfg: TrainConfig, sample_weights: torch.Tensor | None = None):
        self.tagged = labels.dim() == 2
        self.cfg, self.labels, self.val_labels = cfg, as_targets(labels), as_targets(val_labels)
        self.x, self.y = train.reshape(-1, train.shape[-1]), self.labels.repeat_interleave(train.shape[1], dim=0)
        weights = torch.ones(len(labels)) if sample_weights is None else sample_weights.float()
        self.w = weights.repeat_interleave(train.shape[1])
        self.val = val.mean(1) if cfg.tta else val[:, 0]
        self.head = copy.deepcopy(head_of(model)).float().cpu().train()  # beside the features, on the CPU
        for p in self.head.parameters():  # from zero: every class equally likely (timm's init gives logits of tens)
            nn.init.zeros_(p)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps = math.ceil(len(self.x) / cfg.batch_size)
        schedule = warmup_cosine(round(cfg.warmup_epochs * self.steps), cfg.epochs * self.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.weights = loss_weights(self.labels, self.head.out_features, cfg.class_weights)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def epoch(self) -> tuple[dict, dict]:
        """One pass over the training features, then val: (train figures, val figures) as the full loop's; with
        tags val also has map, micro_f1 and macro_f1 (at 0.5)."""
        started, total, correct = time.time(), 0.0, 0.0
        order = torch.randperm(len(self.x), generator=self.generator)
        for i in range(0, len(order), self.cfg.batch_size):
            idx = order[i:i + self.cfg.batch_size]
            logits = self.head(self.x[idx])
            each = head_losses(logits, self.y[idx], self.weights, self.cfg.label_smoothing)
            loss = (each * self.w[idx]).sum() / self.w[idx].sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += loss.item() * len(idx)
            correct += correct_count(logits.detach(), self.y[idx])
        tr = {"loss": total / len(self.x), "acc": correct / len(self.x), "images": len(self.x),
              "skipped_steps": 0, "data_seconds": 0.0, "seconds": time.time() - started}
        return tr, self.evaluate()

    def evaluate(self) -> dict:
        """The head's figures on val as the full loop's validate gives them: the plain loss (no weights or
        smoothing) and accuracy, and with tags mAP and F1 at 0.5 (loop.tag_validation)."""
        with torch.no_grad():
            return val_figures(self.head(self.val), self.val_labels)

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
    head = head_of(model)  # on the model's device; the features on the CPU
    with torch.no_grad():
        return pen, F.linear(pen, head.weight.detach().float().cpu(),
                             None if head.bias is None else head.bias.detach().float().cpu())


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


def out_of_fold_head_probs(model: nn.Module, feats: torch.Tensor, labels: torch.Tensor, fold: torch.Tensor,
                           cfg: TrainConfig, report=None) -> torch.Tensor:
    """(N, classes) softmax probabilities of every image, each from a head trained (as HeadTrainer trains it, for
    --epochs) on the features of the other folds, on the mean of the image and its mirror: the label check on a
    frozen backbone, in seconds once the features exist. `report` (a callable) gets a line per fold."""
    folds = int(fold.max()) + 1
    probs = torch.zeros(len(labels), head_of(model).out_features)
    for k in range(folds):
        held, rest = torch.nonzero(fold == k).flatten(), torch.nonzero(fold != k).flatten()
        head = HeadTrainer(model, feats[rest], labels[rest], feats[held], labels[held], cfg)
        head.generator.manual_seed(cfg.seed + k)
        for _ in range(cfg.epochs):
            head.epoch()
        with torch.no_grad():
            probs[held] = torch.softmax(head.head(feats[held].mean(1)), 1)
        if report is not None:
            report(f"label check: fold {k + 1}/{folds} ({len(held)} images, {cfg.epochs} epochs of the head) "
                   "predicted")
    return probs


def knn_graph(z: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(neighbour indices, cosine similarities), (N, k) each: every row's k most similar other rows."""
    z = F.normalize(z, dim=1)
    index, similarity = [], []
    for i in range(0, len(z), chunk):
        s = z[i:i + chunk] @ z.T
        s[torch.arange(len(s)), torch.arange(i, i + len(s))] = -2.0  # not its own neighbour
        v, j = s.topk(min(k, len(z) - 1), dim=1)
        index.append(j)
        similarity.append(v)
    return torch.cat(index), torch.cat(similarity)


def propagated_labels(feats: torch.Tensor, labels: torch.Tensor, unlabeled: torch.Tensor, num_classes: int,
                      k: int = PROPAGATION_NEIGHBOURS, alpha: float = 0.99, gamma: float = 3.0, steps: int = 30
                      ) -> torch.Tensor:
    """Label spreading (Zhou et al. 2004, on a kNN graph as Iscen et al. 2019 build it): the labelled images'
    classes flow along a graph joining each image (the mean of it and its mirror) to its k most similar ones,
    weighted by similarity**gamma and normalized symmetrically, `steps` times. (len(unlabeled), classes) class
    probabilities of the unlabeled images (uniform where nothing reached them)."""
    z = torch.cat([feats, unlabeled]).mean(1)
    n, n_lab = len(z), len(feats)
    index, similarity = knn_graph(z, k)
    rows = torch.arange(n).repeat_interleave(index.shape[1])
    w = torch.sparse_coo_tensor(torch.stack([rows, index.flatten()]), similarity.clamp(min=0).flatten() ** gamma,
                                (n, n), check_invariants=True)
    w = (w + w.t()).coalesce()
    d = torch.sparse.sum(w, 1).to_dense().clamp(min=1e-12).rsqrt()[:, None]
    seeds = torch.zeros(n, num_classes)
    seeds[torch.arange(n_lab), labels.long()] = 1.0
    f = seeds.clone()
    for _ in range(steps):
        f = alpha * d * torch.sparse.mm(w, d * f) + (1 - alpha) * seeds
    f = f[n_lab:].clamp(min=0)
    total = f.sum(1, keepdim=True)
    return torch.where(total > 0, f / total.clamp(min=1e-12), torch.full_like(f, 1.0 / num_classes))


def pseudo_labelled(feats: torch.Tensor, labels: torch.Tensor, unlabeled: torch.Tensor, num_classes: int,
                    threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices into `unlabeled`, their pseudo-labels): the unlabeled images whose propagated class probability
    (propagated_labels) is at least `threshold`."""
    confidence, predicted = propagated_labels(feats, labels, unlabeled, num_classes).max(1)
    keep = torch.nonzero(confidence >= threshold).flatten()
    return keep, predicted[keep]
