"""End to end on a real redis-server with a real scheduler and two real `relay worker` processes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from conftest import Procs, assert_equal_weights, free_port, tiny_spec, wait_for
from segmodel import checkpoint
from segmodel.layout import JobLayout
from segmodel.engine import train_range

pytestmark = pytest.mark.e2e


# A worker's extra command-line arguments and environment.
WorkerSetup = tuple[list[str], dict[str, str]]


class Cluster:
    def __init__(self, procs: Procs, redis_url: str, workers: dict[str, WorkerSetup] | None = None) -> None:
        self.procs = procs
        port = free_port()
        self.api = f"http://127.0.0.1:{port}"
        procs.env.update(RELAY_BROKER_URL=redis_url, RELAY_API_URL=self.api)
        self.storage = Path(procs.env["RELAY_STORAGE"])
        self.scheduler = procs.start("scheduler", "--port", str(port), name="scheduler")
        workers = workers if workers is not None else {"w1": ([], {}), "w2": ([], {})}
        self.workers = {name: self.start_worker(name, *setup) for name, setup in workers.items()}
        wait_for(self._healthy, 60, "the scheduler's /healthz")
        wait_for(lambda: len(self.get("/api/queue")["workers"]) == len(workers), 90, f"{len(workers)} workers online")

    def start_worker(self, name: str, args: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.procs.start("worker", "--name", name, *(args or []), name=name, env=env)

    def commits(self, job_id: str) -> list[dict[str, Any]]:
        path = self.layout(job_id).commit_log
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def steps_trained(self, job_id: str) -> int:
        """The newest step in the job's training metrics (written as each step ends)."""
        path = self.layout(job_id).root / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return max((json.loads(line)["step"] for line in lines if line.strip().endswith("}")), default=0)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.api + "/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def get(self, path: str) -> Any:
        return httpx.get(self.api + path, timeout=10).json()

    def submit(self, spec: Any, *extra: str) -> str:
        args = ["submit", "--train", spec.train, "--val", spec.val, "--epochs", str(spec.epochs), "--seed", str(spec.seed),
                "--batch-size", str(spec.batch_size), "--height", str(spec.height), "--width", str(spec.width),
                "--engine", spec.engine, "--no-pretrained", "--json", *extra]
        if spec.chunk_steps:
            args += ["--chunk-steps", str(spec.chunk_steps)]
        if spec.chunk_minutes:
            args += ["--chunk-minutes", str(spec.chunk_minutes)]
        out = json.loads(self.procs.relay(*args).stdout)
        assert out["state"] in ("queued", "running")
        return out["id"]

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float = 180) -> dict[str, Any]:
        return wait_for(lambda: (j := self.get(f"/api/jobs/{job_id}"))["state"] in states and j, timeout,
                        f"job {job_id} to reach {states} (logs: {self.procs.tmp})")

    def layout(self, job_id: str) -> JobLayout:
        return JobLayout(self.storage / "jobs" / job_id)

    def final_weights(self, job_id: str, epochs: int = 3) -> dict[str, torch.Tensor]:
        return checkpoint.load(self.layout(job_id).weight(epochs))


@pytest.fixture
def cluster(procs: Procs, redis_url: str) -> Iterator[Cluster]:
    yield Cluster(procs, redis_url)


