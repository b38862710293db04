"""The seed's data format: a list file of image/annotation pairs, the R channel holding class ids."""
from __future__ import annotations

import errno
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from segmodel.errors import DataError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class Sample:
    image: Path
    annotation: Path
    list_file: Path
    line: int


def _ade_annotation_for(image: Path) -> Path:
    """ADEChallengeData2016 layout: images/<split>/X.jpg -> annotations/<split>/X.png."""
    parts = list(image.parts)
    if "images" not in parts:
        raise ValueError("no 'images' folder in the path to map to 'annotations'")
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "annotations"
    return Path(*parts).with_suffix(".png")


def _list_text(list_file: Path) -> str:
    """The list file's text, or a DataError saying why it cannot be one (never blocks on a FIFO)."""
    try:
        mode = list_file.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise DataError("list file does not exist", list_file=list_file) from None
    except ValueError:
        raise DataError("list file path contains a NUL byte", list_file=list_file) from None
    except OSError as exc:
        why = "path too long" if exc.errno == errno.ENAMETOOLONG else exc.strerror
        raise DataError(f"cannot open the list file ({why})", list_file=list_file) from None
    if stat.S_ISDIR(mode):
        raise DataError("list file is a folder, not a file", list_file=list_file)
    if not stat.S_ISREG(mode):
        raise DataError("list file is not a regular file (a FIFO, socket or device)", list_file=list_file)
    try:
        return list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"list file is not UTF-8 text ({exc.reason} at byte {exc.start})", list_file=list_file) from exc
    except OSError as exc:
        raise DataError(f"cannot read the list file ({exc.strerror or exc})", list_file=list_file) from exc


def read_list(list_file: Path | str, bad_lines: list[DataError] | None = None) -> list[Sample]:
    """Parse a list file; paths are relative to it. Raises DataError naming file and line; with
    `bad_lines`, malformed lines are collected there instead and parsing goes on."""
    list_file = Path(list_file)
    return parse_list(_list_text(list_file), list_file, bad_lines)


def parse_list(text: str, list_file: Path, bad_lines: list[DataError] | None = None) -> list[Sample]:
    """read_list on a list file's text: sample paths are `list_file`'s folder joined with each field."""
    root = list_file.parent
    samples: list[Sample] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            samples.append(_parse_line(fields, root, list_file, n))
        except DataError as exc:
            if bad_lines is None:
                raise
            bad_lines.append(exc)
    if not samples and not bad_lines:
        raise DataError("list file names no samples", list_file=list_file)
    return samples


def _parse_line(fields: list[str], root: Path, list_file: Path, n: int) -> Sample:
    if len(fields) > 2:
        raise DataError(f"expected 'image [annotation]', got {len(fields)} fields", list_file=list_file, line=n)
    image = root / fields[0]
    if len(fields) == 2:
        return Sample(image, root / fields[1], list_file, n)
    try:
        return Sample(image, _ade_annotation_for(image), list_file, n)
    except ValueError as exc:
        raise DataError(f"{exc}; give the annotation path as a second field", list_file=list_file, line=n, path=image) from exc


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


def to_tensors(rgb: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet-normalised CHW float image and HW int64 labels, as the seed fed the model."""
    x = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(labels.astype(np.int64))


class SegmentationDataset(Dataset):
    def __init__(self, list_file: Path | str, height: int = 240, width: int = 240, num_classes: int = 101) -> None:
        self.samples = read_list(list_file)
        self.height, self.width, self.num_classes = height, width, num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensors(*load_sample(self.samples[i], self.height, self.width, self.num_classes))


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


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of an epoch: a function of (seed, epoch) only, never of the process."""
    return np.random.default_rng([seed, epoch]).permutation(n)
