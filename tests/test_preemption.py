"""Chunks that end early: at a step chosen at run time, with the bits of a chunk planned to end there."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError

from conftest import assert_equal_weights, tiny_spec
from segmodel import checkpoint
from segmodel.engine import train_range
from segmodel.layout import JobLayout
from segmodel.spec import ChunkPlan
from scheduler.cli import main
from segmodel.jobs import JobStatus
from test_protocol import rig  # noqa: F401  (the fixture)
from worker import tasks
from worker.lifetime import Lifetime, parse_duration, stop_note
from worker.trainer import STOP, TrainerFailed, TrainerProcess


def _stop_after(n: int) -> Any:
    calls = []

    def stop() -> str | None:
        calls.append(1)
        return "told" if len(calls) >= n else None

    return stop


@pytest.mark.parametrize("engine", ["fast", "seed"])
def test_a_stopped_chunk_ends_at_its_step_and_the_job_stays_exact(engine: str, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    spec = tiny_spec(tiny_data, engine=engine, chunk_steps=None, epochs=2)  # 8 steps, one epoch a chunk
    one = tmp_path / "one"
    train_range(spec, one, 0, 8, cache_dir=tmp_path / "cache")
    job = tmp_path / "stopped"
    first = train_range(spec, job, 0, 8, cache_dir=tmp_path / "cache", stop=_stop_after(3))  # stops after step 3
    assert (first.end_step, first.stopped) == (3, "told")
    assert JobLayout(job).checkpoint(3).is_file() and not JobLayout(job).checkpoint(8).exists()
    second = train_range(spec, job, 3, 8, cache_dir=tmp_path / "cache", stop=_stop_after(2))  # crosses epoch 1 at step 4
    assert (second.end_step, second.stopped) == (5, "told")
    assert_equal_weights(checkpoint.load(JobLayout(job).weight(1)), checkpoint.load(JobLayout(one).weight(1)))
    last = train_range(spec, job, 5, 8, cache_dir=tmp_path / "cache", stop=lambda: None)
    assert (last.end_step, last.stopped) == (8, None)
    a, b = checkpoint.load(JobLayout(one).checkpoint(8)), checkpoint.load(JobLayout(job).checkpoint(8))
    assert_equal_weights(a["model"], b["model"])
    for p, st in a["optimizer"]["state"].items():
        assert_equal_weights(st, b["optimizer"]["state"][p])
    assert torch.equal(a["rng_cpu"], b["rng_cpu"])
    assert_equal_weights(checkpoint.load(JobLayout(job).weight(2)), checkpoint.load(JobLayout(one).weight(2)))


def test_plan_after_an_early_stop_finishes_the_grid_cell(tiny_data: dict[str, Path]) -> None:
    plan = ChunkPlan(tiny_spec(tiny_data), 16)  # 12 steps, chunks of 3
    assert [plan.planned_end(s) for s in (0, 1, 2, 3, 11)] == [3, 3, 3, 6, 12]
    assert [plan.chunks_left(s) for s in (0, 1, 3, 11, 12)] == [4, 4, 3, 1, 0]
    budget = ChunkPlan(tiny_spec(tiny_data, chunk_steps=None, chunk_minutes=30), 16)
    assert (budget.planned_end(5), budget.chunks_left(5), budget.n_chunks) == (12, 1, 1)


def test_chunk_steps_and_minutes_are_one_or_the_other(tiny_data: dict[str, Path]) -> None:
    with pytest.raises(ValidationError, match="chunk_steps .3. and chunk_minutes .5.0."):
        tiny_spec(tiny_data, chunk_minutes=5)
    out = CliRunner().invoke(main, ["submit", "--train", str(tiny_data["train"]), "--val", str(tiny_data["val"]),
                                    "--chunk-steps", "3", "--chunk-minutes", "5"])
    assert out.exit_code == 2 and "chunk_minutes" in out.output
    with pytest.raises(ValidationError, match="chunk_minutes"):
        tiny_spec(tiny_data, chunk_steps=None, chunk_minutes=0)


@pytest.mark.parametrize(("text", "seconds"), [("11h30m", 41400), ("90m", 5400), ("45s", 45), ("1.5h", 5400), ("120", 120), ("2m30s", 150)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5d", "0", "-3m", "m"])
def test_bad_durations_are_named(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_pause_mid_chunk_commits_the_steps_done(rig: Any, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    rt, control, job_id = rig
    monkeypatch.setattr(tasks, "STATE_POLL_S", 0.0)
    rt.trainer.script = [lambda: control.pause(job_id)]  # lands while the chunk trains
    assert tasks.handle_train(rt, job_id, 0) == "done, job not active"
    state = control.store.state(job_id)
    assert (state.status, state.chunk, state.step, state.n_chunks) == (JobStatus.paused, 1, 1, 5)
    assert state.history[-1].ended == "pause" and (state.history[-1].start_step, state.history[-1].end_step) == (0, 1)
    assert any("chunk 0 ended at step 1 of 0..3: the job was paused" in e.what for e in state.events)
    control.resume(job_id)
    rt.trainer.script = ["ok"]
    assert tasks.handle_train(rt, job_id, 1) == "committed chunk 1"
    assert (rt.trainer.requests[-1]["start"], rt.trainer.requests[-1]["end"]) == (1, 3)  # finishes the grid cell
    assert control.store.state(job_id).history[-1].ended == "steps"


def test_a_stop_note_ends_the_chunk_as_a_signal(rig: Any) -> None:  # noqa: F811
    rt, control, job_id = rig
    life = Lifetime(rt.settings.caches, rt.settings.node)
    life.note.parent.mkdir(parents=True, exist_ok=True)
    rt.trainer.script = [lambda: stop_note(rt.settings.caches, rt.settings.node).write_text("signal")]
    assert tasks.handle_train(rt, job_id, 0) == "committed chunk 0"
    record = control.store.state(job_id).history[-1]
    assert (record.ended, record.end_step) == ("signal", 1)
    life.install()  # a new life of the node forgets the note
    assert not life.note.exists()


def test_a_stop_request_while_the_trainer_starts_does_not_kill_it() -> None:
    """SIGTERM to a worker right after its trainer (re)started: the stop requests (SIGUSR1, repeated
    every tick) reach a process still importing torch. They must wait for its handler, not kill it
    (which would cost the chunk an attempt)."""
    trainer = TrainerProcess()
    request = {"op": "evaluate", "spec": {"train": "x"}, "job_dir": "/nonexistent", "weights": "/nonexistent"}
    try:
        with pytest.raises(TrainerFailed) as failed:  # its reply: the request is invalid, it was answered
            trainer.run(request, lambda: STOP, tick_s=0.005)
        assert failed.value.kind == "ValidationError"
    finally:
        trainer.kill()
