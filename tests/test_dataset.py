from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from conftest import NASTY_READABLE
from core.common import UserError
from dataset import (augment, batch_affine, batch_flip_lr, cutmix, image_tensor, load_data, load_split, random_affine,
                     to_float)
from loading import decode
from loading.decode import decode_image, preprocess
from loading.layout import layout_splits, read_layout
from loading.table import SKIPPED
from loading.synthetic import make_synthetic


def files_of(split_dir):
    """(paths, labels) of split_dir/<class>/* as read_layout lists them, labels indexing its sorted classes."""
    lay = read_layout(split_dir, val_fraction=0)
    items = lay.items["train"]
    return [p for p, _ in items], [lay.classes.index(c) for _, c in items]


def test_classes_sorted_hidden_ignored_and_subset(tmp_path):
    for name in ("horse", "dog", "cat", ".ipynb_checkpoints", "__MACOSX"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / name / "a.png")
    assert read_layout(tmp_path).classes == ["cat", "dog", "horse"]
    assert read_layout(tmp_path, classes=["dog", "cat"]).classes == ["cat", "dog"]
    with pytest.raises(UserError, match="zebra"):
        read_layout(tmp_path, classes=["cat", "zebra"])


def test_non_image_and_hidden_files_are_not_images(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / c / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "cat" / "B.JPG", format="JPEG")
    for junk in ("Thumbs.db", "notes.txt", ".DS_Store", "._a.png"):
        (tmp_path / "cat" / junk).write_bytes(b"x")
    paths, labels = files_of(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["B.JPG", "a.png", "a.png"] and labels == [0, 0, 1]
    assert sorted(read_layout(tmp_path).problems[SKIPPED]) == ["cat/Thumbs.db", "cat/notes.txt"]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_preprocess_any_mode_gives_uint8_square(mode):
    img = Image.new("RGB", (30, 20), (200, 100, 50)).convert(mode)
    out = preprocess(img, 16, channels=1)
    assert out.shape == (1, 16, 16) and out.dtype == np.uint8
    assert preprocess(img, 16, channels=3).shape == (3, 16, 16)


def test_sixteen_bit_images_are_scaled_not_clipped():
    arr = np.full((10, 10), 32768, dtype=np.uint16)
    out = preprocess(Image.fromarray(arr), 4)
    assert 120 <= out.mean() <= 135  # half of 65535 -> about half of 255, not clipped to 255


def test_transparency_goes_onto_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert preprocess(img, 4).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "r.jpg"
    img.save(path, exif=exif, quality=95)
    out = decode_image(path, 20)
    assert out.shape == (1, 20, 20)
    assert out[0, :10].mean() > 200 and out[0, 10:].mean() < 50  # the white half is now on top


def test_image_tensor_is_normalized_to_minus_one_one(tmp_path):
    arr = np.zeros((20, 20), dtype=np.uint8)
    arr[:, 10:] = 255
    Image.fromarray(arr).save(tmp_path / "x.png")
    x = image_tensor(tmp_path / "x.png", 16)
    assert x.shape == (1, 1, 16, 16) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(to_float(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0]))


def test_webp_named_png_is_read_by_content(tmp_path):
    path = tmp_path / "fake.png"
    Image.new("RGB", (12, 12), (255, 255, 255)).save(path, format="WEBP")
    assert decode_image(path, 8).min() > 240


