"""Storage side by side: a local folder against a bucket on an S3 server (moto on loopback), in one run.

Per backend, one multi-chunk job with two warm workers on a private redis-server (on S3 each worker
has its own cache folder and shares no folder with the other), then checkpoint save and load:

- hand-off: from chunk k's `committed_at` in the commit log to chunk k+1's `started_at` (the next
  worker has the message, the lease and the trainer), and on to chunk k+1's first step beginning
  (the start checkpoint fetched, on S3, and loaded);
- checkpoint save: the job's newest chunk checkpoint written with its checksum (`put_checked`),
  and load: read, verified and `torch.load`ed (`get_checked`), repeated, medians; the same for the
  frozen backbone's weights (`checkpoints/backbone.pt`, written once per job, read by every chunk).

    python bench/storage.py [--chunks 10] [--chunk-steps 2] [--repeats 10]

Needs redis-server, moto (`python -m moto.server`) and boto3, as the tests do. moto keeps objects in
memory and speaks HTTP on loopback: a real bucket adds network latency this does not show.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from scheduler.control import Control
from segmodel.jobs import JobStore
from segmodel.spec import TrainSpec
from segmodel.storage import Storage
from segmodel.synthetic import generate
from worker.registry import online
from worker.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import s3_env, start_moto  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(label: str, root: Path, storage: Path | str, broker_url: str, spec: TrainSpec) -> tuple[JobStore, str]:
    """The job trained to the end by two warm workers; the store and the job's id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_STORAGE=str(storage), RELAY_BROKER_URL=broker_url)
    workers = []
    for i in (1, 2):
        own = {"RELAY_CACHE_DIR": str(root / f"cache-{label}-{i}")} if isinstance(storage, str) else {}
        workers.append(subprocess.Popen([sys.executable, "-m", "scheduler.cli", "worker", "--name", f"{label}-{i}"],
                                        env={**env, **own}, stdout=open(root / f"{label}-{i}.log", "ab"),
                                        stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 120
        while len(online(storage)) < 2:  # warm: both workers up, trainers imported
            if time.time() > deadline:
                raise SystemExit(f"{label}: workers did not come up (logs in {root})")
            time.sleep(0.2)
        time.sleep(5)
        control = Control(Settings(storage=storage, broker_url=broker_url))
        job_id, _ = control.submit(spec)
        deadline = time.time() + 600
        while not control.store.state(job_id).status.final:
            if time.time() > deadline:
                raise SystemExit(f"{label}: the job did not end in 10 minutes (logs in {root})")
            time.sleep(0.2)
        state = control.store.state(job_id)
        if state.status.value != "succeeded":
            raise SystemExit(f"{label}: job {state.status.value}: {state.reason}")
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=30)
    return control.store, job_id


def hand_offs(store: JobStore, job_id: str) -> tuple[list[float], list[float]]:
    """Per hand-off: commit to the next chunk's start, and commit to its first step beginning."""
    commits = sorted((c for c in store.records(job_id, "commits") if "committed_at" in c), key=lambda c: c["committed_at"])
    first_step = {}
    for m in store.records(job_id, "metrics"):
        first_step.setdefault(m["chunk"], m["time"] - m["step_s"])
        first_step[m["chunk"]] = min(first_step[m["chunk"]], m["time"] - m["step_s"])
    started, stepping = [], []
    for prev, nxt in zip(commits, commits[1:]):
        started.append(nxt["started_at"] - prev["committed_at"])
        stepping.append(first_step[nxt["chunk"]] - prev["committed_at"])
    return started, stepping


def checkpoint_times(backend: Storage, key: str, data: bytes, repeats: int) -> tuple[float, float]:
    """Median seconds to save (bytes + checksum) and to load (read, verify, torch.load) one checkpoint."""
    saves, loads = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.put_checked(key, data)
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got, _ = backend.get_checked(key)
        torch.load(io.BytesIO(got), map_location="cpu", weights_only=True)
        loads.append(time.perf_counter() - t0)
    return statistics.median(saves), statistics.median(loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--chunk-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="checkpoint saves and loads per backend")
    args = parser.parse_args()
    redis_exe = shutil.which("redis-server")
    if redis_exe is None:
        raise SystemExit("redis-server is needed: an object store needs a broker")
    root = Path(tempfile.mkdtemp(prefix="relay-storage-bench-"))
    lists = generate(root / "data", train=16, val=4, size=64)
    steps_per_epoch = 4
    spec = TrainSpec(train=str(lists["train"]), val=str(lists["val"]), epochs=-(-args.chunks * args.chunk_steps // steps_per_epoch),
                     chunk_steps=args.chunk_steps, batch_size=4, height=128, width=128, pretrained=False)
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = [subprocess.Popen(
        [redis_exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)],
        stdout=subprocess.DEVNULL)]
    results: dict[str, dict[str, Any]] = {}
    try:
        moto, endpoint = start_moto(root / "moto.log")
        procs.append(moto)
        os.environ.update(s3_env(endpoint, "bench"))
        time.sleep(0.5)
        data, backbone = b"", b""
        for label, storage in (("local", root / "storage"), ("s3", "s3://bench/relay")):
            store, job_id = run_job(label, root, storage, f"redis://127.0.0.1:{port}/{len(results)}", spec)
            started, stepping = hand_offs(store, job_id)
            if not data:  # the local job's newest chunk checkpoint, saved and loaded on both backends
                newest = max(int(k.rsplit("step", 1)[1][:-3]) for k in store.backend.list(f"jobs/{job_id}/checkpoints")
                             if k.rsplit("/", 1)[1].startswith("step") and k.endswith(".pt"))
                data, _ = store.backend.get_checked(f"jobs/{job_id}/checkpoints/step{newest}.pt")
                backbone, _ = store.backend.get_checked(f"jobs/{job_id}/checkpoints/backbone.pt")
            save, load = checkpoint_times(store.backend, "bench/checkpoint.pt", data, args.repeats)
            bb_save, bb_load = checkpoint_times(store.backend, "bench/backbone.pt", backbone, args.repeats)
            results[label] = {"started": started, "stepping": stepping, "save": save, "load": load,
                              "bb_save": bb_save, "bb_load": bb_load}
    finally:
        for p in procs:
            p.kill()
            p.wait()
    local, s3 = results["local"], results["s3"]
    rows = [("hand-off: commit -> next chunk started, median", statistics.median(local["started"]), statistics.median(s3["started"])),
            ("hand-off: commit -> next chunk started, worst", max(local["started"]), max(s3["started"])),
            ("commit -> next chunk's first step, median", statistics.median(local["stepping"]), statistics.median(s3["stepping"])),
            ("commit -> next chunk's first step, worst", max(local["stepping"]), max(s3["stepping"])),
            (f"checkpoint save ({len(data) / 2**20:.1f} MiB + checksum), median", local["save"], s3["save"]),
            ("checkpoint load (read, verify, torch.load), median", local["load"], s3["load"]),
            (f"backbone save ({len(backbone) / 2**20:.1f} MiB + checksum), median", local["bb_save"], s3["bb_save"]),
            ("backbone load (read, verify, torch.load), median", local["bb_load"], s3["bb_load"])]
    print(f"{len(local['started'])} hand-offs per backend, {args.repeats} checkpoint saves and loads")
    print(f"{'':<54}{'local':>9}{'s3 (moto)':>11}{'s3/local':>10}")
    for name, a, b in rows:
        print(f"{name:<54}{a:>8.3f}s{b:>10.3f}s{b / a:>9.1f}x")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
