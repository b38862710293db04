"""The folder a trainer works in: the job's own folder on a local storage backend, or a scratch copy on
this worker that is filled from the object store before a chunk and pushed back before the commit.

The trainer (torch.save, TensorBoard's writer) needs local paths; an object store has none. Pushing
writes every new file as an object of its own, checkpoints last (each object before its checksum),
so a commit only ever points at a checkpoint that is complete on storage.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from segmodel.jobs import JobStore
from segmodel.layout import JobLayout
from segmodel.storage import LocalStorage, ObjectNotFound


class JobFiles:
    def __init__(self, store: JobStore, job_id: str, scratch: Path) -> None:
        self.store, self.job_id = store, job_id
        self.mirrored = not isinstance(store.backend, LocalStorage)
        self.layout = JobLayout(Path(scratch) / "jobs" / job_id) if self.mirrored else store.layout(job_id)
        self._since = time.time()
        self._pulled: set[Path] = set()

    def _key(self, name: str) -> str:
        return f"jobs/{self.job_id}/{name}"

    def pull(self, *names: str) -> None:
        """Fetch these files (and their checksums) from storage; a missing one stays missing, and
        the trainer then reports it the way it reports a missing checkpoint in a folder."""
        if not self.mirrored:
            return
        for name in names:
            for part in (name, name + ".sha256"):
                dest = self.layout.root / part
                try:
                    self.store.backend.download(self._key(part), dest)
                    self._pulled.add(dest)
                except ObjectNotFound:
                    dest.unlink(missing_ok=True)

    def begin(self) -> None:
        """Mark the start of the trainer's work: files written from now on are pushed."""
        self._since = time.time() - 1  # mtimes can trail the clock by a tick
        if self.mirrored:
            self.layout.root.mkdir(parents=True, exist_ok=True)
            for log in self._logs():
                log.unlink(missing_ok=True)

    def _logs(self) -> dict[Path, str]:
        """The logs a trainer appends to, each uploaded as one object per chunk under its folder."""
        return {self.layout.metrics_file: "metrics", self.layout.validation_file: "validation"}

    def push(self, name: str) -> None:
        """Upload what the trainer wrote: its logs as one object each (`<log>/<name>.jsonl`), then
        every new file, checkpoints last."""
        if not self.mirrored:
            return
        backend = self.store.backend
        for log, folder in self._logs().items():
            if log.is_file():
                backend.upload(log, self._key(f"{folder}/{name}.jsonl"))
                log.unlink()
        new = [p for p in self.layout.root.rglob("*") if p.is_file() and not p.name.startswith(".")
               and p.stat().st_mtime >= self._since and p not in self._pulled]
        # Checksums after their objects, and the chunk's checkpoint after everything it stands for.
        new.sort(key=lambda p: (p.parent.name == "checkpoints", p.name.endswith(".sha256"), str(p)))
        for path in new:
            backend.upload(path, self._key(str(path.relative_to(self.layout.root))))

    def clean(self) -> None:
        """Free the scratch copy (the object store has it all)."""
        if self.mirrored:
            shutil.rmtree(self.layout.root, ignore_errors=True)