def test_three_epoch_job_on_two_workers(cluster: Cluster, tiny_data: dict[str, Path], reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    job_id = cluster.submit(tiny_spec(tiny_data))
    watched = cluster.procs.relay("watch", job_id, "--interval", "0.3", timeout=300)
    assert watched.returncode == 0
    job = cluster.get(f"/api/jobs/{job_id}")
    assert job["state"] == "succeeded"
    layout = cluster.layout(job_id)
    assert [layout.weight(e).is_file() for e in (1, 2, 3)] == [True] * 3
    report = json.loads(cluster.procs.relay("report", job_id, "--json").stdout)
    assert 0.0 <= report["mean_iou"] <= 1.0 and report["val_samples"] == 4
    assert layout.predictions_file.is_file()

    fetched = Path(cluster.procs.relay("fetch", job_id, "-o", str(tmp_path)).stdout.strip())
    assert fetched.name == "weight3.pt"
    assert fetched.read_bytes() == layout.weight(3).read_bytes()
    assert_equal_weights(torch.load(fetched), reference)  # the seed's own loading code
    one = Path(cluster.procs.relay("fetch", job_id, "-o", str(tmp_path / "w1.pt"), "--epoch", "1").stdout.strip())
    assert one.read_bytes() == layout.weight(1).read_bytes()

    workers = {h["worker"] for h in job["history"]}
    assert workers == {"w1", "w2"}, f"chunks ran on {workers} only"
    assert [h["chunk"] for h in job["history"]] == [0, 1, 2, 3]
    commits = [json.loads(line)["chunk"] for line in layout.commit_log.read_text().splitlines()]
    assert commits == [0, 1, 2, 3]

    status = json.loads(cluster.procs.relay("status", "--json").stdout)
    assert {w["node"] for w in status["workers"]} == {"w1", "w2"}
    assert set(status["queues"]) >= {"cpu", "gpu"}
    assert any(j["id"] == job_id for j in status["jobs"])
    assert "succeeded" in cluster.procs.relay("status").stdout


def test_two_jobs_at_once_and_duplicate_messages(cluster: Cluster, tiny_data: dict[str, Path], reference: dict[str, torch.Tensor]) -> None:
    a = cluster.submit(tiny_spec(tiny_data))
    b = cluster.submit(tiny_spec(tiny_data))
    # Duplicated and stale messages for job a: they must neither move it twice nor backwards.
    from worker.broker import Broker
    from worker.app import TRAIN_TASK, make_app
    from worker.settings import Settings

    settings = Settings(storage=cluster.storage, broker_url=cluster.procs.env["RELAY_BROKER_URL"])
    app = make_app(settings)
    for chunk in (0, 0, 1):
        app.send_task(TRAIN_TASK, args=[a, chunk], queue="cpu")
    for job_id in (a, b):
        assert cluster.wait_state(job_id, ("succeeded", "failed"))["state"] == "succeeded"
        assert_equal_weights(cluster.final_weights(job_id), reference)
    commits = [json.loads(line)["chunk"] for line in cluster.layout(a).commit_log.read_text().splitlines()]
    assert commits == [0, 1, 2, 3], "a chunk was committed twice or out of order"
    # A message replayed after the job finished changes nothing.
    before = cluster.layout(a).state_file.read_bytes()
    app.send_task(TRAIN_TASK, args=[a, 2], queue="cpu")
    wait_for(lambda: Broker(app, settings).depths()["cpu"] == 0, 30, "the replayed message to be consumed")
    time.sleep(1)
    assert cluster.layout(a).state_file.read_bytes() == before


def test_pause_resume_cancel_resume(cluster: Cluster, tiny_data: dict[str, Path], reference: dict[str, torch.Tensor]) -> None:
    # One-step chunks: twelve of them, so the pause lands while training is under way (the same
    # weights as the reference, since any chunking gives bitwise equal weights).
    job_id = cluster.submit(tiny_spec(tiny_data, chunk_steps=1))
    assert cluster.procs.relay("pause", job_id).stdout.strip() in (f"{job_id}: paused", f"{job_id}: pausing")
    job = cluster.wait_state(job_id, ("paused",))
    time.sleep(2)  # the chunk in flight may commit; nothing further may start
    held = cluster.get(f"/api/jobs/{job_id}")
    assert held["state"] == "paused"
    time.sleep(2)
    assert cluster.get(f"/api/jobs/{job_id}")["progress"] == held["progress"], "a chunk started while paused"
    assert cluster.procs.relay("resume", job_id).returncode == 0
    if held["progress"]["chunk"] < held["progress"]["n_chunks"]:  # on a loaded machine the last chunk may be in flight at pause
        wait_for(lambda: cluster.get(f"/api/jobs/{job_id}")["progress"]["step"] > held["progress"]["step"], 60, "progress after resume")
    cancelled = cluster.procs.relay("cancel", job_id, check=False)  # the tiny job may finish first
    assert cancelled.returncode == 0 or "already succeeded" in cancelled.stderr, cancelled.stderr
    job = cluster.wait_state(job_id, ("cancelled", "succeeded"))
    if job["state"] == "cancelled":
        assert cluster.procs.relay("resume", job_id).returncode == 0
    assert cluster.wait_state(job_id, ("succeeded", "failed"))["state"] == "succeeded"
    assert_equal_weights(cluster.final_weights(job_id), reference)
    # A finished job refuses to resume, with a clear message and a non-zero exit.
    refused = cluster.procs.relay("resume", job_id, check=False)
    assert refused.returncode != 0 and "succeeded" in refused.stderr


def test_worker_killed_mid_chunk(cluster: Cluster, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    # Full-size 240x240 inputs make a chunk long enough to be killed in the middle.
    spec = tiny_spec(tiny_data, height=240, width=240, epochs=2, chunk_steps=4)
    ref_dir = tmp_path / "ref"
    train_range(spec, ref_dir, 0, 8, cache_dir=ref_dir / "cache")
    job_id = cluster.submit(spec)

    def busy_worker() -> str | None:
        return next((w["node"] for w in cluster.get("/api/queue")["workers"] if w.get("job") == job_id and w["chunk"] == 1), None)

    victim = wait_for(busy_worker, 120, "a worker to start chunk 1", every=0.05)
    cluster.procs.kill(cluster.workers[victim])  # the whole worker: main process, pool child, trainer
    job = cluster.wait_state(job_id, ("succeeded", "failed"), timeout=240)
    assert job["state"] == "succeeded", job["reason"]
    assert_equal_weights(cluster.final_weights(job_id, 2), checkpoint.load(JobLayout(ref_dir).weight(2)))
    events = " | ".join(e["what"] for e in job["events"])
    assert "chunk 1 attempt 2" in events or "reconciler" in events, events
    commits = [json.loads(line)["chunk"] for line in cluster.layout(job_id).commit_log.read_text().splitlines()]
    assert commits == [0, 1]  # 2 epochs of 4 steps, chunks of 4 steps


def test_bad_submissions_change_nothing(cluster: Cluster, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    jobs_before = sorted((cluster.storage / "jobs").glob("*")) if (cluster.storage / "jobs").exists() else []
    missing = cluster.procs.relay("submit", "--train", str(tmp_path / "nope.txt"), "--val", str(tiny_data["val"]),
                                  "--no-pretrained", check=False)
    assert missing.returncode == 2 and "train" in missing.stderr and "nope.txt" in missing.stderr
    zero = cluster.procs.relay("submit", "--train", str(tiny_data["train"]), "--val", str(tiny_data["val"]),
                               "--epochs", "0", check=False)
    assert zero.returncode == 2 and "epochs" in zero.stderr
    wrong_type = cluster.procs.relay("submit", "--train", str(tiny_data["train"]), "--val", str(tiny_data["val"]),
                                     "--lr", "fast", check=False)
    assert wrong_type.returncode == 2 and "lr" in wrong_type.stderr
    r = httpx.post(cluster.api + "/api/jobs", json={"train": str(tiny_data["train"]), "val": str(tiny_data["val"]), "colour": "red"})
    assert r.status_code == 422 and "colour" in r.text
    r = httpx.post(cluster.api + "/api/jobs", json={"train": str(tiny_data["train"]), "val": str(tiny_data["val"]), "epochs": "many"})
    assert r.status_code == 422 and "epochs" in r.text
    jobs_after = sorted((cluster.storage / "jobs").glob("*")) if (cluster.storage / "jobs").exists() else []
    assert jobs_after == jobs_before


def test_relay_run_embedded(procs: Procs, tiny_data: dict[str, Path], reference: dict[str, torch.Tensor]) -> None:
    spec = tiny_spec(tiny_data)
    out = procs.relay("run", "--train", spec.train, "--val", spec.val, "--epochs", "3", "--chunk-steps", "3", "--seed", "7",
                      "--batch-size", "4", "--height", "64", "--width", "64", "--no-pretrained", timeout=300)
    assert "mean IoU" in out.stdout
    # Not a terminal: one plain, labelled line per committed chunk, with the job id, loss and speed.
    job_id = out.stdout.split()[1].rstrip(":")
    for chunk in range(1, 5):
        line = next(line for line in out.stdout.splitlines() if f"chunk {chunk}/4 done" in line)
        assert f"job {job_id}: " in line and " loss " in line and " img/s " in line and " eta " in line, line
    assert f"job {job_id}: succeeded  step 12/12 (100%)" in out.stdout
    weights = Path(next(line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("final weights: ")))
    assert_equal_weights(checkpoint.load(weights), reference)


def _ctrl_c_after_two_chunks(procs: Procs, tiny_data: dict[str, Path], *extra: str) -> tuple[str, str, JobLayout]:
    """`relay run` of the tiny job in one-step chunks, a real SIGINT once two have committed; it
    must exit 7 (paused or left running). Returns the job id, the run's output and the job's files."""
    spec = tiny_spec(tiny_data)
    log = procs.tmp / "run.log"
    with open(log, "wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "scheduler.cli", "run", "--train", spec.train, "--val", spec.val,
                                "--epochs", "3", "--chunk-steps", "1", "--seed", "7", "--batch-size", "4",
                                "--height", "64", "--width", "64", "--no-pretrained", *extra],
                               env=procs.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "chunk 2/12 done" in log.read_text(), 240, "two chunks committed")
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=120) == 7, log.read_text()
    finally:
        if run.poll() is None:
            run.kill()
    text = log.read_text()
    job_id = text.split()[1].rstrip(":")
    return job_id, text, JobLayout(Path(procs.env["RELAY_STORAGE"]) / "jobs" / job_id)


def test_ctrl_c_on_relay_run_pauses_and_attach_finishes(procs: Procs, tiny_data: dict[str, Path],
                                                        reference: dict[str, torch.Tensor]) -> None:
    """A real SIGINT: the job pauses at a chunk boundary, nothing is lost; --attach finishes it
    with the weights of an uninterrupted run."""
    job_id, text, layout = _ctrl_c_after_two_chunks(procs, tiny_data, "--name", "interrupted")
    assert f"continue with: relay run --attach {job_id}" in text and "Traceback" not in text
    state = json.loads(layout.state_file.read_text())
    assert state["status"] == "paused" and 2 <= state["step"] < 12 and state["chunk"] == state["step"]
    assert [json.loads(x)["chunk"] for x in layout.commit_log.read_text().splitlines()] == list(range(state["step"]))

    attached = procs.relay("run", "--attach", "interrupted", timeout=300)
    assert f"job {job_id}: attached" in attached.stdout and "final weights: " in attached.stdout
    assert_equal_weights(checkpoint.load(layout.weight(3)), reference)


def test_ctrl_c_with_detach_leaves_the_job_running_and_attach_finishes(procs: Procs, tiny_data: dict[str, Path],
                                                                      reference: dict[str, torch.Tensor]) -> None:
    job_id, text, layout = _ctrl_c_after_two_chunks(procs, tiny_data, "--detach")
    assert "leaving job" in text and "with no worker" in text and f"relay run --attach {job_id}" in text, text
    state = json.loads(layout.state_file.read_text())
    assert state["status"] == "running" and 2 <= state["step"] < 12, state  # the local workers stopped at a step
    time.sleep(2)
    assert json.loads(layout.state_file.read_text())["step"] == state["step"], "trained on with no worker"
    attached = procs.relay("run", "--attach", job_id, timeout=300)
    assert f"job {job_id}: attached" in attached.stdout and "final weights: " in attached.stdout
    assert_equal_weights(checkpoint.load(layout.weight(3)), reference)


def test_resume_wait_follows_the_job_to_its_end(cluster: Cluster, tiny_data: dict[str, Path], reference: dict[str, torch.Tensor]) -> None:
    job_id = cluster.submit(tiny_spec(tiny_data, chunk_steps=1))
    cluster.procs.relay("pause", job_id)
    cluster.wait_state(job_id, ("paused",))
    resumed = cluster.procs.relay("resume", job_id, "--wait", timeout=300)
    first = resumed.stdout.splitlines()[0]
    assert resumed.returncode == 0 and first in (f"{job_id}: running", f"{job_id}: queued") and "succeeded" in resumed.stdout, resumed.stdout
    assert cluster.get(f"/api/jobs/{job_id}")["state"] == "succeeded"
    assert_equal_weights(cluster.final_weights(job_id), reference)


def test_init_weights_and_extend_through_the_cli(cluster: Cluster, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    """A seed file starts a job at epoch 1 (`relay submit --init-weights --start-epoch`); `relay extend`
    takes it on to 4 epochs on the workers; it ends equal to that 4-epoch job run in one go."""
    from scheduler.control import Control
    from segmodel.model import SegmentationNN
    from worker.settings import Settings

    torch.manual_seed(5)
    seed_file = tmp_path / "weight1.pt"
    torch.save(SegmentationNN(num_classes=101, height=64, width=64, pretrained=False).state_dict(), seed_file)
    bad = tmp_path / "bad.pt"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    spec = tiny_spec(tiny_data, epochs=2, init_weights=str(seed_file), start_epoch=1)

    refused = cluster.procs.relay("submit", "--train", spec.train, "--val", spec.val, "--init-weights", str(bad), check=False)
    assert refused.returncode == 2 and str(bad) in refused.stderr and "missing keys" in refused.stderr, refused.stderr
    job_id = cluster.submit(spec, "--init-weights", str(seed_file), "--start-epoch", "1")
    assert cluster.wait_state(job_id, ("succeeded", "failed"))["state"] == "succeeded"
    layout = cluster.layout(job_id)
    assert sorted(p.name for p in layout.weights_dir.glob("*.pt")) == ["weight2.pt"]
    assert cluster.procs.relay("extend", job_id, "--epochs", "2", check=False).returncode == 2
    assert "to 4 epochs" in cluster.procs.relay("extend", job_id, "--epochs", "4").stdout
    job = cluster.wait_state(job_id, ("succeeded", "failed"))
    assert job["state"] == "succeeded", job["reason"]
    assert json.loads(cluster.procs.relay("report", job_id, "--json").stdout)["weights"] == "weight4.pt"
    assert any("extended from 2 to 4 epochs" in e["what"] for e in job["events"])
    assert all(h["environment"]["deterministic"] for h in job["history"])

    control = Control(Settings(storage=tmp_path / "ref"))
    ref_id, _ = control.submit(spec.model_copy(update={"epochs": 4}))
    ref = control.store.layout(ref_id)
    train_range(control.store.spec(ref_id), ref.root, 0, 12, cache_dir=tmp_path / "ref-cache")
    assert_equal_weights(cluster.final_weights(job_id, 4), checkpoint.load(ref.weight(4)))


# ---- preemption: time budgets, SIGTERM, runtime limits (each step throttled to be catchable) ----

SLOW = {"RELAY_THROTTLE_STEP_S": "0.5"}


def _reference(spec: Any, tmp_path: Path, steps: int, epoch: int) -> dict[str, torch.Tensor]:
    ref_dir = tmp_path / "ref"
    train_range(spec, ref_dir, 0, steps, cache_dir=ref_dir / "cache")
    return checkpoint.load(JobLayout(ref_dir).weight(epoch))


def test_sigterm_commits_mid_chunk_and_another_worker_goes_on(procs: Procs, redis_url: str, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    spec = tiny_spec(tiny_data, epochs=2, chunk_steps=8)  # one planned chunk of 8 steps
    cluster = Cluster(procs, redis_url, {"w1": ([], SLOW), "w2": ([], SLOW)})
    job_id = cluster.submit(spec)
    victim = wait_for(lambda: next((w["node"] for w in cluster.get("/api/queue")["workers"] if w.get("job") == job_id), None),
                      120, "a worker to take the chunk", every=0.05)
    wait_for(lambda: cluster.steps_trained(job_id) >= 2, 120, "two steps trained", every=0.05)
    cluster.workers[victim].send_signal(signal.SIGTERM)  # the main process only, as `docker stop` does
    assert cluster.workers[victim].wait(timeout=120) == 0
    first = cluster.commits(job_id)[0]
    assert first["worker"] == victim and first["ended"] == "signal" and 2 <= first["end_step"] < 8, first
    assert "warm shutdown" in procs.log(victim).lower()
    job = cluster.wait_state(job_id, ("succeeded", "failed"), timeout=240)
    assert job["state"] == "succeeded", job["reason"]
    commits = cluster.commits(job_id)
    assert [c["chunk"] for c in commits] == [0, 1] and commits[1]["start_step"] == first["end_step"] and commits[1]["end_step"] == 8
    assert commits[1]["worker"] != victim and commits[1]["ended"] == "job end"
    assert any(f"chunk 0 ended at step {first['end_step']} of 0..8" in e["what"] for e in job["events"])
    assert_equal_weights(cluster.final_weights(job_id, 2), _reference(spec, tmp_path, 8, 2))


def test_time_budget_chunks_on_workers_of_two_speeds(procs: Procs, redis_url: str, tiny_data: dict[str, Path], reference: dict[str, torch.Tensor]) -> None:
    cluster = Cluster(procs, redis_url, {"slow": ([], {"RELAY_THROTTLE_STEP_S": "0.3"}), "fast": ([], {"RELAY_THROTTLE_STEP_S": "0.05"})})
    spec = tiny_spec(tiny_data, chunk_steps=None, chunk_minutes=0.012)  # 0.72 s per chunk
    job_id = cluster.submit(spec)
    job = cluster.wait_state(job_id, ("succeeded", "failed"), timeout=300)
    assert job["state"] == "succeeded", job["reason"]
    assert_equal_weights(cluster.final_weights(job_id), reference)
    history = job["history"]
    assert [h["chunk"] for h in history] == list(range(len(history))) and history[-1]["end_step"] == 12
    assert all(a["end_step"] == b["start_step"] for a, b in zip(history, history[1:]))
    assert {h["ended"] for h in history[:-1]} == {"budget"} and history[-1]["ended"] in ("budget", "job end")
    assert len({h["end_step"] - h["start_step"] for h in history}) > 1, history  # the chunks differ in steps
    assert all(cluster.layout(job_id).weight(e).is_file() for e in (1, 2, 3))


def test_max_runtime_commits_and_exits_and_idle_workers_leave(procs: Procs, redis_url: str, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    spec = tiny_spec(tiny_data, epochs=4, chunk_steps=16)  # one chunk of 16 steps of at least a second
    cluster = Cluster(procs, redis_url, {"w1": (["--max-runtime", "20s"], {"RELAY_THROTTLE_STEP_S": "1"})})
    job_id = cluster.submit(spec)
    assert cluster.workers["w1"].wait(timeout=120) == 0
    first = cluster.commits(job_id)[0]
    assert first["worker"] == "w1" and first["ended"] == "runtime limit" and 1 <= first["end_step"] < 16, first
    # A worker that finds nothing left to do after the job leaves by itself.
    late = cluster.start_worker("w2", ["--exit-when-idle", "3s"])
    assert cluster.wait_state(job_id, ("succeeded", "failed"), timeout=240)["state"] == "succeeded"
    assert late.wait(timeout=120) == 0
    assert [c["worker"] for c in cluster.commits(job_id)] == ["w1", "w2"]
    assert_equal_weights(cluster.final_weights(job_id, 4), _reference(spec, tmp_path, 16, 4))
