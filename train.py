"""Train a ResNet image classifier on a folder of images.

Usage:
    python train.py                                    # trains on ./Dataset (DATA/train/<class>/*)
    python train.py --data PATH --epochs 20 --arch resnet18
    python train.py --data PATH --classes cat dog      # only these class folders
    python train.py --resume                           # continue from models/last.pth
    python train.py --arch resnet50 --pretrained --freeze-epochs 3 --lr 1e-3   # ImageNet weights, two phases
    python train.py --arch resnet18 --weights resnet18-f37072fd.pth            # weights file, no internet needed
    torchrun --nproc_per_node=4 train.py --data PATH   # DistributedDataParallel, one process per GPU
    python train.py --help                             # every setting, from config.py
    tensorboard --logdir logs

Writes models/best_model.pth (best val accuracy), models/last.pth (every epoch, for --resume),
logs/<run-name>/ (TensorBoard and config.json) and curves/ (PNG plots).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from config import TrainConfig, UserError, format_config, given_flags
from dataset import NORMALIZATION, Split, augment, batches, load_data, to_float
from model import (CHECKPOINT_VERSION, adapt_state_dict, build_model, load_checkpoint, load_pretrained,
                   model_from_checkpoint, predict_logits, pretrained_normalization, save_atomic, unwrap)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 math (AVX512-BF16 or AMX), where bf16 autocast trains ~2x faster; elsewhere
    PyTorch emulates bf16 and it is slower than fp32. These checks are private to torch.cpu, hence the getattr."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def pick_amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for --amp on this device, or None for plain fp32."""
    if not enabled:
        return None
    if device.type == "cuda":
        # Only where the GPU computes bf16 natively (Ampere and later): T4/V100-class cards emulate it, slowly.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def needs_grad_scaler(amp_dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and fp32 needs none."""
    return amp_dtype == torch.float16


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """What the start-up line says about the arithmetic: 'fp32', 'bf16 autocast' or 'fp16 autocast + GradScaler'."""
    if amp_dtype is None:
        return "fp32"
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype] + " autocast"
    return name + (" + GradScaler" if needs_grad_scaler(amp_dtype) else "")


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate factor per step: linear warmup to 1, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # Decay conv and linear weights only: shrinking BN scales and biases just fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


# ---------------------------------------------------------------- transfer learning

def uses_pretrained(cfg: TrainConfig) -> bool:
    return cfg.pretrained or bool(cfg.weights)


def normalization_for(cfg: TrainConfig) -> dict:
    """ImageNet statistics for pretrained weights, the [-1, 1] default otherwise; stored in the checkpoint."""
    return pretrained_normalization(cfg.channels) if uses_pretrained(cfg) else dict(NORMALIZATION)


def is_head(param_name: str) -> bool:
    return param_name.startswith("fc.")


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) every parameter but the head's (fc)."""
    for name, p in unwrap(model).named_parameters():
        if not is_head(name):
            p.requires_grad_(trainable)


