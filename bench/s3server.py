"""moto's standalone S3 server on loopback for the benchmarks: the real protocol over HTTP,
conditional PUTs included (the tests start theirs in tests/conftest.py)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}


def start_moto(log: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """The server and its endpoint URL, once it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = open(log, "ab") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"moto did not listen on 127.0.0.1:{port} within 60 s")


def s3_env(endpoint: str, bucket: str) -> dict[str, str]:
    """Create `bucket` at endpoint; the AWS_* settings that point a client at it."""
    import boto3

    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    boto3.client("s3", endpoint_url=endpoint, region_name=env["AWS_REGION"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
    return env
