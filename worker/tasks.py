"""The chunk protocol: a message (job_id, chunk) moves a job exactly one chunk forward, or nothing.

On receipt: drop it if the job is past that chunk, not active, or leased by another worker; else
take the lease, count the attempt, train in the trainer process from the job's committed step
while a heartbeat renews the lease, commit with a compare-and-set (the job must still be at this
chunk and the lease still ours), enqueue the next chunk (or the evaluation), release. Storage, not
the broker, says where a job stands, so duplicated, stale and redelivered messages are harmless.

A chunk is planned to end at the next line of the job's grid (`ChunkPlan.planned_end`); it ends
sooner at a step boundary when its time budget runs out, when the job is paused, or when the
worker is told to stop (`worker.lifetime`), and commits there: the next chunk goes on from that
step on any worker, and the weights are the same bits as if the chunk had been planned to end there.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from celery import shared_task
from celery.signals import worker_process_init, worker_process_shutdown
from kombu.utils.functional import retry_over_time

from worker.broker import Broker
from segmodel.jobs import ENDED, ChunkRecord, JobNotFound, JobState, JobStatus, JobStore
from segmodel.lists import read_list
from segmodel.errors import DataError
from segmodel.storage import StorageError
from worker.datasets import localize
from worker.trainer_env import worker_env
from segmodel.spec import ChunkPlan, TrainSpec
from worker.app import EVAL_TASK, TRAIN_TASK, make_app
from worker.jobfiles import JobFiles
from worker.lifetime import stop_requested
from worker.lease import Leases, make_leases
from worker.registry import WorkerRegistry
from worker.settings import Settings
from worker.trainer import GO, KILL, STOP, Cancelled, TrainerCrashed, TrainerFailed, TrainerProcess

log = logging.getLogger("relay.worker")
STATE_POLL_S = 1.0
# The broker or storage not answering: what a worker rides out or reports, never what fails a job.
INFRA_ERRORS = (redis.RedisError, OSError, StorageError)
PATIENCE_S = 30.0
T = TypeVar("T")


@dataclass
class Runtime:
    settings: Settings
    store: JobStore
    broker: Broker
    leases: Leases
    trainer: TrainerProcess
    registry: WorkerRegistry


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's collaborators, built once from the environment."""
    global _runtime
    if _runtime is None:
        s = Settings()
        _runtime = Runtime(
            settings=s,
            store=JobStore(s.storage),
            broker=Broker(make_app(s), s),
            leases=make_leases(s.broker_url, s.storage, s.lease_ttl_s),
            trainer=TrainerProcess(env=worker_env(), stall_timeout_s=s.stall_timeout_s),
            registry=WorkerRegistry(s.storage, s.node, s.queues),
        )
    return _runtime


@worker_process_init.connect
def _warm_up(**_: Any) -> None:
    rt = runtime()
    rt.trainer.start()  # import torch now, not when the first chunk arrives
    rt.registry.start()


@worker_process_shutdown.connect
def _shut_down(**_: Any) -> None:
    if _runtime is not None:
        _runtime.trainer.kill()
        _runtime.registry.stop()