def train_mode(model: nn.Module) -> None:
    """model.train(), except BatchNorm layers with frozen weights: they also keep their running statistics, so a
    frozen pretrained backbone computes what it computed on ImageNet while the head learns."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.weight is not None and not m.weight.requires_grad:
            m.eval()


def finetune_param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_factor: float) -> list[dict]:
    """Discriminative learning rates: the backbone learns at lr x backbone_lr_factor, the new head at lr.
    Weight decay on conv and linear weights only, as in make_optimizer."""
    groups = []
    for head, scale in ((False, backbone_lr_factor), (True, 1.0)):
        params = [p for n, p in unwrap(model).named_parameters() if is_head(n) == head]
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": lr * scale, "weight_decay": weight_decay})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": lr * scale, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.freeze_epochs > 0 or uses_pretrained(cfg):
        groups = finetune_param_groups(model, cfg.lr, cfg.weight_decay, cfg.backbone_lr_factor)
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return make_optimizer(model, cfg.lr, cfg.weight_decay)


def two_phase_schedule(warmup_steps: int, phase1_steps: int, total_steps: int):
    """warmup_cosine over the head-only phase, then a fresh warmup and cosine once the backbone is unfrozen:
    the warmup keeps the first full-network steps from wrecking the pretrained features."""
    first = warmup_cosine(warmup_steps, phase1_steps)
    second = warmup_cosine(warmup_steps, total_steps - phase1_steps)
    return lambda step: first(step) if step < phase1_steps else second(step - phase1_steps)


# ---------------------------------------------------------------- several processes (torchrun)

def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless running under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1) join the process group, NCCL on CUDA and gloo on CPU, and return this
    rank's device (cuda:LOCAL_RANK on GPUs). A plain `python train.py` gets `device` back untouched."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "mps":
        raise UserError("torchrun needs --device cuda or --device cpu (no process groups on mps)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def quiet_unless_rank0():
    """Under torchrun only rank 0 prints; the other ranks' stdout goes to /dev/null (errors still reach stderr)."""
    if int(os.environ.get("RANK", "0")) == 0:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums of these numbers over all ranks; the numbers themselves in a single process."""
    if rank_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one: ranks must agree to skip a step or stop, or DDP waits forever."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def shard_batches(n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1):
    """This rank's shuffled training batches for one epoch. Every rank draws the same permutation (generators
    seeded alike stay in step) and takes every world-th index, cut to equal lengths so all ranks run the same
    number of steps. In one process this is exactly batches(..., drop_last=True)."""
    if world == 1:
        yield from batches(n, batch_size, True, generator, drop_last=True)
        return
    order = torch.randperm(n, generator=generator)
    order = order[:n - n % world][rank::world]
    for idx in batches(len(order), batch_size, False, drop_last=True):
        yield order[idx]


def wrap_for_training(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The module the training steps call: DistributedDataParallel under torchrun, compiled with --compile.
    Built again when the backbone is unfrozen, since DDP only syncs parameters that were trainable when built."""
    if rank_world()[1] > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    return torch.compile(model) if cfg.compile else model


