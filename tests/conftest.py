"""Shared fixtures: tiny generated datasets and a trained toy checkpoint, all under pytest's tmp_path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from core.metrics import confusion_matrix
from dataset import image_tensor, load_items
from loading.layout import read_layout
from loading.synthetic import make_synthetic
from prediction.checkpoint import model_from_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"


def load_folder(folder: Path, classes: list[str], size: int, channels: int = 1):
    """The decoded Split of folder/<class>/* for these classes (labels = their index), as train.py reads it."""
    items = read_layout(folder, classes=classes, val_fraction=0).items["train"]
    return load_items(items, classes, Path(folder).name, size, channels)


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """train/val/test with 16 train images per class (cat, dog) at 40x40."""
    return make_synthetic(tmp_path / "data", 16, size=40, seed=1)


def table_labelled_set(root: Path, per_class: int, size: int, labels: tuple[str, str], id_format: str,
                       extra_rows: str = "") -> Path:
    """Dog Breed style: ROOT/train/<id>.png, numbered in file order, and ROOT/labels.csv with `id,breed` rows
    whose ids have no extension (generated class a -> labels[0], b -> labels[1]), then `extra_rows`."""
    gen = make_synthetic(root.parent / f"{root.name}-gen", {"a": per_class, "b": per_class}, size=size,
                         splits=("train",))
    (root / "train").mkdir(parents=True)
    rows = []
    for i, f in enumerate(sorted(gen.rglob("*.png"))):
        f.rename(root / "train" / f"{id_format.format(i)}.png")
        rows.append(f"{id_format.format(i)},{labels[f.parent.name == 'b']}")
    (root / "labels.csv").write_text("id,breed\n" + "\n".join(rows) + "\n" + extra_rows)
    return root


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Fast flags for a toy run whose outputs all stay under `out`; on the CPU also where a GPU is, so that the
    numbers tests recompute on the CPU match (a GPU's TF32 convolutions differ in the 4th digit)."""
    return ["--data", str(data), "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--width", "8",
            "--workers", "0", "--device", "cpu", "--out-dir", str(out / "models"), "--log-dir", str(out / "logs"),
            "--curves-dir", str(out / "curves"), "--cache-dir", str(out / "cache"), "--run-name", "t", *extra]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """A toy model trained once for the whole session: {'data', 'out', 'checkpoint'}."""
    import train

    out = tmp_path_factory.mktemp("trained")
    data = make_synthetic(out / "data", 24, size=40, seed=2)
    # Without the random zoom a 3-epoch toy model is sure enough of itself that its answers differ image by image.
    assert train.main(train_args(data, out, "--epochs", "3", "--max-scale", "0")) == 0
    return {"data": data, "out": out, "checkpoint": out / "models" / "best_model.pth"}


def expected_answer(ckpt: dict, image) -> tuple[str, float]:
    """Label and confidence computed by hand: the network on the image and its mirror, softmax with temperature."""
    x = image_tensor(image, ckpt["image_size"], ckpt["channels"], ckpt["normalization"])
    model = model_from_checkpoint(ckpt)
    with torch.no_grad():
        logits = (model(x) + model(x.flip(-1))) / 2 if ckpt["tta"] else model(x)
    conf, k = torch.softmax(logits[0] / ckpt["temperature"], 0).max(0)
    return ckpt["classes"][int(k)], conf.item()


def fixed_confusion_matrix() -> torch.Tensor:
    """Rows true, columns predicted: 'c' is never predicted, 'd' has no images and is never predicted."""
    y_true = [0, 0, 0, 0, 1, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 0, 1, 1, 0, 1]
    return confusion_matrix(torch.tensor(y_true), torch.tensor(y_pred), 4)


def imagenet_like_resnet18(path):
    """A torchvision resnet18 state_dict saved to `path`, with non-trivial BatchNorm statistics so that loading
    them (or not) shows in the outputs."""
    torch.manual_seed(5)
    rgb = torchvision.models.resnet18(weights=None)
    for m in rgb.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.normal_(0, 0.1)
    torch.save(rgb.state_dict(), path)
    return rgb.eval()


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height but holds no pixels: a decompression bomb for free."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


# Files of the nasty folder, relative to its root, by what should happen to them.
NASTY_READABLE = ["train/cat/cmyk.jpg", "train/cat/sixteen_bit.png", "train/cat/palette_transparent.png",
                  "train/cat/rgba.png", "train/dog/animated.gif", "train/dog/one_pixel.png",
                  "train/dog/exif_rotated.jpg", "train/dog/webp_named.png",
                  "train/cat/saved_from_browser.jfif", "train/dog/camera.JPE"]  # JPEGs by other names
NASTY_UNREADABLE = ["train/cat/zero_bytes.jpg", "train/cat/truncated.jpg", "train/dog/text_named.jpg",
                    "train/dog/bomb.png", "train/cat/bomb_warning.png"]
NASTY_IGNORED = ["train/cat/Thumbs.db", "train/dog/notes.txt", "train/dog/IMG_0042", "train/cat/live.heic"]
# the last two are photos (a JPEG without an extension, a HEIC PIL cannot read), skipped for their extension
NASTY_DUPLICATE = ("train/cat/cat_0000.png", "train/cat/copy_of_cat_0000.png")
NASTY_LEAK = ("train/dog/dog_0001.png", "val/dog/leaked_dog_0001.png")


@pytest.fixture
def nasty_data(tmp_path: Path) -> Path:
    """The dirty folder real photo sets look like: 12 good images per class in train/ and 3 in val/ (and a copy
    of a train image in each), every odd-but-valid image type, unreadable files and junk beside the images."""
    import io
    import shutil

    import numpy as np
    from PIL import Image

    root = make_synthetic(tmp_path / "nasty", 12, size=40, seed=3, splits=("train", "val"))
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB")

    Image.new("CMYK", (40, 40), (0, 200, 100, 30)).save(cat / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(cat / "sixteen_bit.png")
    palette = photo.convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(cat / "palette_transparent.png", transparency=0)
    photo.convert("RGBA").save(cat / "rgba.png")
    frames = [photo.convert("P"), photo.transpose(Image.FLIP_LEFT_RIGHT).convert("P")]
    frames[0].save(dog / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("L", (1, 1), 128).save(dog / "one_pixel.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    photo.save(dog / "exif_rotated.jpg", exif=exif)
    photo.save(dog / "webp_named.png", format="WEBP")

    (cat / "zero_bytes.jpg").write_bytes(b"")
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=95)
    (cat / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (dog / "text_named.jpg").write_text("this is a text file, not a picture\n")
    _png_header_only(dog / "bomb.png", 100_000, 100_000)  # over twice PIL's limit: refused on open
    _png_header_only(cat / "bomb_warning.png", 12_000, 12_000)  # between 1x and 2x: PIL only warns

    (cat / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 not an image")
    (dog / "notes.txt").write_text("dogs from grandma's phone\n")
    photo.save(cat / "saved_from_browser.jfif", format="JPEG")
    photo.transpose(Image.FLIP_TOP_BOTTOM).save(dog / "camera.JPE", format="JPEG")
    photo.save(dog / "IMG_0042", format="JPEG")
    (cat / "live.heic").write_bytes(b"\x00\x00\x00\x18ftypheic not decodable here")
    for folder in (cat, dog, root / "val" / "cat"):
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    Image.new("L", (40, 40)).save(root / "train" / ".ipynb_checkpoints" / "stray.png")

    for src, dst in (NASTY_DUPLICATE, NASTY_LEAK):
        shutil.copyfile(root / src, root / dst)
    return root