class _Watch:
    """Called between polls of the trainer: renew the lease; kill on cancel or a lost lease; ask
    for a stop at the next step when the job is paused or the worker is told to stop.

    A broker that does not answer (down, paused, cut off) does not stop the chunk while the lease
    may still be ours; once a whole TTL has passed since the last renewal that succeeded, the chunk
    ends at its next step, to be committed if the lease can be retaken. A lease found lost is
    retaken only while the job is still where this work belongs (`is_current`): a worker that was
    frozen past its job's end trains and writes nothing more; one found taken kills the trainer."""

    def __init__(self, rt: Runtime, job_id: str, token: str, is_current: Callable[[JobState], bool]) -> None:
        self.rt, self.job_id, self.token, self.is_current = rt, job_id, token, is_current
        self.renewed = self.tried = self.polled = time.monotonic()
        self.why_stopped = ""
        self.stop_reason: str | None = None  # a key of segmodel.jobs.ENDED
        self.warned = False

    def __call__(self) -> str:
        now = time.monotonic()
        if now - self.tried >= self.rt.settings.heartbeat_s:
            self.tried = now
            try:
                if not self.renew():
                    return KILL
                self.renewed, self.warned = now, False
            except INFRA_ERRORS as exc:
                if not self.warned:
                    log.warning("%s: cannot renew the lease (%s); training on while it may still be valid", self.job_id, exc)
                    self.warned = True
                unrenewed = time.monotonic() - self.renewed  # the failed call itself may have taken seconds
                if unrenewed >= self.rt.settings.lease_ttl_s and self.stop_reason is None:
                    # It may have expired: end the chunk at the next step and keep those steps if the
                    # lease can be retaken once the broker answers (nothing is uploaded before). A stop
                    # asked for meanwhile (SIGTERM, a runtime limit) names the reason.
                    log.warning("%s: lease not renewed for %.0f s; ending the chunk at its next step", self.job_id, unrenewed)
                    self.stop_reason = stop_requested(self.rt.settings.caches, self.rt.settings.node) or "lease"
        if self.stop_reason is None:
            self.stop_reason = stop_requested(self.rt.settings.caches, self.rt.settings.node)
        if now - self.polled >= STATE_POLL_S:
            self.polled = now
            try:
                status = self.rt.store.state(self.job_id).status
            except StorageError as exc:  # storage hiccup: the commit is fenced anyway
                log.warning("%s: cannot read the job's state (%s)", self.job_id, exc)
                return STOP if self.stop_reason else GO
            if status in (JobStatus.cancelled, JobStatus.failed):
                self.why_stopped = f"job {status.value}"
                return KILL
            if status == JobStatus.paused and self.stop_reason is None:
                self.stop_reason = "pause"
        return STOP if self.stop_reason else GO

    def renew(self) -> bool:
        if self.rt.leases.renew(self.job_id, self.token):
            return True
        # Lost (expired, or the broker was flushed): retake it if the work is still wanted and free.
        state = self.rt.store.state(self.job_id)
        if not (state.status.active or state.status == JobStatus.paused) or not self.is_current(state):
            self.why_stopped = f"job moved on ({state.status.value}, chunk {state.chunk}) while the lease was lost"
            return False
        if self.rt.leases.acquire(self.job_id, self.rt.settings.node, self.token) is None:
            self.why_stopped = "lease taken by another worker"
            return False
        return True


def _patiently(rt: Runtime, what: str, fn: Callable[[], T]) -> T:
    """fn(), tried again every second while the broker or storage does not answer, for up to a lease
    TTL (at least PATIENCE_S): trained steps are not thrown away for a moment's outage. A worker
    stopping gracefully spends its grace period here rather than losing the chunk."""
    def waiting(exc: BaseException, intervals: Iterator[float], _: int) -> float:
        log.warning("cannot %s yet (%s); trying again", what, exc)
        return next(intervals)

    return retry_over_time(fn, INFRA_ERRORS, errback=waiting, interval_start=1, interval_step=0, interval_max=1,
                           timeout=max(rt.settings.lease_ttl_s, PATIENCE_S))


def _may_upload(rt: Runtime, watch: _Watch) -> bool:
    """Only the lease holder of a job still at this work uploads its files: a worker cut off
    mid-chunk and reconnected after another took over must not overwrite what that one committed."""
    try:
        return _patiently(rt, "prove the lease is ours", watch.renew)
    except INFRA_ERRORS as exc:
        watch.why_stopped = f"cannot prove the lease is ours: {exc}"
        return False


def _begin(rt: Runtime, job_id: str, is_current: Any) -> tuple[JobState, bool]:
    """Count an attempt; fail the job once the attempts are used up."""
    node, cap = rt.settings.node, rt.settings.max_attempts

    def begin(s: JobState) -> bool:
        if not s.status.active or not is_current(s):
            return False
        if s.attempts >= cap:
            what = f"chunk {s.chunk}" if not s.training_done else "evaluation"
            s.set_status(JobStatus.failed, f"{what} gave up", f"{what} failed {s.attempts} times; last: {s.last_error or 'worker lost mid-chunk'}")
            return False
        s.attempts += 1
        if s.status == JobStatus.queued:
            s.set_status(JobStatus.running, f"first chunk taken by {node}")
        s.worker = node
        s.note(f"{'chunk ' + str(s.chunk) if not s.training_done else 'evaluation'} attempt {s.attempts} on {node}")
        return True

    return rt.store.update(job_id, begin)


