"""Training settings: one dataclass, and the command-line flags generated from it.

Usage (from other scripts):
    cfg = parse_config(argv)          # flags --batch-size etc. come from TrainConfig's fields
    cfg = parse_config(argv, base)    # flags given on the command line override `base`
    cfg = parse_config(["--config", "logs/<run>/config.json", "--epochs", "5"])   # a saved run's settings, 5 epochs
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from core.common import UserError

DESCRIPTION = """Train a ResNet image classifier on a folder of images: class folders, train/val/test split folders,
or images labelled by a table (--labels) or by their names (--labels-from-name); see README 'Your data'.

Every flag below is a field of TrainConfig in config.py, shown with its reason and default. With --resume the
saved run's settings are the defaults and the flags given override them."""
# Pretrained backbones whose ImageNet weights come installed with a package (model.WEIGHT_PACKAGES), and what an
# --arch of one takes unless the flags say otherwise: the input its weights were trained at, those weights, and
# the head's recipe on its frozen features (a strong weight decay, few epochs: chosen on held-out train photos of
# Dogs vs. Cats, benchmarks/bench_backbone.py; docs/experiments/backbone.md), and how sure label spreading must be
# of an --unlabeled image's class (chosen on train photos of Dogs vs. Cats held out from 10 labelled per class), and
# how many epochs then fine-tune its last stages (chosen on held-out train photos of mirflickr and Dogs vs. Cats).
# efficientnet_lite2 takes lite0's recipe at the input its weights were trained at: twice the time per photo for
# better features where labels are few (docs/experiments/backbone.md).
_BACKBONE_RECIPE = {"channels": 3, "pretrained": True, "epochs": 20, "weight_decay": 5.0, "pseudo_threshold": 0.6,
                    "tune_epochs": 4}
BACKBONE_DEFAULTS = {"efficientnet_lite0": {"image_size": 224, **_BACKBONE_RECIPE},
                     "efficientnet_lite2": {"image_size": 260, **_BACKBONE_RECIPE}}
