"""The seed's samples: images and annotations decoded and resized as its Dataset does, the R
channel holding class ids (the list files themselves: segmodel/lists.py). No torch here: data
checks and cache builds run without it."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segmodel.errors import DataError
from segmodel.lists import Sample, read_list


def _open(sample: Sample, path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError("file does not exist", list_file=sample.list_file, line=sample.line, path=path)
    try:
        # PIL raises over twice MAX_IMAGE_PIXELS and only warns between: we refuse both, naming the file.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        if img.width * img.height > Image.MAX_IMAGE_PIXELS:
            raise DataError(f"decompression bomb: {img.width}x{img.height} pixels, over the limit of "
                            f"{Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS)",
                            list_file=sample.list_file, line=sample.line, path=path)
        img.load()  # decode now: a truncated file fails here, not later in a worker
    except Image.DecompressionBombError as exc:
        raise DataError(f"decompression bomb: {exc}", list_file=sample.list_file, line=sample.line, path=path) from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"unreadable or truncated image ({exc})", list_file=sample.list_file, line=sample.line, path=path) from exc
    return img


def load_sample(sample: Sample, height: int, width: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize one pair: (H x W x 3 uint8 RGB, H x W uint8 class ids)."""
    img = _open(sample, sample.image)
    ann = _open(sample, sample.annotation)
    if img.size != ann.size:
        raise DataError(
            f"annotation size {ann.size[0]}x{ann.size[1]} differs from image size {img.size[0]}x{img.size[1]} "
            f"({sample.image})",
            list_file=sample.list_file, line=sample.line, path=sample.annotation,
        )
    if ann.mode in ("P", "PA"):  # palette indices: the class id is the R of each index's colour
        ann = ann.convert("RGB")
    labels = np.asarray(ann)
    if labels.ndim == 3:  # RGB(A): the class id is the R channel
        labels = labels[..., 0]
    top = int(labels.max())
    if top > num_classes - 1:
        raise DataError(
            f"class id {top} above num_classes - 1 = {num_classes - 1}",
            list_file=sample.list_file, line=sample.line, path=sample.annotation,
        )
    rgb = img.convert("RGB").resize((width, height), Image.BILINEAR)
    lab = Image.fromarray(labels.astype(np.uint8)).resize((width, height), Image.NEAREST)
    return np.asarray(rgb, dtype=np.uint8), np.asarray(lab, dtype=np.uint8)


def check_dataset(list_file: Path | str, num_classes: int = 101) -> tuple[int, list[DataError]]:
    """Validate every line and sample of a list file in one pass; returns (samples checked, every
    problem found, in line order). Malformed lines count as checked samples that are bad."""
    errors: list[DataError] = []
    try:
        samples = read_list(list_file, errors)
    except DataError as exc:
        return 0, [exc]
    bad_lines = len(errors)
    for s in samples:
        try:
            load_sample(s, 64, 64, num_classes)
        except DataError as exc:
            errors.append(exc)
    errors.sort(key=lambda e: e.line or 0)
    return len(samples) + bad_lines, errors