def _keep_lease(rt: Runtime, job_id: str, token: str) -> Callable[[], None]:
    """A heartbeat for work before the trainer runs (a dataset fetch): renews the lease when due. A
    broker that does not answer is ridden out: the chunk's uploads and commit are fenced anyway."""
    renewed = time.monotonic()

    def beat() -> None:
        nonlocal renewed
        if time.monotonic() - renewed >= rt.settings.heartbeat_s:
            renewed = time.monotonic()
            try:
                rt.leases.renew(job_id, token)
            except INFRA_ERRORS as exc:
                log.warning("%s: cannot renew the lease during the data fetch (%s)", job_id, exc)

    return beat


def _failed(rt: Runtime, job_id: str, what: str, exc: Exception) -> None:
    """Record a failure: permanent ones (data that must change) fail the job now, others are
    retried up to the cap."""
    permanent = isinstance(exc, DataError) or (isinstance(exc, TrainerFailed) and exc.permanent)
    message = f"{what}: {exc}"

    def record(s: JobState) -> bool:
        s.worker = None
        if permanent:
            s.set_status(JobStatus.failed, f"{what} failed", message)
            return False
        s.last_error = message
        s.note(f"retryable failure: {message}")
        return s.status.active

    try:
        _, retry = rt.store.update(job_id, record)
        if retry:
            rt.broker.dispatch(rt.store, job_id, f"retry after: {message}")
    except INFRA_ERRORS as cause:  # e.g. the disk that failed the chunk is full for the record too
        log.error("%s: %s; not recorded (%s): the reconciler sends the chunk again once storage and broker answer",
                  job_id, message, cause)
        rt.registry.trouble(f"job {job_id}: {message}; could not record it: {cause}")


def _roll_back(rt: Runtime, job_id: str, exc: Exception) -> None:
    """The start checkpoint is corrupt: continue from the newest good one, and say so."""
    def back(s: JobState) -> bool:
        if not s.status.active:
            return False
        s.rewind_to(rt.store.newest_good_checkpoint(job_id, before=s.step), str(exc))
        rt.store.log(job_id, {"rewind_to_chunk": s.chunk, "step": s.step, "at": time.time(), "why": str(exc)},
                     f"c{s.chunk:05d}.rewind{len(s.events)}")
        return True

    if rt.store.update(job_id, back)[1]:
        rt.broker.dispatch(rt.store, job_id, "rolled back to the newest good checkpoint")


