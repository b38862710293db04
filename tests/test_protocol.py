"""The chunk protocol in-process: a stand-in trainer, real job store, leases and embedded broker."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_spec
from worker.broker import Broker
from scheduler.control import Control
from segmodel.jobs import JobStatus, append_jsonl
from segmodel import checkpoint
from worker import tasks
from worker.lease import FileLeases
from worker.registry import WorkerRegistry
from worker.settings import Settings
from worker.trainer import KILL, STOP, Cancelled, TrainerCrashed, TrainerFailed


class FakeTrainer:
    """Answers like the trainer process; `script` decides each reply (a dict, or an exception)."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []

    def run(self, request: dict[str, Any], tick: Any) -> dict[str, Any]:
        self.requests.append(request)
        reply = self.script.pop(0)
        if isinstance(reply, Exception):
            raise reply
        if callable(reply):  # something happens while the chunk trains; then the watch runs
            reply()
            what = tick()
            if what == KILL:
                raise Cancelled("stopped")
            return self._result(request, stopped=what == STOP)
        return reply if isinstance(reply, dict) else self._result(request)

    @staticmethod
    def _result(request: dict[str, Any], stopped: bool = False) -> dict[str, Any]:
        """The planned range trained, or (told to stop) its first step only."""
        layout_root = Path(request["job_dir"])
        end = request["start"] + 1 if stopped else request["end"]
        path = layout_root / "checkpoints" / f"step{end}.pt"
        digest = checkpoint.save({"step": end}, path)
        return {"start_step": request["start"], "end_step": end, "seconds": 0.1, "loss_last": 1.0,
                "images_per_s": 10.0, "checkpoint_sha256": digest, "environment": {"device": "cpu"},
                "stopped": "told" if stopped else None}

    pid = None
    waited_s = 0.0  # for a starting trainer's imports: none here

    def start(self) -> None:
        pass

    def kill(self) -> None:
        pass


@pytest.fixture
def rig(tmp_path: Path, tiny_data: dict[str, Path]) -> Any:
    settings = Settings(storage=tmp_path / "storage", node="w1", max_attempts=3, lease_ttl_s=30)
    control = Control(settings)
    job_id, _ = control.submit(tiny_spec(tiny_data))
    rt = tasks.Runtime(settings=settings, store=control.store, broker=Broker(control.app, settings),
                       leases=FileLeases(settings.storage, 30), trainer=FakeTrainer([]),  # type: ignore[arg-type]
                       registry=WorkerRegistry(settings.storage, "w1", ["cpu"]))
    return rt, control, job_id


def messages(rt: tasks.Runtime) -> list[list[Any]]:
    """The (job, chunk) args of the messages waiting in the embedded queue."""
    import base64
    import json

    return [json.loads(base64.b64decode(m["body"]))[0] for _, m in rt.broker._messages()]


def test_commit_moves_exactly_one_chunk_and_enqueues_the_next(rig: Any) -> None:
    rt, control, job_id = rig
    rt.trainer.script = ["ok"]
    assert tasks.handle_train(rt, job_id, 0) == "committed chunk 0"
    state = control.store.state(job_id)
    assert (state.chunk, state.step, state.status) == (1, 3, JobStatus.running)
    assert [job_id, 1] in messages(rt)
    # A duplicate of the same message, and a stale one, are dropped without training.
    assert tasks.handle_train(rt, job_id, 0).startswith("dropped: stale")
    assert tasks.handle_train(rt, job_id, 5).startswith("dropped: stale")
    assert len(rt.trainer.requests) == 1
    assert control.store.state(job_id).chunk == 1


def test_leased_by_another_worker_is_dropped(rig: Any) -> None:
    rt, control, job_id = rig
    assert rt.leases.acquire(job_id, "w2") is not None
    assert tasks.handle_train(rt, job_id, 0) == "dropped: leased by w2"
    assert rt.trainer.requests == [] and control.store.state(job_id).attempts == 0


def test_checkpoint_already_written_is_committed_without_training(rig: Any) -> None:
    rt, control, job_id = rig
    layout = control.store.layout(job_id)
    checkpoint.save({"step": 3}, layout.checkpoint(3))  # a worker died after writing, before committing
    for step, loss in ((1, 2.5), (2, 2.25), (3, 2.0)):  # its metrics: the record tells its work, not the commit's
        append_jsonl(layout.metrics_file, {"step": step, "loss": loss, "step_s": 0.5, "images_per_s": 8.0, "worker": "w0",
                                           "chunk": 0, "attempt": 1})
    assert tasks.handle_train(rt, job_id, 0) == "committed chunk 0"
    assert rt.trainer.requests == []
    record = control.store.state(job_id).history[0]
    assert record.environment == {"recovered": True, "committed_by": "w1"} and record.ended == "recovered"
    assert (record.worker, record.loss_last, record.seconds, record.images_per_s) == ("w0", 2.0, 1.5, 8.0)


