"""Outages during a chunk: a broker that stops answering, a trainer that hangs, an abandoned request."""
from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import Procs, RedisServer, assert_equal_weights, tiny_spec, wait_for
from segmodel import checkpoint
from segmodel.layout import JobLayout
from test_relay_e2e import Cluster, _reference
from worker.trainer import GO, TrainerFailed, TrainerProcess, TrainerStalled


def _bad_request() -> dict[str, Any]:
    return {"op": "evaluate", "spec": {"train": "x"}, "job_dir": "/nonexistent", "weights": "/nonexistent"}


def test_an_abandoned_request_kills_the_trainer_and_the_next_gets_its_own_reply() -> None:
    trainer = TrainerProcess()
    trainer.start()
    first_pid = trainer.pid

    def broker_down() -> str:
        raise ConnectionError("the broker went away")

    try:
        with pytest.raises(ConnectionError):
            trainer.run(_bad_request(), broker_down, tick_s=0.0)
        assert trainer.proc is None  # killed: its late reply cannot answer the next request
        with pytest.raises(ProcessLookupError):
            os.kill(first_pid, 0)
        with pytest.raises(TrainerFailed) as failed:
            trainer.run(_bad_request(), lambda: GO)
        assert failed.value.kind == "ValidationError"
    finally:
        trainer.kill()


def test_a_hung_trainer_is_killed_by_the_stall_watchdog() -> None:
    trainer = TrainerProcess(stall_timeout_s=2)
    trainer.start()
    assert trainer.pid is not None
    os.kill(trainer.pid, signal.SIGSTOP)  # an NFS hang, a deadlocked loader: alive, silent
    try:
        with pytest.raises(TrainerStalled, match="no progress for 2 s"):
            trainer.run(_bad_request(), lambda: GO)
        assert trainer.proc is None
    finally:
        trainer.kill()


def _job_record_is_true(cluster: Cluster, job_id: str) -> dict[str, Any]:
    """The job's record after an outage: every step trained once in order, the report there."""
    job = cluster.wait_state(job_id, ("succeeded", "failed"), timeout=300)
    assert job["state"] == "succeeded", (job["reason"], [e["what"] for e in job["events"]])
    history = job["history"]
    assert [h["chunk"] for h in history] == list(range(len(history)))
    assert history[0]["start_step"] == 0 and history[-1]["end_step"] == job["progress"]["total_steps"] == job["progress"]["step"]
    assert all(a["end_step"] == b["start_step"] for a, b in zip(history, history[1:])), history
    commits = cluster.commits(job_id)
    assert [c["chunk"] for c in commits if "chunk" in c] == [h["chunk"] for h in history], "a chunk committed twice"
    assert json.loads(cluster.procs.relay("report", job_id, "--json").stdout)["val_samples"] == 4
    return job


def test_broker_paused_longer_than_the_lease_mid_chunk(procs: Procs, redis_server: RedisServer, tiny_data: dict[str, Path],
                                                       reference: dict[str, torch.Tensor]) -> None:
    procs.env.update(RELAY_LEASE_TTL_S="4", RELAY_RECONCILE_GRACE_S="3", RELAY_RECONCILE_INTERVAL_S="1")
    cluster = Cluster(procs, redis_server.url, {"w1": ([], {"RELAY_THROTTLE_STEP_S": "0.5"})})
    job_id = cluster.submit(tiny_spec(tiny_data))
    wait_for(lambda: cluster.steps_trained(job_id) >= 1, 120, "a step trained", every=0.05)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # connections open, nothing answers
    time.sleep(8)  # twice the lease TTL
    redis_server.proc.send_signal(signal.SIGCONT)
    _job_record_is_true(cluster, job_id)
    assert_equal_weights(cluster.final_weights(job_id), reference)
    # The same worker then runs a clean job: no reply read one request late.
    second = cluster.submit(tiny_spec(tiny_data))
    _job_record_is_true(cluster, second)
    assert_equal_weights(cluster.final_weights(second), reference)


