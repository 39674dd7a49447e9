"""The checkpoint format: the one module that builds, saves, loads, checks and reads the files train.py writes.

Usage (from other scripts):
    ckpt = build_checkpoint(model, cfg, classes, epoch, metrics, history, best)
    save_checkpoint(ckpt, "models/best_model.pth")        # atomic: the old file or the new one
    ckpt = load_checkpoint("models/best_model.pth")      # weights_only=True, validated, version 1 upgraded
    model = model_from_checkpoint(ckpt)                  # eval mode, CPU
    tta_of(ckpt), temperature_of(ckpt), width_of(ckpt), blocks_of(ckpt), normalization_of(ckpt), val_accuracy_of(ckpt),
    run_name_of(ckpt), fingerprint_of(ckpt)
    ckpt = with_novelty(ckpt, novelty_record(states, "combined", threshold, 0.95, tta, seconds, n))
    novelty = novelty_of(ckpt)                           # None for a checkpoint trained before it existed
    novelty = novelty_of(ckpt, needed_by="--reject")     # ... or a UserError that says to retrain

Format version 2, a dict of plain types and tensors:
    format_version   2
    model_state      the unwrapped network's state_dict; with EMA the averaged weights, which inference uses
    arch, classes, image_size, channels, width     what rebuilding the network needs (width: resnet_small's)
    blocks           resnet_small's residual blocks per stage (absent in files written before it: one each)
    normalization    {"mean", "std"}: pixels / 255 minus mean, over std (one value, or one per channel)
    tta              evaluate on the image and its mirror, averaged (the training setting)
    temperature      softmax temperature fitted on val at the end of training (1.0 before that)
    config           every TrainConfig field, as a plain dict
    epoch, metrics {"val", "train"}, best {"acc", "epoch", "loss"}, history [one record per epoch]
    layout           how the data was read: {"description", "source", "folders", "carve", "val_files_sha1"}
                     (absent in older files; evaluate.py rebuilds a carved val/test from config)
  novelty (optional) what tells images of no known class apart, fitted at the end of training (prediction/novelty.py):
                   {"score": the name used, "states": {score name: plain dict of tensors and numbers},
                    "threshold": accept an image when its score <= this, "accept_rate": the share of val images
                    accepted at that threshold when it was chosen, "tta": features averaged with the mirror,
                    "fit_seconds", "train_images"}. Files without it (older ones) load; --reject needs it.
  and in last.pth, for --resume: optimizer_state, scheduler_state, rng, with EMA raw_model_state (the
  weights training continues from) and ema_steps, and with fp16 autocast scaler_state (the GradScaler's scale).
Version 1 files (no top-level width and tta; temperature optional) load as version 2 with the values version 1
readers used: config's width and tta, else the defaults width 48 and tta off, and temperature 1.0.
"""
from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from config import TrainConfig
from core.common import UserError, save_atomic
from model import build_model, input_normalization, unwrap

FORMAT_VERSION = 2
BEST, LAST = "best_model.pth", "last.pth"  # in --out-dir: best val accuracy; every epoch, for --resume
DEFAULT_PATH = str(Path(TrainConfig.out_dir) / BEST)  # what inference.py, evaluate.py and export.py read
REQUIRED_V1 = ("format_version", "model_state", "arch", "classes", "image_size", "channels", "normalization")
REQUIRED = REQUIRED_V1 + ("width", "tta", "temperature")
RESUME_KEYS = ("optimizer_state", "scheduler_state", "rng")
NOVELTY_KEYS = ("score", "states", "threshold", "accept_rate", "tta")
V1_WIDTH = 48  # what version 1 readers built when a file's config had no width: that time's default


