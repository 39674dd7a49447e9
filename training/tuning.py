"""Fine-tuning a pretrained backbone's last stages together with its head, once the head alone has trained on the
frozen features: from the feature maps before those stages, computed once and kept in the feature store
(training/features.py), so that an epoch costs only the last stages' passes. What train.py runs for --tune-epochs
on the backbones of model.WEIGHT_PACKAGES.

Usage (from train.py):
    maps, computed = cached_features(..., before_last=TUNED_STAGES)     # (N, 2, C, H, W) float16: image, mirror
    tuner = TailTrainer(model, maps, labels, val_maps, val_labels, cfg, epochs, device, amp_dtype)
    tr, ev = tuner.epoch()              # one pass over the maps (a random side of each image), then val
    tuner.replan(epochs)                # fewer epochs (a time budget): the schedule reaches 0 at the last
    best = tuner.state()                # the tuned stages' and the head's weights now
    feats = tuner.features(maps)        # (N, 2, D) pooled features through the tuned stages

The whole network stays in eval mode: batch norm keeps the ImageNet statistics (batches of a few classes would
shift them). The tuned stages and the head learn at --lr times --backbone-lr-factor, the head from the weights it
reached alone.
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn

from config import TrainConfig
from core.common import needs_grad_scaler
from core.metrics import correct_count
from model import head_of, tail_forward, tail_stages
from prediction.predict import amp, maps_input, maps_pooled
from training.features import as_targets, feature_logits, head_losses, loss_weights, val_figures

TUNED_STAGES = 2  # EfficientNet's last block group and its 1x1 head convolution with its batch norm
VAL_BATCH = 256   # maps per pass when computing features


def epochs_that_fit(done: int, planned: int, seconds_left: float, epoch_seconds: float) -> int:
    """How many fine-tuning epochs the run ends with, after `done` of `planned`, when `seconds_left` remain and an
    epoch takes `epoch_seconds`: those that fit, keeping one epoch's time for the fits after training (at least
    the epochs done, at most those planned). Before the first epoch its time is unknown: all, while time is left."""
    if math.isinf(seconds_left):
        return planned
    if seconds_left <= 0:
        return done
    if done == 0:
        return planned
    return min(planned, max(done, done + int(seconds_left // max(epoch_seconds, 1e-9)) - 1))


class TailTrainer:
    """The last TUNED_STAGES stages and the head, trained together on stored maps: AdamW, warmup over half an epoch
    and a cosine to 0 over the planned epochs; losses as HeadTrainer's (class weights, label smoothing, tags'
    positive weights); val on the mean of the image and its mirror with --tta."""

    def __init__(self, model: nn.Module, maps: torch.Tensor, labels: torch.Tensor, val_maps: torch.Tensor,
                 val_labels: torch.Tensor, cfg: TrainConfig, epochs: int, device: torch.device,
                 amp_dtype: torch.dtype | None):
        self.model, self.cfg, self.device, self.amp_dtype = model.eval(), cfg, device, amp_dtype
        self.maps, self.labels = maps, as_targets(labels)
        self.val_maps, self.val_labels = val_maps, as_targets(val_labels)
        self.stages, self.head = tail_stages(model, TUNED_STAGES), head_of(model)
        lr = cfg.lr * cfg.backbone_lr_factor
        self.optimizer = torch.optim.AdamW([
            {"params": [p for m in self.stages for p in m.parameters()], "weight_decay": 0.0},
            {"params": list(self.head.parameters()), "weight_decay": cfg.weight_decay}], lr=lr)
        self.steps = math.ceil(len(maps) / cfg.batch_size)
        self.total = epochs * self.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.factor)
        weights = loss_weights(self.labels, self.head.out_features, cfg.class_weights)
        self.weights = None if weights is None else weights.to(device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(amp_dtype))  # fp16 on older GPUs

    def factor(self, step: int) -> float:
        """The learning rate's factor at `step`: warmup over half an epoch, then a cosine to 0 at the planned end
        (self.total, which replan moves)."""
        warmup = max(1, self.steps // 2)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, self.total - warmup))))

    def replan(self, epochs: int) -> None:
        """End the schedule after `epochs` epochs in all (the cosine from where it stands reaching 0 there)."""
        self.total = epochs * self.steps

    def epoch(self) -> tuple[dict, dict]:
        """One pass over the training maps, each image as itself or its mirror at random, then val: (train
        figures, val figures) as HeadTrainer's."""
        started, total, correct = time.time(), 0.0, 0.0
        order = torch.randperm(len(self.maps), generator=self.generator)
        for i in range(0, len(order), self.cfg.batch_size):
            idx = order[i:i + self.cfg.batch_size]
            side = torch.randint(0, 2, (len(idx),), generator=self.generator)
            x, y = maps_input(self.maps[idx, side], self.device), self.labels[idx].to(self.device)
            with amp(self.device, self.amp_dtype):
                logits = self.head(tail_forward(self.model, x, TUNED_STAGES)).float()
            loss = head_losses(logits, y, self.weights, self.cfg.label_smoothing).mean()
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total += loss.item() * len(idx)
            correct += correct_count(logits.detach().cpu(), self.labels[idx])
        tr = {"loss": total / len(self.maps), "acc": correct / len(self.maps), "images": len(self.maps),
              "skipped_steps": 0, "data_seconds": 0.0, "seconds": time.time() - started}
        return tr, self.evaluate()

    def evaluate(self) -> dict:
        """The figures on val as prediction gives its logits: the head on the pooled features of the image and its
        mirror (their mean with --tta), through the stages as they are now."""
        return val_figures(feature_logits(self.model, self.features(self.val_maps), self.cfg.tta)[1], self.val_labels)

    def features(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, 2, D) float32 pooled features of stored maps through the stages as they are now (image, mirror)."""
        return maps_pooled(self.model, maps, TUNED_STAGES, self.device, self.amp_dtype, VAL_BATCH)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state(self) -> list[dict]:
        """Copies of the tuned stages' and the head's weights now (load_state puts them back)."""
        return [copy.deepcopy(m.state_dict()) for m in (*self.stages, self.head)]

    def load_state(self, state: list[dict]) -> None:
        for module, weights in zip((*self.stages, self.head), state):
            module.load_state_dict(weights)
