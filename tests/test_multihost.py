"""Workers on other hosts: each worker in its own network namespace, joined to the scheduler's host by
a veth pair on a Linux bridge, reaching the TLS broker and the S3 server only over that link. The
dataset is pushed to the bucket and its folder deleted, so each worker fetches it into its own
scratch. One worker's link is cut mid-chunk while it holds the lease and restored after the other
took over."""
from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from conftest import IN_CI, S3_CREDENTIALS, Procs, assert_equal_weights, start_moto, tiny_spec, wait_for
from segmodel.jobs import JobStore
from test_tls_broker import start_tls_redis

pytestmark = pytest.mark.e2e

WORKERS = {"w1": "1", "w2": "2"}  # name -> OMP_NUM_THREADS: the fast engine's bits do not depend on it


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces, veth pairs and a bridge"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    probe = f"relay-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.77.x.0/24 that no interface on this machine uses (leftover or parallel runs pick another)."""
    used = _ip("-o", "-4", "addr", "show").stdout
    for x in range(256):
        net = ipaddress.IPv4Network(f"10.77.{x}.0/24")
        if f" {net[1]}/" not in used:
            return net
    raise RuntimeError("no free 10.77.x.0/24 subnet")


@dataclass
class Lan:
    """A bridge on the host at host_ip and one namespace per worker, each behind its own veth pair."""

    tag: str
    net: ipaddress.IPv4Network
    namespaces: dict[str, str] = field(default_factory=dict)  # worker -> namespace
    links: dict[str, str] = field(default_factory=dict)  # worker -> host side of its veth pair

    @property
    def bridge(self) -> str:
        return f"rb{self.tag}"

    @property
    def host_ip(self) -> str:
        return str(self.net[1])

    def build(self, workers: list[str]) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, worker in enumerate(workers):
            ns, outside, inside = f"relay-{self.tag}-{worker}", f"rv{self.tag}{i}", f"rv{self.tag}{i}n"
            _ip("netns", "add", ns)
            self.namespaces[worker] = ns
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self.links[worker] = outside
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.net[2 + i]}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def prefix(self, worker: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespaces[worker])

    def cut(self, worker: str) -> None:
        _ip("link", "set", self.links[worker], "down")

    def restore(self, worker: str) -> None:
        _ip("link", "set", self.links[worker], "up")

    def tear_down(self) -> None:
        for ns in self.namespaces.values():
            # The relay processes this test started in the namespace, by pid, before it goes.
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", ns, check=False)  # takes the veth pair with it
        for link in self.links.values():
            _ip("link", "del", link, check=False)
        _ip("link", "del", self.bridge, check=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def lan() -> Iterator[Lan]:
    why = _cannot_run()
    if why:
        if IN_CI:
            pytest.fail(f"CI runs the multi-host test: {why}")
        pytest.skip(f"multi-host test skipped: {why}")
    network = Lan(str(os.getpid()), _free_subnet())
    try:
        network.build(list(WORKERS))
        yield network
    finally:
        network.tear_down()


@pytest.fixture
def services(lan: Lan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The TLS broker (its certificate names the bridge address) and the S3 server, on the host side."""
    redis_proc, broker = start_tls_redis(tmp_path / "tls", [lan.host_ip], bind=lan.host_ip)
    moto_proc, endpoint = start_moto(lan.host_ip, tmp_path / "moto.log")
    try:
        import boto3

        for k, v in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="relay-multihost")
        yield {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "RELAY_BROKER_URL": broker.url(),
               "RELAY_STORAGE": "s3://relay-multihost/relay"}
    finally:
        for proc in (redis_proc, moto_proc):
            proc.kill()
            proc.wait()