def handle_train(rt: Runtime, job_id: str, chunk: int) -> str:
    try:
        spec, state = rt.store.spec(job_id), rt.store.state(job_id)
    except JobNotFound:
        return "dropped: no such job"
    if not state.status.active:
        return f"dropped: job is {state.status.value}"
    if state.chunk != chunk:
        return f"dropped: stale message, job is at chunk {state.chunk}"
    token = rt.leases.acquire(job_id, rt.settings.node)
    if token is None:
        return f"dropped: leased by {rt.leases.holder(job_id)}"
    files = JobFiles(rt.store, job_id, rt.settings.caches / "scratch")
    try:
        begun, go = _begin(rt, job_id, lambda s: s.chunk == chunk)
        if not go:
            return "dropped: job moved on or gave up"
        attempt = begun.attempts
        layout = files.layout
        try:
            spec = localize(spec, rt.settings.caches, rt.store, job_id, rt.settings.node, _keep_lease(rt, job_id, token))
        except (DataError, StorageError, OSError) as exc:  # bad data fails the job; the rest is retried
            _failed(rt, job_id, f"chunk {chunk}", exc)
            return f"failed: {exc}"
        plan = ChunkPlan(spec, len(read_list(spec.train)))
        start, end = begun.step, plan.planned_end(begun.step)
        rt.trainer.start()
        rt.registry.doing(job_id, chunk, rt.trainer.pid)
        started = time.time()
        if (done := rt.store.newest_good_checkpoint(job_id, before=end, after=start)) > start:
            # Trained before, not committed (the worker died in between): commit, don't retrain.
            result = _trained_before(rt, job_id, start, done, state.last_loss)
        else:
            files.begin()
            files.pull(f"checkpoints/step{start}.pt", "checkpoints/backbone.pt", "init_weights.pt")
            watch = _Watch(rt, job_id, token, lambda s: s.chunk == chunk)
            request = {"op": "train", "spec": spec.model_dump(), "job_dir": str(layout.root), "chunk": chunk,
                       "start": start, "end": end, "cache_dir": str(rt.settings.caches),
                       "attempt": attempt, "worker": rt.settings.node}
            try:
                result = rt.trainer.run(request, watch)
            except Cancelled:
                rt.store.update(job_id, lambda s: s.note(f"chunk {chunk} stopped on {rt.settings.node}: {watch.why_stopped}"))
                return f"stopped: {watch.why_stopped}"
            except TrainerFailed as exc:
                if exc.kind == "CheckpointError":
                    _roll_back(rt, job_id, exc)
                else:
                    _failed(rt, job_id, f"chunk {chunk}", exc)
                return f"failed: {exc}"
            except TrainerCrashed as exc:
                _failed(rt, job_id, f"chunk {chunk}", exc)
                return f"crashed: {exc}"
            if not _may_upload(rt, watch):
                rt.store.update(job_id, lambda s: s.note(f"chunk {chunk} on {rt.settings.node}: trained, not uploaded: {watch.why_stopped}"))
                return f"dropped: {watch.why_stopped}"
            files.push(f"c{chunk:05d}.a{attempt}.{rt.settings.node}")
            if result["stopped"] == "told":
                result["stopped"] = watch.stop_reason
            result["trainer_wait_s"] = round(rt.trainer.waited_s, 3)
        record = ChunkRecord(chunk=chunk, worker=result.get("worker", rt.settings.node), attempt=attempt,
                             ended=result["stopped"] or _planned_end(spec, plan, result["end_step"]),
                             started_at=started, ended_at=time.time(), trainer_wait_s=result.get("trainer_wait_s", 0.0),
                             **{k: result[k] for k in ("start_step", "end_step", "seconds", "loss_last", "images_per_s",
                                                       "checkpoint_sha256", "environment")})

        committed: dict[str, Any] = {}  # the commit log's line, once the state holds the commit

        def commit(s: JobState) -> bool:
            committed.clear()  # an earlier try whose state write failed did not commit
            # Fencing: only the lease holder commits, and only if the job is still at this chunk.
            if s.chunk != chunk or s.status not in (JobStatus.queued, JobStatus.running, JobStatus.paused):
                return False
            if not rt.leases.renew(job_id, token):
                return False
            s.chunk, s.step, s.attempts, s.worker = chunk + 1, record.end_step, 0, None
            s.replan()
            s.last_loss, s.last_error = record.loss_last, None
            s.history.append(record)
            if record.end_step < end and record.ended != "recovered":
                s.note(f"chunk {chunk} ended at step {record.end_step} of {start}..{end}: {ENDED.get(record.ended, record.ended)}")
            if record.environment.get("deterministic") is False:
                s.note(f"chunk {chunk} ran without deterministic kernels ({record.environment.get('why_not')}): "
                       f"the job's weights are reproducible within float rounding only")
            committed.update(chunk=chunk, start_step=record.start_step, end_step=record.end_step, ended=record.ended,
                             worker=rt.settings.node, token=token, started_at=started, committed_at=time.time())
            if s.status == JobStatus.paused:
                s.note(f"paused after chunk {chunk}")
            return s.status.active

        try:
            _, go_on = _patiently(rt, f"commit chunk {chunk} of {job_id}", lambda: rt.store.update(job_id, commit))
        except INFRA_ERRORS as exc:
            # Not fenced, not made. The trained checkpoint stays: the next attempt commits it
            # without training (once the reconciler or a redelivery sends the chunk again).
            log.warning("%s chunk %s: trained to step %s, not committed: %s", job_id, chunk, record.end_step, exc)
            return f"not committed: {exc}"
        if committed:
            # Written after the state holds the commit, so a state write that fails (a full disk, a
            # conflict retried) leaves no line for a commit that did not happen.
            try:
                rt.store.log(job_id, committed, f"c{chunk:05d}.{token}")
            except INFRA_ERRORS as exc:
                log.error("%s chunk %s: committed, but not written to the commit log: %s", job_id, chunk, exc)
        if go_on:
            # Release first: the next chunk's worker must find the lease free, not drop its message.
            rt.leases.release(job_id, token)
            rt.broker.dispatch(rt.store, job_id, f"chunk {chunk} committed by {rt.settings.node}")
        return f"committed chunk {chunk}" if go_on else "done, job not active"
    finally:
        _let_go(rt, job_id, token, files)