@pytest.mark.parametrize("content", [b"", b"this is text, not a picture", b"\xff\xd8\xff\xe0garbage"])
def test_unreadable_files_raise_bad_image(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(decode.BadImage):
        decode_image(path, 8)


def test_augmentation_keeps_shape_dtype_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    y = augment(x, True, 10.0, 0.1, 0.15, g)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= -1.0001 and y.max() <= 1.0001
    assert not torch.equal(x, y)


def test_flip_mirrors_about_half_the_batch():
    x = torch.arange(4.0).repeat(1000, 1, 1, 1)  # every image [0 1 2 3]
    y = batch_flip_lr(x, torch.Generator().manual_seed(0))
    flipped = (y[:, 0, 0, 0] == 3).float().mean().item()
    assert 0.45 < flipped < 0.55
    assert torch.equal(y.sort(dim=-1).values, x)


def test_affine_zero_is_identity_and_matches_torchvision_rotation():
    from torchvision.transforms.functional import InterpolationMode, rotate

    x = torch.zeros(1, 1, 33, 33)
    x[..., 4:12, 14:19] = 1.0  # a bar above the centre
    same = batch_affine(x, torch.zeros(1), torch.zeros(1, 2))
    assert torch.allclose(same, x, atol=1e-5)
    ours = batch_affine(x, torch.tensor([30.0]), torch.zeros(1, 2))
    ref = rotate(x, 30.0, interpolation=InterpolationMode.BILINEAR)
    inner = (slice(None), slice(None), slice(6, 27), slice(6, 27))  # away from the reflected borders
    assert (ours[inner] - ref[inner]).abs().mean() < 0.03


def test_shift_moves_content_right_and_down():
    x = torch.zeros(1, 1, 20, 20)
    x[..., 8:12, 8:12] = 1.0
    y = batch_affine(x, torch.zeros(1), torch.tensor([[0.1, 0.2]]))  # 2 px right, 4 px down
    ys, xs = torch.nonzero(y[0, 0] > 0.5, as_tuple=True)
    assert xs.float().mean().item() == pytest.approx(11.5, abs=0.3)
    assert ys.float().mean().item() == pytest.approx(13.5, abs=0.3)


def test_scale_zooms_about_the_centre():
    x = torch.zeros(2, 1, 32, 32)
    x[..., 12:20, 12:20] = 1.0  # an 8-pixel square in the middle
    y = batch_affine(x, torch.zeros(2), torch.zeros(2, 2), torch.tensor([0.5, 2.0]))
    big, small = y[0, 0] > 0.5, y[1, 0, 8:24, 8:24] > 0.5  # (zoomed out, the borders reflect the image)
    assert big.sum().item() == pytest.approx(16 * 16, rel=0.1)  # scale 0.5: twice the side
    assert small.sum().item() == pytest.approx(4 * 4, rel=0.25)  # scale 2: half the side, still centred
    assert torch.equal(big.nonzero().float().mean(0), torch.tensor([15.5, 15.5]))  # both about the centre
    assert torch.equal(small.nonzero().float().mean(0), torch.tensor([7.5, 7.5]))


def test_random_scales_stay_in_their_range():
    """max_scale 0.2 zooms each image by 1 / s, s uniform in [0.8, 1.2]: a centred square's area moves within
    (1/1.2)^2 .. (1/0.8)^2 of its own, and both ways."""
    x = torch.zeros(200, 1, 40, 40)
    x[..., 10:30, 10:30] = 1.0
    g = torch.Generator().manual_seed(0)
    areas = (random_affine(x, 0, 0, 0.2, g) > 0.5).sum((1, 2, 3)).float() / 400
    assert areas.min() > 0.62 and areas.max() < 1.62
    assert (areas < 0.85).any() and (areas > 1.2).any()


def test_batch_augmentation_statistics_match_torchvision_pil_pipeline():
    """Same visible effect as the per-image PIL transforms it replaces: pixel statistics agree."""
    from torchvision import transforms

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = torch.zeros(1, 1, 32, 32)
    base[..., 6:26, 4:14] = 1.0  # a bright block left of centre
    batch = base.repeat(400, 1, 1, 1) * 2 - 1
    ours = augment(batch, True, 10.0, 0.0, 0.0, g)
    tv = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.RandomRotation(10)])
    ref = torch.stack([tv(base[0]) for _ in range(400)]) * 2 - 1
    assert abs(ours.mean() - ref.mean()) < 0.03
    # the mirror makes the mean image symmetric in both pipelines
    for img in (ours.mean(0), ref.mean(0)):
        assert (img - img.flip(-1)).abs().mean() < 0.1


def test_random_affine_off_returns_input():
    x = torch.rand(2, 1, 8, 8)
    assert random_affine(x, 0, 0) is x


def _touch_changed(path, color):
    Image.new("L", (40, 40), color).save(path)


def test_cache_hits_invalidates_and_equals_a_fresh_decode(tmp_path, monkeypatch):
    data = make_synthetic(tmp_path / "d", 5, size=24, splits=("train",))
    paths, labels = files_of(data / "train")
    cache = tmp_path / "cache"
    first = load_split(paths, labels, "train", 16, 1, str(cache), 0)
    fresh = load_split(paths, labels, "train", 16, 1, "", 0)
    assert torch.equal(first.images, fresh.images) and torch.equal(first.labels, fresh.labels)
    assert first.labels.tolist() == labels and list(cache.iterdir())

    calls = []
    real = decode.decode_files
    monkeypatch.setattr(dataset, "decode_files", lambda paths, *a, **k: calls.append(list(paths)) or real(paths, *a, **k))
    second = load_split(paths, labels, "train", 16, 1, str(cache), 0)
    assert calls == [] and torch.equal(second.images, first.images)

    changed = data / "train" / "dog" / "dog_0002.png"
    _touch_changed(changed, 255)
    third = load_split(paths, labels, "train", 16, 1, str(cache), 0)
    assert calls == [[str(changed)]]
    row = third.paths.index(str(changed))
    assert third.images[row].min() == 255
    other = [i for i, p in enumerate(third.paths) if p != str(changed)]
    assert torch.equal(third.images[other], first.images[other])


