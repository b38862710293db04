"""What services say when they start: storage, broker (password hidden), queues, the dashboard's
address; a worker that can never meet a job warns; the scheduler's log is not access lines."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from conftest import Procs, free_port, wait_for

pytestmark = pytest.mark.e2e


def test_start_up_lines_and_quiet_scheduler(procs: Procs) -> None:
    storage = procs.env["RELAY_STORAGE"]
    api = procs.start_scheduler()
    worker = procs.start("worker", "--name", "lonely", name="worker")
    for _ in range(3):
        httpx.get(api + "/api/queue", timeout=5)
    line = next(x for x in procs.log("scheduler").splitlines() if x.startswith("relay scheduler: "))
    assert f"storage {storage}; broker embedded" in line and "queues cpu,gpu" in line
    assert line.endswith(f"dashboard and API at {api}/")
    assert "GET /api/queue" not in procs.log("scheduler")  # access lines are off by default
    wait_for(lambda: "relay worker lonely: " in procs.log("worker"), 60, "the worker's start-up line")
    log = procs.log("worker")
    assert f"relay worker lonely: storage {storage}; broker embedded" in log and "queues cpu" in log
    assert "warning: embedded transport (no RELAY_BROKER_URL) and no jobs in" in log
    procs.kill(worker)

    # A broker URL's password never shows, not even when the broker is not there.
    dead = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"
    env = {**procs.env, "RELAY_BROKER_URL": dead}
    r = subprocess.run([sys.executable, "-m", "scheduler.cli", "scheduler", "--port", str(free_port())], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stderr
    assert f"broker redis://:***@127.0.0.1:{dead.rsplit(':', 1)[1].split('/')[0]}/0" in r.stderr
    assert "hunter2secret" not in r.stderr + r.stdout


def test_access_log_on_request(procs: Procs) -> None:
    port = free_port()
    procs.start("scheduler", "--port", str(port), "--access-log", name="scheduler")
    api = f"http://127.0.0.1:{port}"

    def logged() -> bool:
        try:
            httpx.get(api + "/api/queue", timeout=2)
        except httpx.TransportError:
            return False
        return "GET /api/queue" in procs.log("scheduler")

    wait_for(logged, 60, "an access line in the scheduler's log")


@pytest.mark.parametrize(("env", "args", "expected"), [
    ({"RELAY_PORT": "eighty"}, ["status"], "relay: bad settings: RELAY_PORT: Input should be a valid integer"),
    ({"RELAY_LEASE_TTL_S": "0", "RELAY_MAX_ATTEMPTS": "x"}, ["worker"],
     "relay: bad settings: RELAY_LEASE_TTL_S: Input should be greater than 0; RELAY_MAX_ATTEMPTS: Input should be a valid integer"),
    ({"RELAY_STORAGE": "s3://bucket/relay"}, ["worker"], "relay: bad settings: RELAY_STORAGE=s3://bucket/relay needs RELAY_BROKER_URL"),
    ({"RELAY_STORAGE": "s3://bucket/relay", "RELAY_BROKER_URL": "redis://127.0.0.1:1/0"}, ["run", "--train", "a.txt", "--val", "b.txt"],
     "relay: relay run trains on the embedded default, whose queue lives in the storage folder, so it needs a local "
     "RELAY_STORAGE (got s3://bucket/relay)"),
])
def test_bad_settings_name_the_variable(procs: Procs, env: dict[str, str], args: list[str], expected: str) -> None:
    r = procs.relay(*args, check=False, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(expected), r.stderr
    assert "Traceback" not in r.stderr
