"""Near-copies (near_duplicates.py): planted copies that are resized, re-encoded, cropped, mirrored and recolored
are found and distinct images are not; check_data.py names copies across splits as leakage and counts those
within one; the training start-up line counts them."""
from __future__ import annotations

import json
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

import check_data
from conftest import load_folder
from dataset import RowView
from loading import near_duplicates
from loading.decode import preprocess
from loading.near_duplicates import (End, Joined, altered_copy, connected_groups, copy_groups, cross_and_within,
                                     near_duplicate_pairs, start_up_check, thumbnails)
from loading.synthetic import make_synthetic


def photo(rng: np.random.Generator, side: int = 120) -> Image.Image:
    """A distinct smooth random picture: a 6x6 random field blown up, with a bright disc somewhere."""
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB").resize((side, side),
                                                                                         Image.BICUBIC)
    x, y, r = rng.integers(20, side - 20, 2).tolist() + [int(rng.integers(8, 20))]
    field.paste(tuple(int(v) for v in rng.integers(0, 256, 3)), (x - r, y - r, x + r, y + r))
    return field


def test_planted_near_copies_are_found_and_distinct_pictures_are_not():
    rng = np.random.default_rng(0)
    originals = [photo(rng) for _ in range(80)]
    copies = [altered_copy(originals[i], rng) for i in range(0, 80, 10)]  # 8 copies of images 0, 10, ..., 70
    assert sum(c.size != (120, 120) for c in copies) >= 6  # resized and cropped: not the same pixels
    images = torch.stack([torch.from_numpy(preprocess(im, 32, 1)) for im in originals + copies])
    pairs = near_duplicate_pairs(images)
    assert {(i, j) for i, j, _ in pairs} == {(10 * k, 80 + k) for k in range(8)}
    assert all(0.9 < s <= 1.0 for _, _, s in pairs)


def test_flat_images_match_nothing_and_groups_join_chains():
    flat = torch.full((3, 1, 32, 32), 128, dtype=torch.uint8)  # no contrast: no descriptor, not "copies"
    assert near_duplicate_pairs(flat) == []
    assert connected_groups([(0, 3, 1.0), (3, 5, 1.0), (1, 2, 1.0)], 6) == [[0, 3, 5], [1, 2]]
    assert cross_and_within([[0, 3, 5], [1, 2]], 4) == (1, 1)  # 0 and 3 in the first part, 5 in the second


def test_thumbnails_are_grayscale_at_32_from_any_size():
    rgb = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    rgb[:, 0, :32] = 255  # red top half: gray 85 there
    t = thumbnails(rgb)
    assert t.shape == (2, 1, 32, 32) and t.dtype == torch.uint8
    assert t[0, 0, :16].unique().tolist() == [85] and t[0, 0, 16:].unique().tolist() == [0]


@pytest.fixture
def leaky(tmp_path):
    """train/val folders of distinct pictures, with an altered copy of a val image in train (leakage) and an
    altered copy of a train image in train (a near-copy within a split)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    for split, n in (("train", 12), ("val", 4)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                photo(rng).save(root / split / cls / f"{cls}{i}.png")
    altered_copy(Image.open(root / "val" / "dog" / "dog1.png"), rng).save(root / "train" / "dog" / "copy_of_val.jpg")
    altered_copy(Image.open(root / "train" / "cat" / "cat3.png"), rng).save(root / "train" / "cat" / "again.jpg")
    return root


def test_check_data_names_near_copies_across_splits_and_counts_those_within(leaky, tmp_path, capsys):
    out = tmp_path / "out"
    assert check_data.main([str(leaky), "--json", "--workers", "0", "--out-dir", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["near_leaks"] == [["train/dog/copy_of_val.jpg", "val/dog/dog1.png"]]
    assert report["near_duplicates"] == [["train/cat/again.jpg", "train/cat/cat3.png"]]
    assert report["leaks"] == [] and report["duplicates"] == []
    assert (out / "near_leaks.png").stat().st_size > 0
    assert any("near-copies" in w and "span splits" in w for w in report["warnings"])
    assert check_data.main([str(leaky), "--workers", "0", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train/dog/copy_of_val.jpg ~ val/dog/dog1.png" in text
    assert "near-copies within a split: 1 group(s) of 2 images" in text


def test_training_start_up_check_counts_near_copies(leaky):
    train, val = (load_folder(leaky / s, ["cat", "dog"], 64) for s in ("train", "val"))
    check = start_up_check(train.near_descriptors(), val.near_descriptors())
    assert check.found.end is End.DONE and check.n_train == len(train.labels)
    assert check.counts() == (1, 1, 0)  # one group within train or val, one across them, none not judged
    late = start_up_check(train.near_descriptors(), val.near_descriptors(), seconds=0)
    assert late.found.end is End.TIME_CAP and late.counts() == (0, 0, len(train.labels) + len(val.labels))


def test_large_chains_are_look_alikes_not_copies(tmp_path, capsys):
    groups = [list(range(12)), [12, 13]]
    assert copy_groups(groups) == ([[12, 13]], 12)
    # make_synthetic's pictures are one bright shape on dark noise: in 8x8 thumbnails they chain into one group
    data = make_synthetic(tmp_path / "data", 40, size=64, seed=0)
    assert check_data.main([str(data), "--json", "--workers", "0", "--out-dir", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["near_leaks"] == [] and report["near_duplicates"] == [] and report["near_lookalike_images"] > 10


def lookalikes(n: int, seed: int = 0) -> torch.Tensor:
    """n uint8 32x32 pictures that all look alike at 8x8, as X-rays, scans or product shots do: one bright square
    of a random place and size on dark noise."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 90, (n, 1, 32, 32), generator=g, dtype=torch.uint8)
    centre, half = torch.randint(6, 14, (n, 2), generator=g), torch.randint(5, 9, (n, 1, 1), generator=g)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    inside = ((yy - centre[:, :1, None]).abs() < half) & ((xx - centre[:, 1:, None]).abs() < half)
    return torch.where(inside[:, None], torch.tensor(220, dtype=torch.uint8), noise)