def class_weight_tensor(labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """Inverse-frequency loss weights (mean 1) for mode 'auto', None for 'none'."""
    if mode == "none":
        return None
    if mode != "auto":
        raise UserError(f"--class-weights must be 'auto' or 'none', not {mode!r}")
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


def ema_of(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of the model whose weights and BatchNorm statistics follow an exponential moving average.

    Averaging the recent weights acts like a lower learning rate without slowing the training itself, so the
    average is better than the raw model while the learning rate is still high. The decay ramps up from 0.1 over
    the first steps (as in timm), so the average does not remember the random start."""
    def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, weight)
            else:  # BatchNorm's step counter
                a.copy_(c)
    return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


def train_one_epoch(model: nn.Module, data: Split, optimizer: torch.optim.Optimizer, scheduler, loss_fn: nn.Module,
                    device: torch.device, cfg: TrainConfig, generator: torch.Generator,
                    amp_dtype: torch.dtype | None, deadline: float, ema: AveragedModel | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> dict:
    """One pass over the training images, augmented on whole batches; returns mean loss, accuracy, counts."""
    from tqdm import tqdm

    train_mode(model)
    rank, world = rank_world()
    norm = normalization_for(cfg)
    images, labels = data.images.to(device), data.labels.to(device)
    loss_sum = correct = seen = skipped = steps = 0
    steps_total = len(images) // world // cfg.batch_size or 1
    # Under torchrun the ranks share one generator state, so augmentation draws repeat across ranks, each on
    # different images; that keeps the permutations in step without passing state between processes.
    bar = tqdm(shard_batches(len(images), cfg.batch_size, generator, rank, world), total=steps_total,
               leave=False, desc="train", mininterval=1.0, file=sys.stderr, disable=rank != 0)
    # The forward pass of a skipped step has already moved BatchNorm's running statistics: keep a copy to undo it.
    buffers = list(model.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    data_seconds = 0.0  # time spent fetching and augmenting batches (exact on CPU; CUDA runs it async)
    for idx in bar:
        t_data = time.perf_counter()
        idx = idx.to(device)
        x = augment(to_float(images[idx], norm["mean"], norm["std"]), cfg.flip, cfg.max_rotation, cfg.max_shift,
                    generator)
        y = labels[idx]
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        data_seconds += time.perf_counter() - t_data
        with torch.no_grad():
            for b, saved in zip(buffers, saved_buffers):
                saved.copy_(b)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        if any_rank(not torch.isfinite(loss).item(), device):
            # A NaN/inf step would poison the weights: skip it, count it, and stop if it keeps happening.
            skipped += 1
            with torch.no_grad():
                for b, saved in zip(buffers, saved_buffers):
                    b.copy_(saved)
            optimizer.zero_grad(set_to_none=True)
            if skipped > max(3, steps_total // 10):
                raise UserError(f"training loss became NaN/inf in {skipped} steps; lower --lr (now {cfg.lr})")
            continue
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:  # fp16: scaled loss; steps whose gradients overflowed are skipped and the scale lowered
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))
        steps += 1
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        if steps % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        if deadline < math.inf and any_rank(time.time() > deadline, device):
            break
    bar.close()
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device)
    return {"loss": loss_sum / max(1, seen), "acc": correct / max(1, seen), "images": int(seen),
            "skipped_steps": skipped, "data_seconds": data_seconds}


def evaluate(model: nn.Module, data: Split, device: torch.device, tta: bool = False, channels_last: bool = False,
             amp_dtype: torch.dtype | None = None, normalization: dict | None = None) -> dict:
    """Plain cross-entropy loss and accuracy over a split, and top-5 accuracy ('top5') with more than 5 classes.
    Under torchrun each rank scores every world-th image and the sums are reduced: all ranks get the same numbers."""
    rank, world = rank_world()
    if world > 1:
        data = data.subset(torch.arange(rank, len(data.labels), world))
    logits = predict_logits(model, data.images, device, tta=tta, channels_last=channels_last, amp_dtype=amp_dtype,
                            normalization=normalization)
    labels, n = data.labels, len(data.labels)
    num_classes = unwrap(model).fc.out_features
    loss_sum = F.cross_entropy(logits, labels, reduction="sum").item() if n else 0.0
    correct = (logits.argmax(1) == labels).sum().item() if n else 0
    top5 = ((logits.topk(5, 1).indices == labels[:, None]).any(1).sum().item() if n and num_classes > 5 else 0)
    loss_sum, correct, top5, n = all_reduce_sum([loss_sum, correct, top5, n], device)
    out = {"loss": loss_sum / n if n else float("nan"), "acc": correct / n if n else float("nan")}
    if num_classes > 5:
        out["top5"] = top5 / n if n else float("nan")
    return out


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_checkpoint(model: nn.Module, cfg: TrainConfig, classes: list[str], epoch: int, metrics: dict,
                    history: list[dict], best: dict) -> dict:
    """The self-sufficient checkpoint: everything inference and evaluation need, in plain types."""
    return {"format_version": CHECKPOINT_VERSION, "model_state": unwrap(model).state_dict(), "arch": cfg.arch,
            "classes": list(classes), "image_size": cfg.image_size, "channels": cfg.channels,
            "normalization": normalization_for(cfg), "config": cfg.to_dict(), "epoch": epoch, "metrics": metrics,
            "best": dict(best), "history": history, "temperature": 1.0}


def plot_history(history: list[dict], path: Path) -> None:
    """Loss, accuracy and learning-rate curves per epoch as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, axis, title in (("loss", ax[0], "loss"), ("acc", ax[1], "accuracy")):
        axis.plot(ep, [h[f"train_{key}"] for h in history], "o-", label="train")
        axis.plot(ep, [h[f"val_{key}"] for h in history], "o-", label="val")
        axis.set_title(title)
        axis.legend()
    ax[2].plot(ep, [h["lr"] for h in history], "o-")
    ax[2].set_title("learning rate (end of epoch)")
    for axis in ax:
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def calibrate_best_model(path: Path, val: Split, device: torch.device, tta: bool, writer) -> dict:
    """Fit a softmax temperature for the best model on val and store it in its checkpoint (inference and
    evaluate.py divide the logits by it); also log the val confusion matrix to TensorBoard.

    Returns the temperature and the expected calibration error on val before and after it.
    """
    from evaluate import confusion_matrix, expected_calibration_error, fit_temperature, plot_confusion_matrix

    ckpt = load_checkpoint(path)
    logits = predict_logits(model_from_checkpoint(ckpt).to(device), val.images, device, tta=tta,
                            normalization=ckpt["normalization"])
    temperature = fit_temperature(logits, val.labels)
    before = expected_calibration_error(torch.softmax(logits, 1), val.labels)
    after = expected_calibration_error(torch.softmax(logits / temperature, 1), val.labels)
    ckpt["temperature"] = temperature
    save_atomic(ckpt, path)
    cm = confusion_matrix(val.labels, logits.argmax(1), len(ckpt["classes"]))
    if writer is not None:
        writer.add_figure("confusion_matrix/val", plot_confusion_matrix(cm, ckpt["classes"]), ckpt["epoch"])
    print(f"calibration on val: temperature {temperature:.3f}, expected calibration error {before:.4f} -> "
          f"{after:.4f} (stored in {path})")
    return {"temperature": temperature, "val_ece_before": before, "val_ece_after": after}


def resolve_config(argv: list[str] | None) -> tuple[TrainConfig, dict | None]:
    """Settings from flags; with --resume, the saved run's settings with the given flags on top."""
    given = given_flags(argv)
    cfg = dataclasses.replace(TrainConfig(), **given)
    if not cfg.resume:
        return cfg, None
    ckpt = load_checkpoint(Path(cfg.out_dir) / "last.pth", hint="nothing to resume: train without --resume first")
    if "optimizer_state" not in ckpt:
        raise UserError(f"{Path(cfg.out_dir) / 'last.pth'} has no optimizer state to resume from")
    return dataclasses.replace(TrainConfig.from_dict(ckpt["config"]), **given), ckpt


def run(cfg: TrainConfig, resume_ckpt: dict | None = None) -> dict:
    """Train as `cfg` says; returns the summary (best accuracy, epoch, seconds, checkpoint path)."""
    from torch.utils.tensorboard import SummaryWriter

    # -- seed and device
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = init_distributed(pick_device(cfg.device))
    rank, world = rank_world()
    is_main = rank == 0
    amp_dtype = pick_amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(amp_dtype) else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if not cfg.run_name:
        cfg = dataclasses.replace(cfg, run_name=f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.arch}")
    print("config:", format_config(cfg))
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                                 else f" ({torch.get_num_threads()} threads)")
          + f", {precision_name(amp_dtype)}"
          + (f", {world} processes ({dist.get_backend()}), batch size {cfg.batch_size} per process"
             if world > 1 else ""))
    # Fetched before the data so a missing download fails fast; a resumed run has its weights already.
    pretrained_state = None
    if uses_pretrained(cfg) and resume_ckpt is None:
        pretrained_state = adapt_state_dict(load_pretrained(cfg.arch, cfg.weights), cfg.channels)
        print(f"pretrained: {cfg.weights or 'torchvision ImageNet weights'}, normalization {normalization_for(cfg)}")

    # -- data: decoded once (cached), then kept as uint8 tensors
    t0 = time.time()
    train, val, classes = load_data(cfg.data, cfg.classes or None, cfg.image_size, cfg.channels, cfg.val_fraction,
                                    cfg.seed, cfg.cache_dir, cfg.workers, cfg.max_bad_fraction)
    if resume_ckpt is not None and resume_ckpt["classes"] != classes:
        raise UserError(f"the checkpoint's classes {resume_ckpt['classes']} differ from the data's {classes}")
    print(f"data: {len(train.paths)} train / {len(val.paths)} val images, classes {classes}, "
          f"loaded in {time.time() - t0:.1f}s")
    for path, reason in train.bad + val.bad:
        print(f"skipped unreadable image {path}: {reason}")
    if train.bad or val.bad:
        print(f"skipped {len(train.bad) + len(val.bad)} unreadable image(s) in total")
    # Kept on the training device for the whole run: on a GPU no batch crosses the PCIe bus again.
    train.images, train.labels = train.images.to(device), train.labels.to(device)
    if len(train.paths) < cfg.batch_size:
        print(f"note: only {len(train.paths)} training images; each epoch is one batch of that size")

    # -- model, loss, optimizer, schedule
    model = build_model(cfg.arch, len(classes), cfg.channels, cfg.width, cfg.image_size,
                        pretrained_state=pretrained_state).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = class_weight_tensor(train.labels, len(classes), cfg.class_weights)
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                  label_smoothing=cfg.label_smoothing)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = max(1, len(train.paths) // world // cfg.batch_size)
    warmup_steps, total_steps = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    phase1_steps = min(cfg.freeze_epochs, cfg.epochs) * steps_per_epoch
    schedule = (two_phase_schedule(warmup_steps, phase1_steps, total_steps) if 0 < phase1_steps < total_steps
                else warmup_cosine(warmup_steps, total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = ema_of(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start_epoch, history = 0, []
    best = {"acc": -1.0, "epoch": 0}
    if resume_ckpt is not None:
        # With EMA, model_state holds the average (what inference uses) and raw_model_state what training resumes.
        model.load_state_dict(resume_ckpt.get("raw_model_state", resume_ckpt["model_state"]))
        if ema is not None:
            ema.module.load_state_dict(resume_ckpt["model_state"])
            ema.n_averaged.fill_(resume_ckpt.get("ema_steps", 0))
        optimizer.load_state_dict(resume_ckpt["optimizer_state"])
        scheduler.load_state_dict(resume_ckpt["scheduler_state"])
        set_rng_state(resume_ckpt["rng"], generator)
        start_epoch, history, best = resume_ckpt["epoch"], resume_ckpt["history"], resume_ckpt["best"]
        print(f"resuming after epoch {start_epoch} (best val acc {best['acc']:.4f} at epoch {best['epoch']})")
    frozen = start_epoch < cfg.freeze_epochs
    if frozen:
        set_backbone_trainable(model, False)
        print(f"epochs 1-{cfg.freeze_epochs}: training the head only; then the backbone at lr x "
              f"{cfg.backbone_lr_factor}")
    train_model = wrap_for_training(model, cfg, device)
    eval_model = model if ema is None else ema.module  # evaluated, and saved as the checkpoint's weights

    # -- loop
    out_dir, run_dir = Path(cfg.out_dir), Path(cfg.log_dir) / cfg.run_name
    writer = None
    if is_main:
        for stale in out_dir.glob(".*.pth.*.tmp"):  # save_atomic's temp file of a run killed while saving
            stale.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(format_config(cfg))
        writer = SummaryWriter(str(run_dir))
    t_start = time.time()
    train_seconds = history[-1]["train_seconds"] if history else 0.0  # cumulative, carried over by --resume
    deadline = t_start + cfg.time_budget - train_seconds if cfg.time_budget > 0 else float("inf")
    stopped, saved_epoch = "", start_epoch
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            if frozen and epoch > cfg.freeze_epochs:
                frozen = False
                set_backbone_trainable(model, True)
                train_model = wrap_for_training(model, cfg, device)
                print(f"epoch {epoch}: backbone unfrozen")
            t_epoch = time.time()
            tr = train_one_epoch(train_model, train, optimizer, scheduler, loss_fn, device, cfg, generator,
                                 amp_dtype, deadline, ema, scaler)
            epoch_train_seconds = time.time() - t_epoch
            train_seconds += epoch_train_seconds
            ev = evaluate(eval_model, val, device, cfg.tta, cfg.channels_last, amp_dtype, normalization_for(cfg))
            lr = optimizer.param_groups[-1]["lr"]  # the head's, when the backbone has a lower one
            h = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": ev["loss"],
                 "val_acc": ev["acc"], "lr": lr, "train_seconds": round(train_seconds, 2),
                 "epoch_seconds": round(time.time() - t_epoch, 2),
                 "train_images_per_s": round(tr["images"] / max(1e-9, epoch_train_seconds), 1),
                 "train_images": tr["images"], "skipped_steps": tr["skipped_steps"],
                 "data_seconds": round(tr["data_seconds"], 2), "elapsed_seconds": round(time.time() - t_start, 2)}
            if "top5" in ev:
                h["val_top5"] = ev["top5"]
            history.append(h)
            for key, tag in (("train_loss", "loss/train"), ("val_loss", "loss/val"), ("train_acc", "acc/train"),
                             ("val_acc", "acc/val"), ("val_top5", "acc5/val"), ("lr", "lr")):
                if writer is not None and key in h:
                    writer.add_scalar(tag, h[key], epoch)
            if writer is not None:
                writer.flush()
            nets = (model,) if eval_model is model else (model, eval_model)
            finite = math.isfinite(ev["loss"]) and all(torch.isfinite(p).all()
                                                       for net in nets for p in net.parameters())
            improved = finite and ev["acc"] > best["acc"]
            if improved:
                best = {"acc": ev["acc"], "epoch": epoch, "loss": ev["loss"]}
            if is_main:
                ckpt = make_checkpoint(eval_model, cfg, classes, epoch, {"val": ev, "train": tr}, history, best)
                if improved:
                    save_atomic(ckpt, out_dir / "best_model.pth")
                ckpt.update(optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                            rng=rng_state(generator))
                if ema is not None:
                    ckpt.update(raw_model_state=unwrap(model).state_dict(), ema_steps=int(ema.n_averaged))
                if finite:  # a broken model must not replace the last good state that --resume starts from
                    save_atomic(ckpt, out_dir / "last.pth")
            if finite:
                saved_epoch = epoch
            top5 = f" top5 {ev['top5']:.4f}" if "top5" in ev else ""
            print(f"epoch {epoch}/{cfg.epochs}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f}  "
                  f"val loss {ev['loss']:.4f} acc {ev['acc']:.4f}{top5}  lr {lr:.2e}  {h['epoch_seconds']:.1f}s"
                  + ("  *best*" if improved else "")
                  + (f"  ({tr['skipped_steps']} NaN/inf steps skipped)" if tr["skipped_steps"] else ""), flush=True)
            if not finite:
                kept = "best_model.pth and last.pth were kept" if saved_epoch else "nothing was saved"
                raise UserError(f"the model's weights or val loss became NaN/inf in epoch {epoch}; {kept}; "
                                f"lower --lr (now {cfg.lr})")
            if cfg.patience and epoch - best["epoch"] >= cfg.patience:
                stopped = f"early stop: no better val accuracy for {cfg.patience} epochs"
                break
            if time.time() > deadline:
                stopped = f"time budget of {cfg.time_budget:.0f}s reached"
                break
    except KeyboardInterrupt:
        # Only the epochs whose last.pth was written count: Ctrl-C may land between an epoch and its save.
        stopped = (f"interrupted; {out_dir / 'last.pth'} holds epoch {saved_epoch}: continue with --resume"
                   if saved_epoch else "interrupted before the first epoch ended; nothing saved")
    finally:
        if writer is not None:
            writer.flush()

    # -- summary
    if stopped:
        print(stopped)
    if history and is_main:
        plot_history(history, Path(cfg.curves_dir) / "training_curves.png")
    calibration = calibrate_best_model(out_dir / "best_model.pth", val, device, cfg.tta, writer) \
        if is_main and best["epoch"] and len(val.labels) else {}
    if writer is not None:
        writer.close()
    summary = {"best_val_acc": best["acc"], "best_epoch": best["epoch"], "epochs_run": len(history) - start_epoch,
               "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - t_start, 1),
               "checkpoint": str(out_dir / "best_model.pth"), "history": history, **calibration}
    if best["epoch"]:
        print(f"done: best val acc {best['acc']:.4f} at epoch {best['epoch']}, {summary['wall_seconds']:.0f}s, "
              f"saved {summary['checkpoint']}")
    if world > 1:
        dist.barrier()  # no rank leaves (and tears down the group) while rank 0 still writes
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume_ckpt = resolve_config(argv)
        if cfg.check_only:
            from dataset import main as dataset_main
            return dataset_main(["check", cfg.data, "--max-bad-fraction", str(cfg.max_bad_fraction)])
        if resume_ckpt is not None and resume_ckpt["epoch"] >= cfg.epochs:
            print(f"{cfg.out_dir}/last.pth already finished {resume_ckpt['epoch']} of {cfg.epochs} epochs; "
                  "pass a larger --epochs to train on")
            return 0
        with quiet_unless_rank0():
            run(cfg, resume_ckpt)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the epoch loop: while loading data, setting up or plotting
        print("interrupted; checkpoints already written are complete (continue with --resume if last.pth exists)",
              file=sys.stderr)
        return 130
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