def _let_go(rt: Runtime, job_id: str, token: str, files: JobFiles) -> None:
    """After a chunk or an evaluation, whatever happened: scratch removed, lease released (if the
    broker answers; else it expires by itself)."""
    files.clean()
    rt.registry.doing(None, None)
    try:
        rt.leases.release(job_id, token)
    except INFRA_ERRORS as exc:
        log.warning("%s: lease not released (%s); it expires by itself", job_id, exc)


def _trained_before(rt: Runtime, job_id: str, start: int, done: int, last_loss: float | None) -> dict[str, Any]:
    """The record of steps (start, done] trained by an attempt that died before committing them,
    from that attempt's own metrics: its worker, loss and time."""
    steps = {m["step"]: m for m in rt.store.records(job_id, "metrics") if start < m.get("step", -1) <= done}
    tail = steps.get(done, {})
    seconds = sum(m.get("step_s", 0.0) for m in steps.values())
    images = sum(m.get("images_per_s", 0.0) * m.get("step_s", 0.0) for m in steps.values())
    result: dict[str, Any] = {"start_step": start, "end_step": done, "loss_last": tail.get("loss", last_loss or 0.0),
                              "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else 0.0,
                              "environment": {"recovered": True, "committed_by": rt.settings.node},
                              "checkpoint_sha256": rt.store.checkpoint_digest(job_id, done), "stopped": "recovered"}
    if "worker" in tail:
        result["worker"] = tail["worker"]
    return result


def _planned_end(spec: TrainSpec, plan: ChunkPlan, step: int) -> str:
    """Why a chunk that ran to its planned end ended there."""
    if step >= plan.total_steps:
        return "job end"
    return "steps" if spec.chunk_steps else "epoch"


def handle_evaluate(rt: Runtime, job_id: str) -> str:
    try:
        spec, state = rt.store.spec(job_id), rt.store.state(job_id)
    except JobNotFound:
        return "dropped: no such job"
    if not state.status.active or not state.training_done:
        return f"dropped: job is {state.status.value} at chunk {state.chunk}"
    token = rt.leases.acquire(job_id, rt.settings.node)
    if token is None:
        return f"dropped: leased by {rt.leases.holder(job_id)}"
    files = JobFiles(rt.store, job_id, rt.settings.caches / "scratch")
    try:
        _, go = _begin(rt, job_id, lambda s: s.training_done)
        if not go:
            return "dropped"
        layout = files.layout
        try:
            spec = localize(spec, rt.settings.caches, rt.store, job_id, rt.settings.node, _keep_lease(rt, job_id, token))
        except (DataError, StorageError, OSError) as exc:  # bad data fails the job; the rest is retried
            _failed(rt, job_id, "evaluation", exc)
            return f"failed: {exc}"
        files.begin()
        files.pull(f"weights/weight{spec.epochs}.pt")
        rt.trainer.start()
        rt.registry.doing(job_id, "eval", rt.trainer.pid)
        watch = _Watch(rt, job_id, token, lambda s: s.training_done)
        request = {"op": "evaluate", "spec": spec.model_dump(), "job_dir": str(layout.root), "weights": str(layout.weight(spec.epochs)),
                   "cache_dir": str(rt.settings.caches)}
        try:
            report = rt.trainer.run(request, watch)
        except Cancelled:
            return f"stopped: {watch.why_stopped}"
        except (TrainerFailed, TrainerCrashed) as exc:
            _failed(rt, job_id, "evaluation", exc)
            return f"failed: {exc}"
        if not _may_upload(rt, watch):
            return f"dropped: {watch.why_stopped}"
        files.push("eval")

        def finish(s: JobState) -> bool:
            if not s.status.active or not s.training_done:
                return False
            s.attempts, s.worker = 0, None
            s.set_status(JobStatus.succeeded, f"evaluated on {rt.settings.node}: mIoU {report['mean_iou']:.4f}, "
                                              f"pixel accuracy {report['pixel_accuracy']:.4f}")
            return True

        rt.store.update(job_id, finish)
        return "evaluated"
    finally:
        _let_go(rt, job_id, token, files)


@shared_task(name=TRAIN_TASK)
def train_chunk(job_id: str, chunk: int) -> str:
    outcome = handle_train(runtime(), str(job_id), int(chunk))
    log.info("%s chunk %s: %s", job_id, chunk, outcome)
    return outcome


@shared_task(name=EVAL_TASK)
def evaluate(job_id: str) -> str:
    outcome = handle_evaluate(runtime(), str(job_id))
    log.info("%s evaluation: %s", job_id, outcome)
    return outcome
