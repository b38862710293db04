"""Prediction grid: deterministic size, image column copied through unchanged."""

from pathlib import Path

import numpy as np
from PIL import Image

from segmodel.classes import class_names
from segmodel.visualize import grid_size, save_prediction_grid, tile_origin


def test_grid_of_four_random_samples(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    h, w, n = 24, 32, 4
    names = class_names(6)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    targets = [rng.integers(0, 4, (h, w)) for _ in range(n)]  # ids 0..3
    preds = [rng.integers(2, 6, (h, w)) for _ in range(n)]  # ids 2..5
    path = save_prediction_grid(tmp_path / "sub" / "grid.png", images, targets, preds, names)
    assert path == tmp_path / "sub" / "grid.png"
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary left behind
    with Image.open(path) as grid:
        assert grid.mode == "RGB"
        assert grid.size == grid_size(n, h, w, 6)
        pixels = np.asarray(grid)
    for row, image in enumerate(images):
        x, y = tile_origin(row, 0, h, w)
        assert np.array_equal(pixels[y : y + h, x : x + w], image)


def test_only_first_four_rows_and_their_classes(tmp_path: Path) -> None:
    h, w = 8, 8
    images = [np.zeros((h, w, 3), np.uint8)] * 5
    targets = [np.full((h, w), 1)] * 4 + [np.full((h, w), 2)]
    preds = [np.full((h, w), 1)] * 5
    path = save_prediction_grid(tmp_path / "grid.png", images, targets, preds, class_names())
    with Image.open(path) as grid:
        assert grid.size == grid_size(4, h, w, 1)


def test_grid_size_formula() -> None:
    assert grid_size(1, 10, 20, 0) == (2 * 8 + 3 * 20 + 2 * 4, 8 + 18 + 10 + 8)
    w, h = grid_size(2, 10, 200, 0)
    assert grid_size(2, 10, 200, 1)[1] > h
    assert grid_size(2, 10, 200, 1) == grid_size(2, 10, 200, (w - 16) // 160)
