"""Evaluation of a job's weights: the seed's path against the fast path, side by side in one run.

    .venv/bin/python bench/evaluate.py --images 96 [--out DIR]

On ADE20K-like 683x512 images (bench/epoch.py's generator): the seed path (decode, AlexNet and a
16x101x240x240 upsample per batch), the fast path cold (the validation caches built first) and
warm (caches there: a later evaluation of the same set), in ms per image, with the ratio, and a
check that the reports are equal. Random head weights (no download); the timing does not depend
on them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from epoch import generate  # noqa: E402

from segmodel import checkpoint  # noqa: E402
from segmodel.evaluate import evaluate  # noqa: E402
from segmodel.net import build_model  # noqa: E402
from segmodel.spec import TrainSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--queue", choices=["cpu", "gpu"], default="cpu", help="gpu: evaluate on CUDA (both paths)")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="relay-eval-bench-"))
    val = work / "val" / "train.txt"
    if not val.exists() or len(val.read_text().splitlines()) != args.images:
        generate(work / "val", args.images, seed=1)
    spec = TrainSpec(train=str(val), val=str(val), pretrained=False, queue=args.queue)
    torch.manual_seed(0)
    weights = work / "weights.pt"
    checkpoint.save({k: v for k, v in build_model(spec).state_dict().items()}, weights)
    shutil.rmtree(work / "cache", ignore_errors=True)
    load = os.getloadavg()[0]
    rows = []
    for name, kwargs in (("seed path (decode, AlexNet, full logits)", {}),
                         ("fast path, cold (builds the val caches)", {"cache_dir": work / "cache"}),
                         ("fast path, warm (caches there)", {"cache_dir": work / "cache"})):
        t0 = time.perf_counter()
        report = evaluate(spec, work / name.split(",")[0].replace(" ", "_"), weights, **kwargs)
        rows.append((name, time.perf_counter() - t0, report))
    n = args.images
    seed_s = rows[0][1]
    device = torch.cuda.get_device_name() if args.queue == "gpu" and torch.cuda.is_available() else "cpu"
    print(f"{n} images on {device}, {torch.get_num_threads()} threads, load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'':44s} {'ms/image':>9s} {'vs seed':>8s}")
    for name, s, _ in rows:
        print(f"{name:44s} {1000 * s / n:9.1f} {seed_s / s:7.1f}x")
    same = all(r[2][k] == rows[0][2][k] for r in rows[1:] for k in ("mean_iou", "pixel_accuracy", "per_class"))
    print(f"reports equal: {same}  (mean IoU {rows[0][2]['mean_iou']:.4f})")


if __name__ == "__main__":
    main()
