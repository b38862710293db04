"""The errors Relay raises on purpose; each names the file, line, field or value at fault."""
from __future__ import annotations

from pathlib import Path

MAX_SHOWN_PATH = 160


def show_path(path: Path | str) -> str:
    """A path for a message: whole when short, else its start and end around its length."""
    text = str(path)
    if len(text) <= MAX_SHOWN_PATH:
        return text
    return f"{text[:100]}…({len(text):,} characters)…{text[-40:]}"


class RelayError(Exception):
    """Base of every error Relay raises deliberately (as opposed to bugs)."""


class DataError(RelayError):
    """A dataset problem: retrying will not fix it, the data must change."""

    def __init__(
        self,
        problem: str,
        *,
        list_file: Path | str | None = None,
        line: int | None = None,
        path: Path | str | None = None,
    ) -> None:
        self.problem = problem
        self.list_file = list_file
        self.line = line
        self.path = path
        where = ""
        if list_file is not None:
            where = f"{show_path(list_file)}:{line}: " if line is not None else f"{show_path(list_file)}: "
        if path is not None:
            where += f"{show_path(path)}: "
        super().__init__(where + problem)


class PretrainedWeightsUnavailable(RelayError):
    """Pretrained backbone weights were asked for but cannot be had (offline, missing file)."""


class CheckpointError(RelayError):
    """A checkpoint is missing, truncated, or fails its checksum."""


class TrainingError(RelayError):
    """Training cannot go on: a non-finite loss, or a spec the model cannot run."""


class CacheSpaceError(RelayError):
    """Too little free space where a cache must be built: retrying cannot help until space is freed."""


class InitWeightsError(RelayError):
    """A job's init weights file is missing, unreadable, or does not fit the job's model."""
