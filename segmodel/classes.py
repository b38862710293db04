"""Project class names, the ADE20K 150-class mapping and the colour palette."""

from functools import cache
from importlib import resources

import numpy as np

NUM_CLASSES = 101  # 0 = void, 1..100 = the ADE20K Instance100 "thing" classes
VOID = 0


@cache
def _thing_rows() -> tuple[tuple[int, str, int], ...]:
    """(seed_id, name, ade150_index) rows of the bundled thing table, in seed_id order."""
    text = resources.files("segmodel").joinpath("resources/ade20k_thing_classes.tsv").read_text("utf-8")
    lines = text.splitlines()
    header = lines[0].split("\t")
    if header != ["seed_id", "name", "ade150_index"]:
        raise ValueError(f"unexpected header in ade20k_thing_classes.tsv: {header}")
    rows = []
    for line in lines[1:]:
        if line:
            seed, name, ade150 = line.split("\t")
            rows.append((int(seed), name, int(ade150)))
    rows.sort()
    # The ids must be exactly 1..100 so that list index == class id.
    if [r[0] for r in rows] != list(range(1, NUM_CLASSES)):
        raise ValueError("ade20k_thing_classes.tsv must hold seed_id 1..100 exactly once")
    return tuple(rows)


def class_names(num_classes: int = NUM_CLASSES) -> list[str]:
    """Names indexed by class id; synthetic names when the class count is not the ADE20K one."""
    if num_classes != NUM_CLASSES:
        return ["void"] + [f"class{i}" for i in range(1, num_classes)]
    return ["void"] + [name for _, name, _ in _thing_rows()]


def ade150_to_project_lut() -> np.ndarray:
    """uint8[256] lookup: 150-class pixel value -> project id (stuff, 'other' and >150 -> void)."""
    lut = np.zeros(256, dtype=np.uint8)
    for seed, _, ade150 in _thing_rows():
        lut[ade150] = seed
    return lut


def palette(num_classes: int) -> np.ndarray:
    """Fixed (num_classes, 3) uint8 colours; void is black, the rest are spread in hue.

    Golden-ratio hue steps keep neighbouring ids visually distinct, and
    alternating value/saturation bands separate ids whose hues come close.
    """
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for i in range(1, num_classes):
        h = (i * 0.618033988749895) % 1.0
        s = (0.95, 0.65, 0.8)[i % 3]
        v = (0.95, 0.75)[(i // 3) % 2]
        colours[i] = _hsv_to_rgb(h, s, v)
    return colours


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    k = int(h * 6.0)
    f = h * 6.0 - k
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[k % 6]
    return round(r * 255), round(g * 255), round(b * 255)
