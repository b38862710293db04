"""The API and CLI with the broker down: reads come from storage, /healthz says what is down,
infrastructure trouble has its own exit code, and a job submitted meanwhile runs once it is back."""
from __future__ import annotations

import http.server
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Procs, RedisServer, free_port, tiny_spec, wait_for

pytestmark = pytest.mark.e2e
EXIT_INFRA = 5


class Scheduler:
    def __init__(self, procs: Procs, redis: RedisServer) -> None:
        self.procs = procs
        port = free_port()
        self.api = f"http://127.0.0.1:{port}"
        procs.env.update(RELAY_BROKER_URL=redis.url, RELAY_API_URL=self.api, COLUMNS="200")
        procs.start("scheduler", "--port", str(port), name="scheduler")
        wait_for(lambda: self.health()[0] == 200, 60, "the scheduler's /healthz to say ok")

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            r = httpx.get(self.api + "/healthz", timeout=30)
        except httpx.TransportError:
            return 0, {}
        return r.status_code, r.json()

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.api + path, timeout=60)

    def submit(self, data: dict[str, Path]) -> dict[str, Any]:
        spec = tiny_spec(data)
        out = self.procs.relay("submit", "--train", spec.train, "--val", spec.val, "--epochs", "3", "--chunk-steps", "3",
                               "--batch-size", "4", "--height", "64", "--width", "64", "--seed", "7", "--no-pretrained",
                               "--json")
        return json.loads(out.stdout)


def _reads_work_from_storage(s: Scheduler, job_id: str, port: int) -> None:
    """Every read a user or the dashboard makes answers from storage, naming the broker as unknown."""
    status, body = s.health()
    assert status == 503 and body["status"] == "degraded", body
    assert body["broker"]["ok"] is False and str(port) in body["broker"]["error"], body
    assert body["storage"]["ok"] is True, body

    job = json.loads(s.procs.relay("status", job_id, "--json").stdout)
    assert job["id"] == job_id and job["state"] == "queued" and job["worker"] is None
    assert "broker" in job["broker_error"] and str(port) in job["broker_error"], job
    shown = s.procs.relay("status", job_id)
    assert job_id in shown.stdout and "unknown" in shown.stdout and "broker" in shown.stdout, shown.stdout

    everything = json.loads(s.procs.relay("status", "--json").stdout)
    assert everything["queues"] == {"cpu": None, "gpu": None} and "broker" in everything["broker_error"], everything
    assert job_id in [j["id"] for j in everything["jobs"]]
    shown = s.procs.relay("status")
    assert "unknown" in shown.stdout and job_id in shown.stdout, shown.stdout

    for path in ("/api/jobs", f"/api/jobs/{job_id}", "/api/queue", f"/api/jobs/{job_id}/metrics", "/"):
        r = s.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])


def _history_is_clean(job: dict[str, Any]) -> None:
    assert job["state"] == "succeeded", job["reason"]
    ranges = [(h["start_step"], h["end_step"]) for h in job["history"]]
    assert ranges == [(0, 3), (3, 6), (6, 9), (9, 12)], ranges
    assert job["progress"]["step"] == 12 and job["has_report"]


def test_broker_paused_then_killed(procs: Procs, redis_server: RedisServer, tiny_data: dict[str, Path]) -> None:
    s = Scheduler(procs, redis_server)
    first = s.submit(tiny_data)["id"]
    assert redis_server.proc is not None

    redis_server.proc.send_signal(signal.SIGSTOP)  # a hung broker: connections open, nothing answers
    _reads_work_from_storage(s, first, redis_server.port)
    paused = s.submit(tiny_data)
    assert paused["state"] == "queued" and paused["id"] != first
    assert any("not enqueued" in e["what"] and "broker" in e["what"] for e in paused["events"]), paused["events"]
    redis_server.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: s.health()[0] == 200, 60, "/healthz to say ok once the broker answers")

    redis_server.stop()  # a dead broker: connections refused
    _reads_work_from_storage(s, first, redis_server.port)
    down = s.submit(tiny_data)
    assert down["state"] == "queued" and down["id"] not in (first, paused["id"])
    assert any("not enqueued" in e["what"] for e in down["events"]), down["events"]

    redis_server.start()  # back, and empty: every message is lost; storage says what to send
    wait_for(lambda: s.health()[0] == 200, 60, "/healthz to say ok once the broker is back")
    procs.start("worker", "--name", "w1", name="w1")
    jobs = {first, paused["id"], down["id"]}
    done = wait_for(lambda: (all_ := s.get("/api/jobs").json()) and all(j["state"] in ("succeeded", "failed") for j in all_)
                    and all_, 600, f"every job to end (logs: {procs.tmp})", every=1)
    assert {j["id"] for j in done} == jobs  # nothing lost, nothing created twice
    for j in done:
        _history_is_clean(s.get(f"/api/jobs/{j['id']}").json())


class _Failing(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        body = json.dumps({"detail": "storage unavailable: [Errno 5] Input/output error"}).encode()
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def failing_api() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_infrastructure_trouble_has_its_own_exit_code(procs: Procs, failing_api: str) -> None:
    procs.env["RELAY_API_URL"] = failing_api
    for args in (("status",), ("status", "some-job"), ("report", "some-job"), ("watch", "some-job")):
        r = procs.relay(*args, check=False)
        assert r.returncode == EXIT_INFRA, (args, r.returncode, r.stderr)
        assert "503" in r.stderr and "storage unavailable" in r.stderr, (args, r.stderr)
    helped = procs.relay("--help").stdout
    for code in ("0", "1", "2", "3", "4", "5"):
        assert f"{code} " in helped
    assert "infrastructure" in helped
