"""Convert ADE20K SceneParsing (ADEChallengeData2016) into the project's dataset format.

Output layout under ``out``:
  images/<split>/X.jpg         the original image (hard link when possible, else a copy)
  annotations/<split>/X.png    RGB, R = project class id (0 = void), G = B = 0
  train.txt / val.txt          "images/<split>/X.jpg annotations/<split>/X.png" per line,
                               paths relative to the list file
"""

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from segmodel.classes import ade150_to_project_lut
from segmodel.errors import DataError

SPLITS = {"training": "train.txt", "validation": "val.txt"}
# A flat folder (X.jpg next to X.png, like the dev kit's sample data) is taken as validation data.
FLAT_SPLIT = "validation"


def convert_ade20k(root: Path, out: Path) -> dict[str, int]:
    """Convert every split found under ``root`` into ``out``; returns {split: sample count}."""
    root, out = Path(root), Path(out)
    sources = _find_splits(root)
    lut = ade150_to_project_lut()
    stats: dict[str, int] = {}
    for split, (image_dir, annotation_dir) in sources.items():
        pairs = _pair_files(image_dir, annotation_dir)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for image_path, annotation_path in pairs:
            rel_image = f"images/{split}/{image_path.name}"
            rel_annotation = f"annotations/{split}/{image_path.stem}.png"
            _convert_annotation(annotation_path, image_path, out / rel_annotation, lut)
            _link_or_copy(image_path, out / rel_image)
            lines.append(f"{rel_image} {rel_annotation}\n")
        _write_atomic_text(out / SPLITS[split], "".join(lines))
        stats[split] = len(pairs)
    return stats


def _find_splits(root: Path) -> dict[str, tuple[Path, Path]]:
    """Map each split present under ``root`` to its (image folder, annotation folder)."""
    if not root.is_dir():
        raise DataError("ADE20K root is not a folder", path=root)
    found = {}
    for split in SPLITS:
        image_dir = root / "images" / split
        if image_dir.is_dir():
            annotation_dir = root / "annotations" / split
            if not annotation_dir.is_dir():
                raise DataError(f"images/{split} exists but annotations/{split} does not", path=root)
            found[split] = (image_dir, annotation_dir)
    if found:
        return found
    if any(root.glob("*.jpg")):
        return {FLAT_SPLIT: (root, root)}
    raise DataError(
        "no ADE20K data found: expected images/{training,validation}/*.jpg with "
        "annotations/{training,validation}/*.png (ADEChallengeData2016 layout), "
        "or X.jpg + X.png pairs side by side",
        path=root,
    )


def _pair_files(image_dir: Path, annotation_dir: Path) -> list[tuple[Path, Path]]:
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise DataError("no .jpg images in this folder", path=image_dir)
    pairs = []
    for image_path in images:
        annotation_path = annotation_dir / f"{image_path.stem}.png"
        if not annotation_path.is_file():
            raise DataError(f"image {image_path.name} has no annotation", path=annotation_path)
        pairs.append((image_path, annotation_path))
    return pairs


def _convert_annotation(src: Path, image_path: Path, dst: Path, lut: np.ndarray) -> None:
    with Image.open(src) as annotation:
        if annotation.mode != "L":
            raise DataError(f"expected a 150-class annotation in PIL mode L, got {annotation.mode}", path=src)
        labels = np.asarray(annotation)
    with Image.open(image_path) as image:
        image_size = image.size
    if (labels.shape[1], labels.shape[0]) != image_size:
        raise DataError(
            f"annotation is {labels.shape[1]}x{labels.shape[0]} but its image is {image_size[0]}x{image_size[1]}",
            path=src,
        )
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = lut[labels]
    # Write beside the target and rename so an interrupted run never leaves a truncated PNG.
    tmp = dst.with_name(f".{dst.name}.tmp")
    Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG")
    os.replace(tmp, dst)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link to save space on the (large) image set; copy across file systems."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
