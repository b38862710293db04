"""`relay submit` against a scheduler that does not answer in time: the CLI retries under one
idempotency key, and exactly one job exists, whichever try the scheduler acted on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import Procs, RedisServer, tiny_spec, wait_for
from test_outage_api import Scheduler

pytestmark = pytest.mark.e2e


class Submit:
    """`relay submit` in the background, its stderr collected line by line."""

    def __init__(self, procs: Procs, data: dict[str, Path]) -> None:
        spec = tiny_spec(data)
        env = {**procs.env, "RELAY_API_TIMEOUT_S": "2", "RELAY_API_RETRIES": "30"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "submit", "--train", spec.train, "--val", spec.val, "--epochs", "3",
             "--chunk-steps", "3", "--batch-size", "4", "--height", "64", "--width", "64", "--no-pretrained", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.errors: list[str] = []
        self._reader = threading.Thread(target=lambda: self.errors.extend(iter(self.proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
        self._reader.start()

    def retries(self) -> int:
        return sum("retrying with the same idempotency key" in line for line in self.errors)

    def result(self) -> dict:
        out, _ = self.proc.communicate(timeout=300)
        self._reader.join(timeout=10)
        assert self.proc.returncode == 0, (self.proc.returncode, self.errors)
        return json.loads(out)


def _one_job(s: Scheduler, job_id: str) -> None:
    jobs = s.get("/api/jobs").json()
    assert [j["id"] for j in jobs] == [job_id], [j["id"] for j in jobs]
    on_storage = [p.name for p in (Path(s.procs.env["RELAY_STORAGE"]) / "jobs").iterdir() if not p.name.startswith(".")]
    assert on_storage == [job_id]


def test_submit_retried_while_the_scheduler_is_stopped(procs: Procs, redis_server: RedisServer, tiny_data: dict[str, Path]) -> None:
    s = Scheduler(procs, redis_server)
    scheduler = procs.started[0]
    os.kill(scheduler.pid, signal.SIGSTOP)  # the requests queue up unanswered in the socket
    try:
        submit = Submit(procs, tiny_data)
        wait_for(lambda: submit.retries() >= 2, 120, "the CLI to time out and retry twice")
    finally:
        os.kill(scheduler.pid, signal.SIGCONT)
    job = submit.result()
    assert any("retrying" in line for line in submit.errors)
    _one_job(s, job["id"])


def test_submit_retried_while_the_broker_hangs(procs: Procs, redis_server: RedisServer, tiny_data: dict[str, Path]) -> None:
    s = Scheduler(procs, redis_server)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # the job is created, then its enqueue hangs
    try:
        submit = Submit(procs, tiny_data)
        job = submit.result()
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    # Either the first try's enqueue hung past the CLI's timeout (it retried), or the scheduler had
    # already seen the broker fail (a reconciler tick) and answered at once with the job not enqueued.
    deferred = any(e["what"].startswith("not enqueued") for e in job["events"])
    assert submit.retries() >= 1 or deferred, (submit.errors, job["events"])
    _one_job(s, job["id"])
    procs.start("worker", "--name", "w1", name="w1")
    done = wait_for(lambda: (j := s.get(f"/api/jobs/{job['id']}").json())["state"] in ("succeeded", "failed") and j, 300,
                    "the job to end")
    assert done["state"] == "succeeded" and [h["chunk"] for h in done["history"]] == [0, 1, 2, 3]
    _one_job(s, job["id"])
