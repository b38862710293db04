"""Poison work on real workers: bad data and a chunk that always dies fail their job with the
reason after bounded attempts; other jobs on the same workers finish; resume after a fix continues."""
from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from conftest import Procs, assert_equal_weights, tiny_spec
from segmodel import checkpoint
from segmodel.data import epoch_order
from segmodel.engine import train_range
from segmodel.layout import JobLayout
from test_relay_e2e import Cluster

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(procs: Procs, redis_url: str) -> Cluster:
    procs.env["RELAY_MAX_ATTEMPTS"] = "2"
    return Cluster(procs, redis_url)


def test_bad_data_fails_with_the_file_then_resumes_after_the_fix(cluster: Cluster, tiny_data: dict[str, Path],
                                                                tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data["train"].parent, data)
    # The seed engine reads samples as it goes, so chunk 0 commits before the bad file is met.
    spec = tiny_spec({"train": data / "train.txt", "val": data / "val.txt"}, engine="seed")
    train_range(spec, tmp_path / "ref", 0, 12, cache_dir=tmp_path / "cache")
    reference = checkpoint.load(JobLayout(tmp_path / "ref").weight(3))
    # The sample that step 3 (chunk 1) reads first: chunk 0 commits, chunk 1 meets the bad file.
    victim_line = int(epoch_order(16, spec.seed, 0)[12]) + 1
    image = data / (data / "train.txt").read_text().splitlines()[victim_line - 1].split()[0]
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 3])  # truncated JPEG

    bad = cluster.submit(spec)
    early = cluster.submit(spec.model_copy(update={"engine": "fast"}))
    healthy = cluster.submit(tiny_spec(tiny_data))
    # The fast engine prepares the whole dataset before its first step: it fails in chunk 0.
    job = cluster.wait_state(early, ("failed", "succeeded"))
    assert job["state"] == "failed" and "chunk 0" in job["reason"] and f"train.txt:{victim_line}" in job["reason"]
    assert job["progress"]["step"] == 0
    job = cluster.wait_state(bad, ("failed", "succeeded"))
    assert job["state"] == "failed"
    assert "chunk 1" in job["reason"] and image.name in job["reason"] and f"train.txt:{victim_line}" in job["reason"]
    assert job["progress"]["chunk"] == 1 and job["attempts"] == 1  # failed at once: retrying won't fix data
    assert cluster.wait_state(healthy, ("failed", "succeeded"))["state"] == "succeeded"

    image.write_bytes(good)
    cluster.procs.relay("resume", bad)
    job = cluster.wait_state(bad, ("failed", "succeeded"))
    assert job["state"] == "succeeded", job["reason"]
    assert [h["chunk"] for h in job["history"]] == [0, 1, 2, 3]  # chunk 0 was not trained again
    assert_equal_weights(cluster.final_weights(bad), reference)


def test_a_chunk_that_always_dies_fails_after_the_cap(cluster: Cluster, tiny_data: dict[str, Path]) -> None:
    doomed = cluster.submit(tiny_spec(tiny_data, height=240, width=240))
    stop = threading.Event()
    kills: list[int] = []

    def oom_killer() -> None:
        """Like the kernel's OOM killer: SIGKILL the trainer whenever it trains chunk 1 of the job."""
        while not stop.wait(0.05):
            for w in cluster.get("/api/queue")["workers"]:
                pid = w.get("trainer_pid")
                if w.get("job") == doomed and w.get("chunk") == 1 and pid and pid not in kills:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append(pid)
                    except ProcessLookupError:
                        pass

    killer = threading.Thread(target=oom_killer, daemon=True)
    killer.start()
    try:
        healthy = cluster.submit(tiny_spec(tiny_data))
        job = cluster.wait_state(doomed, ("failed", "succeeded"), timeout=240)
    finally:
        stop.set()
        killer.join()
    assert job["state"] == "failed"
    assert "chunk 1 failed 2 times" in job["reason"] and "SIGKILL" in job["reason"], job["reason"]
    assert len(kills) == 2
    assert cluster.wait_state(healthy, ("failed", "succeeded"))["state"] == "succeeded"
    # After the cause is gone, resume continues from chunk 1's start checkpoint.
    cluster.procs.relay("resume", doomed)
    job = cluster.wait_state(doomed, ("failed", "succeeded"), timeout=240)
    assert job["state"] == "succeeded"
    assert job["history"][0]["chunk"] == 0 and [h["chunk"] for h in job["history"]].count(0) == 1