def test_a_look_alike_set_is_searched_in_bounded_memory_and_pairs_and_not_judged():
    n = 4000
    desc = near_duplicates.descriptors(lookalikes(n))
    tracemalloc.start()
    found = near_duplicates.find_near_copies(desc)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < near_duplicates.WORK_BYTES_PER_IMAGE * n + (8 << 20)  # the bound the module's docstring states
    assert found.examined <= near_duplicates.PAIRS_PER_IMAGE * n
    groups, not_judged = found.groups()
    assert found.end is End.DONE and not_judged > 0.9 * n and sum(map(len, groups)) < 0.01 * n


def test_the_search_stops_at_its_pair_cap_and_at_its_deadline_and_then_judges_nothing(monkeypatch):
    desc = near_duplicates.descriptors(lookalikes(500))
    monkeypatch.setattr(near_duplicates, "PAIRS_PER_IMAGE", 2)
    capped = near_duplicates.find_near_copies(desc)
    assert capped.end is End.PAIR_CAP and capped.examined == 2 * 500 and capped.groups() == ([], 500)
    monkeypatch.undo()
    late = near_duplicates.find_near_copies(desc, deadline=time.monotonic() - 1)
    assert late.end is End.TIME_CAP and late.groups() == ([], 500)
    assert late.examined < near_duplicates.find_near_copies(desc).examined


def test_joined_reads_two_sources_as_one_without_copying():
    a, b = torch.arange(12).view(6, 2), torch.arange(100, 108).view(4, 2)
    joined = Joined(a, RowView(b, torch.tensor([3, 2, 1, 0])))
    whole = torch.cat([a, b.flip(0)])
    assert len(joined) == 10 and torch.equal(joined[0:10], whole) and torch.equal(joined[4:8], whole[4:8])
    assert torch.equal(joined[torch.tensor([9, 0, 6, 5])], whole[[9, 0, 6, 5]])


@pytest.mark.parametrize("n", [0, 1, 7, 3000])
def test_buckets_are_the_distinct_keys_and_images_of_a_table_in_order(n):
    """One table's buckets, built in place a block at a time, against a plain set of (key, image)."""
    keys = np.random.default_rng(n).integers(-1, 40, n).astype(np.int32)  # -1: a flat image's entry
    bucket_keys, images = near_duplicates._buckets(keys, block=100)
    expected = sorted({(int(k), i // near_duplicates.VARIANTS) for i, k in enumerate(keys) if k >= 0})
    assert list(zip(bucket_keys.tolist(), images.tolist())) == expected


def test_altered_copies_of_real_photos_are_found_with_no_wrong_pair():
    """Kaggle photos (skipped without ../shared): of 30 altered copies among 400 val photos, at least 29 are matched
    to their original, and none to anything else."""
    from conftest import SHARED

    folder = SHARED / "data" / "catdog" / "val" / "dog"
    if not folder.is_dir():
        pytest.skip("../shared/data is not present")
    paths = sorted(folder.glob("*.jpg"))[:400]
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(paths), 30, replace=False).tolist()
    images = [Image.open(p) for p in paths] + [altered_copy(Image.open(paths[i]), rng) for i in chosen]
    pairs = near_duplicate_pairs(torch.stack([torch.from_numpy(preprocess(im, 32, 1)) for im in images]))
    with_copy = {(i, j) for i, j, _ in pairs if j >= 400}
    right = {(orig, 400 + k) for k, orig in enumerate(chosen)}
    assert with_copy <= right and len(with_copy) >= 29


def rss_anon() -> int:
    """This process's own memory (RssAnon), in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status (not Linux)")


@pytest.mark.slow
def test_the_search_adds_at_most_its_bound_of_memory_to_the_process():
    """Measured as the process's own memory grows, torch's allocations included (tracemalloc sees only numpy's):
    100,000 images, read as train.py reads train and val, searched through all the tables, add at most the
    stated bytes per image and fixed blocks."""
    n = 100_000
    desc = torch.nn.functional.normalize(torch.randn(n, near_duplicates.VARIANTS, 64), dim=-1).half()
    before, peak, done = rss_anon(), [0], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_anon())
    sampler = threading.Thread(target=sample)
    sampler.start()
    found = near_duplicates.find_near_copies(Joined(desc[:80_000], desc[80_000:]))  # train and val, as train.py
    done.set()
    sampler.join()
    assert found.end is End.DONE and found.examined < 5 * n  # random descriptors: few candidates, all tables
    assert peak[0] - before < near_duplicates.WORK_BYTES_PER_IMAGE * n + (100 << 20)


@pytest.mark.parametrize("count", [0, 3, 4, 9])
def test_descriptor_blocks_are_the_descriptors_of_the_images_in_order(count):
    images = lookalikes(count, seed=count) if count else torch.zeros(0, 1, 32, 32, dtype=torch.uint8)
    blocks = near_duplicates.DescriptorBlocks(block=4)
    for image in images.numpy():
        blocks.add(image)
    assert torch.equal(blocks.tensor(), near_duplicates.descriptors(images))
    assert blocks.tensor().shape == (count, near_duplicates.VARIANTS, 64)
