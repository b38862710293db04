"""End to end with storage on an S3 server (moto, over HTTP): a scheduler and two workers that share no
folder, each with its own empty scratch disk; the broker is a TLS redis-server with a password."""
from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from conftest import S3_CREDENTIALS, Procs, assert_equal_weights, tiny_spec, wait_for
from segmodel.storage import open_storage
from test_tls_broker import TlsRedis, start_tls_redis

pytestmark = pytest.mark.e2e


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsRedis]:
    proc, server = start_tls_redis(tmp_path / "tls", ["127.0.0.1"])
    yield server
    proc.kill()
    proc.wait()


class BucketRig:
    """Storage in the bucket and a TLS broker: a scheduler and two workers with empty scratch caches."""

    def __init__(self, procs: Procs, s3_endpoint: str, url: str, tls_broker: TlsRedis, tmp_path: Path) -> None:
        self.procs = procs
        procs.env.update(S3_CREDENTIALS, AWS_ENDPOINT_URL=s3_endpoint, RELAY_STORAGE=url, RELAY_BROKER_URL=tls_broker.url())
        self.scratch = {name: tmp_path / f"scratch-{name}" for name in ("w1", "w2")}

    def start(self) -> str:
        self.procs.env["RELAY_API_URL"] = self.api = self.procs.start_scheduler()
        for name, folder in self.scratch.items():
            self.procs.start("worker", "--name", name, name=name, env={"RELAY_CACHE_DIR": str(folder)})
        wait_for(lambda: (q := self.get("/api/queue")) and len(q["workers"]) == 2, 120, f"two workers online (logs: {self.procs.tmp})")
        return self.api

    def get(self, path: str) -> Any:
        try:
            return httpx.get(self.api + path, timeout=5).json()
        except (httpx.TransportError, ValueError):
            return None

    def run(self, train: str, val: str, seed: int, *extra: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Submit the tiny job on these lists; (the submission, the job once it ended)."""
        out = json.loads(self.procs.relay("submit", "--train", train, "--val", val, "--epochs", "3", "--seed", str(seed),
                                          "--batch-size", "4", "--height", "64", "--width", "64", "--chunk-steps", "3",
                                          "--no-pretrained", "--json", *extra).stdout)
        job = wait_for(lambda: (j := self.get(f"/api/jobs/{out['id']}")) and j["state"] in ("succeeded", "failed") and j, 300,
                       f"the job to end (logs: {self.procs.tmp})")
        assert job["state"] == "succeeded", job
        return out, job


def test_job_on_object_storage(procs: Procs, s3_endpoint: str, s3_bucket: str, tls_broker: TlsRedis,
                               tiny_data: dict[str, Path], reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}/relay"
    rig = BucketRig(procs, s3_endpoint, url, tls_broker, tmp_path)
    api, get, scratch = rig.start(), rig.get, rig.scratch
    spec = tiny_spec(tiny_data)
    job_id = rig.run(spec.train, spec.val, spec.seed, "--val-every", "1")[0]["id"]

    # Everything is in the bucket, nothing in a shared folder: the weights come back through the API.
    weights = httpx.get(f"{api}/api/jobs/{job_id}/weights", timeout=30)
    assert weights.status_code == 200
    assert_equal_weights(torch.load(io.BytesIO(weights.content), weights_only=True), reference)
    store = open_storage(url)
    keys = store.list(f"jobs/{job_id}")
    for name in ("job.json", "state.json", "weights/weight3.pt", "weights/weight3.pt.sha256", "checkpoints/step12.pt",
                 "eval/report.json", "eval/predictions.png"):
        assert f"jobs/{job_id}/{name}" in keys, name
    assert any(k.startswith(f"jobs/{job_id}/tensorboard/events.out.tfevents.") for k in keys)
    commits = [k.rsplit("/", 1)[-1].split(".")[0] for k in keys if k.startswith(f"jobs/{job_id}/commits/")]
    assert commits == ["c00000", "c00001", "c00002", "c00003"]  # each chunk committed once
    assert [m["step"] for m in get(f"/api/jobs/{job_id}/metrics")] == list(range(1, 13))
    # Epochs 1-3 end in chunks 1-3 (steps 4, 8, 12): each chunk's validation points are kept.
    assert [(v["epoch"], v["step"]) for v in get(f"/api/jobs/{job_id}/validation")] == [(1, 4), (2, 8), (3, 12)]
    assert 0.0 <= get(f"/api/jobs/{job_id}/report")["mean_iou"] <= 1.0
    # The scratch copies are gone: the workers kept only their caches.
    for folder in scratch.values():
        assert not (folder / "scratch" / "jobs" / job_id).exists()


def test_data_only_in_the_bucket(procs: Procs, s3_endpoint: str, s3_bucket: str, tls_broker: TlsRedis,
                                 tiny_data: dict[str, Path], reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """The dataset is pushed and its folder deleted: workers with empty caches fetch it from the bucket
    and train the same weights as the folder gives."""
    url = f"s3://{s3_bucket}/relay"
    rig = BucketRig(procs, s3_endpoint, url, tls_broker, tmp_path)
    folder = tmp_path / "dataset"
    shutil.copytree(tiny_data["train"].parent, folder)
    pushed = procs.relay("data", "push", str(folder), f"s3://{s3_bucket}/datasets/tiny").stdout
    train, val = f"s3://{s3_bucket}/datasets/tiny/train.txt", f"s3://{s3_bucket}/datasets/tiny/val.txt"
    assert f"--train {train}" in pushed and f"--val {val}" in pushed and "pushed 42 files" in pushed, pushed
    shutil.rmtree(folder)

    api, scratch = rig.start(), rig.scratch
    out, job = rig.run(train, val, tiny_spec(tiny_data).seed)
    job_id, digest = out["id"], out["spec"]["train_manifest_sha256"]
    assert out["spec"]["train"] == train and out["spec"]["val_manifest_sha256"] == digest
    weights = httpx.get(f"{api}/api/jobs/{job_id}/weights", timeout=30)
    assert_equal_weights(torch.load(io.BytesIO(weights.content), weights_only=True), reference)

    # Each worker that took part fetched each list once, into its own cache, and said so.
    fetches = [e["what"] for e in job["events"] if " fetched " in e["what"]]
    took_part = {f.split(" fetched ")[0] for f in fetches}
    assert {h["worker"] for h in job["history"]} <= took_part, fetches
    for name in took_part:
        mine = [f for f in fetches if f.startswith(f"{name} fetched ")]
        assert sorted(f.split(" for ")[1].split(" in ")[0] for f in mine) == ["train", "val"], fetches
        assert any(f.startswith(f"{name} fetched 33 files, ") for f in mine), fetches
        local = scratch[name] / "datasets" / digest
        assert sorted(p.name for p in local.iterdir()) == ["annotations", "images", "manifest.json", "train.txt", "val.txt"]
    assert len(fetches) == 2 * len(took_part), fetches
