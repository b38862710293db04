"""The seed's list files: one image/annotation pair per line, paths relative to the list file.

Parsing needs no torch or imaging library: the worker and scheduler processes read lists, only
trainers decode images.
"""
from __future__ import annotations

import errno
import stat
from dataclasses import dataclass
from pathlib import Path

from segmodel.errors import DataError


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
