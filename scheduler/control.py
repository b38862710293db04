"""What users can do to jobs: submit, cancel, pause, resume, look. Shared by the API and `relay run`."""
from __future__ import annotations

import errno
import stat
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.broker import QUEUES, Broker
from scheduler.health import BrokerDown, BrokerGuard, health
from segmodel.jobs import JobNotFound, JobState, JobStatus, JobStore
from segmodel.lists import read_list
from segmodel.datasets import is_remote, open_remote_list, sample_count
from segmodel.errors import DataError, InitWeightsError, show_path
from segmodel.spec import ChunkPlan, TrainSpec
from segmodel.storage import StorageError
from worker.app import make_app
from worker.lease import make_leases
from worker.registry import lost, online
from worker.settings import Settings


class SpecRejected(ValueError):
    """A spec that passed type checks but cannot run; names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TransitionRefused(ValueError):
    """The job's status does not allow the asked change (e.g. resuming a succeeded job)."""


def _absolute(field: str, value: str, base: Path) -> Path:
    """The path resolved against `base`; a SpecRejected naming the field for one no system call takes."""
    if "\x00" in value:
        raise SpecRejected(field, f"{show_path(value)!r} contains a NUL byte")
    try:
        return (base / value).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long for the system
        raise SpecRejected(field, f"{show_path(value)}: cannot resolve the path ({exc.__class__.__name__})") from None


class AmbiguousJob(ValueError):
    """A reference (an id prefix) that matches several jobs; names them."""

    def __init__(self, ref: str, candidates: list[str]) -> None:
        super().__init__(f"{ref!r} matches {len(candidates)} jobs: {', '.join(candidates)}; give more of the id")
        self.candidates = candidates


LATEST = ("last", "-")


