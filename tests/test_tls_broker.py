"""rediss:// end to end: a TLS redis-server with a password and a self-signed CA made here with openssl."""
from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from conftest import IN_CI, Procs, assert_equal_weights, free_port, tiny_spec, wait_for
from segmodel import checkpoint
from segmodel.layout import JobLayout
from worker.redis_url import BrokerConfigError, RedisTarget, check, redacted

PASSWORD = "tls-test-secret"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}", cwd=folder)
    return folder / f"{name}.pem"


def make_server_cert(folder: Path, ca: Path, hosts: list[str]) -> tuple[Path, Path]:
    san = ",".join(f"IP:{h}" if h[0].isdigit() else f"DNS:{h}" for h in hosts)
    (folder / "san.ext").write_text(f"subjectAltName={san}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={hosts[0]}", cwd=folder)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")), "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=folder)
    return folder / "server.pem", folder / "server.key"


@dataclass
class TlsRedis:
    port: int
    ca: Path
    other_ca: Path
    host: str = "127.0.0.1"

    def url(self, scheme: str = "rediss", password: str | None = PASSWORD, ca: Path | None = None, reqs: str = "required") -> str:
        auth = f":{password}@" if password else ""
        query = f"?ssl_ca_certs={ca or self.ca}&ssl_cert_reqs={reqs}" if scheme == "rediss" else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/0{query}"


def start_tls_redis(folder: Path, hosts: list[str], bind: str = "127.0.0.1") -> tuple[subprocess.Popen[bytes], TlsRedis]:
    """redis-server with only a TLS port, a password, and a certificate signed by a CA made here."""
    exe, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if exe is None or openssl is None:
        if IN_CI:
            pytest.fail("redis-server and openssl must be installed: CI runs the TLS broker tests")
        pytest.skip("redis-server or openssl not installed")
    ca = make_ca(folder / "ca", "relay-test-ca")
    other_ca = make_ca(folder / "other", "some-other-ca")
    cert, key = make_server_cert(folder / "ca", ca, hosts)
    port = free_port()
    proc = subprocess.Popen([exe, "--port", "0", "--tls-port", str(port), "--bind", bind, "--tls-cert-file", str(cert),
                             "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
                             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = TlsRedis(port, ca, other_ca, bind)

    def up() -> bool:
        try:
            check(server.url(), timeout_s=2)
            return True
        except BrokerConfigError:
            return False

    wait_for(up, 20, "the TLS redis-server to answer")
    return proc, server


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    proc, server = start_tls_redis(tmp_path / "tls", ["127.0.0.1", "localhost"])
    yield server
    proc.kill()
    proc.wait()


def test_url_translated_for_each_library(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    for spelling in ("required", "CERT_REQUIRED"):
        t = RedisTarget.parse(f"rediss://:pw@h:6380/2?ssl_ca_certs={ca}&ssl_cert_reqs={spelling}&health_check_interval=5")
        assert t.url == "rediss://:pw@h:6380/2?health_check_interval=5"
        assert t.redis_py_options()["ssl_cert_reqs"] == "required" and t.redis_py_options()["ssl_ca_certs"] == str(ca)
        assert t.kombu_ssl() == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    assert RedisTarget.parse("rediss://h:6380/0?ssl_cert_reqs=none").kombu_ssl() == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert RedisTarget.parse("redis://h:6379/0").kombu_ssl() is None
    assert redacted("rediss://:pw@h:6380/0") == "rediss://:***@h:6380/0"


@pytest.mark.parametrize("url, problem", [
    ("redis://h:6379/0?ssl_cert_reqs=required", r"ssl_cert_reqs given on a redis:// URL; use rediss://"),
    ("rediss://h:6380/0?ssl_cert_reqs=maybe", r"ssl_cert_reqs='maybe' is not one of required, optional, none"),
    ("rediss://h:6380/0?ssl_ca_certs=/no/such/ca.pem", r"ssl_ca_certs=/no/such/ca.pem is not a readable file"),
    ("http://h:6379/0", r"RELAY_BROKER_URL=http://h:6379/0: use redis://"),
])
def test_bad_urls_name_the_setting(url: str, problem: str) -> None:
    with pytest.raises(BrokerConfigError, match=problem):
        RedisTarget.parse(url)


def test_bad_tls_settings_are_named_at_start(tls_redis: TlsRedis, redis_url: str) -> None:
    check(tls_redis.url())
    cases = {
        tls_redis.url(scheme="redis"): r"RELAY_BROKER_URL=redis://:\*\*\*@127\.0\.0\.1:\d+/0: the server closed the connection"
                                       r" without answering; if that port speaks TLS, use rediss://",
        tls_redis.url(ca=tls_redis.other_ca): r"the server's TLS certificate does not verify \(give its CA with \?ssl_ca_certs=",
        tls_redis.url(password="wrong"): r"the server refused the password",
        tls_redis.url(password=None): r"the server wants a password",
        redis_url.replace("redis://", "rediss://") + "?ssl_cert_reqs=none": r"no TLS handshake within 5 s; if the server does not speak TLS on that port, use redis://",
    }
    for url, problem in cases.items():
        with pytest.raises(BrokerConfigError, match=problem):
            check(url, timeout_s=5)


@pytest.mark.e2e
def test_worker_refuses_to_start_on_a_certificate_that_does_not_verify(tls_redis: TlsRedis, procs: Procs) -> None:
    procs.env["RELAY_BROKER_URL"] = tls_redis.url(ca=tls_redis.other_ca)
    result = subprocess.run([sys.executable, "-m", "scheduler.cli", "worker", "--name", "w"], env=procs.env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 4
    assert "RELAY_BROKER_URL=rediss://:***@127.0.0.1" in result.stderr
    assert "TLS certificate does not verify" in result.stderr and PASSWORD not in result.stderr


@pytest.mark.e2e
def test_job_over_a_tls_broker(tls_redis: TlsRedis, procs: Procs, tiny_data: dict[str, Path],
                               reference: dict[str, torch.Tensor]) -> None:
    """Celery, the leases, queue depths and the workers list all over rediss:// with a password."""
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    procs.env.update(RELAY_BROKER_URL=tls_redis.url(), RELAY_API_URL=api)
    procs.start("scheduler", "--port", str(port), name="scheduler")
    procs.start("worker", "--name", "w1", name="w1")

    def get(path: str) -> object:
        try:
            return httpx.get(api + path, timeout=5).json()
        except httpx.TransportError:
            return None

    wait_for(lambda: (q := get("/api/queue")) and len(q["workers"]) == 1, 120, f"the worker online (logs: {procs.tmp})")
    spec = tiny_spec(tiny_data)
    out = json.loads(procs.relay("submit", "--train", spec.train, "--val", spec.val, "--epochs", "3", "--seed", str(spec.seed),
                                 "--batch-size", "4", "--height", "64", "--width", "64", "--chunk-steps", "3",
                                 "--no-pretrained", "--json").stdout)
    job = wait_for(lambda: (j := get(f"/api/jobs/{out['id']}")) and j["state"] in ("succeeded", "failed") and j, 300,
                   f"the job to end (logs: {procs.tmp})")
    assert job["state"] == "succeeded", job
    assert get("/api/queue")["queues"] == {"cpu": 0, "gpu": 0}  # LLEN over TLS
    layout = JobLayout(Path(procs.env["RELAY_STORAGE"]) / "jobs" / out["id"])
    assert_equal_weights(checkpoint.load(layout.weight(3)), reference)
    assert PASSWORD not in procs.log("w1") + procs.log("scheduler")
