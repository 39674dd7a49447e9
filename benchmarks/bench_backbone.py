"""The input size and the head's recipe of a frozen pretrained backbone, chosen on train photos alone: for each
size, a seeded sample of DATA's train photos is decoded at that size, its pooled features (each photo and its
mirror) computed, and for each weight decay and number of epochs the head trained on part of them (train.py's
HeadTrainer) and measured on the rest, after its last epoch (no epoch picked on them). Val is never read, so what
it picks can then be reported on val.

Usage:
    python -m benchmarks.bench_backbone --data ../shared/data/catdog --sizes 160 192 224 --photos 2000
    python -m benchmarks.bench_backbone --data D --sizes 224 --photos 10000 --weight-decays 0.05 5 --epochs 80 20

Prints a Markdown table (size, recipe, held-out accuracy, features per second: photo and mirror, decoding
excluded), the command, commit, date and machine, then the same figures as one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time

import torch

from config import BACKBONE_DEFAULTS, TrainConfig
from core.common import markdown_source, provenance
from dataset import load_items
from loading.layout import read_layout
from model import backbone_weights, build_model, input_normalization
from prediction.predict import pooled_features
from training.features import HeadTrainer


def held_out_accuracy(feats: torch.Tensor, labels: torch.Tensor, held_out: torch.Tensor, cfg: TrainConfig,
                      model: torch.nn.Module) -> float:
    """The head trained on the photos not held out, for cfg.epochs; its accuracy on the held-out ones after the
    last epoch."""
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out] = False
    trainer = HeadTrainer(model, feats[keep], labels[keep], feats[held_out], labels[held_out], cfg)
    return [trainer.epoch()[1]["acc"] for _ in range(cfg.epochs)][-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--arch", default="efficientnet_lite0", choices=list(BACKBONE_DEFAULTS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224])
    parser.add_argument("--photos", type=int, default=2000, help="train photos sampled (stratified by chance)")
    parser.add_argument("--held-out", type=float, default=0.25, help="share of them the head is measured on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[TrainConfig.weight_decay],
                        help="the head's AdamW weight decays to try")
    parser.add_argument("--epochs", type=int, nargs="+", default=[TrainConfig.epochs], help="the head's epochs to try")
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
        split = load_items(items, lay.classes, f"train at {size} px", size, 3, "", args.workers)
        model = build_model(args.arch, len(lay.classes), 3, pretrained_state=state)
        started = time.time()
        feats = pooled_features(model, split.images, normalization=input_normalization(True, 3, args.arch),
                                batch_size=32)
        seconds = time.time() - started
        for decay, epochs in itertools.product(args.weight_decays, args.epochs):
            cfg = dataclasses.replace(TrainConfig(), arch=args.arch, image_size=size, channels=3, pretrained=True,
                                      weight_decay=decay, epochs=epochs)
            acc = held_out_accuracy(feats, split.labels, held_out, cfg, model)
            rows.append({"size": size, "weight_decay": decay, "epochs": epochs, "held_out_accuracy": round(acc, 4),
                         "held_out": len(held_out), "trained_on": len(items) - len(held_out),
                         "images_per_s": round(len(items) / seconds, 1)})
    prov = provenance("benchmarks.bench_backbone", argv if argv is not None else sys.argv[1:])
    print("| input | head: weight decay, epochs | held-out train photos right | photos/s (photo and mirror) |\n"
          "|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['size']} px | {r['weight_decay']:g}, {r['epochs']} | {100 * r['held_out_accuracy']:.2f}% of "
              f"{r['held_out']} | {r['images_per_s']:.1f} |")
    print(f"\n{markdown_source(prov)}\n")
    print(json.dumps({**prov, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
