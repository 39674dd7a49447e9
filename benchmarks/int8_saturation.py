"""What an INT8 file would answer on an x86 CPU without VNNI (AVX2 only), measured on any CPU: the first
convolution's uint8 x int8 products summed in pairs into int16 and clipped at 32,767, as onnxruntime's AVX2 kernel
does, with the file's own scales and integer weights; the rest of the network in float. Against the float model on
the val split: labels, known/unknown verdicts and accuracy. Only resnet_small (its stem's first convolution, then its
BatchNorm) is emulated.

Usage:
    python -m benchmarks.int8_saturation --checkpoint M --int8 M.int8.onnx --data ../shared/data/catdog
    python -m benchmarks.int8_saturation --checkpoint M --int8 M.int8.onnx --no-clip   # exact int32 sums

Where the sums cannot pass 32,767 (7-bit weights: 2 x 255 x 64) the clipped and exact answers are the same.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from core.common import markdown_source, provenance
from prediction.checkpoint import load_checkpoint, model_from_checkpoint
from prediction.predict import predict_images
from prediction.quantize import int8_images

INT16_MAX = 32767


def first_conv_quantization(path: str) -> dict:
    """The input's scale and zero point, the integer weights (O, C, k, k), their per-channel scales and the bias
    (BatchNorm folded in) of the INT8 file's first Conv."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    x, w, b = (producer[name] for name in conv.input[:3])
    return {"x_scale": float(stored[x.input[1]]), "x_zero": int(stored[x.input[2]]),
            "weights": torch.from_numpy(stored[w.input[0]].astype(np.float32)),
            "w_scale": torch.from_numpy(stored[w.input[1]].astype(np.float32)),
            "bias": torch.from_numpy((stored[b.input[0]] * stored[b.input[1]]).astype(np.float32))}


def pair_sums(patches: torch.Tensor, weights: torch.Tensor, clip: bool) -> torch.Tensor:
    """sum_k (a_2k w_2k + a_2k+1 w_2k+1) over the patches (N, K, L) for each weight row (O, K): each pair's sum
    clipped to int16 when `clip` (the AVX2 kernel), exact otherwise."""
    if patches.shape[1] % 2:
        patches, weights = F.pad(patches, (0, 0, 0, 1)), F.pad(weights, (0, 1))
    products = patches[:, None] * weights[None, :, :, None]                     # (N, O, K, L)
    pairs = products[:, :, 0::2] + products[:, :, 1::2]
    return (pairs.clamp(-INT16_MAX - 1, INT16_MAX) if clip else pairs).sum(2)


def saturating_hook(model: torch.nn.Module, q: dict, clip: bool):
    """A forward hook for resnet_small's first convolution: its output as the INT8 kernel computes it, BatchNorm
    folded (as in the file), then unfolded again, since the model applies its BatchNorm next."""
    conv, bn = model.stem[0], model.stem[1]

    def hook(module, inputs, output):
        xq = torch.clamp(torch.round(inputs[0] / q["x_scale"]) + q["x_zero"], 0, 255)
        xq = F.pad(xq, [conv.padding[1]] * 2 + [conv.padding[0]] * 2, value=q["x_zero"])
        patches = F.unfold(xq, conv.kernel_size, stride=conv.stride)           # (N, C*k*k, L)
        n, k, cells = patches.shape
        c = conv.in_channels
        patches = patches.view(n, c, -1, cells).transpose(1, 2).reshape(n, k, cells)  # channels last, as onnxruntime
        w = q["weights"].view(len(q["weights"]), c, -1).transpose(1, 2).reshape(len(q["weights"]), k)
        acc = pair_sums(patches, w, clip) - q["x_zero"] * w.sum(1)[None, :, None]
        folded = (acc * (q["x_scale"] * q["w_scale"])[None, :, None] + q["bias"][None, :, None]).view_as(output)
        per_channel = (lambda t: t[None, :, None, None])
        return ((folded - per_channel(bn.bias)) * per_channel(torch.sqrt(bn.running_var + bn.eps))
                / per_channel(bn.weight) + per_channel(bn.running_mean))
    return conv.register_forward_hook(hook)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--int8", required=True, help="the INT8 file export.py wrote from that checkpoint")
    parser.add_argument("--data", default=None, help="dataset whose val split is measured (default: the trained one)")
    parser.add_argument("--no-clip", action="store_true", help="exact sums: what a VNNI CPU computes")
    args = parser.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt)
    if ckpt["config"].get("arch", "resnet_small") != "resnet_small":
        parser.error("only resnet_small's first convolution is emulated")
    _, val = int8_images(ckpt, args.data, 1)
    images = list(torch.as_tensor(val.images))
    reference = predict_images(model, ckpt, images)
    with torch.no_grad():
        handle = saturating_hook(model, first_conv_quantization(args.int8), clip=not args.no_clip)
        try:
            emulated = predict_images(model, ckpt, images)
        finally:
            handle.remove()
    classes = list(ckpt["classes"])
    truth = [classes[k] for k in val.labels.tolist()]
    n = len(truth)
    share = (lambda same: f"{100 * sum(same) / n:.1f}%")
    print(f"first convolution {'exact' if args.no_clip else 'clipped to int16 pair sums (AVX2)'}, on {n} val images: "
          f"labels agree with float {share(a.label == b.label for a, b in zip(reference, emulated))}, known/unknown "
          f"verdicts {share(a.known == b.known for a, b in zip(reference, emulated))}; accuracy "
          f"{share(b.label == t for b, t in zip(emulated, truth))} vs "
          f"{share(a.label == t for a, t in zip(reference, truth))}")
    print(markdown_source(provenance("benchmarks.int8_saturation", argv if argv is not None else sys.argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
