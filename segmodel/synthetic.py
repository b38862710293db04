"""A generated dataset in the seed's format whose classes are learnable: class decides colour and texture."""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image


def _class_look(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A saturated colour of its own hue and a stripe period per class, so that even a randomly
    initialised backbone's features tell the classes apart."""
    hues = np.arange(n_classes + 1) / max(n_classes, 1)
    colours = np.array([colorsys.hsv_to_rgb(h, 0.85, 0.95) for h in hues]) * 255
    periods = 4 + (np.arange(n_classes + 1) % 4) * 3
    return colours, periods


def _sample(rng: np.random.Generator, size: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    colours, periods = _class_look(n_classes)
    yy, xx = np.mgrid[0:size, 0:size]
    image = (rng.normal(110, 15, size=(size, size, 3))).clip(0, 255)  # void background: grey noise
    labels = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        c = int(rng.integers(1, n_classes + 1))
        cy, cx = rng.integers(0, size, size=2)
        ry, rx = rng.integers(size // 6, size // 3, size=2)
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        stripes = ((xx + yy) // periods[c]) % 2
        shade = colours[c][None, None, :] * (0.8 + 0.2 * stripes[..., None])
        image[mask] = shade[mask] + rng.normal(0, 6, size=(int(mask.sum()), 3))
        labels[mask] = c
    return image.clip(0, 255).astype(np.uint8), labels


def generate(out: Path | str, train: int = 200, val: int = 40, seed: int = 0, size: int = 128, classes: int = 5) -> dict[str, Path]:
    """Write images/, annotations/ and train.txt / val.txt under out. Same arguments, same bytes."""
    out = Path(out)
    if not 1 <= classes <= 100:
        raise ValueError(f"classes must be in 1..100, got {classes}")
    lists: dict[str, Path] = {}
    for split, count, offset in (("train", train, 0), ("val", val, 1)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, offset])
        lines = []
        for i in range(count):
            image, labels = _sample(rng, size, classes)
            name = f"{split}_{i:06d}"
            Image.fromarray(image).save(out / "images" / split / f"{name}.jpg", quality=92)
            rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
            rgb[..., 0] = labels
            Image.fromarray(rgb).save(out / "annotations" / split / f"{name}.png")
            lines.append(f"images/{split}/{name}.jpg annotations/{split}/{name}.png\n")
        lists[split] = out / f"{split}.txt"
        lists[split].write_text("".join(lines))
    return lists
