"""TensorBoard logs: every chunk, on whichever worker, adds to one run with the global step."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from conftest import tiny_spec
from segmodel.layout import JobLayout
from segmodel.spec import ChunkPlan, TrainSpec
from segmodel.train import chunk_range
from worker.tbevents import EventFile
from worker.trainer import GO, TrainerProcess


def _run(log_dir: Path) -> EventAccumulator:
    """The log folder read back as TensorBoard does: one run, its event files in name order."""
    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})  # 0: keep every point
    acc.Reload()
    return acc


def _train(spec_dict: dict, job_dir: Path, chunk: int, attempt: int = 1, worker: str = "w") -> dict:
    """One chunk in a fresh trainer process, killed afterwards: as if each chunk ran on another worker."""
    trainer = TrainerProcess()
    start, end = chunk_range(TrainSpec.model_validate(spec_dict), chunk)
    try:
        return trainer.run({"op": "train", "spec": spec_dict, "job_dir": str(job_dir), "chunk": chunk, "start": start, "end": end,
                            "cache_dir": str(job_dir.parent / "cache"),
                            "attempt": attempt, "worker": worker}, tick=lambda: GO)
    finally:
        trainer.kill()


def test_chunks_on_different_workers_form_one_run(tiny_data: dict[str, Path], tmp_path: Path) -> None:
    spec = tiny_spec(tiny_data, epochs=2, chunk_steps=3)  # 8 steps in chunks of 3, 3 and 2
    plan = ChunkPlan(spec, 16)
    assert plan.n_chunks == 3
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    for k in range(plan.n_chunks):
        result = _train(spec.model_dump(), job_dir, k, worker=f"w{k % 2 + 1}")
        assert result["end_step"] == plan.end(k)

    log_dir = job_dir / "tensorboard"
    files = sorted(p.name for p in log_dir.iterdir())
    assert len(files) == plan.n_chunks, files  # one event file per chunk, all in one folder: one run
    assert [f.rsplit(".", 3)[1:] for f in files] == [["w1", "c0", "a1"], ["w2", "c1", "a1"], ["w1", "c2", "a1"]]

    acc = _run(log_dir)
    assert {"train/loss", "train/lr", "train/images_per_s"} <= set(acc.Tags()["scalars"])
    losses = acc.Scalars("train/loss")
    steps = [e.step for e in losses]
    assert steps == list(range(1, plan.total_steps + 1))  # 1..total, strictly increasing, no gap at hand-offs
    recorded = [json.loads(line) for line in JobLayout(job_dir).metrics_file.read_text().splitlines()]
    assert [m["step"] for m in recorded] == steps
    # TensorBoard stores float32: equal to the recorded loss at that precision.
    assert [e.value for e in losses] == [float(np.float32(m["loss"])) for m in recorded]
    assert [e.value for e in acc.Scalars("train/lr")] == [float(np.float32(m["lr"])) for m in recorded]
    assert [e.step for e in acc.Scalars("train/images_per_s")] == steps
    assert all(e.value > 0 for e in acc.Scalars("train/images_per_s"))


def test_a_retried_chunk_replaces_the_failed_attempts_steps(tiny_data: dict[str, Path], tmp_path: Path) -> None:
    """An attempt that wrote steps and then died is hidden by the retry (TensorBoard's purge_step)."""
    spec = tiny_spec(tiny_data, epochs=2, chunk_steps=3)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    _train(spec.model_dump(), job_dir, 0)
    _train(spec.model_dump(), job_dir, 1, attempt=1, worker="lost")  # trained steps 4..6, never committed
    _train(spec.model_dump(), job_dir, 1, attempt=2, worker="w2")
    _train(spec.model_dump(), job_dir, 2)

    losses = _run(job_dir / "tensorboard").Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 9))
    latest: dict[int, dict] = {}
    for line in JobLayout(job_dir).metrics_file.read_text().splitlines():
        m = json.loads(line)
        latest[m["step"]] = m  # the retry's values win, as in the API
    assert len(latest) < sum(1 for _ in JobLayout(job_dir).metrics_file.open())  # steps 4..6 were trained twice
    assert [e.value for e in losses] == [float(np.float32(latest[s]["loss"])) for s in range(1, 9)]


def test_files_opened_in_one_second_sort_in_the_order_they_were_opened(tmp_path: Path) -> None:
    """Chunks shorter than a second, one after another: each file's name still sorts after the one
    before (no waiting for the next second), and a retry's purge hides the lost attempt's steps."""
    log_dir = tmp_path / "tensorboard"
    chunks = [(".w1.c0.a1", None, range(1, 4)), (".lost.c1.a1", 4, range(4, 7)), (".w1.c1.a2", 4, range(4, 7)),
              (".w2.c2.a1", 7, range(7, 9))]
    opened = []
    for i, (suffix, purge, steps) in enumerate(chunks):
        f = EventFile(log_dir, suffix, purge)
        opened.append(f.path.name)
        for step in steps:
            f.add_scalar("train/loss", 100.0 * i + step, step)
        f.close()
    assert sorted(opened) == opened
    seconds = [int(name.split(".")[3]) for name in opened]
    assert seconds == sorted(set(seconds))  # one second each, increasing
    losses = _run(log_dir).Scalars("train/loss")
    assert [(e.step, e.value) for e in losses] == [(s, float(s)) for s in (1, 2, 3)] + \
        [(s, 200.0 + s) for s in (4, 5, 6)] + [(s, 300.0 + s) for s in (7, 8)]
