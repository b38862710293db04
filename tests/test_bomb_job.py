"""A decompression-bomb image in a job's data fails the job at once, naming the file, on real workers."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import Procs, tiny_spec
from test_relay_e2e import Cluster

pytestmark = pytest.mark.e2e


def test_a_bomb_fails_the_job_at_once_naming_the_file(procs: Procs, redis_url: str, tiny_data: dict[str, Path],
                                                       tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data["train"].parent, data)
    line = 5
    image = data / (data / "train.txt").read_text().splitlines()[line - 1].split()[0]
    Image.new("1", (10_000, 10_000)).save(image, format="PNG")  # 100 M pixels: PIL would only warn and decode
    cluster = Cluster(procs, redis_url)
    jobs = {engine: cluster.submit(tiny_spec({"train": data / "train.txt", "val": data / "val.txt"}, engine=engine))
            for engine in ("fast", "seed")}
    for engine, job_id in jobs.items():
        job = cluster.wait_state(job_id, ("failed", "succeeded"))
        assert job["state"] == "failed", (engine, job["state"])
        assert "decompression bomb" in job["reason"] and f"train.txt:{line}: {image}" in job["reason"], (engine, job["reason"])
        assert job["attempts"] == 1, (engine, job["attempts"])  # permanent: not retried
