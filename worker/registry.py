"""Workers online and what each is doing, as heartbeat objects on storage (a folder or a bucket).

Works the same on Redis and on the embedded transport, and survives a flushed broker.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from segmodel.storage import Storage, StorageError, open_storage

BEAT_S = 2.0


class WorkerRegistry:
    def __init__(self, storage: Path | str | Storage, node: str, queues: list[str]) -> None:
        self.backend = storage if isinstance(storage, Storage) else open_storage(storage)
        self.key = f"workers/{node}.json"
        self.record: dict[str, Any] = {"node": node, "pid": os.getpid(), "queues": queues, "job": None,
                                       "chunk": None, "since": None, "started_at": time.time()}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        with self._lock:
            record = {**self.record, "last_seen": time.time()}
        self.backend.put(self.key, json.dumps(record).encode())

    def start(self) -> None:
        self._write()
        self._thread = threading.Thread(target=self._beat, name="relay-registry", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self._write()
            except (OSError, StorageError):
                pass  # storage hiccup: the next beat tries again

    def doing(self, job: str | None, chunk: int | str | None, trainer_pid: int | None = None) -> None:
        with self._lock:
            self.record.update(job=job, chunk=chunk, trainer_pid=trainer_pid, since=time.time() if job else None)
        self._publish()

    def trouble(self, what: str) -> None:
        """The worker's latest infrastructure problem (e.g. a failure it could not record in the job),
        shown with the worker in `relay status`, the API and the dashboard."""
        with self._lock:
            self.record["problem"] = {"at": time.time(), "what": what}
        self._publish()

    def _publish(self) -> None:
        try:
            self._write()
        except (OSError, StorageError):
            pass  # storage hiccup: the record stays in memory and the next beat writes it

    def stop(self) -> None:
        self._stop.set()
        self.backend.delete(self.key)


LOST_SHOWN_S = 24 * 3600  # how long a worker that vanished is listed as lost


def _records(storage: Path | str | Storage) -> list[dict[str, Any]]:
    backend = storage if isinstance(storage, Storage) else open_storage(storage)
    found = []
    for key in backend.list("workers"):
        try:
            found.append(json.loads(backend.get(key)))
        except (OSError, ValueError, StorageError):
            continue  # gone since it was listed, or not a record
    return found


def online(storage: Path | str | Storage, max_age_s: float = 4 * BEAT_S) -> list[dict[str, Any]]:
    now = time.time()
    return [r for r in _records(storage) if now - r.get("last_seen", 0) <= max_age_s]


def lost(storage: Path | str | Storage, max_age_s: float = 4 * BEAT_S, shown_s: float = LOST_SHOWN_S) -> list[dict[str, Any]]:
    """Workers that stopped heartbeating without a clean stop (which removes their record): killed,
    crashed, or cut off from storage. Newest loss first; each with `lost_at`, its last heartbeat."""
    now = time.time()
    gone = [{**r, "lost_at": r.get("last_seen", 0)} for r in _records(storage)
            if max_age_s < now - r.get("last_seen", 0) <= shown_s]
    return sorted(gone, key=lambda r: -r["lost_at"])
