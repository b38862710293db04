"""`docker compose up` in a real Docker engine: the README's walk-through, then faults.

The project's own Dockerfile and docker-compose.yml, in a copy of the checkout with a fresh .env:
up to healthy, the README's data and submit commands, a multi-chunk job to `succeeded`, weights
fetched through the published port with curl and loaded as the README loads them, two workers, a
SIGKILLed worker whose chunk runs again on the other one, a warm stop mid-chunk that commits, a
wedged worker turning unhealthy, Redis restarted with its queue kept, Flower refusing wrong
credentials, every Relay container running as uid 10001. Removes its containers, volumes and
images at the end.

Needs a running Docker engine (root), Compose v2 or v1 (`docker-compose`), curl, and debootstrap
where the base images cannot be pulled; `.ci/run` installs and starts them. Slow (a cold build
installs torch): run it alone with `.venv/bin/python -m pytest -m docker`. `.ci/run` builds ahead
with `tests/engine.py warm` while the other tests run, and this test's build is then a cache hit.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from conftest import IN_CI, wait_for
from engine import build, compose_command, copy_checkout, ensure_base_images, shell_env, write_env
from segmodel.model import SegmentationNN

RELAY_SERVICES = ("scheduler", "worker", "flower")
pytestmark = [pytest.mark.docker, pytest.mark.e2e, pytest.mark.timeout(3600)]


def _run(args: list[str], timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


def engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], 60)
    if info.returncode != 0:
        return f"no Docker engine answers (dockerd not running, or not root): {info.stderr.strip()[:300]}"
    if compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    if shutil.which("curl") is None:
        return "curl is not installed"
    return None


def _images() -> list[str]:
    """Every image id in the engine, intermediate ones included, newest first."""
    return list(dict.fromkeys(_run(["docker", "images", "--all", "--quiet", "--no-trunc"], 60).stdout.split()))


class Stack:
    """The compose project in `folder`: compose commands there, container lookups, the API."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.compose_cmd = compose_command() or []
        self.api = f"http://127.0.0.1:{env['RELAY_API_PORT']}"
        self.flower = f"http://127.0.0.1:{env['FLOWER_PORT']}"
        self.shell_env = shell_env(env)

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = _run([*self.compose_cmd, *args], timeout, cwd=self.folder, env=self.shell_env)
        if check:
            assert result.returncode == 0, f"{' '.join(self.compose_cmd)} {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        return result

    def relay(self, *args: str, timeout: float = 120) -> str:
        """The relay CLI inside the scheduler container, as the README runs it."""
        return self.compose("exec", "-T", "scheduler", "relay", *args, timeout=timeout).stdout

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    @staticmethod
    def inspect(container: str, template: str) -> str:
        result = _run(["docker", "inspect", "-f", template, container], 60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def health(self, container: str) -> str:
        return self.inspect(container, "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}")

    def all_healthy(self, counts: dict[str, int]) -> bool:
        for service, count in counts.items():
            found = self.containers(service)
            if len(found) != count or any(self.health(c) != "healthy" for c in found):
                return False
        return True

    def get(self, path: str) -> Any:
        response = httpx.get(self.api + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/api/jobs/{job_id}")

    def wait_job(self, job_id: str, timeout: float = 900) -> dict[str, Any]:
        job = wait_for(lambda: (j := self.job(job_id))["state"] in ("succeeded", "failed", "cancelled") and j,
                       timeout, f"job {job_id} to end", every=1)
        assert job["state"] == "succeeded", f"{job['state']}: {job.get('reason')}\n{self.logs()}"
        return job

    def busy_worker(self, job_id: str, chunk: int) -> str | None:
        return next((w["node"] for w in self.get("/api/queue")["workers"] if w.get("job") == job_id and w.get("chunk") == chunk), None)

    def container_of(self, node: str, among: list[str] | None = None) -> str:
        """A worker's node name is <hostname>.<pid>; a container's hostname is its short id."""
        hostname = node.rsplit(".", 1)[0]
        return next(c for c in among or self.containers("worker") if c.startswith(hostname))

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", check=False).stdout[-8000:]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    problem = engine_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"{problem}, and CI must run the compose test in a real engine")
        pytest.skip(problem)
    run_id = secrets.token_hex(4)
    folder = tmp_path / "relay"
    copy_checkout(folder)
    env = write_env(folder, run_id)
    s = Stack(folder, env)
    images_before = set(_images())
    made: list[str] = []
    try:
        made = ensure_base_images(tmp_path)
        yield s
    finally:
        print(s.logs())
        s.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", check=False)
        project = env["COMPOSE_PROJECT_NAME"]
        # Tags first, then every image this run made (stand-ins, intermediate layers),
        # newest first so that children go before their parents.
        for image in [f"{env['RELAY_IMAGE']}:cpu", *made]:
            _run(["docker", "rmi", image], 300)
        for image in [i for i in _images() if i not in images_before]:
            _run(["docker", "rmi", image], 300)
        left = [i for i in _images() if i not in images_before]
        left += _run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"], 60).stdout.split()
        left += _run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"], 60).stdout.split()
        assert not left, f"left behind: {left}"


def test_compose_in_docker_engine(stack: Stack, tmp_path: Path) -> None:
    build(stack.folder, stack.env, tmp_path)
    walk_through(stack, tmp_path)


def walk_through(s: Stack, tmp_path: Path) -> None:
    image = f"{s.env['RELAY_IMAGE']}:cpu"
    size_gb = int(_run(["docker", "image", "inspect", "-f", "{{.Size}}", image], 60).stdout) / 1e9
    print(f"{image}: {size_gb:.2f} GB")

    # ---- up, healthy, published on the loopback only ----
    s.compose("up", "-d", timeout=900)
    wait_for(lambda: s.all_healthy({"redis": 1, "scheduler": 1, "worker": 1, "flower": 1}), 600,
             "redis, scheduler, worker and flower to be healthy", every=2)
    (scheduler,) = s.containers("scheduler")
    (flower,) = s.containers("flower")
    assert _run(["docker", "port", scheduler, "8000"], 60).stdout.split() == [f"127.0.0.1:{s.env['RELAY_API_PORT']}"]
    assert _run(["docker", "port", flower, "5555"], 60).stdout.split() == [f"127.0.0.1:{s.env['FLOWER_PORT']}"]

    # ---- the README's data and submit commands: a multi-chunk job ----
    s.compose("run", "--rm", "-T", "--no-deps", "--user", f"{os.getuid()}:{os.getgid()}", "-v", f"{s.folder / 'data'}:/out",
              "worker", "relay", "data", "synthetic", "/out/syn", "--train", "48", "--val", "8", timeout=600)
    assert (s.folder / "data" / "syn" / "train.txt").is_file() and (s.folder / "data" / "syn" / "val.txt").is_file()
    job_id = s.relay("submit", "--train", "/data/syn/train.txt", "--val", "/data/syn/val.txt", "--epochs", "3",
                     "--chunk-steps", "4", "--no-pretrained").strip()
    s.relay("status")  # the README's table; the JSON form says the same
    assert job_id in {j["id"] for j in json.loads(s.relay("status", "--json"))["jobs"]}
    s.relay("watch", job_id, timeout=900)
    job = s.wait_job(job_id)
    assert [h["chunk"] for h in job["history"]] == [0, 1, 2]  # 48 samples, batch 16: 9 steps, chunks of 4

    # ---- weights through the published port, loading as the README says ----
    fetched = tmp_path / "weight3.pt"
    curl = _run(["curl", "-fsSo", str(fetched), f"{s.api}/api/jobs/{job_id}/weights"], 120)
    assert curl.returncode == 0, curl.stderr
    stored = s.compose("exec", "-T", "scheduler", "cat", f"/storage/jobs/{job_id}/weights/weight3.pt.sha256").stdout
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() in stored
    model = SegmentationNN(pretrained=False)
    model.load_state_dict(torch.load(fetched))

    # ---- every Relay container runs as uid 10001; the storage volume is theirs ----
    def check_users() -> None:
        for service in RELAY_SERVICES:
            for container in s.containers(service):
                assert s.inspect(container, "{{.Config.User}}") == "10001:10001", service
                rows = _run(["docker", "top", container, "-eo", "pid,uid"], 60).stdout.splitlines()[1:]
                uids = [row.split()[1] for row in rows]
                assert uids and set(uids) == {"10001"}, f"{service}: processes run as {uids}"
    check_users()
    assert s.compose("exec", "-T", "scheduler", "stat", "-c", "%u:%g", "/storage").stdout.strip() == "10001:10001"

    # ---- Flower refuses wrong credentials ----
    assert httpx.get(f"{s.flower}/api/workers", timeout=30).status_code == 401
    wrong = httpx.get(f"{s.flower}/api/workers", auth=(s.env["FLOWER_USER"], "wrong"), timeout=30)
    assert wrong.status_code == 401
    right = httpx.get(f"{s.flower}/api/workers", auth=(s.env["FLOWER_USER"], s.env["FLOWER_PASSWORD"]), timeout=30)
    assert right.status_code == 200

    # ---- two workers ----
    # From here each step sleeps a second after it trains (the trainer's test hook), so that a stop
    # sent once a chunk is seen taken lands inside it whatever the machine's load; Compose merges
    # the override file into the services, and the scale-up recreates the worker with it.
    (s.folder / "docker-compose.override.yml").write_text(
        'services:\n  worker:\n    environment:\n      RELAY_THROTTLE_STEP_S: "1"\n')
    s.compose("up", "-d", "--scale", "worker=2", timeout=600)
    wait_for(lambda: s.all_healthy({"worker": 2}), 600, "two healthy workers", every=2)
    wait_for(lambda: len(s.get("/api/queue")["workers"]) == 2, 120, "two workers online", every=1)
    check_users()

    # ---- a SIGKILLed worker's chunk runs again on the other; a warm stop mid-chunk commits ----
    # 6 steps, chunks of 2, each step a second or more: long enough to act in the middle of a chunk.
    job_id = s.relay("submit", "--train", "/data/syn/train.txt", "--val", "/data/syn/val.txt", "--epochs", "2",
                     "--chunk-steps", "2", "--height", "160", "--width", "160", "--engine", "seed", "--no-pretrained").strip()
    killed = wait_for(lambda: s.busy_worker(job_id, 1), 600, "a worker to start chunk 1", every=0.2)
    killed_container = s.container_of(killed)
    assert _run(["docker", "kill", "--signal", "KILL", killed_container], 60).returncode == 0
    wait_for(lambda: s.inspect(killed_container, "{{.State.Running}}") == "false" or
             s.inspect(killed_container, "{{.State.Restarting}}") == "true", 60, "the killed worker to die")

    def chunk_committed(chunk: int) -> dict[str, Any] | None:
        return next((h for h in s.job(job_id)["history"] if h["chunk"] == chunk), None)

    again = wait_for(lambda: chunk_committed(1), 600, "chunk 1 to run again and commit", every=1)
    assert again["worker"] != killed and again["attempt"] >= 2, again
    assert not again["worker"].startswith(killed.rsplit(".", 1)[0]), "chunk 1 ran again in the killed container"

    workers = s.containers("worker")  # looked up before, so that the stop follows the sighting at once
    stopped = wait_for(lambda: s.busy_worker(job_id, 2), 600, "a worker to start chunk 2", every=0.2)
    stopped_container = s.container_of(stopped, workers)
    stop_at = time.time()
    stop = _run(["docker", "stop", "--time", "120", stopped_container], 300)  # SIGTERM: Celery's warm shutdown
    assert stop.returncode == 0, stop.stderr
    assert s.inspect(stopped_container, "{{.State.ExitCode}}") == "0", "the worker did not stop warm"
    record = chunk_committed(2)
    assert record is not None, f"the warm stop lost chunk 2\n{s.logs()}"
    assert record["worker"] == stopped and record["attempt"] == 1
    # The registry showed chunk 2 taken before the stop; the record's start stamp comes a moment
    # later (once the worker's trainer is up), so only its end is compared.
    assert stop_at < record["ended_at"], "the stop did not land mid-chunk"

    s.compose("up", "-d", "--scale", "worker=2", timeout=600)
    job = s.wait_job(job_id)
    # Chunk 2 (steps 4..6) committed where the stop ended it; a stop in its first step leaves step
    # 5..6 to a chunk 3.
    stopped_at = record["end_step"]
    spans = [(0, 2), (2, 4), (4, stopped_at)] + ([(stopped_at, 6)] if stopped_at < 6 else [])
    assert [(h["chunk"], h["start_step"], h["end_step"]) for h in job["history"]] == [(i, *span) for i, span in enumerate(spans)]
    wait_for(lambda: s.all_healthy({"worker": 2}), 600, "two healthy workers again", every=2)

    # ---- a wedged worker turns unhealthy, and healthy again once it runs ----
    (node,) = [w["node"] for w in s.get("/api/queue")["workers"]][:1]
    wedged = s.container_of(node)
    pid = node.rsplit(".", 1)[1]
    # The worker's main process, stopped: it still exists but answers nothing.
    assert _run(["docker", "exec", wedged, "sh", "-c", f"kill -STOP {pid}"], 60).returncode == 0
    wait_for(lambda: s.health(wedged) == "unhealthy", 300, "the wedged worker to turn unhealthy", every=2)
    assert _run(["docker", "exec", wedged, "sh", "-c", f"kill -CONT {pid}"], 60).returncode == 0
    wait_for(lambda: s.health(wedged) == "healthy", 300, "the worker to be healthy again", every=2)

    # ---- Redis restarted keeps its queue ----
    s.compose("stop", "worker", timeout=600)
    job_id = s.relay("submit", "--train", "/data/syn/train.txt", "--val", "/data/syn/val.txt", "--epochs", "1",
                     "--no-pretrained").strip()
    wait_for(lambda: s.get("/api/queue")["queues"].get("cpu") == 1, 60, "the job's first chunk in the cpu queue", every=0.5)
    s.compose("restart", "redis", timeout=300)
    wait_for(lambda: s.all_healthy({"redis": 1}), 120, "redis to be healthy again", every=1)
    # Read in Redis itself, before the reconciler would re-enqueue a lost chunk (20 s grace).
    llen = s.compose("exec", "-T", "redis", "sh", "-c", 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli llen cpu').stdout.strip()
    assert llen == "1", f"redis lost its queue: llen cpu = {llen!r}"
    s.compose("start", "worker", timeout=600)
    job = s.wait_job(job_id)
    assert not any("re-enqueue" in e["what"] or "reconciler" in e["what"] for e in job["events"]), job["events"]
    wait_for(lambda: s.all_healthy({"redis": 1, "scheduler": 1, "worker": 2, "flower": 1}), 600, "all healthy at the end", every=2)
