"""Workers online and what each is doing, as heartbeat files on shared storage.

Works the same on Redis and on the embedded transport, and survives a flushed broker.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from segmodel.checkpoint import atomic_write_bytes

BEAT_S = 2.0


class WorkerRegistry:
    def __init__(self, storage: Path, node: str, queues: list[str]) -> None:
        self.path = Path(storage) / "workers" / f"{node}.json"
        self.record: dict[str, Any] = {"node": node, "pid": os.getpid(), "queues": queues, "job": None,
                                       "chunk": None, "since": None, "started_at": time.time()}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        with self._lock:
            record = {**self.record, "last_seen": time.time()}
        atomic_write_bytes(self.path, json.dumps(record).encode())

    def start(self) -> None:
        self._write()
        self._thread = threading.Thread(target=self._beat, name="relay-registry", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self._write()
            except OSError:
                pass  # storage hiccup: the next beat tries again

    def doing(self, job: str | None, chunk: int | str | None, trainer_pid: int | None = None) -> None:
        with self._lock:
            self.record.update(job=job, chunk=chunk, trainer_pid=trainer_pid, since=time.time() if job else None)
        self._write()

    def stop(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


LOST_SHOWN_S = 24 * 3600  # how long a worker that vanished is listed as lost


def _records(storage: Path) -> list[dict[str, Any]]:
    folder = Path(storage) / "workers"
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def online(storage: Path, max_age_s: float = 4 * BEAT_S) -> list[dict[str, Any]]:
    now = time.time()
    return [r for r in _records(storage) if now - r.get("last_seen", 0) <= max_age_s]


def lost(storage: Path, max_age_s: float = 4 * BEAT_S, shown_s: float = LOST_SHOWN_S) -> list[dict[str, Any]]:
    """Workers that stopped heartbeating without a clean stop (which removes their record): killed,
    crashed, or cut off from storage. Newest loss first; each with `lost_at`, its last heartbeat."""
    now = time.time()
    gone = [{**r, "lost_at": r.get("last_seen", 0)} for r in _records(storage)
            if max_age_s < now - r.get("last_seen", 0) <= shown_s]
    return sorted(gone, key=lambda r: -r["lost_at"])