def test_cache_is_per_size(tmp_path):
    data = make_synthetic(tmp_path / "d", 2, size=24, splits=("train",))
    paths, labels = files_of(data / "train")
    a = load_split(paths, labels, "train", 16, 1, str(tmp_path / "c"), 0)
    b = load_split(paths, labels, "train", 8, 1, str(tmp_path / "c"), 0)
    assert a.images.shape[-1] == 16 and b.images.shape[-1] == 8


def test_cache_is_shared_by_a_carved_val_and_reused_by_another_layout_of_the_same_files(tmp_path, monkeypatch):
    data = make_synthetic(tmp_path / "d", 6, size=24, splits=("train",))
    lay = read_layout(data)
    cache = str(tmp_path / "cache")
    train, val = load_data(lay, 16, 1, cache)
    assert len(list((tmp_path / "cache").glob("*.index.pt"))) == 1  # train and its carved val: one cache
    calls = []
    real = decode.decode_files
    monkeypatch.setattr(dataset, "decode_files", lambda paths, *a, **k: calls.append(list(paths)) or real(paths, *a, **k))
    again, again_val = load_data(lay, 16, 1, cache)
    assert calls == [] and again.paths == train.paths and again_val.paths == val.paths
    # The same files labelled by a table instead of folders: still no decoding.
    rows = "\n".join(f"{p.relative_to(data).as_posix()},{p.parent.name}" for p in sorted(data.rglob("*.png")))
    (data / "labels.csv").write_text("file,label\n" + rows + "\n")
    by_table = read_layout(data, labels_file=data / "labels.csv")
    table_train, table_val = load_data(by_table, 16, 1, cache)
    assert calls == [] and sorted(table_train.paths + table_val.paths) == sorted(train.paths + val.paths)


def test_load_data_carves_val_from_train_when_there_is_no_val(tmp_path):
    data = make_synthetic(tmp_path / "d", 10, size=24, splits=("train",))
    lay = read_layout(data)
    train, val = load_data(lay, 16, 1)
    assert lay.classes == ["cat", "dog"]
    assert len(train.paths) == 16 and len(val.paths) == 4
    assert not set(train.paths) & set(val.paths)
    assert torch.bincount(val.labels).tolist() == [2, 2]
    assert val.paths == [p for p, _ in layout_splits(lay)["val"]]  # the one carve: what evaluate.py rebuilds


def test_load_data_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="no dataset folder at"):
        read_layout(tmp_path / "nope")
    one = make_synthetic(tmp_path / "one", {"cat": 4}, size=24, splits=("train",))
    with pytest.raises(UserError, match="at least 2"):
        read_layout(one)
    data = make_synthetic(tmp_path / "d", 4, size=24, splits=("train",))
    with pytest.raises(UserError, match="no val split.*--val-fraction above 0"):
        load_data(read_layout(data, val_fraction=0), 16, 1)
    (data / "train" / "horse").mkdir()
    (data / "train" / "horse" / "h.png").write_bytes(b"")
    (data / "train" / "horse" / "h2.png").write_bytes(b"")
    with pytest.raises(UserError, match="no readable images.*horse"):
        load_data(read_layout(data), 16, 1)


def test_mostly_unreadable_data_stops(tmp_path):
    data = make_synthetic(tmp_path / "d", 2, size=24, splits=("train",))
    for i in range(6):
        (data / "train" / "cat" / f"broken{i}.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot be read"):
        load_data(read_layout(data), 16, 1, max_bad_fraction=0.5)


def test_real_photos_decode_to_gray_64(tmp_path):
    """Real Kaggle photos (200 px and full resolution) decode through draft mode; skipped without ../shared."""
    from conftest import SHARED

    folders = [SHARED / "data" / "catdog" / "val" / "cat", SHARED / "data" / "catdog-fullres" / "train" / "dog"]
    if not all(f.is_dir() for f in folders):
        pytest.skip("../shared/data is not present")
    for folder in folders:
        for path in sorted(folder.iterdir())[:10]:
            out = decode_image(path, 64)
            assert out.shape == (1, 64, 64) and out.dtype == np.uint8
            assert out.std() > 5  # a photo, not a blank


