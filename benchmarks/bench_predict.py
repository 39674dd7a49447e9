"""Prediction on a CPU, measured on real photos: INT8 ONNX against float ONNX (val accuracy, file size, latency of
one image and throughput of 32), and the Python API's latency against the functions under it.

Usage:
    python -m benchmarks.bench_predict --checkpoint models/best_model.pth          # the data the model trained on
    python -m benchmarks.bench_predict --checkpoint M --data ../shared/data/catdog --threads 1 --rounds 20

Runs `export.py --format onnx onnx-int8` (into a temporary folder) as a user would, then, on the val split (read as
training read it; the INT8 calibration never sees it):
- accuracy of PyTorch, float ONNX and INT8 through prediction.Classifier (what inference.py, serve.py and your
  code get), and the share of labels INT8 and float agree on;
- the files' sizes: export.py's float OUT.onnx and OUT.int8.onnx;
- the network alone (the graph the runtimes run: logits, penultimate feature, stage statistics) on 1 image and
  on 32, and the whole prediction through the API (mirror TTA and the novelty score as the checkpoint says);
- the API's Classifier.predict(path) against decode_image + predict_images, the functions it calls.
Each timing alternates the contenders in --rounds short rounds and takes each one's median, so that the
machine's drift falls on both; onnxruntime uses --threads cores per call (serve.py's --torch-threads, default 1).
Prints Markdown tables with the command, commit, date and machine, then one JSON object with the same figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from core.common import figures_report, markdown_table, reports_user_errors, run_script
from loading.decode import decode_image
from prediction.checkpoint import load_checkpoint
from prediction.classifier import Classifier
from prediction.predict import OnnxFeatures, export_features, normalize, predict_images
from prediction.quantize import int8_images

BURST_SECONDS = 0.25  # each contender's share of a round


def per_call_ms(contenders: dict, rounds: int) -> dict[str, float]:
    """{name: median milliseconds per call} of the zero-argument callables, alternated in `rounds` rounds of
    about BURST_SECONDS each."""
    for fn in contenders.values():
        fn()  # warm-up: first calls allocate
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < BURST_SECONDS:
                fn()
                calls += 1
            times[name].append(1000 * (time.perf_counter() - start) / calls)
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def accuracies(classifiers: dict[str, Classifier], images, labels: torch.Tensor) -> dict:
    """Val accuracy of each classifier's labels, and INT8's agreement with float ONNX."""
    classes = next(iter(classifiers.values())).classes
    truth = [classes[k] for k in labels.tolist()]
    predicted = {}
    for name, clf in classifiers.items():
        predicted[name] = [p.label for i in range(0, len(images), 256)
                           for p in clf.predict_decoded(list(torch.as_tensor(images[i:i + 256])))]
    out = {f"{name}_accuracy": round(sum(p == t for p, t in zip(labels_, truth)) / len(truth), 4)
           for name, labels_ in predicted.items()}
    out["int8_agreement"] = round(sum(a == b for a, b in zip(predicted["onnx"], predicted["onnx-int8"]))
                                  / len(truth), 4)
    return {**out, "val_images": len(truth)}


def network_timings(ckpt: dict, float_graph: Path, int8_graph: Path, images, threads: int, rounds: int) -> dict:
    """Milliseconds per call of the float and INT8 graphs on 1 and on 32 normalized val images."""
    runtimes = {"onnx": OnnxFeatures(float_graph, threads), "onnx-int8": OnnxFeatures(int8_graph, threads)}
    batches = {n: normalize(torch.as_tensor(images[:n]), ckpt["normalization"]) for n in (1, 32)}
    return {n: per_call_ms({name: (lambda r=r, x=x: r(x)) for name, r in runtimes.items()}, rounds)
            for n, x in batches.items()}


def api_timings(classifiers: dict[str, Classifier], images, rounds: int) -> dict:
    """Milliseconds per Classifier.predict_decoded call on 1 and on 32 val images, per runtime."""
    decoded = {n: list(torch.as_tensor(images[:n])) for n in (1, 32)}
    return {n: per_call_ms({name: (lambda c=c, x=x: c.predict_decoded(x)) for name, c in classifiers.items()},
                           rounds) for n, x in decoded.items()}


def api_overhead(clf: Classifier, path: str, rounds: int) -> dict[str, float]:
    """Milliseconds per image: Classifier.predict(path) against the functions it calls (decode_image, then
    predict_images with the same model, runtime and facts)."""
    def direct():
        image = decode_image(path, clf.image_size, clf.channels)
        return predict_images(clf.model, clf.ckpt, [image], runtime=clf.onnx, facts=clf.facts)

    return per_call_ms({"api": lambda: clf.predict(path), "direct": direct}, rounds)


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Every figure of the benchmark, as one dict."""
    ckpt = load_checkpoint(args.checkpoint)
    out = work / "model"
    run_script("export.py", ["--checkpoint", args.checkpoint, "--format", "onnx", "onnx-int8", "--out", str(out),
                             "--int8-tolerance", "100", *(["--data", args.data] if args.data else [])])
    _, val = int8_images(ckpt, args.data, calibration=1)
    classifiers = {"torch": Classifier(ckpt, threads=args.threads),
                   "onnx": Classifier(ckpt, "onnx", threads=args.threads),
                   "onnx-int8": Classifier(ckpt, "onnx-int8", threads=args.threads,
                                           int8_model=Path(f"{out}.int8.onnx"))}
    result = {"accuracy": accuracies(classifiers, val.images, val.labels),
              "bytes": {"onnx": Path(f"{out}.onnx").stat().st_size,
                        "onnx-int8": Path(f"{out}.int8.onnx").stat().st_size}}
    float_graph = export_features(classifiers["torch"].model, ckpt["image_size"], ckpt["channels"],
                                  work / "features.onnx")
    result["network_ms"] = network_timings(ckpt, float_graph, Path(f"{out}.int8.onnx"), val.images, args.threads,
                                           args.rounds)
    del classifiers["torch"]
    result["api_ms"] = api_timings(classifiers, val.images, args.rounds)
    result["api_overhead_ms"] = api_overhead(classifiers["onnx"], val.paths[0], args.rounds)
    return result


