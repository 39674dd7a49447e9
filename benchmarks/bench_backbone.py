"""The input size of a frozen pretrained backbone, chosen by accuracy per second on train photos alone: for each
size, a seeded sample of DATA's train photos is decoded at that size, its pooled features (each photo and its
mirror) computed, and the head trained on part of them (train.py's HeadTrainer, its defaults) and measured on the
rest. Val is never read, so the size it picks can then be reported on val.

Usage:
    python -m benchmarks.bench_backbone --data ../shared/data/catdog --sizes 160 192 224 --photos 2000
    python -m benchmarks.bench_backbone --data D --arch efficientnet_lite0 --held-out 0.25 --seed 0

Prints a Markdown table (size, held-out accuracy, features per second: photo and mirror, decoding excluded), the
command, commit, date and machine, then the same figures as one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from config import BACKBONE_INPUT, TrainConfig
from core.common import markdown_source, provenance
from dataset import load_items
from loading.layout import read_layout
from model import backbone_weights, build_model, input_normalization
from prediction.predict import pooled_features
from training.features import HeadTrainer


def held_out_accuracy(feats: torch.Tensor, labels: torch.Tensor, held_out: torch.Tensor, cfg: TrainConfig,
                      model: torch.nn.Module) -> float:
    """The head trained on the photos not held out, for cfg.epochs; its best accuracy on the held-out ones."""
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out] = False
    trainer = HeadTrainer(model, feats[keep], labels[keep], feats[held_out], labels[held_out], cfg)
    for _ in range(cfg.epochs):
        trainer.epoch()
    return trainer.best_acc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--arch", default="efficientnet_lite0", choices=list(BACKBONE_INPUT))
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224])
    parser.add_argument("--photos", type=int, default=2000, help="train photos sampled (stratified by chance)")
    parser.add_argument("--held-out", type=float, default=0.25, help="share of them the head is measured on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    lay = read_layout(args.data, need="train")
    items = lay.items["train"]
    pick = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed))[:args.photos]
    items = [items[i] for i in pick.tolist()]
    held_out = torch.arange(len(items))[:round(args.held_out * len(items))]
    state = backbone_weights(args.arch)
    rows = []
    for size in args.sizes:
        cfg = dataclasses.replace(TrainConfig(), arch=args.arch, image_size=size, channels=3, pretrained=True)
        split = load_items(items, lay.classes, f"train at {size} px", size, 3, "", args.workers)
        model = build_model(args.arch, len(lay.classes), 3, pretrained_state=state)
        started = time.time()
        feats = pooled_features(model, split.images, normalization=input_normalization(True, 3, args.arch),
                                batch_size=32)
        seconds = time.time() - started
        acc = held_out_accuracy(feats, split.labels, held_out, cfg, model)
        rows.append({"size": size, "held_out_accuracy": round(acc, 4), "held_out": len(held_out),
                     "trained_on": len(items) - len(held_out), "images_per_s": round(len(items) / seconds, 1)})
    prov = provenance("benchmarks.bench_backbone", argv if argv is not None else sys.argv[1:])
    print("| input | held-out train photos right | photos/s (photo and mirror) |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} px | {100 * r['held_out_accuracy']:.2f}% of {r['held_out']} | {r['images_per_s']:.1f} |")
    print(f"\n{markdown_source(prov)}\n")
    print(json.dumps({**prov, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