def test_permanent_failure_fails_the_job_at_once_with_the_reason(rig: Any) -> None:
    rt, control, job_id = rig
    rt.trainer.script = [TrainerFailed("DataError", "train.txt:3: images/x.jpg: unreadable or truncated image")]
    tasks.handle_train(rt, job_id, 0)
    state = control.store.state(job_id)
    assert state.status == JobStatus.failed
    assert "chunk 0" in state.reason and "train.txt:3" in state.reason


def test_nan_loss_fails_the_job_naming_the_step(rig: Any) -> None:
    rt, control, job_id = rig
    rt.trainer.script = [TrainerFailed("TrainingError", "non-finite loss nan at step 2 (epoch 1)")]
    tasks.handle_train(rt, job_id, 0)
    state = control.store.state(job_id)
    assert state.status == JobStatus.failed and "step 2" in state.reason


def test_crashes_are_retried_then_fail_after_the_cap(rig: Any) -> None:
    rt, control, job_id = rig
    rt.trainer.script = [TrainerCrashed("trainer process killed by SIGKILL (out of memory?)")] * 3
    for _ in range(3):
        assert tasks.handle_train(rt, job_id, 0).startswith("crashed")
        assert [job_id, 0] in messages(rt)  # retried through the queue
    assert control.store.state(job_id).status == JobStatus.running
    assert tasks.handle_train(rt, job_id, 0).startswith("dropped")
    state = control.store.state(job_id)
    assert state.status == JobStatus.failed
    assert "failed 3 times" in state.reason and "SIGKILL" in state.reason
    # resume after the cause is fixed continues from the last checkpoint (chunk 0 here)
    control.resume(job_id)
    rt.trainer.script = ["ok"]
    assert tasks.handle_train(rt, job_id, 0) == "committed chunk 0"


def test_corrupt_start_checkpoint_rolls_back_to_the_newest_good_one(rig: Any) -> None:
    rt, control, job_id = rig
    rt.trainer.script = ["ok", "ok"]
    tasks.handle_train(rt, job_id, 0)
    tasks.handle_train(rt, job_id, 1)
    layout = control.store.layout(job_id)
    data = bytearray(layout.checkpoint(6).read_bytes())
    data[len(data) // 2] ^= 0xFF
    layout.checkpoint(6).write_bytes(bytes(data))
    rt.trainer.script = [TrainerFailed("CheckpointError", f"{layout.checkpoint(6)}: checksum mismatch")]
    tasks.handle_train(rt, job_id, 2)
    state = control.store.state(job_id)
    # Back to step 3; the chunk that redoes steps 3..6 keeps the number 2 (chunk numbers only grow).
    assert (state.chunk, state.step, state.status, state.n_chunks) == (2, 3, JobStatus.running, 5)
    assert any("continuing from step 3" in e.what for e in state.events)
    assert [job_id, 2] in messages(rt)
    rt.trainer.script = ["ok"]
    assert tasks.handle_train(rt, job_id, 2) == "committed chunk 2"
    assert rt.trainer.requests[-1]["start"] == 3 and control.store.state(job_id).step == 6


def test_cancel_stops_a_running_chunk(rig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    rt, control, job_id = rig
    control.cancel(job_id)
    # A message already in a worker's hands when the job was cancelled is dropped.
    assert tasks.handle_train(rt, job_id, 0) == "dropped: job is cancelled"
    control.resume(job_id)
    monkeypatch.setattr(tasks, "STATE_POLL_S", 0.0)
    # Cancel lands while the chunk trains: the watch sees it at its next poll and stops the trainer.
    rt.trainer.script = [lambda: control.cancel(job_id)]
    assert tasks.handle_train(rt, job_id, 0) == "stopped: job cancelled"
    assert rt.leases.holder(job_id) is None
    assert control.store.state(job_id).chunk == 0


class _Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "step3.pt"
    # Even with a matching checksum (an attacker can write both files), loading runs no code.
    checkpoint.save({"model": _Exploit(marker)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="does not load"):
        checkpoint.load(path)
    assert not marker.exists()


def test_a_failure_storage_cannot_record_goes_to_the_log_and_the_registry(rig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    rt, control, job_id = rig
    rt.trainer.script = [TrainerFailed("OSError", "[Errno 28] No space left on device: 'step3.pt'")]

    def full_disk(*_: Any, **__: Any) -> Any:
        raise OSError(28, "No space left on device")

    real_update = rt.store.update
    begun = []

    def update(job: str, change: Any) -> Any:
        if begun:  # the attempt is counted; the failure's record then meets the full disk
            full_disk()
        begun.append(1)
        return real_update(job, change)

    monkeypatch.setattr(rt.store, "update", update)
    assert tasks.handle_train(rt, job_id, 0).startswith("failed")  # nothing escapes to Celery
    problem = rt.registry.record["problem"]["what"]
    assert job_id in problem and "No space left on device: 'step3.pt'" in problem and "could not record it" in problem
    assert rt.leases.holder(job_id) is None  # released: the reconciler can send the chunk again
