"""The short fault-injection profile: every fault kind at least once, zero violated checks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def test_short_chaos_profile(redis_url: str) -> None:  # redis_url: skip/fail like every broker test
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--trials", "10", "--seed", "0", "--faults", "3"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "violated checks: 0" in run.stdout
    for kind in ("kill_worker", "kill_trainer", "term_worker", "preempt_kill", "redis_restart", "flushall", "scheduler_restart",
                 "broker_pause", "trainer_stall", "disk_full", "duplicate", "stale", "corrupt_newest", "corrupt_older"):
        line = next(x for x in run.stdout.splitlines() if x.startswith(kind + " "))
        count, _, why = line.split(maxsplit=1)[1].partition("not injected: ")
        # disk_full needs root and a loop device; without them the run names why and leaves it out.
        assert int(count) >= 1 or (kind == "disk_full" and why), f"the short profile injected no {kind}: {line}"


def test_chaos_on_object_storage(redis_url: str) -> None:
    """Two trials against a bucket on moto: the S3 path of every check and fault stays alive."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--storage", "s3", "--trials", "2", "--seed", "5",
                          "--faults", "3"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "storage a bucket on an S3 server (moto)" in run.stdout and "violated checks: 0" in run.stdout
    assert "trials 2, " in run.stdout and "jobs recovered 2/2" in run.stdout
