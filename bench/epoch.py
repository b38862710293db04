"""An epoch in minutes: the seed's own training loop against Relay's fast engine, on the same data.

    python bench/epoch.py                          # 160 images, 8 seed steps: a few minutes on 2 cores
    python bench/epoch.py --images 640 --steps 20 --out /tmp/epoch-bench

Generates ADE20K-like data (683x512 JPEGs of ~90 KB, PNG annotations with class ids 0..100 in the
R channel: blobs of classes over a void background, textured, with JPEG-like detail), then, each in
its own fresh process:

(a) the seed's loop as the student wrote it: `SegmentationNN` (a LightningModule) fitted by
    `pytorch_lightning.Trainer(max_epochs=1, limit_train_batches=S)` on a Dataset that decodes and
    resizes with PIL in `__getitem__`, DataLoader(batch_size=16, shuffle=True, num_workers=0), Adam
    at 1e-2 - untouched, in the default environment;
(b) Relay's fast engine (`segmodel.fasttrain.train_steps_fast`) on the same list file, in the
    environment `worker_env()` gives the trainer: the one-time cache build (decode + resize, then
    the frozen AlexNet's features), then steady-state steps.
For information it also reruns (a) unchanged in `worker_env()`'s environment (its malloc settings
alone; `--no-seed-in-worker-env` skips it). Speed-ups are always against the untouched (a).

Prints s/it, images/s, the speed-up, the one-time cache cost, and minutes per 20,210-image epoch
(ADE20K's training set) extrapolated for both: the fast engine's first epoch includes building its
caches. Timings on a machine shared with other work are noisy: the script prints the load average.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ADE_TRAIN = 20_210
BATCH = 16
ROOT = Path(__file__).resolve().parent.parent


# ---- data ---------------------------------------------------------------------------------------

def _sample(rng: np.random.Generator, width: int = 683, height: int = 512) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # a smooth background (like walls, floor, sky: void among the 100 thing classes) with texture
    base = rng.uniform(60, 200, size=3).astype(np.float32)
    grad = rng.uniform(-0.08, 0.08, size=(2, 3)).astype(np.float32)
    noise = rng.normal(0, 6, size=(height, width, 3)).astype(np.float32)
    image = base + xx[..., None] * grad[0] + yy[..., None] * grad[1] + noise
    labels = np.zeros((height, width), np.uint8)
    for _ in range(rng.integers(4, 12)):  # objects of random classes over one another
        c = int(rng.integers(1, 101))
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(20, height / 3), rng.uniform(20, width / 3)
        theta = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / rx
        v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / ry
        mask = u * u + v * v <= 1 + 0.15 * np.sin(5 * np.arctan2(v, u) + rng.uniform(0, 6))
        colour = np.random.default_rng(c).uniform(0, 255, size=3).astype(np.float32)  # a class's own look
        stripes = np.sin((xx[mask] * np.cos(c) + yy[mask] * np.sin(c)) / (3 + c % 9)) * 25
        image[mask] = colour + stripes[:, None] + 1.3 * noise[mask]
        labels[mask] = c
    return image.clip(0, 255).astype(np.uint8), labels


def generate(out: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        img, lab = _sample(rng)
        Image.fromarray(img).save(out / f"{i:06d}.jpg", quality=90)
        rgb = np.zeros((*lab.shape, 3), np.uint8)
        rgb[..., 0] = lab
        Image.fromarray(rgb).save(out / f"{i:06d}.png")
        lines.append(f"{i:06d}.jpg {i:06d}.png\n")
    (out / "train.txt").write_text("".join(lines))
    return out / "train.txt"


# ---- (a) the seed's loop ------------------------------------------------------------------------

def run_seed(list_file: str, steps: int, device: str) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from segmodel.data import SegmentationDataset
    from segmodel.model import SegmentationNN

    class Times(pl.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

    torch.manual_seed(0)
    model = SegmentationNN(pretrained=False)  # same compute as the ImageNet weights; this runs offline
    loader = DataLoader(SegmentationDataset(list_file), batch_size=BATCH, shuffle=True, num_workers=0)
    times = Times()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=steps, accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
                         enable_checkpointing=False, callbacks=[times])
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    total = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(times.ends, times.ends[1:])]  # fetch + decode + step, per batch
    return {"steps": len(times.ends), "fit_s": total, "first_step_s": times.ends[0] - t0,
            "s_per_it": statistics.median(gaps) if gaps else total / max(1, len(times.ends)),
            "threads": torch.get_num_threads()}


# ---- (b) Relay's fast engine --------------------------------------------------------------------

def run_fast(list_file: str, steps: int, work: Path, device: str) -> dict[str, Any]:
    import torch

    from segmodel import cache as caches
    from segmodel import features
    from segmodel.lists import read_list
    from segmodel.fasttrain import train_steps_fast
    from segmodel.spec import ChunkPlan, TrainSpec
    from segmodel.layout import JobLayout
    from segmodel.train import _fresh_state

    samples = read_list(list_file)
    n = len(samples)
    per_epoch = math.ceil(n / BATCH)
    spec = TrainSpec(train=list_file, val=list_file, epochs=max(1, math.ceil((steps + 1) / per_epoch)), pretrained=False,
                     queue="gpu" if device == "cuda" else "cpu")  # jobs on the gpu queue train on CUDA
    assert ChunkPlan(spec, n).total_steps >= steps + 1
    cache = work / "cache"
    # the one-time cost, stage by stage: what the job's first chunk does before its first step
    t0 = time.perf_counter()
    data = caches.data_cache(samples, spec.height, spec.width, spec.num_classes, cache)
    data_s = time.perf_counter() - t0
    model, _ = _fresh_state(spec, JobLayout(work / "job"), torch.device(device))  # the job's backbone at step 0 (every chunk builds its model)
    t1 = time.perf_counter()
    features.feature_cache(data, model.features, cache, torch.device(device))
    features_s = time.perf_counter() - t1
    step_s: list[float] = []
    first = train_steps_fast(spec, work / "job", 0, 1, storage_cache=cache)
    assert first.environment["cache_build_s"] == 0  # the chunk found the caches just built
    t3 = time.perf_counter()
    rest = train_steps_fast(spec, work / "job", 1, steps + 1, storage_cache=cache, on_step=lambda m: step_s.append(m["step_s"]))
    rest_s = time.perf_counter() - t3
    return {"cache_build_s": data_s + features_s, "stages_s": {"decode + resize": data_s, "AlexNet features": features_s},
            "chunk_startup_s": rest_s - rest.seconds, "steps": len(step_s), "s_per_it": statistics.median(step_s),
            "mean_s_per_it": statistics.mean(step_s), "loss_last": rest.loss_last, "threads": torch.get_num_threads(),
            "environment": rest.environment}


# ---- driver -------------------------------------------------------------------------------------

def _child(part: str, args: argparse.Namespace, list_file: Path, work: Path, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--part", part, "--list", str(list_file), "--work", str(work),
           "--steps", str(args.steps if part == "seed" else args.fast_steps), "--device", args.device]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"{part} run failed (exit {proc.returncode})")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=160, help="generated training images (default 160)")
    ap.add_argument("--steps", type=int, default=8, help="seed loop: batches of 16 to time (default 8)")
    ap.add_argument("--fast-steps", type=int, default=30, help="fast engine: steady-state steps to time (default 30)")
    ap.add_argument("--out", type=Path, default=None, help="folder for data and caches (default: a temporary one)")
    ap.add_argument("--no-seed-in-worker-env", dest="seed_in_worker_env", action="store_false",
                    help="skip the informational rerun of the seed loop with the trainer's malloc settings")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both loops run (default cpu)")
    ap.add_argument("--part", choices=["seed", "fast"], help=argparse.SUPPRESS)
    ap.add_argument("--list", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.part == "seed":
        print("RESULT " + json.dumps(run_seed(args.list, args.steps, args.device)), flush=True)
        return
    if args.part == "fast":
        print("RESULT " + json.dumps(run_fast(args.list, args.steps, args.work, args.device)), flush=True)
        return

    sys.path.insert(0, str(ROOT))
    from worker.trainer_env import worker_env

    out = args.out or Path(tempfile.mkdtemp(prefix="epoch-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t = time.perf_counter()
    list_file = out / "data" / "train.txt"
    if not list_file.is_file() or len(list_file.read_text().splitlines()) != args.images:
        list_file = generate(out / "data", args.images)
    jpeg_kb = statistics.mean(p.stat().st_size for p in (out / "data").glob("*.jpg")) / 1024
    print(f"data: {args.images} images 683x512, JPEG {jpeg_kb:.0f} KB on average ({time.perf_counter() - t:.1f} s to generate) in {out}")
    print(f"machine: {os.cpu_count()} CPUs, load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start")

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_", "MKL_"))}
    base_env["PYTHONPATH"] = str(ROOT) + os.pathsep + base_env.get("PYTHONPATH", "")
    seed = _child("seed", args, list_file, out, base_env)
    # for information: the same untouched loop with only the trainer's allocator settings
    seed_env = _child("seed", args, list_file, out, worker_env(base_env)) if args.seed_in_worker_env else None
    work = out / f"fast-{int(time.time())}"
    fast = _child("fast", args, list_file, work, worker_env(base_env))
    load1 = os.getloadavg()

    steps_epoch = math.ceil(ADE_TRAIN / BATCH)
    seed_epoch_min = seed["s_per_it"] * steps_epoch / 60
    cache_per_image = fast["cache_build_s"] / args.images
    fast_epoch_min = fast["s_per_it"] * steps_epoch / 60
    first_epoch_min = fast_epoch_min + cache_per_image * ADE_TRAIN / 60
    ratio = seed["s_per_it"] / fast["s_per_it"]
    rows = [("seed loop (Lightning, PIL in __getitem__)", seed["s_per_it"], seed["threads"])]
    if seed_env is not None:
        rows.append(("  the same, in worker_env() (malloc settings)", seed_env["s_per_it"], seed_env["threads"]))
    rows.append(("Relay fast engine, steady state", fast["s_per_it"], fast["threads"]))
    print()
    print(f"{'':44s} {'s/it':>8s} {'images/s':>9s} {'threads':>8s}")
    for name, s, th in rows:
        print(f"{name:44s} {s:8.3f} {BATCH / s:9.1f} {th:8d}")
    print(f"\nspeed-up, steady state: {ratio:.1f}x  (seed median over {seed['steps'] - 1} batch intervals, "
          f"fast median over {fast['steps']} steps; fast mean {fast['mean_s_per_it']:.3f} s/it)")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in fast["stages_s"].items())
    print(f"one-time cache build: {fast['cache_build_s']:.1f} s for {args.images} images "
          f"({cache_per_image * 1000:.1f} ms/image: {stages}); chunk start-up {fast['chunk_startup_s']:.1f} s")
    print(f"\nper {ADE_TRAIN:,}-image epoch ({steps_epoch} steps of {BATCH}), extrapolated:")
    print(f"  seed loop                      {seed_epoch_min:7.1f} min")
    print(f"  fast engine, first epoch       {first_epoch_min:7.1f} min  (incl. {cache_per_image * ADE_TRAIN / 60:.1f} min of cache build)")
    print(f"  fast engine, later epochs      {fast_epoch_min:7.1f} min")
    busy = max(load0[0], load1[0]) > (os.cpu_count() or 1) * 0.75
    print(f"\nload average {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at the end"
          + (" - the machine was busy with other work: timings are noisy" if busy else ""))
    (out / "result.json").write_text(json.dumps({"seed": seed, "seed_in_worker_env": seed_env, "fast": fast, "images": args.images, "ratio": ratio,
                                                 "seed_epoch_min": seed_epoch_min, "fast_first_epoch_min": first_epoch_min,
                                                 "fast_epoch_min": fast_epoch_min, "load": [load0, load1]}, indent=2))


if __name__ == "__main__":
    main()
