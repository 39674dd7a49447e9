"""Plots as PNG files: training curves, confusion matrices, image galleries, Grad-CAM overlays.

Usage (from other scripts):
    save_figure(plot_confusion_matrix(cm, class_names), Path("curves/confusion_matrix.png"))
    plot_history(history, Path("curves/training_curves.png"))

Each plot is a matplotlib Figure of its own (no pyplot state), so plotting needs no display and no backend.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure  # imported when plotting: matplotlib is slow to import
    return Figure(figsize=(width, height), layout=layout)


def _show_image(ax, image: torch.Tensor) -> None:
    """A uint8 (C, H, W) image on an axis, grayscale or RGB, without ticks."""
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def plot_confusion_matrix(cm: torch.Tensor, class_names: list[str]):
    """Counts and row-normalized (recall per true class) matrices side by side.

    The figure grows with the number of classes and the font shrinks, so 40 classes stay readable;
    numbers are written in the cells only while they fit (up to 15 classes).
    """
    k = len(class_names)
    side = min(4.0 + 0.25 * k, 16.0)
    font = max(5.0, min(10.0, 280.0 / k))
    fig = _figure(2 * side + 2, side + 1)
    axes = fig.subplots(1, 2)
    rows = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)
    for ax, values, title, fmt in ((axes[0], cm.double(), "counts", "{:.0f}"),
                                   (axes[1], rows, "row-normalized (recall)", "{:.2f}")):
        im = ax.imshow(values.numpy(), cmap="Blues", vmin=0, vmax=max(values.max().item(), 1e-12))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(k), class_names, rotation=90, fontsize=font)
        ax.set_yticks(range(k), class_names, fontsize=font)
        if k <= 15:
            top = values.max().item()
            for i in range(k):
                for j in range(k):
                    v = values[i, j].item()
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=font,
                            color="white" if v > top / 2 else "black")
    return fig


def plot_gallery(images: torch.Tensor, captions: list[str], columns: int = 8):
    """A grid of uint8 (N, C, H, W) images with a caption above each."""
    n = max(1, len(images))
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = _figure(1.9 * cols, 2.5 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes:
        ax.axis("off")
    for ax, image, caption in zip(axes, images, captions):
        _show_image(ax, image)
        ax.axis("on")
        ax.set_title(caption, fontsize=7)
    if len(images) == 0:
        axes[0].text(0.5, 0.5, "no images to show", ha="center", va="center")
    return fig


def plot_gradcam(image: torch.Tensor, cam: torch.Tensor, title: str):
    """The input beside the input overlaid with the Grad-CAM heatmap."""
    fig = _figure(6, 3.3)
    left, right = fig.subplots(1, 2)
    _show_image(left, image)
    left.set_title("input", fontsize=9)
    _show_image(right, image)
    right.imshow(cam.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    right.set_title(title, fontsize=9)
    return fig


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_history(history: list[dict], path: Path) -> None:
    """Loss, accuracy and learning-rate curves per epoch as one PNG."""
    ep = [h["epoch"] for h in history]
    fig = _figure(13, 3.6, layout=None)
    ax = fig.subplots(1, 3)
    for key, axis, title in (("loss", ax[0], "loss"), ("acc", ax[1], "accuracy")):
        axis.plot(ep, [h[f"train_{key}"] for h in history], "o-", label="train")
        axis.plot(ep, [h[f"val_{key}"] for h in history], "o-", label="val")
        axis.set_title(title)
        axis.legend()
    ax[2].plot(ep, [h["lr"] for h in history], "o-")
    ax[2].set_title("learning rate (end of epoch)")
    for axis in ax:
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_unknown_scores(known: torch.Tensor, unknown: torch.Tensor, threshold: float, score: str,
                        by_folder: dict[str, torch.Tensor] | None = None):
    """Histograms of the novelty scores of known and unknown images on shared bins, and the threshold: images
    to its right are answered 'unknown'. With `by_folder` ({folder: its unknown images' scores}, more than one),
    a second panel shows each folder's scores as a box beside the known images', with the share accepted."""
    groups = by_folder if by_folder and len(by_folder) > 1 else {}
    fig = _figure(7, 3.8 + 0.32 * (len(groups) + 1) if groups else 3.8)
    axes = fig.subplots(2, 1, height_ratios=[3.8, 0.32 * (len(groups) + 1)]) if groups else [fig.subplots()]
    ax = axes[0]
    both = torch.cat([known.double(), unknown.double()])
    # the axis ends at the 99th percentile (or the threshold); the few scores beyond it fall in the last bin
    low = min(both.min().item(), threshold)
    high = max(torch.quantile(both, 0.99).item() if len(both) else low, threshold)
    high = high if high > low else low + 1
    bins = torch.linspace(low, high, 41).numpy()
    for values, label in ((known, f"known ({len(known)})"), (unknown, f"unknown ({len(unknown)})")):
        ax.hist(values.double().clamp(max=high).numpy(), bins=bins, alpha=0.55, label=label,
                weights=torch.full((len(values),), 1 / max(1, len(values)), dtype=torch.float64).numpy())
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel(f"novelty score ({score}; higher = less like any known class)")
    ax.set_ylabel("share of images")
    ax.legend()
    if groups:
        box = axes[1]
        values = [known.double().numpy()] + [v.double().numpy() for v in groups.values()]
        labels = ["known"] + [f"{g} ({(v.double() <= threshold).double().mean().item():.0%} accepted)"
                              for g, v in groups.items()]
        box.boxplot(values[::-1], vert=False, tick_labels=labels[::-1], showfliers=False, widths=0.6)
        box.axvline(threshold, color="black", linestyle="--")
        box.set_xlim(ax.get_xlim())
        box.set_xlabel("novelty score by folder of the unknown set")
    return fig


def plot_pr_curves(probs: torch.Tensor, targets: torch.Tensor, tags: list[str], aps: list[float], columns: int = 4):
    """One precision-recall curve per tag (probs and targets (N, T)), each titled with its AP and support."""
    n = len(tags)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = _figure(3.0 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[n:]:
        ax.axis("off")
    for t, ax in enumerate(axes[:n]):
        hits = targets[torch.argsort(probs[:, t], descending=True, stable=True), t].float()
        support = int(hits.sum())
        if support:
            found = hits.cumsum(0)
            ax.plot((found / support).numpy(), (found / torch.arange(1, len(hits) + 1)).numpy())
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.set_title(f"{tags[t]}: AP {aps[t]:.2f} ({support} images)", fontsize=8)
    return fig
