"""The carve: val (and test) split off a dataset's train images, stratified by class (by every tag, for images
with several), the same for the same labels and seed.

Usage (from loading/layout.py and loading/table.py):
    parts = carve_indices(labels, [0.7, 0.2, 0.1], seed=0)              # sorted index lists, one per ratio
    parts = iterative_stratification([{"sea", "sky"}, {"dog"}], [0.8, 0.2], seed=0)   # several tags per image
    splits = carve(items, {"val": 0.2}, seed=0)                          # {"train": the rest, "val": ...}
    splits = carve(items, {"val": 0.2}, seed=0, tags=True)               # labels "sea|sky": tags joined by TAG_SEP
"""
from __future__ import annotations

import random
from collections import defaultdict

TAG_SEP = "|"  # joins an image's tags into the one label string a layout item holds


def split_tags(label: str) -> set[str]:
    """The tags of a multi-label item's label string ('' or TAG_SEP alone: none)."""
    return {t for t in label.split(TAG_SEP) if t}


def narrow_tags(label: str, keep: set[str]) -> str:
    """An item's label with only the tags in `keep`: '' (the item is dropped) when it had tags and none is kept;
    TAG_SEP alone, an image with none of the tags, stays so."""
    tags = split_tags(label)
    return TAG_SEP.join(sorted(tags & keep)) if tags else label


def carve_indices(labels: list, ratios: list[float], seed: int) -> list[list[int]]:
    """Sorted index lists, one per ratio (e.g. train/val/test = 0.7/0.2/0.1), each class divided in those
    ratios: counts rounded by largest remainder so each index is used once, and a split with a share gets at
    least one image of every class that has more than one. Same labels and seed, same lists."""
    rng = random.Random(seed)
    by_class = defaultdict(list)
    for i, c in enumerate(labels):
        by_class[c].append(i)
    parts: list[list[int]] = [[] for _ in ratios]
    for c in sorted(by_class):
        idx = by_class[c]
        rng.shuffle(idx)
        exact = [len(idx) * r / sum(ratios) for r in ratios]
        counts = [int(e) for e in exact]
        for k in sorted(range(len(ratios)), key=lambda k: (counts[k] - exact[k], k))[:len(idx) - sum(counts)]:
            counts[k] += 1
        for k, r in enumerate(ratios):
            largest = max(range(len(counts)), key=lambda j: counts[j])
            if r > 0 and counts[k] == 0 and counts[largest] > 1:
                counts[k], counts[largest] = 1, counts[largest] - 1
        start = 0
        for k, n in enumerate(counts):
            parts[k] += idx[start:start + n]
            start += n
    return [sorted(p) for p in parts]


def iterative_stratification(tag_sets: list[set[str]], ratios: list[float], seed: int) -> list[list[int]]:
    """Sorted index lists, one per ratio, for images with several tags each (Sechidis et al. 2011): the rarest tag
    still to place goes first, each of its images to the part that most lacks that tag (then the part that most
    lacks images; ties by chance), so every tag is spread in the ratios as far as its count allows. Images with no
    tag go last, by the parts' lack of images. Same tags and seed, same lists."""
    rng = random.Random(seed)
    total = sum(ratios)
    order = list(range(len(tag_sets)))
    rng.shuffle(order)
    wanted_images = [len(tag_sets) * r / total for r in ratios]
    counts: dict[str, int] = defaultdict(int)
    for tags in tag_sets:
        for t in tags:
            counts[t] += 1
    wanted = {t: [n * r / total for r in ratios] for t, n in counts.items()}
    left = {t: [i for i in order if t in tag_sets[i]] for t in counts}
    placed: set[int] = set()
    parts: list[list[int]] = [[] for _ in ratios]

    def place(i: int, need: list[float]) -> None:
        best = max(range(len(ratios)), key=lambda k: (need[k], wanted_images[k], rng.random()))
        parts[best].append(i)
        placed.add(i)
        wanted_images[best] -= 1
        for t in tag_sets[i]:
            wanted[t][best] -= 1

    while True:
        open_tags = [t for t in counts if any(i not in placed for i in left[t])]
        if not open_tags:
            break
        rarest = min(open_tags, key=lambda t: (sum(i not in placed for i in left[t]), t))
        for i in left[rarest]:
            if i not in placed:
                place(i, wanted[rarest])
    for i in order:
        if i not in placed:
            place(i, list(wanted_images))
    return [sorted(p) for p in parts]


def carve(items: list[tuple[str, str]], fractions: dict[str, float], seed: int, tags: bool = False
          ) -> dict[str, list[tuple[str, str]]]:
    """{'train': the rest, and one list per fraction} from (path, class) items, stratified by class; with `tags`,
    each label is a set of tags joined by TAG_SEP, stratified tag by tag (iterative_stratification)."""
    ratios = [1 - sum(fractions.values()), *fractions.values()]
    if tags:
        parts = iterative_stratification([split_tags(c) for _, c in items], ratios, seed)
    else:
        parts = carve_indices([c for _, c in items], ratios, seed)
    return {name: [items[i] for i in idx] for name, idx in zip(["train", *fractions], parts)}
