"""Generated images for tests and the demo, never for the figures a feature is judged by: a small learnable
cat/dog-like set (class k draws a shape with k+3 corners) and far-away "unknown" images (shapes, noise, text...).

Usage:
    make_synthetic("demo_data", 150)              # demo_data/{train,val,test}/{cat,dog}/*.png
    write_unknown_set("demo_unknown", count=60)   # a flat folder of PNGs
    python dataset.py demo DIR / python dataset.py unknown DIR --count 600   # the same from the command line
"""
from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont


def make_synthetic(root: str | Path, n_per_class: dict[str, int] | int = 60, size: int = 80, seed: int = 0,
                   classes: tuple[str, ...] = ("cat", "dog"), splits: tuple[str, ...] = ("train", "val", "test"),
                   fmt: str = "png") -> Path:
    """Write a small learnable ImageFolder set: class k draws a bright shape with k+3 corners on a noisy
    background (3 = triangle 'cat', 4 = square 'dog', ...), at random places, sizes and angles."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    counts = n_per_class if isinstance(n_per_class, dict) else {c: n_per_class for c in classes}
    for split in splits:
        for k, name in enumerate(counts):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            n = counts[name] if split == "train" else max(2, counts[name] // 4)
            for i in range(n):
                bg = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                img = Image.fromarray(bg, "RGB")
                cx, cy = rng.uniform(0.35, 0.65, 2) * size
                r, a0 = rng.uniform(0.2, 0.33) * size, rng.uniform(0, 2 * np.pi)
                corners = k + 3
                pts = [(cx + r * np.cos(a0 + 2 * np.pi * j / corners), cy + r * np.sin(a0 + 2 * np.pi * j / corners))
                       for j in range(corners)]
                color = tuple(int(v) for v in rng.integers(150, 256, 3))
                ImageDraw.Draw(img).polygon(pts, fill=color)
                img.save(folder / f"{name}_{i:04d}.{fmt}")
    return root


UNKNOWN_KINDS = ("shapes", "noise", "smooth_noise", "gradient", "text", "chart", "stripes", "checkers", "blank")


WORDS = ("total", "invoice", "settings", "error", "cancel", "update", "report", "2024", "page", "login", "OK",
         "download", "price", "chapter", "lorem", "ipsum", "graph", "menu", "file", "help", "x = 3.14")


def _color(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: one fixed-size bitmap font
        return ImageFont.load_default()


def _noise(s: int, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8), "RGB")


def _smooth_noise(s: int, rng: np.random.Generator) -> Image.Image:
    cells = int(rng.integers(2, 9))
    small = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8), "RGB")
    return small.resize((s, s), Image.BICUBIC)


def _between(t: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Two random colours mixed by t (0..1 per pixel)."""
    c0, c1 = np.array(_color(rng)), np.array(_color(rng))
    return Image.fromarray((c0 + (c1 - c0) * np.asarray(t, float)[..., None]).astype(np.uint8), "RGB")


def _gradient(s: int, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1)
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(a) + yy * np.sin(a))
    else:
        cx, cy = rng.uniform(0, 1, 2)
        t = np.hypot(xx - cx, yy - cy)
    return _between((t - t.min()) / max(t.max() - t.min(), 1e-9), rng)


def _stripes(s: int, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[0:s, 0:s] / s
    a, freq = rng.uniform(0, np.pi), rng.uniform(2, 12)
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(a) + yy * np.sin(a)))
    return _between(wave > 0 if rng.random() < 0.5 else (wave + 1) / 2, rng)


def _checkers(s: int, rng: np.random.Generator) -> Image.Image:
    n = int(rng.integers(2, 12))
    yy, xx = np.mgrid[0:s, 0:s] * n // s
    return _between((xx + yy) % 2, rng)