def test_worker_cut_off_mid_chunk(lan: Lan, services: dict[str, str], procs: Procs, tiny_data: dict[str, Path],
                                  reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    procs.env.update(services, RELAY_LEASE_TTL_S="6")
    # The data exists only in the bucket: pushed from the host side over the bridge, then its folder deleted.
    # The copy has the bytes `reference` was trained from.
    folder = tmp_path / "dataset"
    shutil.copytree(tiny_data["train"].parent, folder)
    prefix = "s3://relay-multihost/datasets/tiny"
    pushed = procs.relay("data", "push", str(folder), prefix).stdout
    train, val = f"{prefix}/train.txt", f"{prefix}/val.txt"
    assert f"--train {train}" in pushed and f"--val {val}" in pushed and "pushed 42 files" in pushed, pushed
    shutil.rmtree(folder)

    api = procs.env["RELAY_API_URL"] = procs.start_scheduler()
    scratch = {name: tmp_path / f"scratch-{name}" for name in WORKERS}
    for name, threads in WORKERS.items():
        procs.start("worker", "--name", name, name=name, prefix=lan.prefix(name),
                    env={"RELAY_CACHE_DIR": str(scratch[name]), "OMP_NUM_THREADS": threads,
                         "RELAY_THROTTLE_STEP_S": "0.6"})

    def get(path: str) -> Any:
        try:
            return httpx.get(api + path, timeout=5).json()
        except (httpx.TransportError, ValueError):
            return None

    def workers() -> dict[str, dict[str, Any]]:
        return {w["node"]: w for w in (get("/api/queue") or {"workers": []})["workers"]}

    wait_for(lambda: len(workers()) == 2, 120, f"two workers online (logs: {procs.tmp})")
    spec = tiny_spec(tiny_data, chunk_steps=4)  # chunks 0..2 of 4 steps, 2.4 s of throttled training each
    out = json.loads(procs.relay("submit", "--train", train, "--val", val, "--epochs", "3", "--seed", str(spec.seed),
                                 "--batch-size", "4", "--height", "64", "--width", "64", "--chunk-steps", "4",
                                 "--no-pretrained", "--json").stdout)
    job_id, digest = out["id"], out["spec"]["train_manifest_sha256"]
    assert (out["spec"]["train"], out["spec"]["val"]) == (train, val) and out["spec"]["val_manifest_sha256"] == digest
    store = JobStore(services["RELAY_STORAGE"])

    victim = wait_for(lambda: next((n for n, w in workers().items() if w.get("job") == job_id and w.get("chunk") == 1), None),
                      120, "a worker to start chunk 1", every=0.05)
    other = next(n for n in WORKERS if n != victim)
    lan.cut(victim)
    # The lease expires, the reconciler sends chunk 1 again, and the other worker commits it.
    wait_for(lambda: any(c["chunk"] == 1 for c in store.records(job_id, "commits")), 120,
             f"chunk 1 committed after {victim} was cut off (logs: {procs.tmp})")
    lan.restore(victim)
    job = wait_for(lambda: (j := get(f"/api/jobs/{job_id}")) and j["state"] in ("succeeded", "failed") and j, 180,
                   f"the job to end (logs: {procs.tmp})")
    assert job["state"] == "succeeded", job
    # The cut-off worker is back on the network and has let go of the chunk it started before the cut.
    wait_for(lambda: (w := workers().get(victim)) and w.get("job") is None, 120,
             f"{victim} back online and idle (log: {procs.tmp / victim}.log)")

    commits = store.records(job_id, "commits")
    assert [c["chunk"] for c in commits] == [0, 1, 2], commits  # each chunk committed once, in order
    assert commits[1]["worker"] == other, commits
    assert [(h["chunk"], h["start_step"], h["end_step"]) for h in job["history"]] == [(0, 0, 4), (1, 4, 8), (2, 8, 12)]
    assert job["history"][1]["worker"] == other
    assert any(e["what"] == f"chunk 1 attempt 2 on {other}" for e in job["events"]), job["events"]
    assert f"{job_id} chunk 1: committed" not in procs.log(victim)
    # Whatever the cut-off worker wrote after it came back left the committed checkpoint as it was.
    assert store.checkpoint_digest(job_id, 8) == job["history"][1]["checkpoint_sha256"]
    assert [m["step"] for m in get(f"/api/jobs/{job_id}/metrics")] == list(range(1, 13))

    # Both workers trained, so each fetched each list and the files it names once, into its own scratch,
    # and the job's events say so; the scratch copy holds the pushed folder's files, byte for byte.
    fetches = [e["what"] for e in job["events"] if " fetched " in e["what"]]
    said = sorted(m.groups() for f in fetches if (m := re.fullmatch(r"(\w+) fetched (\d+) files, .+ for (\w+) in [\d.]+ s", f)))
    assert said == [(w, n, field) for w in sorted(WORKERS) for n, field in (("33", "train"), ("9", "val"))], fetches
    pushed_files = _files(tiny_data["train"].parent)
    for name in WORKERS:
        local = _files(scratch[name] / "datasets" / digest)
        assert local.pop("manifest.json") and local == pushed_files, f"{name}'s fetched copy differs"

    weights = httpx.get(f"{api}/api/jobs/{job_id}/weights", timeout=30)
    assert weights.status_code == 200
    assert_equal_weights(torch.load(io.BytesIO(weights.content), weights_only=True), reference)