def test_jfif_and_jpe_are_read_as_jpegs_and_other_extensions_are_counted_and_named(tmp_path):
    data = make_synthetic(tmp_path / "d", 4, size=24, splits=("train", "val"))
    Image.new("L", (24, 24), 10).save(data / "train" / "cat" / "photo.jfif", format="JPEG")
    Image.new("L", (24, 24), 250).save(data / "train" / "dog" / "OLD_CAMERA.JPE", format="JPEG")
    Image.new("L", (24, 24)).save(data / "val" / "dog" / "IMG_0042", format="JPEG")
    (data / "train" / "cat" / "live.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    lay = read_layout(data)
    assert sorted(lay.problems[SKIPPED]) == ["train/cat/live.heic", "val/dog/IMG_0042"]
    train, val = load_data(lay, 24, 1)
    assert len(train.paths) == 10 and len(val.paths) == 4
    labels = dict(zip((Path(p).name for p in train.paths), train.labels.tolist()))
    assert labels["photo.jfif"] == 0 and labels["OLD_CAMERA.JPE"] == 1
    assert train.images[train.paths.index(str(data / "train" / "dog" / "OLD_CAMERA.JPE"))].float().mean() > 240


def test_each_odd_but_valid_image_decodes(nasty_data):
    for rel in NASTY_READABLE:
        assert decode.decode_image(nasty_data / rel, 32).shape == (1, 32, 32), rel


def test_cutmix_pastes_one_box_from_the_permuted_images_and_says_its_share():
    x = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 10, 10).clone()  # image i is all i
    g = torch.Generator().manual_seed(0)
    boxes = 0
    for _ in range(20):
        y, perm, own = cutmix(x, 1.0, g)
        assert perm is not None and sorted(perm.tolist()) == list(range(6))
        for i in range(6):
            from_other = y[i, 0] == perm[i].item()
            if perm[i] != i:  # what is not its own is one box, from the image perm names, of the share said
                assert (y[i, 0] == i).float().mean().item() == pytest.approx(own)
                rows, cols = from_other.any(1).nonzero(), from_other.any(0).nonzero()
                assert from_other.sum() == len(rows) * len(cols)
                boxes += own < 1
    assert boxes > 0
    assert cutmix(x, 0.0, g)[1] is None and cutmix(x, 0.0, g)[0] is x
    kept = [cutmix(x, 0.5, g)[1] is None for _ in range(400)]
    assert 0.4 < sum(kept) / 400 < 0.6  # share 0.5: about half the batches are left alone


def test_photometric_changes_are_per_image_and_off_at_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8) * 0.5 + 0.25  # room on both sides, so no clipping
    assert torch.allclose(dataset.photometric(x, 0.0, 0.0, 0.0, g), x)
    shifted = dataset.photometric(x, 0.2, 0.0, 0.0, g) - x
    per_image = shifted.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-6)  # one shift an image
    assert per_image[:, 0].abs().max() <= 0.2 and per_image[:, 0].std() > 0  # within +-0.2, not all the same
    stretched = dataset.photometric(x, 0.0, 0.5, 0.0, g)
    assert torch.allclose(stretched.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5)  # contrast keeps the mean
    assert dataset.photometric(torch.ones(3, 1, 4, 4), 0.0, 0.0, 0.5, g).eq(1).all()  # gamma keeps 0 and 1


def test_blur_and_noise_blur_an_impulse_by_the_gaussian_kernel_and_are_off_at_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 1, 5, 5)
    x[:, :, 2, 2] = 16.0
    assert torch.equal(dataset.blur_and_noise(x, 0.0, 0.0, g), x)
    blurred = dataset.blur_and_noise(x, 1.0, 0.0, g)[0, 0]
    assert blurred[1:4, 1:4].tolist() == [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
    assert blurred.sum() == 16.0


def test_cutout_sets_one_square_per_image_to_the_fill():
    g = torch.Generator().manual_seed(3)
    x = torch.ones(20, 2, 16, 16)
    out = dataset.cutout(x, 0.25, -1.0, g)
    filled = (out == -1.0)
    assert torch.equal(filled[:, 0], filled[:, 1])  # every channel of the same square
    whole = 0
    for mask in filled[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4  # a 4 px square, clipped at the borders
        assert mask.sum() == len(rows) * len(cols)  # one rectangle, nothing else
        whole += len(rows) == len(cols) == 4
    assert whole >= 10  # most squares lie inside the image
    assert ((out == 1.0) | filled).all()


def test_strong_augment_keeps_shape_repeats_with_the_generator_and_changes_each_image():
    x = dataset.to_float(torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8))
    a = dataset.strong_augment(x, 0.5, 0.5, generator=torch.Generator().manual_seed(1))
    b = dataset.strong_augment(x, 0.5, 0.5, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert ((a - x).flatten(1).abs().mean(1) > 0.05).all()
    imagenet = dataset.strong_augment(x, [0.449], [0.226], generator=torch.Generator().manual_seed(1))
    assert imagenet.shape == x.shape and torch.isfinite(imagenet).all()
