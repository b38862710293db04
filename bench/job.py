"""A whole job end to end: `relay run` with N epochs against the seed's loop for N epochs, side by side.

    .venv/bin/python bench/job.py --images 64 --val 16 --epochs 2 [--out DIR]

ADE20K-like data (bench/epoch.py's generator). Relay: `relay run` (embedded broker, its own
worker, fast engine, one epoch per chunk), timed from the command's start to its exit; the
phases come from the job's own records: start-up (command start to the first chunk's start),
the first chunk (cache build included, and its cache_build_s; `relay run` starts its worker with
the job, so the chunk also waits for the trainer's imports: trainer_wait_s), later chunks
(median), hand-offs (a chunk's end to the next one's start, median), evaluation (last chunk's
end to the job's end), the whole job to its success and to the command's exit (after the warm
shutdown of its idle worker, ~1.5 s). The seed: its Lightning loop over N epochs (`max_epochs=N`, PIL in `__getitem__`) and the
seed path's evaluation of the validation set, in a fresh process. Random backbone weights on
both sides (no download; same compute).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SEED = """
import json, sys, time
t0 = time.perf_counter()
import pytorch_lightning as pl, torch
from torch.utils.data import DataLoader
from segmodel import checkpoint
from segmodel.data import SegmentationDataset
from segmodel.evaluate import evaluate
from segmodel.model import SegmentationNN
from segmodel.spec import TrainSpec
torch.manual_seed(0)
model = SegmentationNN(pretrained=False)
loader = DataLoader(SegmentationDataset(sys.argv[1]), batch_size=16, shuffle=True, num_workers=0)
trainer = pl.Trainer(max_epochs=int(sys.argv[3]), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
t1 = time.perf_counter()
trainer.fit(model, loader)
t2 = time.perf_counter()
checkpoint.save(model.state_dict(), __import__("pathlib").Path(sys.argv[4] + "/seed.pt"))
evaluate(TrainSpec(train=sys.argv[1], val=sys.argv[2], pretrained=False, engine="seed"), sys.argv[4] + "/seed-job", __import__("pathlib").Path(sys.argv[4] + "/seed.pt"))
t3 = time.perf_counter()
print("RESULT " + json.dumps({"startup_s": t1 - t0, "train_s": t2 - t1, "eval_s": t3 - t2, "total_s": t3 - t0}))
"""


def main() -> None:
    from epoch import generate

    from segmodel.jobs import JobStore

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--val", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="relay-job-bench-"))
    train, val = work / "train" / "train.txt", work / "val" / "train.txt"
    for lst, n, seed in ((train, args.images, 0), (val, args.val, 1)):
        if not lst.exists() or len(lst.read_text().splitlines()) != n:
            generate(lst.parent, n, seed=seed)
    load0 = os.getloadavg()[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    storage = work / f"storage-{int(time.time())}"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "scheduler.cli", "run", "--train", str(train), "--val", str(val),
                           "--epochs", str(args.epochs), "--no-pretrained"], env={**env, "RELAY_STORAGE": str(storage)},
                          capture_output=True, text=True, cwd=ROOT)
    relay_total = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"relay run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    store = JobStore(storage)
    (job_id,) = store.ids()
    st = store.state(job_id)
    h = st.history
    ended = max(e.at for e in st.events if e.what.startswith("succeeded"))
    relay = {
        "startup_s": h[0].started_at - t0,
        "first_chunk_s": h[0].ended_at - h[0].started_at,
        "cache_build_s": float(h[0].environment.get("cache_build_s", 0.0)),
        "trainer_wait_s": h[0].trainer_wait_s,
        "later_chunk_s": statistics.median(r.ended_at - r.started_at for r in h[1:]) if len(h) > 1 else float("nan"),
        "handoff_s": statistics.median(b.started_at - a.ended_at for a, b in zip(h, h[1:])) if len(h) > 1 else float("nan"),
        "train_s": h[-1].ended_at - h[0].started_at,
        "eval_s": ended - h[-1].ended_at,
        "succeeded_s": ended - t0,
        "total_s": relay_total,
    }
    p = subprocess.run([sys.executable, "-c", SEED, str(train), str(val), str(args.epochs), str(work)], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"seed run failed: {p.stderr[-3000:]}")
    seed = json.loads([x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1][len("RESULT "):])
    print(f"{args.images} train / {args.val} val images, {args.epochs} epochs; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'phase':34s} {'seed loop':>10s} {'relay':>10s} {'ratio':>7s}")
    rows = [("start-up", seed["startup_s"], relay["startup_s"]), ("training (all epochs)", seed["train_s"], relay["train_s"]),
            ("  per epoch", seed["train_s"] / args.epochs, None), ("  first chunk (cache build incl.)", None, relay["first_chunk_s"]),
            ("    of it trainer start (imports)", None, relay["trainer_wait_s"]),
            ("    of it cache build", None, relay["cache_build_s"]), ("  later chunks (median)", None, relay["later_chunk_s"]),
            ("  hand-off (median)", None, relay["handoff_s"]), ("evaluation", seed["eval_s"], relay["eval_s"]),
            ("whole job (to succeeded)", seed["total_s"], relay["succeeded_s"]),
            ("whole job (to the command's exit)", seed["total_s"], relay["total_s"])]
    for name, s, r in rows:
        ratio = f"{s / r:6.1f}x" if s and r else ""
        print(f"{name:34s} {'' if s is None else f'{s:9.2f}s':>10s} {'' if r is None else f'{r:9.2f}s':>10s} {ratio:>7s}")
    ep = seed["train_s"] / args.epochs
    print(f"steady epoch: seed {ep:.2f}s vs relay chunk {relay['later_chunk_s']:.2f}s = {ep / relay['later_chunk_s']:.1f}x; "
          f"first epoch incl. cache build: {ep / relay['first_chunk_s']:.1f}x "
          f"({ep / (relay['first_chunk_s'] - relay['trainer_wait_s']):.1f}x less the trainer's start, which the seed's "
          f"epoch does not hold either: its imports are in its start-up)")
    (work / "job-result.json").write_text(json.dumps({"seed": seed, "relay": relay}, indent=1))


if __name__ == "__main__":
    main()
