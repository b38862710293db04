"""The job store on shared storage, the source of truth: spec (immutable) and state per job.

Every state change is a compare-and-set on the job's state object (a conditional PUT on an object
store), so concurrent workers and the scheduler never lose an update, and every write is whole, so
a reader never sees a partial one. Workers and the scheduler both use it; it uses neither.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
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
from segmodel.datasets import sample_count
from segmodel.errors import CheckpointError
from segmodel.layout import JobLayout
from segmodel.spec import ChunkPlan, TrainSpec, chunks_left
from segmodel.storage import KeyRefused, LocalStorage, ObjectNotFound, Storage, StorageError, open_storage

JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


class JobStatus(str, Enum):
    queued = "queued"        # submitted, no chunk started yet
    running = "running"      # training or evaluating
    paused = "paused"        # the chunk in flight stops at its next step and commits; resume continues.
    #                          Views show "pausing" while a worker still holds the lease of that chunk
    cancelled = "cancelled"  # stopped now; resume continues from the last checkpoint
    failed = "failed"        # a reason retrying won't fix, or attempts exhausted
    succeeded = "succeeded"  # trained and evaluated

    @property
    def active(self) -> bool:
        return self in (JobStatus.queued, JobStatus.running)

    @property
    def final(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


# Why a chunk ended where it did.
ENDED = {
    "steps": "its planned steps (--chunk-steps)",
    "epoch": "the end of its epoch",
    "job end": "the end of training",
    "budget": "its time budget (--chunk-minutes)",
    "signal": "the worker was told to stop (SIGTERM)",
    "pause": "the job was paused",
    "runtime limit": "the worker's --max-runtime",
    "idle": "the worker's --exit-when-idle",
    "lease": "the broker did not answer for a lease TTL (committed once the lease was retaken)",
    "recovered": "trained before, committed by the next worker",
}


class ChunkRecord(BaseModel):
    chunk: int
    start_step: int
    end_step: int
    ended: str = "steps"  # why it ended: a key of ENDED
    worker: str
    attempt: int
    started_at: float
    ended_at: float
    seconds: float
    loss_last: float
    images_per_s: float
    checkpoint_sha256: str
    environment: dict[str, Any] = Field(default_factory=dict)
    trainer_wait_s: float = 0.0  # of ended_at - started_at: waiting for a starting trainer's imports (torch, Lightning)


class Event(BaseModel):
    at: float
    what: str


class JobState(BaseModel):
    status: JobStatus = JobStatus.queued
    chunk: int = 0              # chunks committed: the number of the next one
    step: int = 0               # global steps committed: where the next chunk starts
    n_chunks: int               # chunk + the chunks planned from `step` (an estimate with time budgets)
    total_steps: int
    steps_per_epoch: int
    chunk_steps: int            # the plan's grid
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
        return self.step >= self.total_steps

    def replan(self) -> None:
        """n_chunks after `step` or the grid changed: the chunks done plus those planned from step."""
        self.n_chunks = self.chunk + chunks_left(self.step, self.total_steps, self.chunk_steps, self.restarts)

    @property
    def epoch(self) -> float:
        return self.start_epoch + self.step / self.steps_per_epoch

    def set_status(self, status: JobStatus, why: str, reason: str | None = None) -> None:
        """The one place status changes, recording when and why."""
        self.status = status
        self.reason = reason
        self.events.append(Event(at=time.time(), what=f"{status.value}: {why}"))

    def rewind_to(self, step: int, why: str) -> None:
        """Go back to the checkpoint at `step` (a newer one went bad): work after it is redone by the
        next chunk, which keeps this chunk's number."""
        self.step = step
        self.replan()
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
    """Specs and states on a Storage (a local folder or an object store).

    `update` is a compare-and-set on the state object, re-read and re-applied on a conflict. On a
    local folder the job's lock also serializes writers, so a change runs once there.
    """

    MAX_CONFLICTS = 50

    def __init__(self, storage: Path | str | Storage) -> None:
        self.backend = storage if isinstance(storage, Storage) else open_storage(storage)
        self.storage = Path(self.backend.url) if isinstance(self.backend, LocalStorage) else self.backend.url
        self.jobs_dir = Path(self.storage) / "jobs"

    @staticmethod
    def _key(job_id: str, name: str) -> str:
        if not JOB_ID.match(job_id):
            raise JobNotFound(job_id)
        return f"jobs/{job_id}/{name}"

    def layout(self, job_id: str) -> JobLayout:
        # Ids become paths: nothing may escape the storage root, by name or by a planted symlink.
        key = self._key(job_id, "state.json").rsplit("/", 1)[0]
        if isinstance(self.backend, LocalStorage):
            try:
                root = self.backend.path(key)
            except KeyRefused:
                raise JobNotFound(job_id) from None
            if not root.resolve().is_relative_to(self.jobs_dir.resolve()):
                raise JobNotFound(job_id)
            return JobLayout(root)
        return JobLayout(Path(key))

    def exists(self, job_id: str) -> bool:
        try:
            return self.backend.exists(self._key(job_id, "state.json"))
        except (JobNotFound, KeyRefused):
            return False

    def create(self, spec: TrainSpec, job_id: str | None = None, init_state: dict[str, Any] | None = None,
               n_train: int | None = None) -> tuple[str, JobState]:
        """Write a new job: the spec once, then the weights it starts from (`init_state`,
        checksummed) if any, then the state, whose presence makes the job exist. `n_train`: the
        training samples, when the caller has checked both lists already."""
        if n_train is None:
            n_train = sample_count(spec.train, spec.train_manifest_sha256)
            sample_count(spec.val, spec.val_manifest_sha256)
        plan = ChunkPlan(spec, n_train)
        job_id = job_id or new_job_id()
        self.layout(job_id)
        state = JobState(n_chunks=plan.n_chunks, total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
                         chunk_steps=plan.chunk_steps, start_epoch=spec.start_epoch)
        state.note(f"submitted: {spec.epochs} epochs, {plan.n_chunks} chunks of {plan.chunk_steps} steps")
        if spec.init_weights is not None:
            state.note(f"starts from {spec.init_weights} (sha256 {spec.init_weights_sha256}) as epoch {spec.start_epoch}, "
                       f"copied into the job; the optimizer starts fresh")
        if self.backend.put_if_absent(self._key(job_id, "job.json"), spec.model_dump_json(indent=1).encode()) is None:
            raise FileExistsError(f"job {job_id} already exists")
        if init_state is not None:
            self.backend.put_checked(self._key(job_id, "init_weights.pt"), checkpoint.to_bytes(init_state))
        self.backend.put(self._key(job_id, "state.json"), state.model_dump_json(indent=1).encode())
        return job_id, state

    def key_job(self, key: str) -> str | None:
        """The job an idempotency key made, if any."""
        try:
            return json.loads(self.backend.get(f"idempotency/{hashlib.sha256(key.encode()).hexdigest()}.json"))["job"]
        except (ObjectNotFound, ValueError, KeyError):
            return None

    def create_once(self, spec: TrainSpec, key: str, init_state: dict[str, Any] | None = None,
                    n_train: int | None = None) -> tuple[str, bool]:
        """The job this idempotency key made, or a new one: (job id, whether it was made now).

        A key's record is written before its job and marked done after, under a lock per key: a
        retried or concurrent submit finds the job instead of making another, a create cut short
        is finished by the next try, and a failed one (bad data) leaves no record behind."""
        record_key = f"idempotency/{hashlib.sha256(key.encode()).hexdigest()}.json"
        wanted = spec.model_dump(mode="json")  # as the record holds it (tuples as lists)
        with self.backend.locked(record_key):
            try:
                record = json.loads(self.backend.get(record_key))
            except ObjectNotFound:
                record = {"key": key, "job": new_job_id(), "spec": wanted, "at": time.time(), "done": False}
                if self.backend.put_if_absent(record_key, json.dumps(record).encode()) is None:
                    record = json.loads(self.backend.get(record_key))  # a concurrent submit wrote it first
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
            try:
                self.create(spec, job_id, init_state=init_state, n_train=n_train)
            except FileExistsError:
                return job_id, False  # a concurrent submit with this key is creating it
            except BaseException:
                self.backend.delete(record_key)
                raise
            self.backend.put(record_key, json.dumps({**record, "done": True}).encode())
            return job_id, True

    def spec(self, job_id: str) -> TrainSpec:
        try:
            return TrainSpec.model_validate_json(self.backend.get(self._key(job_id, "job.json")))
        except (ObjectNotFound, KeyRefused):
            raise JobNotFound(job_id) from None

    def _read_state(self, job_id: str) -> tuple[JobState, str]:
        try:
            data, version = self.backend.get_versioned(self._key(job_id, "state.json"))
        except (ObjectNotFound, KeyRefused):
            raise JobNotFound(job_id) from None
        return JobState.model_validate_json(data), version

    def write_spec(self, job_id: str, spec: TrainSpec) -> None:
        """Replace the spec: only `extend` does, under the job's lock, before the state follows it."""
        self.backend.put(self._key(job_id, "job.json"), spec.model_dump_json(indent=1).encode())

    def state(self, job_id: str) -> JobState:
        return self._read_state(job_id)[0]

    def ids(self) -> list[str]:
        return [j for j in self.backend.children("jobs") if JOB_ID.match(j) and self.exists(j)]

    def remove(self, job_id: str, allowed: Callable[[JobState], None]) -> None:
        """Delete a job and all its files. `allowed(state)` raises to refuse (checked under the
        job's lock); the job disappears at once (its folder renamed away, or on an object store its
        state object deleted first), so readers see the whole job or none."""
        layout = self.layout(job_id)
        with self._serialized(job_id):
            allowed(self.state(job_id))
            if isinstance(self.backend, LocalStorage):
                gone = self.jobs_dir / f".rm-{job_id}-{secrets.token_hex(3)}"
                os.rename(layout.root, gone)
            else:
                self.backend.delete(self._key(job_id, "state.json"))
        if isinstance(self.backend, LocalStorage):
            shutil.rmtree(gone, ignore_errors=True)
        else:
            for key in self.backend.list(f"jobs/{job_id}"):
                self.backend.delete(key)

    # A job's other files, by their name under the job ("weights/weight3.pt"), on either backend.
    def read(self, job_id: str, name: str) -> bytes | None:
        try:
            return self.backend.get(self._key(job_id, name))
        except (ObjectNotFound, KeyRefused):
            return None

    def where(self, job_id: str, name: str) -> str:
        """Where a job's file is, for people: a path in a folder, a URL in a bucket."""
        return f"{self.backend.url}/{self._key(job_id, name)}"

    def checkpoint_digest(self, job_id: str, step: int) -> str | None:
        """The sha256 of the step's checkpoint if it is complete and verifies, else None."""
        try:
            return self.backend.get_checked(self._key(job_id, f"checkpoints/step{step}.pt"))[1]
        except CheckpointError:
            return None

    def newest_good_checkpoint(self, job_id: str, before: int, after: int = -1) -> int:
        """The newest step in (after, before] whose checkpoint verifies; 0 (the seed) if none does."""
        names = (k.rsplit("/", 1)[-1] for k in self.backend.list(self._key(job_id, "checkpoints")))
        steps = sorted((int(n[4:-3]) for n in names if n.startswith("step") and n.endswith(".pt") and n[4:-3].isdigit()), reverse=True)
        return next((s for s in steps if after < s <= before and self.checkpoint_digest(job_id, s) is not None), 0)

    def log(self, job_id: str, record: dict[str, Any], name: str) -> None:
        """Add a record to the job's commit log: a line of commits.jsonl in a folder, an object of its
        own (commits/<name>.json, written whole, the same name on a retry) on an object store."""
        if isinstance(self.backend, LocalStorage):
            append_jsonl(self.layout(job_id).commit_log, record)
        else:
            self.backend.put(self._key(job_id, f"commits/{name}.json"), json.dumps(record).encode())

    def records(self, job_id: str, log: str) -> list[dict[str, Any]]:
        """The records of "commits", "metrics" or "validation": the .jsonl file in a folder, plus the
        objects under <log>/ (one per commit, or per chunk's metrics or validation), in name order."""
        lines: list[str] = []
        whole = self.read(job_id, f"{log}.jsonl")
        if whole is not None:
            lines += whole.decode().splitlines()
        for key in self.backend.list(self._key(job_id, log)):
            try:
                lines += self.backend.get(key).decode().splitlines()
            except ObjectNotFound:
                continue
        found = []
        for line in lines:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue  # a torn last line from a killed writer
        return found

    @contextmanager
    def _serialized(self, job_id: str) -> Iterator[None]:
        if not isinstance(self.backend, LocalStorage):
            yield  # the conditional PUT alone decides
            return
        with open(self.layout(job_id).root / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def update(self, job_id: str, change: Callable[[JobState], Any]) -> tuple[JobState, Any]:
        """Apply `change` to the state; it returns a value (e.g. whether it applied). The state is
        written back, conditional on being unchanged since read, only if `change` modified it."""
        if not self.exists(job_id):
            raise JobNotFound(job_id)
        with self._serialized(job_id):
            for conflict in range(self.MAX_CONFLICTS):
                state, version = self._read_state(job_id)
                before = state.model_dump_json()
                result = change(state)
                if state.model_dump_json() == before:
                    return state, result
                state.updated_at = time.time()
                if self.backend.put_if_match(self._key(job_id, "state.json"), state.model_dump_json(indent=1).encode(), version):
                    return state, result
                time.sleep(random.uniform(0, min(1.0, 0.02 * 2 ** conflict)))  # another writer won: back off, redo
        raise StorageError(f"job {job_id}: state kept changing under {self.MAX_CONFLICTS} tries to update it")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (O_APPEND: concurrent small appends do not interleave)."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
