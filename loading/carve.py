"""The carve: val (and test) split off a dataset's train images, stratified by class, the same for the same
labels and seed.

Usage (from loading/layout.py):
    parts = carve_indices(labels, [0.7, 0.2, 0.1], seed=0)              # sorted index lists, one per ratio
    splits = carve(items, {"val": 0.2}, seed=0)                          # {"train": the rest, "val": ...}
"""
from __future__ import annotations

import random
from collections import defaultdict


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


def carve(items: list[tuple[str, str]], fractions: dict[str, float], seed: int) -> dict[str, list[tuple[str, str]]]:
    """{'train': the rest, and one list per fraction} from (path, class) items, stratified by class."""
    ratios = [1 - sum(fractions.values()), *fractions.values()]
    parts = carve_indices([c for _, c in items], ratios, seed)
    return {name: [items[i] for i in idx] for name, idx in zip(["train", *fractions], parts)}