def tables(r: dict) -> str:
    """The figures as Markdown tables."""
    acc, size = r["accuracy"], r["bytes"]
    lines = [markdown_table(["runtime", "val accuracy", "file"], [
        ["PyTorch (float)", f"{100 * acc['torch_accuracy']:.2f}%", ""],
        ["float ONNX", f"{100 * acc['onnx_accuracy']:.2f}%", f"{size['onnx'] / 1e6:.2f} MB"],
        ["INT8 ONNX", f"{100 * acc['onnx-int8_accuracy']:.2f}%", f"{size['onnx-int8'] / 1e6:.2f} MB "
         f"({size['onnx-int8'] / size['onnx']:.2f} of float)"]]),
        f"\nINT8 and float ONNX agree on {100 * acc['int8_agreement']:.2f}% of {acc['val_images']} val labels.\n"]
    rows = []
    for what, key in (("network alone", "network_ms"), ("prediction through the API", "api_ms")):
        for n in (1, 32):
            f, q = r[key][n]["onnx"], r[key][n]["onnx-int8"]
            rows.append([f"{what}, {n} image{'s' if n > 1 else ''}", f"{f:.2f} ms ({1000 * n / f:,.0f} images/s)",
                         f"{q:.2f} ms ({1000 * n / q:,.0f} images/s)", f"{f / q:.2f}x"])
    lines.append(markdown_table(["per call", "float ONNX", "INT8 ONNX", "INT8 speed-up"], rows))
    o = r["api_overhead_ms"]
    lines.append(f"\nOne image from its file, float ONNX: Classifier.predict {o['api']:.2f} ms, decode_image + "
                 f"predict_images {o['direct']:.2f} ms ({100 * (o['api'] / o['direct'] - 1):+.1f}%).")
    return "\n".join(lines)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/best_model.pth", help="checkpoint written by train.py")
    parser.add_argument("--data", help="dataset whose val split is measured and whose train images calibrate "
                        "(default: the one the model trained on)")
    parser.add_argument("--threads", type=int, default=1, help="cores per onnxruntime call (default: 1)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds each timing alternates in (default: 15)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        result = measure(args, Path(work))
    print(figures_report("benchmarks.bench_predict", argv, tables(result), result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
