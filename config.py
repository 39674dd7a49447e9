"""Training settings: one dataclass, and the command-line flags generated from it.

Usage (from other scripts):
    cfg = parse_config(argv)          # flags --batch-size etc. come from TrainConfig's fields
    cfg = parse_config(argv, base)    # flags given on the command line override `base`
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field


DESCRIPTION = """Train a ResNet image classifier on a folder of images: DATA/train/<class>/*, optionally val/, test/.

Every flag below is a field of TrainConfig in config.py, shown with its reason and default. With --resume the
saved run's settings are the defaults and the flags given override them."""
ARCHS = ("resnet_small", "resnet18", "resnet50")


class UserError(Exception):
    """A mistake the user can fix (bad path, no checkpoint yet...): printed as one line, no traceback."""


def _f(default, help: str, choices: tuple = ()):
    """A dataclass field with a one-line reason, which becomes the flag's help text; `choices` are the only values
    the flag accepts (checked when the flags are parsed, before any data is read)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # data
    data: str = _f("Dataset", "dataset root holding train/<class>/*, and optionally val/ and test/")
    classes: list[str] = _f([], "train on these class folders only (default: every non-hidden folder)")
    val_fraction: float = _f(0.2, "share of train/ held out (stratified) when there is no val/ folder")
    image_size: int = _f(64, "side of the square input; small keeps CPU training fast")
    channels: int = _f(1, "1 = grayscale, 3 = RGB", choices=(1, 3))
    cache_dir: str = _f("cache", "where decoded images are kept so later runs skip JPEG decoding ('' = off)")
    max_bad_fraction: float = _f(0.5, "stop when more than this share of image files cannot be read")
    workers: int = _f(2, "processes that decode images on the first run (0 = in this process)")
    # model
    arch: str = _f("resnet_small", "resnet_small (fast on CPU), resnet18 or resnet50 (torchvision)", choices=ARCHS)
    width: int = _f(48, "channels of resnet_small's first stage; the width sets CPU speed")
    pretrained: bool = _f(False, "start resnet18/resnet50 from ImageNet weights (needs internet or --weights)")
    weights: str = _f("", "local torchvision state_dict to start from (implies --pretrained)")
    freeze_epochs: int = _f(0, "with pretrained weights: train only the head for this many epochs first")
    backbone_lr_factor: float = _f(0.1, "with --pretrained or --freeze-epochs: backbone learning rate = lr x this")
    # optimisation
    epochs: int = _f(40, "passes over the training set")
    batch_size: int = _f(128, "images per step; larger batches use 2 CPU cores better")
    lr: float = _f(4e-3, "peak AdamW learning rate, reached after warmup")
    weight_decay: float = _f(5e-2, "AdamW decoupled weight decay")
    warmup_epochs: float = _f(1.0, "linear learning-rate warmup before the cosine decay")
    label_smoothing: float = _f(0.1, "softens targets; helps accuracy a little on noisy photos")
    ema_decay: float = _f(0.995, "evaluate and save a moving average of the weights, with this per-step decay (0 = off)")
    class_weights: str = _f("none", "'auto' weights the loss by inverse class frequency; 'none' does not",
                            choices=("auto", "none"))
    patience: int = _f(0, "stop after this many epochs without a better val accuracy (0 = off)")
    time_budget: float = _f(0.0, "stop training after this many seconds (0 = no limit)")
    # augmentation and evaluation
    flip: bool = _f(True, "random horizontal flips during training")
    max_rotation: float = _f(10.0, "random rotation range in degrees during training")
    max_shift: float = _f(0.1, "random shift, as a share of the image side, during training")
    tta: bool = _f(True, "evaluate on the image and its mirror and average (flip test-time augmentation)")
    # machine
    device: str = _f("auto", "auto picks cuda, then mps, then cpu")
    amp: bool = _f(True, "mixed precision: bf16 on GPUs and CPUs that compute it natively (~2x faster), "
                         "fp16 with a GradScaler on other GPUs")
    channels_last: bool = _f(True, "memory layout that makes convolutions faster on CPU and GPU")
    compile: bool = _f(False, "torch.compile the model (CUDA; slow first epoch)")
    seed: int = _f(0, "seed for the split, the initial weights, shuffling and augmentation")
    # outputs
    out_dir: str = _f("models", "where best_model.pth and last.pth are written")
    log_dir: str = _f("logs", "TensorBoard runs go to LOG_DIR/<run-name>/")
    curves_dir: str = _f("curves", "PNG plots of the run")
    run_name: str = _f("", "name of the TensorBoard run (default: date-time and arch)")
    resume: bool = _f(False, "continue from OUT_DIR/last.pth with its settings (flags given override them)")
    check_only: bool = _f(False, "report on the data (counts, unreadable files, duplicates) and exit")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a saved dict, ignoring keys of older or newer versions."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _flag_kwargs(f: dataclasses.Field, hints: dict) -> dict:
    typ = hints[f.name]
    kwargs = {"help": f.metadata.get("help", ""), "dest": f.name}
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    if typ is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(typ) is list:
        kwargs["nargs"] = "*"
        kwargs["type"] = typing.get_args(typ)[0]
    else:
        kwargs["type"] = typ
    return kwargs


def build_parser(description: str = DESCRIPTION) -> argparse.ArgumentParser:
    """An argparse parser with one flag per TrainConfig field; unspecified flags are left out of the result.

    Each help line ends with the default once: the field's own wording when its reason already says what the
    default does ("(default: every non-hidden folder)"), else its value."""
    parser = argparse.ArgumentParser(usage="%(prog)s [--data DIR] [--epochs N] [--arch NAME] [other flags below]",
                                     description=description, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        kwargs = _flag_kwargs(f, hints)
        if "(default:" not in kwargs["help"]:
            kwargs["help"] += f" (default: {getattr(defaults, f.name)!r})"
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return parser


def parse_config(argv: list[str] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """Parse flags; those given override `base` (the defaults, or a resumed run's settings)."""
    given = vars(build_parser().parse_args(argv))
    return dataclasses.replace(base or TrainConfig(), **given)


def given_flags(argv: list[str] | None) -> dict:
    """Only the settings named on the command line, e.g. to apply on top of a resumed run's config."""
    return vars(build_parser().parse_args(argv))


def format_config(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)

