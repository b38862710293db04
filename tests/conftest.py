"""Shared fixtures: tiny generated data, a reference run, real redis-server and relay processes."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from segmodel import checkpoint
from segmodel.layout import JobLayout
from segmodel.spec import TrainSpec
from segmodel.synthetic import generate
from segmodel.engine import train_range

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Short liveness settings so recovery happens in seconds, not minutes.
FAST_ENV = {"RELAY_LEASE_TTL_S": "3", "RELAY_RECONCILE_INTERVAL_S": "0.5", "RELAY_RECONCILE_GRACE_S": "3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll until condition() is truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("data"), train=16, val=4, seed=3, size=64, classes=5)


def tiny_spec(data: dict[str, Path], **overrides: Any) -> TrainSpec:
    """3 epochs of 4 steps; chunks of 3 steps cross epoch boundaries."""
    fields = dict(train=str(data["train"]), val=str(data["val"]), epochs=3, chunk_steps=3, batch_size=4,
                  height=64, width=64, pretrained=False, seed=7)
    return TrainSpec(**{**fields, **overrides})


@pytest.fixture(scope="session")
def reference(tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The tiny job trained uninterrupted in-process: every relayed run must end bitwise equal."""
    spec = tiny_spec(tiny_data)
    job_dir = tmp_path_factory.mktemp("reference")
    train_range(spec, job_dir, 0, 12, cache_dir=job_dir / "cache")
    return checkpoint.load(JobLayout(job_dir).weight(3))


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


class RedisServer:
    """A private redis-server on a fixed port (no persistence) that a test may stop, pause and restart."""

    def __init__(self, exe: str, folder: Path) -> None:
        self.exe, self.folder, self.port = exe, folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(up, 10, "redis-server to answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    exe = shutil.which("redis-server")
    if exe is None:
        if IN_CI:
            pytest.fail("redis-server is not installed, and CI must run the broker tests")
        pytest.skip("redis-server not installed: broker tests skipped (install redis-server to run them)")
    server = RedisServer(exe, tmp_path)
    server.start()
    yield server
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


class Procs:
    """Relay processes started by a test, each in its own process group, all killed at the end."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, name: str, env: dict[str, str] | None = None,
              prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        """`relay ARGS`, after a prefix that execs it (e.g. `ip netns exec NS`), so the pid stays the relay's."""
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "scheduler.cli", *args], env={**self.env, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(proc)
        return proc

    def start_scheduler(self, env: dict[str, str] | None = None) -> str:
        """`relay scheduler` on a free port; its API URL once /healthz answers 200."""
        api = f"http://127.0.0.1:{free_port()}"
        self.start("scheduler", "--port", api.rsplit(":", 1)[1], name="scheduler", env=env)

        def up() -> bool:
            try:
                return httpx.get(api + "/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 60, "the scheduler's /healthz")
        return api

    def relay(self, *args: str, check: bool = True, timeout: float = 120,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "scheduler.cli", *args], env={**self.env, **(env or {})}, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"relay {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(proc)
                proc.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    storage = tmp_path / "storage"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(FAST_ENV, RELAY_STORAGE=str(storage), PYTHONUNBUFFERED="1")
    p = Procs(tmp_path, env)
    yield p
    p.stop_all()


def start_moto(host: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """moto's standalone S3 server on host: the real protocol over HTTP, conditional PUTs included."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(up, 60, f"the S3 server (moto) to listen on {host}:{port}")
    return proc, f"http://{host}:{port}"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, endpoint = start_moto("127.0.0.1", tmp_path_factory.mktemp("moto") / "moto.log")
    yield endpoint
    proc.kill()
    proc.wait()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "relay-test", "AWS_SECRET_ACCESS_KEY": "relay-test-secret", "AWS_REGION": "us-east-1"}


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket for this test; AWS_* set in this process the way a user sets them."""
    import boto3

    for k, v in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    name = "relay-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40] + "-" + os.urandom(3).hex()
    boto3.client("s3").create_bucket(Bucket=name)
    return name
