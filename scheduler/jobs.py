"""The job store on shared storage, the source of truth: spec (immutable) and state per job.

Every state change is a read-modify-write under an exclusive lock on the job's folder, written to
a temporary name and renamed, so concurrent workers and the scheduler never lose an update and a
reader never sees a partial file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from segmodel import checkpoint
from segmodel.checkpoint import atomic_write_bytes
from segmodel.data import read_list
from segmodel.layout import JobLayout
from segmodel.spec import ChunkPlan, TrainSpec, chunk_of

JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


class JobStatus(str, Enum):
    queued = "queued"        # submitted, no chunk started yet
    running = "running"      # training or evaluating
    paused = "paused"        # stops at the next chunk boundary; resume continues
    cancelled = "cancelled"  # stopped now; resume continues from the last checkpoint
    failed = "failed"        # a reason retrying won't fix, or attempts exhausted
    succeeded = "succeeded"  # trained and evaluated

    @property
    def active(self) -> bool:
        return self in (JobStatus.queued, JobStatus.running)

    @property
    def final(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class ChunkRecord(BaseModel):
    chunk: int
    start_step: int
    end_step: int
    worker: str
    attempt: int
    started_at: float
    ended_at: float
    seconds: float
    loss_last: float
    images_per_s: float
    checkpoint_sha256: str
    environment: dict[str, Any] = Field(default_factory=dict)


class Event(BaseModel):
    at: float
    what: str


class JobState(BaseModel):
    status: JobStatus = JobStatus.queued
    chunk: int = 0              # next chunk to train; == n_chunks once training is done
    step: int = 0               # global steps committed
    n_chunks: int
    total_steps: int
    steps_per_epoch: int
    chunk_steps: int
    start_epoch: int = 0        # epochs the init weights had; weight files and data order count on from it
    restarts: list[int] = Field(default_factory=list)  # steps where `extend` restarted the chunk grid
    attempts: int = 0           # tries of the current chunk (or of the evaluation)
    reason: str | None = None   # why the job failed (or was stopped)
    last_error: str | None = None  # the latest retryable failure, kept for the record
    worker: str | None = None   # who holds the job now
    last_loss: float | None = None
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    enqueued_at: float | None = None
    history: list[ChunkRecord] = Field(default_factory=list)
    events: list[Event] = Field(default_factory=list)

    @property
    def training_done(self) -> bool:
        return self.chunk >= self.n_chunks

    @property
    def epoch(self) -> float:
        return self.start_epoch + self.step / self.steps_per_epoch

    def set_status(self, status: JobStatus, why: str, reason: str | None = None) -> None:
        """The one place status changes, recording when and why."""
        self.status = status
        self.reason = reason
        self.events.append(Event(at=time.time(), what=f"{status.value}: {why}"))

    def rewind_to(self, step: int, why: str) -> None:
        """Go back to the chunk boundary at `step` (a checkpoint went bad): work after it is redone."""
        self.step, self.chunk = step, chunk_of(step, self.total_steps, self.chunk_steps, self.restarts)
        self.attempts, self.worker = 0, None
        self.note(f"{why}; continuing from step {step} (chunk {self.chunk})" + (", from scratch" if step == 0 else ""))

    def note(self, what: str) -> None:
        self.events.append(Event(at=time.time(), what=what))


class IdempotencyConflict(ValueError):
    """An idempotency key already made a job from another spec (or made one that is gone)."""


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return f"no job {self.args[0]!r}"


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class JobStore:
    def __init__(self, storage: Path) -> None:
        self.storage = Path(storage)
        self.jobs_dir = self.storage / "jobs"

    def layout(self, job_id: str) -> JobLayout:
        # Ids become paths: nothing may escape the storage root, by name or by a planted symlink.
        if not JOB_ID.match(job_id) or not (self.jobs_dir / job_id).resolve().is_relative_to(self.jobs_dir.resolve()):
            raise JobNotFound(job_id)
        return JobLayout(self.jobs_dir / job_id)

    def exists(self, job_id: str) -> bool:
        try:
            return self.layout(job_id).state_file.is_file()
        except JobNotFound:
            return False

    def create(self, spec: TrainSpec, job_id: str | None = None, init_state: dict[str, Any] | None = None) -> tuple[str, JobState]:
        """Write a new job atomically: its folder appears complete or not at all. `init_state`, the
        weights the job starts from, is saved (checksummed) into it."""
        n_train = len(read_list(spec.train))
        read_list(spec.val)
        plan = ChunkPlan(spec, n_train)
        job_id = job_id or new_job_id()
        final = self.layout(job_id).root
        state = JobState(n_chunks=plan.n_chunks, total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
                         chunk_steps=plan.chunk_steps, start_epoch=spec.start_epoch)
        state.note(f"submitted: {spec.epochs} epochs, {plan.n_chunks} chunks of {plan.chunk_steps} steps")
        if spec.init_weights is not None:
            state.note(f"starts from {spec.init_weights} (sha256 {spec.init_weights_sha256}) as epoch {spec.start_epoch}, "
                       f"copied into the job; the optimizer starts fresh")
        tmp = self.jobs_dir / f".new-{job_id}"
        tmp.mkdir(parents=True)
        tmp_layout = JobLayout(tmp)
        atomic_write_bytes(tmp_layout.spec_file, spec.model_dump_json(indent=1).encode())
        if init_state is not None:
            checkpoint.save(init_state, tmp_layout.init_weights)
        atomic_write_bytes(tmp_layout.state_file, state.model_dump_json(indent=1).encode())
        os.rename(tmp, final)
        return job_id, state

    def key_job(self, key: str) -> str | None:
        """The job an idempotency key made, if any."""
        record_file = self.storage / "idempotency" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
        try:
            return json.loads(record_file.read_text())["job"]
        except (OSError, ValueError, KeyError):
            return None

    def create_once(self, spec: TrainSpec, key: str, init_state: dict[str, Any] | None = None) -> tuple[str, bool]:
        """The job this idempotency key made, or a new one: (job id, whether it was made now).

        A key's record is written before its job and marked done after, under a lock per key: a
        retried or concurrent submit finds the job instead of making another, a create cut short
        is finished by the next try, and a failed one (bad data) leaves no record behind."""
        folder = self.storage / "idempotency"
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(key.encode()).hexdigest()
        record_file = folder / f"{name}.json"
        wanted = spec.model_dump(mode="json")  # as the record holds it (tuples as lists)
        with open(folder / f"{name}.lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                if record_file.is_file():
                    record = json.loads(record_file.read_text())
                    job_id = record["job"]
                    if record["spec"] != wanted:
                        changed = ", ".join(f"{k}: {wanted.get(k)!r} here, {record['spec'].get(k)!r} there"
                                            for k in sorted(set(wanted) | set(record["spec"]))
                                            if wanted.get(k) != record["spec"].get(k))
                        raise IdempotencyConflict(f"Idempotency-Key {key!r} already made job {job_id} from another spec ({changed})")
                    if self.exists(job_id):
                        return job_id, False
                    if record["done"]:
                        raise IdempotencyConflict(f"Idempotency-Key {key!r} made job {job_id}, which no longer exists")
                else:
                    job_id = new_job_id()
                    record = {"key": key, "job": job_id, "spec": wanted, "at": time.time(), "done": False}
                    atomic_write_bytes(record_file, json.dumps(record).encode())
                try:
                    self.create(spec, job_id, init_state=init_state)
                except BaseException:
                    record_file.unlink(missing_ok=True)
                    raise
                atomic_write_bytes(record_file, json.dumps({**record, "done": True}).encode())
                return job_id, True
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def spec(self, job_id: str) -> TrainSpec:
        path = self.layout(job_id).spec_file
        if not path.is_file():
            raise JobNotFound(job_id)
        return TrainSpec.model_validate_json(path.read_text())

    def write_spec(self, job_id: str, spec: TrainSpec) -> None:
        """Replace the spec: only `extend` does, under the job's lock, before the state follows it."""
        atomic_write_bytes(self.layout(job_id).spec_file, spec.model_dump_json(indent=1).encode())

    def state(self, job_id: str) -> JobState:
        path = self.layout(job_id).state_file
        if not path.is_file():
            raise JobNotFound(job_id)
        return JobState.model_validate_json(path.read_text())

    def ids(self) -> list[str]:
        if not self.jobs_dir.is_dir():
            return []
        return sorted(p.name for p in self.jobs_dir.iterdir() if JOB_ID.match(p.name) and (p / "state.json").is_file())

    def remove(self, job_id: str, allowed: Callable[[JobState], None]) -> None:
        """Delete a job and all its files. `allowed(state)` raises to refuse (checked under the
        job's lock); the folder is renamed away first, so readers see the whole job or none."""
        layout = self.layout(job_id)
        with self.locked(job_id):
            allowed(self.state(job_id))
            gone = self.jobs_dir / f".rm-{job_id}-{secrets.token_hex(3)}"
            os.rename(layout.root, gone)
        shutil.rmtree(gone, ignore_errors=True)

    @contextmanager
    def locked(self, job_id: str) -> Iterator[None]:
        layout = self.layout(job_id)
        if not layout.state_file.is_file():
            raise JobNotFound(job_id)
        with open(layout.root / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def update(self, job_id: str, change: Callable[[JobState], Any]) -> tuple[JobState, Any]:
        """Apply `change` to the state under the job's lock; it returns a value (e.g. whether it
        applied). The state is written back only if `change` modified it."""
        with self.locked(job_id):
            state = self.state(job_id)
            before = state.model_dump_json()
            result = change(state)
            if state.model_dump_json() != before:
                state.updated_at = time.time()
                atomic_write_bytes(self.layout(job_id).state_file, state.model_dump_json(indent=1).encode())
            return state, result


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (O_APPEND: concurrent small appends do not interleave)."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