def on_cpu(obj):
    """`obj` (a state dict, or dicts and lists of them) with every tensor copied to the CPU: a checkpoint written
    on a GPU then loads with a plain torch.load on a machine without one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def build_checkpoint(model: nn.Module, cfg: TrainConfig, classes: list[str], epoch: int, metrics: dict,
                     history: list[dict], best: dict, layout: dict | None = None) -> dict:
    """The self-sufficient checkpoint: everything inference and evaluation need, in plain types and CPU tensors."""
    return {"layout": dict(layout or {}), "format_version": FORMAT_VERSION,
            "model_state": on_cpu(unwrap(model).state_dict()), "arch": cfg.arch,
            "classes": list(classes), "image_size": cfg.image_size, "channels": cfg.channels, "width": cfg.width,
            "blocks": list(cfg.blocks),
            "normalization": input_normalization(cfg.uses_pretrained, cfg.channels, cfg.arch), "tta": cfg.tta,
            "temperature": 1.0, "config": cfg.to_dict(), "epoch": epoch, "metrics": metrics, "best": dict(best),
            "history": history}


def with_resume_state(ckpt: dict, optimizer: torch.optim.Optimizer, scheduler, rng: dict,
                      raw_model: nn.Module | None = None, ema_steps: int = 0,
                      scaler: torch.amp.GradScaler | None = None) -> dict:
    """The checkpoint plus what --resume needs; `raw_model` is the trained network when `ckpt` holds its EMA;
    `scaler` the fp16 loss scaler, whose scale a resumed run continues from."""
    out = {**ckpt, "optimizer_state": on_cpu(optimizer.state_dict()), "scheduler_state": scheduler.state_dict(),
           "rng": rng}  # the optimizer's state goes back to its parameters' device when loaded
    if raw_model is not None:
        out.update(raw_model_state=on_cpu(unwrap(raw_model).state_dict()), ema_steps=int(ema_steps))
    if scaler is not None:
        out["scaler_state"] = scaler.state_dict()
    return out


def with_temperature(ckpt: dict, temperature: float) -> dict:
    return {**ckpt, "temperature": float(temperature)}


def with_tag_thresholds(ckpt: dict, thresholds: list[float]) -> dict:
    """A checkpoint of a model with several tags per image: one sigmoid per class (tag), and the probability each
    tag needs to be predicted (fitted on val)."""
    return {**ckpt, "tag_thresholds": [float(t) for t in thresholds]}


def novelty_record(states: dict, score: str, threshold: float, accept_rate: float, tta: bool,
                   fit_seconds: float = 0.0, train_images: int = 0) -> dict:
    """The optional "novelty" field: score states (novelty.fit_states) and the threshold chosen on val."""
    return {"score": score, "states": states, "threshold": float(threshold), "accept_rate": float(accept_rate),
            "tta": bool(tta), "fit_seconds": round(float(fit_seconds), 2), "train_images": int(train_images)}


def with_novelty(ckpt: dict, novelty: dict) -> dict:
    return {**ckpt, "novelty": novelty}


def save_checkpoint(ckpt: dict, path: str | Path) -> None:
    save_atomic(ckpt, path)


def load_checkpoint(path: str | Path, hint: str = "run train.py first") -> dict:
    """Load a checkpoint without running any code in it (weights_only=True), check it, upgrade version 1."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; {hint}")
    if not zipfile.is_zipfile(path):  # else a text or truncated file reaches the unpickler and looks malicious
        raise UserError(f"cannot read checkpoint {path}: not a file written by torch.save, or cut short")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice to load it unsafely; keep only what was found in the file.
        found = [line.split("error:", 1)[1].split(". ")[0].strip() for line in str(e).splitlines()
                 if "WeightsUnpickler error:" in line]
        raise UserError(f"refusing to load {path}: it holds objects other than tensors and plain data, "
                        f"which could run code ({(found or [str(e).splitlines()[0]])[0][:200]})") from None
    except Exception as e:  # truncated zip, not a torch file at all...
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_V1):
        raise UserError(f"{path} is not a checkpoint written by train.py (missing fields)")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path} has format version {ckpt['format_version']}; this code reads up to "
                        f"{FORMAT_VERSION}: update the code")
    if ckpt["format_version"] == 1:
        ckpt = _upgrade_v1(ckpt)
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a complete version {FORMAT_VERSION} checkpoint (missing {', '.join(missing)})")
    novelty = ckpt.get("novelty")
    if novelty is not None and (not isinstance(novelty, dict) or any(k not in novelty for k in NOVELTY_KEYS)
                                or novelty["score"] not in novelty["states"]):
        raise UserError(f"{path} has a damaged novelty record (expected {', '.join(NOVELTY_KEYS)})")
    return ckpt


def _upgrade_v1(ckpt: dict) -> dict:
    cfg = ckpt.get("config") or {}
    return {**ckpt, "format_version": FORMAT_VERSION, "width": cfg.get("width", V1_WIDTH),
            "tta": cfg.get("tta", False), "temperature": ckpt.get("temperature", 1.0)}


