"""The validation curve: with val_every, each validated epoch's mIoU and pixel accuracy are
recorded during training, equal to evaluating that epoch's weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import tiny_spec
from scheduler.api import make_api
from segmodel.engine import train_chunk
from segmodel.evaluate import evaluate
from segmodel.layout import JobLayout
from worker.settings import Settings


@pytest.mark.parametrize("engine", ["fast", "seed"])
def test_validated_epochs_are_recorded(tiny_data: dict[str, Path], tmp_path: Path, engine: str) -> None:
    spec = tiny_spec(tiny_data, val_every=2, epochs=4, engine=engine)  # 16 steps in chunks of 3
    job = tmp_path / "job"
    for chunk in range(6):
        train_chunk(spec, job, chunk, cache_dir=tmp_path / "cache")
    layout = JobLayout(job)
    points = [json.loads(line) for line in layout.validation_file.read_text().splitlines()]
    assert [(p["epoch"], p["step"]) for p in points] == [(2, 8), (4, 16)]
    report = evaluate(spec, job, layout.weight(4), cache_dir=tmp_path / "cache")
    assert points[-1]["mean_iou"] == report["mean_iou"] and points[-1]["pixel_accuracy"] == report["pixel_accuracy"]


def test_validation_route_keeps_the_latest_of_each_epoch(tiny_data: dict[str, Path], tmp_path: Path) -> None:
    client = TestClient(make_api(Settings(storage=tmp_path / "storage")))
    job = client.post("/api/jobs", json={"train": str(tiny_data["train"]), "val": str(tiny_data["val"]),
                                         "pretrained": False, "val_every": 1}).json()
    assert job["spec"]["val_every"] == 1 and client.get(f"/api/jobs/{job['id']}/validation").json() == []
    layout = JobLayout(tmp_path / "storage" / "jobs" / job["id"])
    lines = [{"epoch": 1, "step": 4, "mean_iou": 0.1, "pixel_accuracy": 0.5}, {"epoch": 2, "step": 8, "mean_iou": 0.2, "pixel_accuracy": 0.6},
             {"epoch": 1, "step": 4, "mean_iou": 0.15, "pixel_accuracy": 0.55}]  # epoch 1 trained again (a retry)
    layout.validation_file.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"epoch": 3, "st')
    got = client.get(f"/api/jobs/{job['id']}/validation").json()
    assert [(v["epoch"], v["mean_iou"]) for v in got] == [(1, 0.15), (2, 0.2)]
    assert client.post("/api/jobs", json={"train": str(tiny_data["train"]), "val": str(tiny_data["val"]),
                                          "val_every": 0}).status_code == 422
