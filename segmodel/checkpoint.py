"""Checkpoints on storage: written to a temporary name and renamed, verified by checksum on load.

torch is imported only where a checkpoint is serialized or loaded: the worker and scheduler
processes verify, list and remove checkpoints without it (only trainers load them).
"""
from __future__ import annotations

import errno
import hashlib
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from segmodel.errors import CheckpointError
from segmodel.storage import atomic_write_bytes  # noqa: F401  (the one temp-and-rename writer; imported from here too)

# A full or failing disk is often trouble of a moment (another writer's temporaries, a volume being
# grown): a chunk's checkpoint is worth seconds of waiting before the chunk fails and its steps are
# trained again elsewhere. Other errors (a read-only or missing folder) fail at once.
TRANSIENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def to_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save(obj: Any, path: Path) -> str:
    """torch.save obj to path atomically; the sha256 goes to a sidecar written after the file.
    A full disk is waited out for a few seconds (RETRY_DELAYS_S), then the error is raised.

    A crash between the two leaves a file without a checksum, which counts as absent, so a
    checkpoint is only ever used once it is complete and verified.
    """
    data = to_bytes(obj)
    digest = hashlib.sha256(data).hexdigest()
    _write(path, data)
    _write(_sidecar(path), f"{digest}  {path.name}\n".encode())
    return digest


def _write(path: Path, data: bytes) -> None:
    """atomic_write_bytes, tried again after transient disk errors (RETRY_DELAYS_S)."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            atomic_write_bytes(path, data)
            return
        except OSError as exc:
            if delay is None or exc.errno not in TRANSIENT:
                raise
            time.sleep(delay)


def verified_bytes(path: Path) -> bytes:
    """The file's bytes if they match the recorded checksum; CheckpointError names what is wrong."""
    return _verified(path)[0]


def verified_digest(path: Path) -> str:
    """The file's sha256 once verified against its recorded checksum."""
    return _verified(path)[1]


def _verified(path: Path) -> tuple[bytes, str]:
    side = _sidecar(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    if not side.is_file():
        raise CheckpointError(f"{path}: no checksum file {side.name} (an interrupted write)")
    recorded = side.read_text().split()
    if not recorded:
        raise CheckpointError(f"{path}: checksum file {side.name} is empty")
    expected = recorded[0]
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(f"{path}: checksum mismatch (expected {expected[:12]}…, file has {actual[:12]}…, {len(data)} bytes)")
    return data, actual


def load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """Verify, then load with weights_only=True: a checkpoint can never run code."""
    import torch

    data = verified_bytes(path)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: does not load ({exc})") from exc


def remove(path: Path) -> None:
    """Delete a checkpoint: its checksum first, so a half-done removal reads as absent, never as valid."""
    _sidecar(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def is_valid(path: Path) -> bool:
    try:
        verified_bytes(path)
    except CheckpointError:
        return False
    return True