ARCHS = ("resnet_small", "resnet18", "resnet50", *BACKBONE_DEFAULTS)
NOVELTY_SCORES = ("combined", "msp", "energy", "knn", "mahalanobis", "layer_mahalanobis", "rotation")  # their maths:
# prediction/novelty.py
PLACEMENTS = ("auto", "device", "map")
# The cache stores pixels as uint8 and the network sees (x / 127.5 - 1), i.e. mean 0.5 and std 0.5 of [0, 1].
NORMALIZATION = {"mean": 0.5, "std": 0.5}


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
    data: str = _f("Dataset", "dataset folder: class folders, split folders (train/val/test and their aliases), "
                   "or images with --labels / --labels-from-name; see README 'Your data'")
    labels: str = _f("", "CSV/TSV of file,label rows (columns found by header name); '' = labels from folders")
    label_columns: list[str] = _f([], "FILE_COL LABEL_COL of --labels when the header names are not the usual ones")
    labels_from_name: bool = _f(False, "label = the file name before its number (cat.12.jpg -> cat)")
    name_pattern: str = _f("", "regex searched in each file name; its one group is the label (implies names)")
    multi_label: bool = _f(False, "read the --labels table's label column as several tags per image (a column "
                           "named tags/labels/genres... with several per row, or 0/1 columns per tag, is read so "
                           "anyway)")
    untagged: bool = _f(False, "with several tags per image: keep the table's rows with no tag as images with none "
                        "of the tags (default: left out, and counted)")
    classes: list[str] = _f([], "train on these classes only (default: every class found)")
    val_fraction: float = _f(0.2, "share of train held out (stratified) when there is no val split")
    test_fraction: float = _f(0.0, "share of train held out as test (stratified) when there is no test split")
    image_size: int = _f(64, "side of the square input; small keeps CPU training fast")
    channels: int = _f(1, "1 = grayscale, 3 = RGB", choices=(1, 3))
    cache_dir: str = _f("cache", "where decoded images are kept so later runs skip JPEG decoding ('' = off)")
    max_bad_fraction: float = _f(0.5, "stop when more than this share of image files cannot be read")
    workers: int = _f(2, "processes that decode images on the first run (0 = in this process)")
    data_placement: str = _f("auto", "'device': every training image on the device (on CPU: in RAM); 'map': "
                             "batches read from the cache's memory map; 'auto': device on CUDA when it fits",
                             choices=PLACEMENTS)
    # model
    arch: str = _f("resnet_small", "resnet_small (fast on CPU), resnet18 or resnet50 (torchvision), or "
                   "efficientnet_lite0: ImageNet weights installed with requirements.txt, frozen; its features are "
                   "computed once and the head trains on them (RGB 224 px, pretrained, 20 epochs, weight decay 5, "
                   "unless flags say otherwise); efficientnet_lite2: the same at 260 px, half as fast, for few labels",
                   choices=ARCHS)
    width: int = _f(32, "channels of resnet_small's first stage; the width sets CPU speed")
    blocks: list[int] = _f([1, 1, 1, 1], "resnet_small's residual blocks in each of its four stages")
    pretrained: bool = _f(False, "start from ImageNet weights: resnet18/resnet50 torchvision's (needs internet or "
                          "--weights), efficientnet_lite0/lite2 their installed packages' (on for them unless "
                          "--no-pretrained)")
    weights: str = _f("", "local state_dict to start from: a torchvision ResNet's, or the backbone's (implies "
                      "--pretrained)")
    freeze_epochs: int = _f(0, "with pretrained weights: train only the head for this many epochs first")
    backbone_lr_factor: float = _f(0.1, "with --pretrained or --freeze-epochs: backbone learning rate = lr x this")
    tune_epochs: int = _f(0, "a packaged backbone (--arch efficientnet_lite0/lite2): after its head, epochs "
                             "fine-tuning its last stages with the head, from stored feature maps (0 = the head "
                             "alone; --time-budget takes the epochs that fit)")
    # optimisation
    epochs: int = _f(80, "passes over the training set")
    batch_size: int = _f(128, "images per step; larger batches use 2 CPU cores better")
    lr: float = _f(4e-3, "peak AdamW learning rate, reached after warmup")
    weight_decay: float = _f(5e-2, "AdamW decoupled weight decay")
    warmup_epochs: float = _f(1.0, "linear learning-rate warmup before the cosine decay")
    label_smoothing: float = _f(0.1, "softens targets; helps accuracy a little on noisy photos")
    ema_decay: float = _f(0.995, "evaluate and save a moving average of the weights, with this per-step decay (0 = off)")
    class_weights: str = _f("none", "'auto' weights the loss by inverse class frequency; 'none' does not",
                            choices=("auto", "none"))
    patience: int = _f(0, "stop after this many epochs without a better val accuracy (0 = off)")
    time_budget: float = _f(0.0, "fit the run, calibration and novelty fit included, into this many seconds: the "
                            "epochs that fit at the measured speed, the learning rate annealed to 0 over the last "
                            "quarter of them (0 = no limit)")
    # augmentation and evaluation
    flip: bool = _f(True, "random horizontal flips during training")
    max_rotation: float = _f(10.0, "random rotation range in degrees during training")
    max_shift: float = _f(0.1, "random shift, as a share of the image side, during training")
    max_scale: float = _f(0.15, "random zoom during training: the image scaled by 1 +- up to this share")
    cutmix: float = _f(0.0, "share of training batches given CutMix: a random box of each image replaced by the same "
                       "box of another, the loss split between their labels by area (0 = off; pays in long runs)")
    tta: bool = _f(True, "evaluate on the image and its mirror and average (flip test-time augmentation)")
    # images of no known class (prediction/novelty.py)
    novelty_score: str = _f("combined", "score fitted on the train features at the end, for --reject: combined "
                            "(measured best on real photos), msp, energy, knn, mahalanobis, layer_mahalanobis or "
                            "rotation (needs --rotation-weight); 'none' skips it",
                            choices=(*NOVELTY_SCORES, "none"))
    rotation_weight: float = _f(0.25, "weight of a self-supervised loss: a 4-way head learns which quarter turn "
                                "--rotation-share of each batch was given, so the features know more than the "
                                "classes and tell unknown images better; those images teach no class, which at "
                                "0.25 costs no accuracy that a seed's draw does not (0 = no rotation head)")
    rotation_share: float = _f(0.25, "share of each batch turned and given to the rotation head")
    rotation_copies: bool = _f(False, "turn copies of that share, added to the batch, instead of the images "
                               "themselves (which the class loss then skips): every image teaches its class, but a "
                               "step costs more, which short runs pay for")
    other: str = _f("", "folder of images of no class (any layout), e.g. what users send by mistake: trained "
                    "to hold little evidence for any class (energy-margin outlier exposure); never a class, never "
                    "in the accuracy")
    other_synthetic: int = _f(500, "generated far-away images (loading/synthetic.py: shapes, text, noise...) added to "
                              "the --other images, so that they are more varied")
    other_weight: float = _f(0.1, "weight of the --other images' loss (metrics.energy_margin_loss)")
    other_share: float = _f(0.5, "--other images added to each batch, as a share of the batch size")
    other_zoom_out: float = _f(0.5, "share of the --other crops shrunk onto a plain ground (outliers.zoomed_out): "
                               "things seen from afar as well as close up")
    # images without labels
    unlabeled: str = _f("", "folder of images without labels (any layout; labels in it are ignored): each step also "
                            "trains the strongly augmented view of some of them towards the class the evaluated "
                            "model gives their weakly augmented view, where it is confident (FixMatch); an epoch "
                            "is a pass over them; accuracy stays on labelled val")
    unlabeled_ratio: float = _f(1.0, "--unlabeled images in each step, per labelled image of the batch")
    pseudo_threshold: float = _f(0.8, "--unlabeled: the confidence above which a weak view's class becomes the "
                                      "strong view's target (label smoothing keeps confidences near 1 - "
                                      "smoothing x (classes - 1) / classes at most: 0.95 for two classes)")
    unlabeled_weight: float = _f(1.0, "weight of the --unlabeled images' loss")
    accept_rate: float = _f(0.95, "share of known (val) images the stored novelty threshold accepts")
    novelty_max_images: int = _f(20_000, "fit the novelty score on a stratified sample of this many train images "
                                 "(bounds its memory and time on big sets); 0 uses all")
    # machine
    device: str = _f("auto", "auto picks cuda, then mps, then cpu")
    amp: bool = _f(True, "mixed precision: bf16 on GPUs and CPUs that compute it natively (faster), "
                         "fp16 with a GradScaler on other GPUs")
    channels_last: bool = _f(True, "memory layout that makes convolutions faster on CPU and GPU")
    compile: bool = _f(False, "torch.compile the model (CUDA; slow first epoch)")
    seed: int = _f(0, "seed for the split, the initial weights, shuffling and augmentation")
    # outputs
    out_dir: str = _f("models", "where best_model.pth and last.pth are written")
    log_dir: str = _f("logs", "TensorBoard runs go to LOG_DIR/<run-name>/")
    curves_dir: str = _f("curves", "PNG plots of the run")
    run_name: str = _f("", "name of the run: LOG_DIR/<run-name>/, and the folder its files move to when a later run "
                           "starts (default: date-time and arch; a name already used gets -2, -3...)")
    resume: bool = _f(False, "continue from OUT_DIR/last.pth with its settings (flags given override them)")
    config: str = _f("", "start from this saved config.json (LOG_DIR/<run>/config.json); flags given override it")
    check_only: bool = _f(False, "report on the data (counts, unreadable files, duplicates) and exit")
    find_label_errors: bool = _f(False, "before training, predict every train image with short runs that never saw "
                                 "it and list the likely wrong labels (quality/label_errors.py); nothing is changed")
    label_error_folds: int = _f(4, "label check (--find-label-errors, check_data.py --label-errors): folds, each "
                                "predicted by a model trained on the others")
    label_error_epochs: int = _f(80, "label check: epochs of each fold's run, its learning-rate schedule (as "
                                 "--epochs; --label-error-budget may end it sooner)")
    label_error_budget: float = _f(600.0, "label check: about this many seconds for all the folds together; each "
                                   "fold trains as many of its epochs as fit in its share, annealed as --time-budget "
                                   "plans (0 = no limit); folds cut short name more hard images")

    @property
    def uses_pretrained(self) -> bool:
        """--weights implies --pretrained."""
        return self.pretrained or bool(self.weights)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def layout_settings(self, need: str | None = "train") -> dict:
        """How to read DATA, as loading.layout.read_layout's keywords: where the labels come from, the carve, the
        classes kept, and the split the caller needs (None: any)."""
        return {"labels_file": self.labels or None, "label_columns": self.label_columns or None,
                "labels_from_name": self.labels_from_name, "name_pattern": self.name_pattern or None,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction, "seed": self.seed,
                "classes": self.classes or None, "need": need, "multi_label": self.multi_label,
                "untagged": self.untagged}

    def __post_init__(self):
        """The one check of the settings whatever they come from (flags, --config, a saved run, a caller): a field
        with choices holds one of them, and the settings that depend on each other agree."""
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise UserError(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, "
                                f"not {value!r}")
        if not 0.0 < self.accept_rate <= 1.0:
            raise UserError(f"--accept-rate must be in (0, 1], not {self.accept_rate}")
        for name in ("other_zoom_out", "cutmix"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], not {getattr(self, name)}")
        if self.unlabeled and not (self.unlabeled_ratio > 0 and 0.0 < self.pseudo_threshold <= 1.0):
            raise UserError(f"--unlabeled needs --unlabeled-ratio above 0 (not {self.unlabeled_ratio}) and "
                            f"--pseudo-threshold in (0, 1] (not {self.pseudo_threshold})")
        if not 0.0 <= self.max_scale < 1.0:
            raise UserError(f"--max-scale must be in [0, 1), not {self.max_scale}")
        if self.rotation_weight > 0 and not 0.0 < self.rotation_share < 1.0:
            raise UserError(f"--rotation-share must be in (0, 1), not {self.rotation_share}")
        if self.novelty_score == "rotation" and self.rotation_weight <= 0:
            raise UserError("--novelty-score rotation needs the rotation head: give --rotation-weight > 0")
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise UserError(f"--blocks takes 4 numbers of at least 1 (resnet_small's stages), not {self.blocks}")
        if self.label_error_budget < 0:
            raise UserError("--label-error-budget must be 0 (off) or a number of seconds, not "
                            f"{self.label_error_budget}")
        if self.tune_epochs < 0 or (self.tune_epochs and self.arch not in BACKBONE_DEFAULTS):
            raise UserError(f"--tune-epochs fine-tunes a packaged backbone (--arch {', '.join(BACKBONE_DEFAULTS)}): "
                            f"0 or more epochs, not {self.tune_epochs} with --arch {self.arch}")
        if self.label_error_folds < 2 or self.label_error_epochs < 1:
            raise UserError("--label-error-folds must be at least 2 and --label-error-epochs at least 1, not "
                            f"{self.label_error_folds} and {self.label_error_epochs}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a saved dict, ignoring keys of newer versions; a field an older run saved nothing for
        takes the value that run trained with (BEFORE_FIELD), else the default."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**dict(BEFORE_FIELD), **{k: v for k, v in d.items() if k in names}})


# Fields a saved config may lack, with the value a run whose config lacks them trained with (not the default), so
# that resuming it, or starting from its config.json, goes on as it began.
BEFORE_FIELD = (("max_scale", 0.0), ("other_zoom_out", 0.0), ("rotation_weight", 0.0), ("rotation_copies", True))


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


# Where the labels come from: the flags every script that reads a dataset takes (train, evaluate, check, split).
SOURCE_FIELDS = ("labels", "label_columns", "labels_from_name", "name_pattern", "multi_label", "untagged")
# What decides the carved val/test splits, besides the source.
CARVE_FIELDS = ("classes", "val_fraction", "test_fraction", "seed")
# What check_data.py --label-errors trains with, besides the defaults.
LABEL_CHECK_FIELDS = ("label_error_folds", "label_error_epochs", "label_error_budget", "arch", "width", "blocks",
                      "image_size", "channels", "pretrained", "weights", "batch_size", "max_scale", "cache_dir",
                      "device")


def add_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None,
              default_note: str = "") -> argparse.ArgumentParser:
    """One flag per TrainConfig field (or per field in `names`); flags not given are left out of the result."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        kwargs = _flag_kwargs(f, hints)
        if default_note:
            kwargs["help"] += default_note
        elif "(default:" not in kwargs["help"]:  # a reason that already says what the default does keeps its own
            kwargs["help"] += f" (default: {getattr(defaults, f.name)!r})"
        kwargs["default"] = argparse.SUPPRESS
        if f.name == "label_columns":
            kwargs.update(nargs=2, metavar=("FILE_COL", "LABEL_COL"))
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return parser


def build_parser(description: str = DESCRIPTION) -> argparse.ArgumentParser:
    """An argparse parser with one flag per TrainConfig field; unspecified flags are left out of the result.

    Each help line ends with the default once: the field's own wording when its reason already says what the
    default does ("(default: every class found)"), else its value."""
    parser = argparse.ArgumentParser(usage="%(prog)s [--data DIR] [--epochs N] [--arch NAME] [other flags below]",
                                     description=description, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_flags(parser)


# What an invocation does rather than how a run trains: not taken over from a saved config.json.
NOT_SETTINGS = ("run_name", "resume", "check_only", "config", "find_label_errors")


def _fits(value, typ) -> bool:
    """Whether a JSON value can be the value of a field of type `typ` (an int is a float; a bool is neither)."""
    if typing.get_origin(typ) is list:
        return isinstance(value, list) and all(isinstance(v, typing.get_args(typ)[0]) for v in value)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value) is typ


def load_config_file(path: str | Path) -> TrainConfig:
    """The settings of a saved config.json (what train.py writes to LOG_DIR/<run>/config.json), checked field by
    field; its run name, --resume and --check-only are not taken over (a new run gets its own name)."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--config {path}: not a readable JSON file ({e})") from None
    if not isinstance(saved, dict):
        raise UserError(f"--config {path}: expected a JSON object of settings, as train.py writes")
    hints, defaults = typing.get_type_hints(TrainConfig), TrainConfig()
    for name, value in saved.items():
        if name not in hints or name in NOT_SETTINGS:
            continue
        if not _fits(value, hints[name]):
            raise UserError(f"--config {path}: {name} should be {getattr(hints[name], '__name__', hints[name])}, "
                            f"not {value!r}")
    try:
        cfg = TrainConfig.from_dict({k: v for k, v in saved.items() if k not in NOT_SETTINGS})
    except UserError as e:
        raise UserError(f"--config {path}: {e}") from None
    return dataclasses.replace(cfg, **{k: getattr(defaults, k) for k in NOT_SETTINGS})


def parse_config(argv: list[str] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """Parse flags; those given override `base` (the defaults, a resumed run's settings, or with --config FILE
    that file's settings), the rest keep it."""
    given = vars(build_parser().parse_args(argv))
    if given.get("config"):
        if given.get("resume"):
            raise UserError("--config starts a new run from saved settings and --resume continues last.pth with "
                            "its own: give one of them")
        base = load_config_file(given["config"])
    return dataclasses.replace(base or TrainConfig(), **with_arch_defaults(given))


def with_arch_defaults(given: dict) -> dict:
    """The given settings, with what their --arch implies (BACKBONE_DEFAULTS) where they say nothing."""
    return {**BACKBONE_DEFAULTS.get(given.get("arch", ""), {}), **given}


def format_config(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)

