"""The memory-mapped cache (cache.py) through load_split: reuse, appends, damage, compaction, and memory."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from benchmarks.bench import synthetic_set
from config import TrainConfig
from core.common import UserError
from dataset import RowView, load_items
from loading import cache, decode, near_duplicates
from loading.layout import read_layout
from loading.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def split_dir(tmp_path):
    return make_synthetic(tmp_path / "d", 6, size=24, splits=("train",)) / "train"


@pytest.fixture
def decoded(monkeypatch):
    """The lists of paths load_split sends to the decoder, call by call."""
    calls = []
    real = decode.decode_files
    monkeypatch.setattr(dataset, "decode_files", lambda paths, *a, **k: calls.append(list(paths)) or real(paths, *a, **k))
    return calls


def load(split_dir, cache_dir, size=16, items=None):
    """split_dir/<class>/* (or these items of it) decoded as train.py decodes a split."""
    lay = read_layout(split_dir, val_fraction=0)
    return load_items(lay.items["train"] if items is None else items, lay.classes, "train", size, 1,
                      str(cache_dir), 0)


def pixels(split) -> torch.Tensor:
    return split.images[torch.arange(len(split.images))]


def by_path(split) -> dict:
    return {p: pixels(split)[i] for i, p in enumerate(split.paths)}


def mapping_of(address: int) -> tuple[str, str]:
    """(file, permissions) of the memory mapping holding `address`, from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[-1] if len(fields) > 5 else "", fields[1]
    return "", ""


def files(cache_dir, pattern):
    """The cache's files that match, the arrays derived from the pixel arrays (*.near.npy) left out."""
    return sorted(p for p in Path(cache_dir).glob(pattern) if not p.name.endswith(".near.npy"))


def derived(cache_dir):
    return sorted(Path(cache_dir).glob("*.near.npy"))


def test_round_trip_equals_a_fresh_decode_and_is_a_read_only_map(split_dir, tmp_path, decoded):
    first = load(split_dir, tmp_path / "c")
    fresh = load(split_dir, "")
    again = load(split_dir, tmp_path / "c")
    assert len(decoded) == 2  # the cached load decoded nothing
    for s in (first, again):
        assert s.paths == fresh.paths and torch.equal(s.labels, fresh.labels)
        assert torch.equal(pixels(s), fresh.images) and s.images.dtype == torch.uint8
    [npy] = files(tmp_path / "c", "train-16px-1ch-*.npy")  # image size and channels in the name
    assert isinstance(again.images, torch.Tensor) and mapping_of(again.images.data_ptr()) == (str(npy), "r--s")
    assert np.array_equal(np.load(npy, mmap_mode="r"), fresh.images.numpy())


def test_forgetting_a_folder_deletes_its_files_alone(split_dir, tmp_path, decoded):
    load(split_dir, tmp_path / "c")
    load(split_dir, tmp_path / "c", size=8)
    kept = files(tmp_path / "c", "train-8px-*")
    assert cache.forget_folder(tmp_path / "c", split_dir, 16, 1) >= 2  # its arrays and index
    assert not list(Path(tmp_path / "c").glob("train-16px-*")) and files(tmp_path / "c", "train-8px-*") == kept
    load(split_dir, tmp_path / "c")
    assert len(decoded) == 3  # decoded at 16 px, at 8 px, then at 16 px again


def test_new_files_are_the_only_ones_decoded_and_are_appended(split_dir, tmp_path, decoded):
    first = load(split_dir, tmp_path / "c")
    [npy] = files(tmp_path / "c", "*.npy")
    added = [split_dir / "cat" / "new_a.png", split_dir / "dog" / "new_b.png"]
    for i, p in enumerate(added):
        Image.new("L", (30, 30), 40 + 100 * i).save(p)
    second = load(split_dir, tmp_path / "c")
    assert decoded[1] == sorted(str(p) for p in added)
    assert files(tmp_path / "c", "*.npy") == [npy]  # appended in place: the same generation
    assert np.load(npy, mmap_mode="r").shape[0] == len(first.paths) + 2
    assert isinstance(second.images, RowView)  # the new rows sit at the end, out of path order
    old, new = by_path(first), by_path(second)
    assert all(torch.equal(new[p], old[p]) for p in old)
    assert new[str(added[0])].unique().tolist() == [40] and new[str(added[1])].unique().tolist() == [140]


def test_a_changed_file_is_decoded_again(split_dir, tmp_path, decoded):
    first = load(split_dir, tmp_path / "c")
    changed = split_dir / "dog" / "dog_0002.png"
    Image.new("L", (40, 40), 255).save(changed)
    second = load(split_dir, tmp_path / "c")
    assert decoded[1] == [str(changed)]
    assert second.paths == first.paths
    row = second.paths.index(str(changed))
    assert second.images[row].min() == 255 and first.images[row].min() < 255
    others = [i for i, p in enumerate(second.paths) if p != str(changed)]
    assert torch.equal(second.images[others], first.images[others])
    assert torch.equal(pixels(second), load(split_dir, "").images)


def test_unreadable_files_are_remembered_with_their_reason(split_dir, tmp_path, decoded):
    (split_dir / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    first = load(split_dir, tmp_path / "c")
    second = load(split_dir, tmp_path / "c")
    assert len(decoded) == 1
    assert second.bad == first.bad == [(str(split_dir / "cat" / "broken.jpg"), first.bad[0][1])]
    assert "PIL" in first.bad[0][1] and str(split_dir / "cat" / "broken.jpg") not in second.paths


@pytest.mark.parametrize("damage", ["truncate array", "truncate index", "garbage index", "rows overwritten",
                                    "array missing"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(split_dir, tmp_path, decoded, damage):
    n = len(load(split_dir, tmp_path / "c").paths)  # (its map is not read again: the file gets damaged)
    [npy], [index] = files(tmp_path / "c", "*.npy"), files(tmp_path / "c", "*.index.pt")
    if damage == "truncate array":
        npy.write_bytes(npy.read_bytes()[: npy.stat().st_size - 100])
    elif damage == "truncate index":
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    elif damage == "garbage index":
        index.write_bytes(b"\0" * 300)
    elif damage == "rows overwritten":  # same length, different pixels at the end: the checksum catches it
        with open(npy, "r+b") as f:
            f.seek(-50, 2)
            f.write(b"\x07" * 50)
    else:
        npy.unlink()
    with pytest.warns(cache.CacheWarning, match="rebuilding"):
        second = load(split_dir, tmp_path / "c")
    assert len(decoded) == 2 and len(decoded[1]) == n  # every file decoded again
    assert torch.equal(pixels(second), load(split_dir, "").images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache is whole again
        load(split_dir, tmp_path / "c")
    assert len(files(tmp_path / "c", "*.npy")) == 1


def test_rows_written_after_the_index_by_a_killed_run_are_ignored(split_dir, tmp_path, decoded):
    load(split_dir, tmp_path / "c")
    [npy] = files(tmp_path / "c", "*.npy")
    with open(npy, "ab") as f:  # an append that died before its index was written
        f.write(b"\x09" * 16 * 16 * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = load(split_dir, tmp_path / "c")
    assert len(decoded) == 1 and torch.equal(pixels(second), load(split_dir, "").images)


def test_compaction_keeps_every_row_reachable(split_dir, tmp_path, decoded):
    first = load(split_dir, tmp_path / "c")
    [old_npy] = files(tmp_path / "c", "*.npy")
    paths = first.paths
    # Change 2 files (within the stale share: no compaction), then 4 more (past it) and remove 1.
    for i, p in enumerate(paths[:2]):
        Image.new("L", (40, 40), 10 + i).save(p)
    mid = load(split_dir, tmp_path / "c")
    assert files(tmp_path / "c", "*.npy") == [old_npy] and np.load(old_npy, mmap_mode="r").shape[0] == len(paths) + 2
    for i, p in enumerate(paths[2:6]):
        Image.new("L", (40, 40), 20 + i).save(p)
    Path(paths[-1]).unlink()
    last = load(split_dir, tmp_path / "c")
    [new_npy] = files(tmp_path / "c", "*.npy")
    assert new_npy != old_npy and not old_npy.exists()
    assert np.load(new_npy, mmap_mode="r").shape[0] == len(paths) - 1  # only live rows are left
    assert last.paths == paths[:-1]
    assert torch.equal(pixels(last), load(split_dir, "").images)
    assert [int(last.images[i].max()) for i in range(6)] == [10, 11, 20, 21, 22, 23]
    assert mid.paths == paths


def test_lists_under_one_folder_share_its_cache_and_keep_each_others_entries(split_dir, tmp_path, decoded):
    """train and the val carved from it: loading one never costs the other a decode; a file of the other list
    that is deleted drops out when the index is next rewritten."""
    items = read_layout(split_dir, val_fraction=0).items["train"]
    train, val = items[::2], items[1::2]
    load(split_dir, tmp_path / "c", items=train)
    load(split_dir, tmp_path / "c", items=val)
    assert decoded == [[p for p, _ in train], [p for p, _ in val]] and len(files(tmp_path / "c", "*.npy")) == 1
    again_train, again_val = load(split_dir, tmp_path / "c", items=train), load(split_dir, tmp_path / "c", items=val)
    assert len(decoded) == 2  # nothing decoded again
    assert torch.equal(pixels(again_val), load(split_dir, "", items=val).images)
    assert torch.equal(pixels(again_train), load(split_dir, "", items=train).images)
    gone = Path(val[0][0])
    gone.unlink()
    new = split_dir / "cat" / "new.png"
    Image.new("L", (24, 24), 7).save(new)
    load(split_dir, tmp_path / "c", items=[*train, (str(new), "cat")])  # rewrites the index: val is checked
    assert decoded[-1] == [str(new)]
    index = cache.read_index(files(tmp_path / "c", "*.index.pt")[0])
    assert str(gone.relative_to(split_dir)) not in index["names"] and "cat/new.png" in index["names"]
    assert len(index["names"]) == len(items)  # every train and val file but the gone one, and the new one
    n = len(decoded)
    assert len(load(split_dir, tmp_path / "c", items=val[1:]).paths) == len(val) - 1 and len(decoded) == n


def test_subsets_are_lazy_views_of_the_map(split_dir, tmp_path):
    whole = load(split_dir, tmp_path / "c")
    part = whole.subset(torch.tensor([5, 1, 3]))
    assert isinstance(part.images, RowView) and part.images.shape == (3, 1, 16, 16)
    assert torch.equal(part.images[torch.arange(3)], whole.images[[5, 1, 3]])
    again = part.subset(torch.tensor([2, 0]))
    assert torch.equal(again.images[[0, 1]], whole.images[[3, 5]]) and again.paths == [whole.paths[3], whole.paths[5]]


@pytest.mark.slow
def test_training_over_data_larger_than_the_memory_bound_keeps_anonymous_memory_under_it(tmp_path):
    """864 MiB of pixels, more than the bound of 768 MiB over what importing the libraries takes: the first run
    (decoding every image into the cache, then training) and a second one must keep RssAnon under that bound
    reading batches from the map; the same run with the whole set in RAM must not (so the bound is tight enough to
    mean something).
    A run's own model, batches, evaluation, plots, train_batch.png and novelty fit took 220-770 MiB of the bound
    on the 2-core machine: glibc's heap, not the pixels, makes that spread, and it failed the bound now and then.
    So the runs here fix MALLOC_MMAP_THRESHOLD_ (1 MiB): the same map run then peaked at 490-535 MiB over and over
    (the code before the inference-mode fix at 861-878 MiB), training 30% slower, which a 3 s run does not mind."""
    data = synthetic_set(tmp_path, 4608, 24, workers=2)
    side = 256  # 4,608 x 3 x 256 x 256 bytes = 864 MiB (train alone, the whole set in RAM: about 850)
    # The novelty score is fitted after training as usual, in feature batches of --batch-size (16) images, on a
    # sample of 128 train images (--novelty-max-images) read from the map as the whole set would be: the bound is
    # on the pixels, and the features of all 4,500 cost minutes on a 2-core CPU in fp32. --width 16, not less: in
    # fp32 (CPUs without bf16) PyTorch 2.15's channels-last training step at 256 px crashed at --width 8 and
    # stalled for over 13 minutes at --width 4, on 2 threads; at 16 a run takes seconds.
    base = ["--data", str(data), "--image-size", str(side), "--channels", "3", "--epochs", "1", "--batch-size", "16",
            "--width", "16", "--novelty-max-images", "128",
            "--workers", "2", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "m"),
            "--log-dir", str(tmp_path / "l"), "--curves-dir", str(tmp_path / "cv"), "--no-tta", "--ema-decay", "0",
            "--time-budget", "3", "--device", "cpu"]  # a CUDA context alone takes over 1 GB of RssAnon
    script = ("import json, sys, train\n"
              "from benchmarks import bench\n"
              "with bench.MemoryPeaks() as m:\n"
              "    train.main(sys.argv[1:])\n"
              "print(json.dumps(m.peak))\n")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}

    def peak_anon(placement: str) -> int:
        r = subprocess.run([sys.executable, "-c", script, *base, "--data-placement", placement], cwd=ROOT,
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"training images: {'batches read from the memory map' if placement == 'map' else 'whole set'}" \
            in r.stdout
        return json.loads(r.stdout.strip().splitlines()[-1])["RssAnon"]

    libraries = "import json, train, evaluate, matplotlib.pyplot, torch.utils.tensorboard; from benchmarks import bench"
    idle = subprocess.run([sys.executable, "-c", f"{libraries}; print(json.dumps(bench.MemoryPeaks.now()))"],
                          cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    bound = json.loads(idle.stdout)["RssAnon"] + 768 * 2**20
    assert not (tmp_path / "cache").exists()
    assert peak_anon("map") < bound  # decodes into the cache first
    assert peak_anon("map") < bound < peak_anon("device")


def test_training_reads_the_map_on_cpu_and_copies_it_only_when_asked(split_dir, tmp_path):
    split = load(split_dir, tmp_path / "c")
    view = split.subset(torch.tensor([4, 0, 2]))
    cpu = torch.device("cpu")
    same, placement = dataset.place_images(view.images, cpu, "auto")
    assert same is view.images and placement == dataset.Placement("map", "cpu", view.images.shape.numel())
    whole, placement = dataset.place_images(view.images, cpu, "device")
    assert isinstance(whole, torch.Tensor) and torch.equal(whole, split.images[[4, 0, 2]])
    assert placement.where == "device" and placement.device == "cpu"
    assert torch.equal(dataset.fetch_batch(view.images, torch.tensor([2, 1]), cpu), split.images[[2, 0]])
    with pytest.raises(UserError, match="--data-placement must be one of auto, device, map, not 'gpu'"):
        TrainConfig(data_placement="gpu")


def test_on_cuda_a_set_larger_than_half_the_free_memory_stays_in_the_map(split_dir, tmp_path, monkeypatch):
    images = load(split_dir, tmp_path / "c").images
    n_bytes = images.numel()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * n_bytes - 1, 10 * n_bytes))
    same, placement = dataset.place_images(images, torch.device("cuda"), "auto")
    assert same is images and placement == dataset.Placement("map", "cuda", n_bytes, 2 * n_bytes - 1)


def test_the_cache_folder_is_the_deepest_folder_holding_every_file():
    assert dataset.cache_folder(["/d/train/cat/1.jpg", "/d/train/dog/2.jpg", "/d/train/cat/x/3.jpg"]) == "/d/train"
    assert dataset.cache_folder(["/d/bc/1.jpg", "/d/bd/2.jpg"]) == "/d"  # a common prefix is not a folder
    assert dataset.cache_folder(["/d/train/cat/1.jpg"]) == "/d/train/cat"
    assert dataset.cache_folder(["/a/1.jpg", "/b/2.jpg"]) == "/"
    assert dataset.cache_folder(["1.jpg", "2.jpg"]) == "." and dataset.cache_folder(["d/1.jpg", "d/2.jpg"]) == "d"


def test_entries_are_matched_by_name_in_a_stored_run_or_one_by_one():
    known = ["v/1", "v/2", "t/1", "t/2", "t/3"]
    assert cache.match_entries(known, ["t/1", "t/2", "t/3"]).tolist() == [2, 3, 4]  # one stored run
    assert cache.match_entries(known, ["t/1", "t/3", "new"]).tolist() == [2, 4, -1]
    assert cache.match_entries(known, ["new", "v/2"]).tolist() == [-1, 1]
    assert cache.match_entries([], ["a"]).tolist() == [-1] and cache.match_entries(known, []).tolist() == []


def test_files_are_matched_to_the_index_by_name_size_and_mtime():
    """Reused: same name, size and mtime (an unreadable one keeps its reason); decoded: new or changed; the index's
    entries of files not in the list are the other lists'."""
    index = {"names": ["val/1", "a", "b", "bad", "c"], "sizes": np.array([9, 1, 2, 3, 4]),
             "mtimes": np.array([9, 10, 20, 30, 40]), "rows": np.array([0, 5, 6, -1, 7]),
             "reasons": ["", "", "", "PIL: broken", ""]}
    names = ["c", "a", "bad", "b", "new"]
    sizes, mtimes = np.array([4, 1, 3, 2, 8]), np.array([40, 10, 30, 21, 80])  # b's mtime changed
    rows, reasons, todo, other = cache.match_rows(index, names, sizes, mtimes)
    assert rows.tolist() == [7, 5, -1, -1, -1] and reasons == ["", "", "PIL: broken", "", ""]
    assert todo == [3, 4] and other.tolist() == [0]
    rows, reasons, todo, other = cache.match_rows(None, names, sizes, mtimes)
    assert rows.tolist() == [-1] * 5 and reasons == [""] * 5 and todo == [0, 1, 2, 3, 4] and other.tolist() == []
    assert cache.relative_names("/d/train/", ["/d/train/cat/1.jpg", "/e/2.jpg"]) == ["cat/1.jpg", "/e/2.jpg"]


# ---------------------------------------------------------------- arrays derived from the rows

def test_near_copy_descriptors_are_computed_once_per_row_and_follow_their_array(split_dir, tmp_path, monkeypatch):
    """Kept beside the pixel array, equal to a fresh computation, computed again only for rows added since, and
    gone with their generation when the array is compacted."""
    computed = []
    real = dataset.descriptors
    monkeypatch.setattr(dataset, "descriptors", lambda x: computed.append(len(x)) or real(x))
    first = load(split_dir, tmp_path / "c")
    n = len(first.paths)
    [npy], [near] = files(tmp_path / "c", "*.npy"), derived(tmp_path / "c")
    assert near.name == npy.name.removesuffix(".npy") + ".near.npy" and computed == [n]
    assert torch.equal(first.near[torch.arange(n)], real(first.images))
    assert first.near.dtype == torch.float16 and first.near.shape == (n, near_duplicates.VARIANTS, 64)
    load(split_dir, tmp_path / "c")
    assert computed == [n]  # a warm load computes nothing
    Image.new("L", (30, 30), 90).save(split_dir / "cat" / "added.png")
    grown = load(split_dir, tmp_path / "c")
    assert computed == [n, 1] and derived(tmp_path / "c") == [near]  # only the new row, appended in place
    added = grown.paths.index(str(split_dir / "cat" / "added.png"))
    assert torch.equal(grown.near[torch.tensor([added])], real(grown.images[torch.tensor([added])]))
    for i, p in enumerate(first.paths[:6]):  # past the stale share: a new generation
        Image.new("L", (40, 40), 20 + i).save(p)
    compacted = load(split_dir, tmp_path / "c")
    [new_npy], [new_near] = files(tmp_path / "c", "*.npy"), derived(tmp_path / "c")
    assert new_npy != npy and new_near.name == new_npy.name.removesuffix(".npy") + ".near.npy"
    assert torch.equal(compacted.near[torch.arange(n + 1)], real(compacted.images[torch.arange(n + 1)]))


def test_a_damaged_derived_array_is_computed_again(split_dir, tmp_path):
    first = load(split_dir, tmp_path / "c")
    [near] = derived(tmp_path / "c")
    near.write_bytes(near.read_bytes()[:200])  # cut short
    again = load(split_dir, tmp_path / "c")
    assert torch.equal(again.near[torch.arange(len(again.paths))], first.near[torch.arange(len(first.paths))])