def _blank(s: int, rng: np.random.Generator) -> Image.Image:
    base = np.array(_color(rng, 60, 250), dtype=float)
    arr = base + rng.normal(0, rng.uniform(0, 6), (s, s, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _shapes(draw: ImageDraw.ImageDraw, s: int, rng: np.random.Generator) -> None:
    for _ in range(int(rng.integers(1, 6))):
        x0, y0 = rng.uniform(-0.1, 0.8, 2) * s
        w, h = rng.uniform(0.1, 0.6, 2) * s
        box = [x0, y0, x0 + w, y0 + h]
        shape = rng.integers(0, 4)
        if shape == 0:
            draw.rectangle(box, fill=_color(rng))
        elif shape == 1:
            draw.ellipse(box, fill=_color(rng))
        elif shape == 2:
            draw.polygon([tuple(p) for p in rng.uniform(0, 1, (int(rng.integers(3, 7)), 2)) * s], fill=_color(rng))
        else:
            draw.line(box, fill=_color(rng), width=int(rng.integers(1, max(2, s // 10))))


def _text(draw: ImageDraw.ImageDraw, s: int, rng: np.random.Generator) -> None:
    y = rng.uniform(0, 0.1) * s
    while y < s:
        fs = int(rng.integers(max(6, s // 14), max(8, s // 5)))
        line = " ".join(rng.choice(WORDS, int(rng.integers(1, 5))))
        draw.text((rng.uniform(0, 0.2) * s, y), line, fill=_color(rng, 0, 120), font=_font(fs))
        y += fs * rng.uniform(1.1, 1.8)


def _chart(draw: ImageDraw.ImageDraw, s: int, rng: np.random.Generator) -> None:
    """Axes with bars or a line, or a pie. Bars keep a width and height of a pixel at least on small sides."""
    m = s // 8
    style = rng.integers(0, 3)
    if style == 2:
        start = 0.0
        for frac in rng.dirichlet(np.ones(int(rng.integers(2, 7)))):
            draw.pieslice([m, m, s - m, s - m], start, start + 360 * frac, fill=_color(rng))
            start += 360 * frac
        return
    draw.line([m, m, m, s - m, s - m, s - m], fill=(0, 0, 0), width=max(1, s // 64))
    n = int(rng.integers(3, 12))
    values = rng.uniform(0.1, 1, n) * (s - 2 * m)
    xs = np.linspace(m + 2, s - m - 2, n + 1)
    if style == 0:
        color = _color(rng, 0, 200)
        for i, v in enumerate(values):
            left, bottom = xs[i] + 1, s - m - 1
            draw.rectangle([left, min(s - m - v, bottom), max(xs[i + 1] - 1, left), bottom], fill=color)
    else:
        pts = [((xs[i] + xs[i + 1]) / 2, s - m - v) for i, v in enumerate(values)]
        draw.line(pts, fill=_color(rng, 0, 200), width=max(1, s // 40))


FILLED = MappingProxyType({"noise": _noise, "smooth_noise": _smooth_noise, "gradient": _gradient, "stripes": _stripes,
                           "checkers": _checkers, "blank": _blank})  # kinds that fill the whole picture


DRAWN = MappingProxyType({"shapes": _shapes, "text": _text, "chart": _chart})  # kinds drawn on a plain ground


def _draw_kind(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    if kind in FILLED:
        return FILLED[kind](size, rng)
    img = Image.new("RGB", (size, size), _color(rng, 200, 256) if kind in ("text", "chart") else _color(rng))
    DRAWN[kind](ImageDraw.Draw(img), size, rng)
    return img


def make_unknown_images(count: int, size: int = 128, seed: int = 0,
                        kinds: tuple[str, ...] = UNKNOWN_KINDS) -> list[tuple[str, Image.Image]]:
    """`count` RGB images of no natural class, as (kind, image): shapes, noise, smooth noise, gradients, rendered
    text, charts, stripes, checkerboards and blank walls, in turn; some blurred. The same seed gives the same set."""
    for kind in kinds:
        if kind not in UNKNOWN_KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(UNKNOWN_KINDS)}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        img = _draw_kind(kind, size, rng)
        if kind not in ("noise", "blank") and rng.random() < 0.25:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5) * size / 128))
        out.append((kind, img))
    return out


def write_unknown_set(root: str | Path, count: int = 600, size: int = 128, seed: int = 0) -> Path:
    """Save make_unknown_images as ROOT/<kind>_<i>.png (a flat folder) and return ROOT."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, (kind, img) in enumerate(make_unknown_images(count, size, seed)):
        img.save(root / f"{kind}_{i:05d}.png")
    return root