def _unserved(depths: dict[str, int | None], workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Queues with work waiting and no live worker consuming them: the work waits forever."""
    served = {q for w in workers for q in w.get("queues", [])}
    return [{"queue": q, "waiting": n,
             "message": f"queue {q}: {n} waiting and no live worker consumes it (start one: relay worker --queues {q})"}
            for q, n in depths.items() if n and q not in served]


class Control:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore(settings.storage)
        self.app = make_app(settings)
        if not settings.embedded:
            # A hung broker must fail a publish within seconds (the job is on storage already and
            # the reconciler sends it later), not hold the request until the broker returns.
            self.app.conf.broker_transport_options = {**self.app.conf.broker_transport_options,
                                                      "socket_timeout": 5, "socket_connect_timeout": 5}
            self.app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0.5, "interval_step": 0.5}
        self.broker = Broker(self.app, settings)
        self.guard = BrokerGuard(settings)
        self.leases = make_leases(settings.broker_url, settings.storage, settings.lease_ttl_s)

    def _check_paths(self, spec: TrainSpec) -> TrainSpec:
        """Absolute list-file and init weights paths under the allowed data roots (the files are
        parsed on create, the weights read on submit); a local pretrained weights file must be a
        regular file."""
        update = {}
        roots = [r.resolve() for r in self.settings.data_roots]
        for field in ("train", "val", "init_weights"):
            if getattr(spec, field) is None or (field != "init_weights" and is_remote(getattr(spec, field))):
                continue
            path = _absolute(field, getattr(spec, field), self.settings.data_roots[0] if roots else Path.cwd())
            if roots and not any(path.is_relative_to(r) for r in roots):
                raise SpecRejected(field, f"{show_path(path)} is outside the allowed data roots ({', '.join(map(str, roots))})")
            update[field] = str(path)
        if spec.pretrained and spec.pretrained_path:
            path = _absolute("pretrained_path", spec.pretrained_path, Path.cwd())
            try:
                regular = stat.S_ISREG(path.stat().st_mode)
            except OSError as exc:
                why = "does not exist" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else f"cannot be opened ({exc.strerror})"
                raise SpecRejected("pretrained_path", f"{show_path(path)} {why}") from None
            if not regular:
                raise SpecRejected("pretrained_path", f"{show_path(path)} is not a regular file")
            update["pretrained_path"] = str(path)
        return spec.model_copy(update=update)

    @staticmethod
    def _check_lists(spec: TrainSpec) -> tuple[TrainSpec, int]:
        """Parse both lists (a pushed list: read from its bucket and checked against its manifest,
        whose sha256 the spec then records); the spec and its training sample count."""
        update: dict[str, str] = {}
        counts = {}
        for field in ("train", "val"):
            where = getattr(spec, field)
            try:
                if is_remote(where):
                    remote = open_remote_list(where, getattr(spec, f"{field}_manifest_sha256"))
                    update[f"{field}_manifest_sha256"] = remote.manifest_sha256
                    counts[field] = remote.n_samples
                else:
                    counts[field] = len(read_list(where))
            except (DataError, StorageError) as exc:
                raise SpecRejected(field, str(exc)) from exc
        return spec.model_copy(update=update), counts["train"]

    def named(self, name: str) -> list[str]:
        found = []
        for job_id in self.store.ids():
            try:
                if self.store.spec(job_id).name == name:
                    found.append(job_id)
            except JobNotFound:
                continue  # removed while we looked
        return found

    def resolve(self, ref: str) -> str:
        """The job a user means: its id, its name, `last`/`-` (the newest), or a unique id prefix.
        Raises JobNotFound, or AmbiguousJob naming the candidates."""
        ids = self.store.ids()
        if ref in ids:
            return ref
        if ref in LATEST:
            if not ids:
                raise JobNotFound(ref)
            return max(ids, key=lambda i: (self.store.state(i).created_at, i))
        named = self.named(ref)
        if len(named) == 1:
            return named[0]
        matches = named or [i for i in ids if i.startswith(ref)]
        if not matches:
            raise JobNotFound(ref)
        if len(matches) > 1:
            raise AmbiguousJob(ref, matches)
        return matches[0]

    def submit(self, spec: TrainSpec) -> tuple[str, JobState]:
        job_id, state, _ = self.submit_once(spec, None)
        return job_id, state

    def submit_once(self, spec: TrainSpec, idempotency_key: str | None) -> tuple[str, JobState, bool]:
        """Create and enqueue a job: (id, state, whether it was made now). A key already used with
        the same spec answers with the job it made, and sends nothing."""
        spec = self._check_paths(spec)
        init_state = None
        if spec.init_weights is not None:
            # Imported here: torch and Lightning take seconds to import, and only a job that starts
            # from a weights file needs them; the scheduler and `relay run` start without.
            from segmodel.initweights import read_init_weights
            try:
                init_state, digest = read_init_weights(Path(spec.init_weights), spec)
            except InitWeightsError as exc:
                raise SpecRejected("init_weights", str(exc)) from exc
            spec = spec.model_copy(update={"init_weights_sha256": digest})
        taken = self.named(spec.name) if spec.name is not None else []
        if taken and not (idempotency_key is not None and self.store.key_job(idempotency_key) in taken):
            raise SpecRejected("name", f"{spec.name!r} is already the name of job {taken[0]} (relay rm it, or pick another)")
        spec, n_train = self._check_lists(spec)
        if idempotency_key is None:
            job_id, created = self.store.create(spec, init_state=init_state, n_train=n_train)[0], True
        else:
            job_id, created = self.store.create_once(spec, idempotency_key, init_state, n_train=n_train)
        if not created:
            return job_id, self.store.state(job_id), False
        return job_id, self._dispatch(job_id, "submitted"), True

    def _dispatch(self, job_id: str, why: str) -> JobState:
        """Send the job's next task. With the broker down the job stays as storage has it (queued or
        running) and says so; the reconciler sends the task once the broker answers."""
        try:
            return self.guard.call(lambda: self.broker.dispatch(self.store, job_id, why))
        except BrokerDown as exc:
            note = f"not enqueued: {exc}; the reconciler enqueues it when the broker answers"
            return self.store.update(job_id, lambda s: s.note(note))[0]

    def cancel(self, job_id: str) -> JobState:
        def stop(s: JobState) -> None:
            if s.status.final:
                raise TransitionRefused(f"job {job_id} is already {s.status.value}")
            s.set_status(JobStatus.cancelled, "cancelled by user", "cancelled by user")

        return self.store.update(job_id, stop)[0]

    def pause(self, job_id: str) -> JobState:
        def hold(s: JobState) -> None:
            if not s.status.active:
                raise TransitionRefused(f"job {job_id} is {s.status.value}, not queued or running")
            s.set_status(JobStatus.paused, "paused by user (the chunk in progress stops at its next step and commits)")

        return self.store.update(job_id, hold)[0]

    def resume(self, job_id: str) -> JobState:
        """Continue a paused, failed or cancelled job from its last good checkpoint."""
        def go(s: JobState) -> None:
            if s.status not in (JobStatus.paused, JobStatus.failed, JobStatus.cancelled):
                raise TransitionRefused(f"job {job_id} is {s.status.value}; only paused, failed or cancelled jobs resume")
            if s.step > 0 and self.store.checkpoint_digest(job_id, s.step) is None:
                why = f"checkpoint at step {s.step} is missing or corrupt"
                s.rewind_to(self.store.newest_good_checkpoint(job_id, before=s.step), why)
                self.store.log(job_id, {"rewind_to_chunk": s.chunk, "step": s.step, "at": time.time(), "why": why},
                               f"c{s.chunk:05d}.rewind{len(s.events)}")
            s.attempts, s.last_error = 0, None
            s.set_status(JobStatus.running if s.history else JobStatus.queued, f"resumed by user at chunk {s.chunk}")

        self.store.update(job_id, go)
        return self._dispatch(job_id, "resumed")

    def remove(self, job_id: str) -> None:
        """Delete a job with its checkpoints and weights; refused while it is queued or running, or
        while a worker still trains its chunk in flight (a job paused a moment ago)."""
        def allowed(s: JobState) -> None:
            if s.status.active:
                raise TransitionRefused(f"job {job_id} is {s.status.value}: pause or cancel it first")
            holder, _ = self.guard.ask(lambda: self.leases.holder(job_id))
            if holder:
                raise TransitionRefused(f"job {job_id}: {holder} still trains its chunk in flight; try again when it commits")

        self.store.remove(job_id, allowed)

    def extend(self, job_id: str, epochs: int) -> JobState:
        """Give a succeeded job more epochs: it trains on from its final full-state checkpoint (model,
        Adam state, RNG), so it ends as a job submitted with `epochs` would, and is evaluated again."""
        def grow(s: JobState) -> None:
            spec = self.store.spec(job_id)
            if s.status != JobStatus.succeeded:
                hint = " (resume it first)" if s.status in (JobStatus.paused, JobStatus.failed, JobStatus.cancelled) else ""
                raise TransitionRefused(f"job {job_id} is {s.status.value}; only a succeeded job can be extended{hint}")
            if epochs <= spec.epochs:
                raise SpecRejected("epochs", f"{epochs} is not more than the {spec.epochs} epochs job {job_id} has")
            try:
                new = TrainSpec.model_validate({**spec.model_dump(), "epochs": epochs, "extended_at": (*spec.extended_at, spec.epochs)})
            except ValidationError as exc:
                raise SpecRejected("epochs", "; ".join(e["msg"] for e in exc.errors())) from exc
            try:
                plan = ChunkPlan(new, sample_count(new.train, new.train_manifest_sha256))
            except (DataError, StorageError) as exc:
                raise SpecRejected("train", str(exc)) from exc
            if plan.steps_per_epoch != s.steps_per_epoch:
                raise SpecRejected("train", f"{new.train} now gives {plan.steps_per_epoch} steps per epoch; job {job_id} "
                                            f"was trained with {s.steps_per_epoch} (its training list changed)")
            if self.store.checkpoint_digest(job_id, s.total_steps) is None:
                raise TransitionRefused(f"job {job_id}: its final full-state checkpoint (step {s.total_steps}) is missing or corrupt; "
                                        f"extend continues from it")
            self.store.write_spec(job_id, new)
            s.total_steps, s.chunk_steps, s.restarts = plan.total_steps, plan.chunk_steps, plan.restarts
            s.replan()
            s.attempts, s.last_error = 0, None
            s.set_status(JobStatus.running, f"extended from {spec.epochs} to {epochs} epochs by user; "
                                            f"continuing from step {s.step} (chunk {s.chunk})")

        self.store.update(job_id, grow)
        return self._dispatch(job_id, f"extended to {epochs} epochs")

    def view(self, job_id: str) -> dict[str, Any]:
        spec, state = self.store.spec(job_id), self.store.state(job_id)
        done = [h for h in state.history if h.seconds > 0]
        per_step = sum(h.seconds for h in done) / max(sum(h.end_step - h.start_step for h in done), 1) if done else None
        eta = per_step * (state.total_steps - state.step) if per_step is not None and state.status.active else None
        held = state.status.active or state.status == JobStatus.paused
        worker, broker_error = self.guard.ask(lambda: self.leases.holder(job_id)) if held else (None, None)
        # Paused with a lease still held: the chunk in flight has not committed yet.
        shown = "pausing" if state.status == JobStatus.paused and worker else state.status.value
        return {
            "id": job_id,
            "state": shown,
            "spec": spec.model_dump(),
            "progress": {"chunk": state.chunk, "n_chunks": state.n_chunks, "step": state.step,
                         "total_steps": state.total_steps, "epoch": state.epoch, "epochs": spec.epochs,
                         "start_epoch": state.start_epoch, "steps_per_epoch": state.steps_per_epoch,
                         "fraction": state.step / state.total_steps},
            "last_loss": state.last_loss,
            "eta_s": eta,
            "worker": worker,
            "broker_error": broker_error,
            "reason": state.reason,
            "last_error": state.last_error,
            "attempts": state.attempts,
            "created_at": state.created_at,
            "updated_at": state.updated_at,
            "history": [h.model_dump() for h in state.history],
            "events": [e.model_dump() for e in state.events],
            "has_report": self.store.backend.exists(f"jobs/{job_id}/eval/report.json"),
        }

    def queue(self) -> dict[str, Any]:
        """Queue depths from the broker (None each, with the reason, while it is down); workers from storage."""
        depths, broker_error = self.guard.ask(self.broker.depths)
        workers = online(self.store.backend)
        return {"queues": depths if depths is not None else dict.fromkeys(QUEUES), "broker_error": broker_error,
                "workers": workers, "lost_workers": lost(self.store.backend),
                "warnings": _unserved(depths or {}, workers), "at": time.time()}

    def health(self) -> dict[str, Any]:
        return health(self.settings, self.broker.ping)
