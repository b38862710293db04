"""Hand-off overhead: the gap between the last step of chunk k and the first step of chunk k+1.

Runs one multi-chunk job with two warm workers on Redis (a private redis-server) and on the
embedded filesystem transport, and prints the median and worst gap beside a chunk's compute time.

    python bench/relay_overhead.py [--chunks 12] [--chunk-steps 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scheduler.control import Control
from segmodel.spec import TrainSpec
from segmodel.synthetic import generate
from worker.registry import online
from worker.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(label: str, root: Path, spec: TrainSpec, broker_url: str | None) -> dict[str, float]:
    storage = root / label
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_STORAGE=str(storage), **({"RELAY_BROKER_URL": broker_url} if broker_url else {}))
    settings = Settings(storage=storage, broker_url=broker_url)
    workers = [subprocess.Popen([sys.executable, "-m", "scheduler.cli", "worker", "--name", f"{label}-{i}"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in (1, 2)]
    try:
        deadline = time.time() + 120
        while len(online(storage)) < 2:  # warm: both workers up, trainers imported
            if time.time() > deadline:
                raise SystemExit(f"{label}: workers did not come up")
            time.sleep(0.2)
        time.sleep(5)
        control = Control(settings)
        job_id, _ = control.submit(spec)
        while not control.store.state(job_id).status.final:
            time.sleep(0.2)
        state = control.store.state(job_id)
        if state.status.value != "succeeded":
            raise SystemExit(f"{label}: job {state.status.value}: {state.reason}")
        steps: dict[int, dict] = {}
        for line in control.store.layout(job_id).metrics_file.read_text().splitlines():
            m = json.loads(line)
            steps[m["step"]] = m
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=30)
    gaps = []
    for h in state.history[1:]:
        last_prev = steps[h.start_step]                # the step that ended chunk k
        first = steps[h.start_step + 1]                # the first step of chunk k+1
        gaps.append(first["time"] - first["step_s"] - last_prev["time"])
    compute = statistics.median(h.seconds for h in state.history)
    return {"median_gap_s": statistics.median(gaps), "worst_gap_s": max(gaps), "chunk_compute_s": compute,
            "handoffs": len(gaps), "workers_used": len({h.worker for h in state.history})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--chunk-steps", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="relay-overhead-"))
    lists = generate(root / "data", train=16, val=4, size=64)
    steps_per_epoch = 4
    epochs = -(-args.chunks * args.chunk_steps // steps_per_epoch)
    spec = TrainSpec(train=str(lists["train"]), val=str(lists["val"]), epochs=epochs, chunk_steps=args.chunk_steps,
                     batch_size=4, height=128, width=128, pretrained=False)
    results = {}
    redis_exe = shutil.which("redis-server")
    if redis_exe:
        port = free_port()
        redis = subprocess.Popen([redis_exe, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(root)],
                                 stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            results["redis"] = measure("redis", root, spec, f"redis://127.0.0.1:{port}/0")
        finally:
            redis.kill()
    else:
        print("redis-server not found: Redis measurement skipped")
    results["embedded"] = measure("embedded", root, spec, None)
    print(f"{'transport':<10} {'hand-offs':>9} {'median gap':>11} {'worst gap':>10} {'chunk compute':>14} {'workers':>8}")
    for label, r in results.items():
        print(f"{label:<10} {r['handoffs']:>9} {r['median_gap_s']:>10.3f}s {r['worst_gap_s']:>9.3f}s "
              f"{r['chunk_compute_s']:>13.3f}s {r['workers_used']:>8}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