def _each_step_trained_once(cluster: Cluster, job_id: str, steps: int) -> None:
    """The job's metrics (a line as each step ends, by every attempt) hold each step once: none
    thrown away and trained again."""
    lines = (cluster.layout(job_id).root / "metrics.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["step"] for line in lines) == list(range(1, steps + 1)), "a step trained twice or lost"


def test_a_graceful_stop_during_a_broker_outage_keeps_its_steps(procs: Procs, redis_server: RedisServer, tiny_data: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """SIGTERM to a worker while Redis is paused past the lease TTL: the chunk ends at its next step
    and is committed once the broker answers again (the expired lease retaken), not thrown away."""
    procs.env.update(RELAY_LEASE_TTL_S="3", RELAY_RECONCILE_GRACE_S="3", RELAY_RECONCILE_INTERVAL_S="1")
    # One planned chunk of 16 steps, 8 s: longer than a lease renewal left hanging (5 s) lets it run on.
    spec = tiny_spec(tiny_data, epochs=4, chunk_steps=16)
    cluster = Cluster(procs, redis_server.url, {"w1": ([], {"RELAY_THROTTLE_STEP_S": "0.5"})})
    job_id = cluster.submit(spec)
    wait_for(lambda: cluster.steps_trained(job_id) >= 2, 120, "two steps trained", every=0.05)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    cluster.workers["w1"].send_signal(signal.SIGTERM)  # a spot notice in the middle of a broker outage
    time.sleep(8)  # more than twice the lease TTL
    redis_server.proc.send_signal(signal.SIGCONT)
    assert cluster.workers["w1"].wait(timeout=120) == 0
    first = cluster.commits(job_id)[0]
    assert first["worker"] == "w1" and first["ended"] == "signal" and 2 <= first["end_step"] < 16, first
    cluster.start_worker("w2")
    job = _job_record_is_true(cluster, job_id)
    assert [h["worker"] for h in job["history"]] == ["w1", "w2"]
    _each_step_trained_once(cluster, job_id, 16)
    assert_equal_weights(cluster.final_weights(job_id, 4), _reference(spec, tmp_path, 16, 4))


def test_a_broker_silent_past_the_lease_ends_the_chunk_and_keeps_its_steps(procs: Procs, redis_server: RedisServer,
                                                                            tiny_data: dict[str, Path], tmp_path: Path) -> None:
    """Redis paused for 14 s mid-chunk (TTL 3 s): the chunk ends at its next step (`lease`) instead
    of training on with a lease that may be gone, and is committed once the lease is retaken."""
    procs.env.update(RELAY_LEASE_TTL_S="3", RELAY_RECONCILE_GRACE_S="3", RELAY_RECONCILE_INTERVAL_S="1")
    spec = tiny_spec(tiny_data, epochs=8, chunk_steps=32)  # one planned chunk of 32 steps, 16 s
    cluster = Cluster(procs, redis_server.url, {"w1": ([], {"RELAY_THROTTLE_STEP_S": "0.5"})})
    job_id = cluster.submit(spec)
    wait_for(lambda: cluster.steps_trained(job_id) >= 2, 120, "two steps trained", every=0.05)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    time.sleep(14)  # renewals time out after 5 s each: the second failure comes past the TTL
    redis_server.proc.send_signal(signal.SIGCONT)
    job = _job_record_is_true(cluster, job_id)
    first = job["history"][0]
    assert first["worker"] == "w1" and first["ended"] == "lease" and 2 < first["end_step"] < 32, first
    _each_step_trained_once(cluster, job_id, 32)
    assert_equal_weights(cluster.final_weights(job_id, 8), _reference(spec, tmp_path, 32, 8))


def test_a_hung_trainer_is_recorded_and_its_chunk_retried(procs: Procs, redis_server: RedisServer, tiny_data: dict[str, Path],
                                                          reference: dict[str, torch.Tensor]) -> None:
    procs.env.update(RELAY_STALL_TIMEOUT_S="20")  # above a fresh trainer's start-up (torch import) on a loaded machine
    cluster = Cluster(procs, redis_server.url, {"w1": ([], {"RELAY_THROTTLE_STEP_S": "0.3"})})
    job_id = cluster.submit(tiny_spec(tiny_data))
    busy = wait_for(lambda: next((w for w in cluster.get("/api/queue")["workers"] if w.get("job") == job_id and w.get("trainer_pid")), None),
                    120, "the trainer's pid", every=0.05)
    os.kill(busy["trainer_pid"], signal.SIGSTOP)
    job = _job_record_is_true(cluster, job_id)
    assert any("no progress for" in e["what"] for e in job["events"]), [e["what"] for e in job["events"]]
    assert_equal_weights(cluster.final_weights(job_id), reference)
    assert JobLayout(cluster.storage / "jobs" / job_id).weight(3).is_file()
    checkpoint.load(JobLayout(cluster.storage / "jobs" / job_id).weight(3))


def _flaky_disk(monkeypatch: pytest.MonkeyPatch, failures: int, code: int) -> list[Path]:
    """checkpoint writes fail `failures` times with `code`, then reach the disk; returns the attempts."""
    attempts: list[Path] = []
    real = checkpoint.atomic_write_bytes

    def write(path: Path, data: bytes) -> None:
        attempts.append(path)
        if len(attempts) <= failures:
            raise OSError(code, os.strerror(code), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", write)
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS_S", (0.01, 0.01, 0.01))
    return attempts


def test_a_checkpoint_waits_out_a_full_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    attempts = _flaky_disk(monkeypatch, failures=2, code=errno.ENOSPC)
    digest = checkpoint.save({"w": torch.ones(3)}, tmp_path / "step4.pt")
    assert len(attempts) == 4  # two failures, the file, its checksum
    assert checkpoint.verified_digest(tmp_path / "step4.pt") == digest


@pytest.mark.parametrize(("failures", "code"), [(4, errno.ENOSPC), (1, errno.EROFS)])
def test_a_lasting_or_permanent_disk_error_is_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      failures: int, code: int) -> None:
    attempts = _flaky_disk(monkeypatch, failures=failures, code=code)
    with pytest.raises(OSError) as raised:
        checkpoint.save({"w": torch.ones(3)}, tmp_path / "step4.pt")
    assert raised.value.errno == code and len(attempts) == failures  # read-only: no retry; full: 1 + 3 retries
    assert list(tmp_path.iterdir()) == []