def load_resume_checkpoint(out_dir: str | Path) -> dict:
    """OUT_DIR/last.pth with the optimizer, schedule and random state that --resume continues from."""
    path = Path(out_dir) / LAST
    ckpt = load_checkpoint(path, hint="nothing to resume: train without --resume first")
    if any(k not in ckpt for k in RESUME_KEYS):
        raise UserError(f"{path} has no optimizer state to resume from")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights (eval mode, CPU)."""
    model = build_model(ckpt["arch"], len(ckpt["classes"]), ckpt["channels"], width_of(ckpt), ckpt["image_size"],
                        rotation_head="rot.weight" in ckpt["model_state"], blocks=blocks_of(ckpt))
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as e:
        # The first line only names the model class; the next one says which weights clash.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(f"checkpoint weights do not fit arch {ckpt['arch']!r} with {len(ckpt['classes'])} "
                        f"classes: {lines[min(1, len(lines) - 1)][:200]}") from None
    return model.eval()


# ---------------------------------------------------------------- what readers need

def tta_of(ckpt: dict) -> bool:
    return bool(ckpt["tta"])


def temperature_of(ckpt: dict) -> float:
    return float(ckpt["temperature"])


def width_of(ckpt: dict) -> int:
    return int(ckpt["width"])


def blocks_of(ckpt: dict) -> tuple[int, ...]:
    """resnet_small's blocks per stage; files written before the field existed had one in each stage."""
    return tuple(int(n) for n in ckpt.get("blocks", (1, 1, 1, 1)))


def normalization_of(ckpt: dict) -> dict:
    return ckpt["normalization"]


def val_accuracy_of(ckpt: dict) -> float | None:
    """The validation accuracy of the epoch saved (else the best one recorded), or None when it has none."""
    acc = ((ckpt.get("metrics") or {}).get("val") or {}).get("acc")
    if acc is None:
        acc = (ckpt.get("best") or {}).get("acc")
    return None if acc is None or acc < 0 else float(acc)  # best starts at -1 before any epoch


def val_map_of(ckpt: dict) -> float | None:
    """A tag model's val mAP at the epoch saved, or None."""
    value = ((ckpt.get("metrics") or {}).get("val") or {}).get("map")
    return None if value is None else float(value)


def tag_thresholds_of(ckpt: dict) -> list[float] | None:
    """Each tag's threshold for a model with several tags per image; None for one class per image."""
    return ckpt.get("tag_thresholds")


def novelty_of(ckpt: dict, needed_by: str = "") -> dict | None:
    """The novelty record (score states, threshold), or None for a checkpoint without one; with `needed_by`
    (a flag), a UserError that says to retrain instead of None."""
    novelty = ckpt.get("novelty")
    if novelty is None and needed_by:
        raise UserError(f"{needed_by} needs a checkpoint with a novelty score, which train.py stores unless "
                        f"--novelty-score none; this one has none: retrain it")
    return novelty


def fingerprint_of(ckpt: dict) -> str:
    """A short hash of the network's weights and class names: files made from a checkpoint (an INT8 model)
    record it, so that a reader can tell they were made from this checkpoint and not from another."""
    h = hashlib.sha256(repr(list(ckpt["classes"])).encode())
    for name, tensor in sorted(ckpt["model_state"].items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def config_of(ckpt: dict) -> dict:
    """The training settings as saved (a plain dict; empty for a hand-made checkpoint without them)."""
    return ckpt.get("config") or {}


def layout_info_of(ckpt: dict) -> dict:
    """How the training data was read (the 'layout:' line, label source, folders, carve, val_files_sha1); {}
    for files written before it was stored."""
    return ckpt.get("layout") or {}


def run_name_of(ckpt: dict) -> str:
    """The name of the run that wrote the checkpoint ('' when its config has none)."""
    return str(config_of(ckpt).get("run_name") or "")


def resume_state_of(ckpt: dict) -> dict:
    """What --resume restores, from last.pth: weights, EMA, optimizer, schedule, random state, progress."""
    return {"raw_model_state": ckpt.get("raw_model_state", ckpt["model_state"]), "ema_state": ckpt["model_state"],
            "ema_steps": ckpt.get("ema_steps", 0), "scaler_state": ckpt.get("scaler_state"),
            **{k: ckpt[k] for k in RESUME_KEYS},
            "epoch": ckpt["epoch"], "history": ckpt["history"], "best": ckpt["best"]}


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
