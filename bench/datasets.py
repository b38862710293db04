"""Data that follows the job, timed: push a synthetic dataset to an S3 server (moto on loopback), fetch
it into an empty cache and into a warm one, and time a worker's first chunk (fetch + training) from
an empty cache and from a warm one.

    python bench/datasets.py                      # 200 training and 40 validation images
    python bench/datasets.py --train 1000 --val 200

Needs moto (`python -m moto.server`) and boto3, as the tests do. Timings on a machine shared with
other work are noisy: the script prints the load average.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segmodel.lists import read_list# noqa: E402
from segmodel.datasets import fetch, open_remote_list, push, size_text  # noqa: E402
from segmodel.engine import train_range  # noqa: E402
from segmodel.spec import ChunkPlan, TrainSpec  # noqa: E402
from segmodel.synthetic import generate  # noqa: E402
from s3server import s3_env, start_moto  # noqa: E402


def first_chunk(spec: TrainSpec, cache: Path, job_dir: Path) -> tuple[float, float, int]:
    """A worker's first chunk: fetch what the cache lacks, then train the chunk on the local copies.
    (seconds in all, seconds fetching, files fetched)"""
    started = time.monotonic()
    update, fetched = {}, 0
    for field in ("train", "val"):
        got = fetch(getattr(spec, field), getattr(spec, f"{field}_manifest_sha256"), cache)
        update[field], fetched = str(got.list_file), fetched + got.files
    fetch_s = time.monotonic() - started
    local = spec.model_copy(update=update)
    train_range(local, job_dir, 0, ChunkPlan(local, len(read_list(local.train))).planned_end(0), cache_dir=cache)
    return time.monotonic() - started, fetch_s, fetched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--val", type=int, default=40)
    args = ap.parse_args()
    proc, endpoint = start_moto()
    try:
        os.environ.update(s3_env(endpoint, "bench"))
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            generate(tmp / "data", args.train, args.val)
            pushed = push(tmp / "data", "s3://bench/data")
            print(f"push: {pushed.files} files, {size_text(pushed.bytes)} in {pushed.seconds:.2f} s")
            digest = open_remote_list("s3://bench/data/train.txt").manifest_sha256
            for label, cache in (("cold", tmp / "fetch"), ("warm", tmp / "fetch")):
                t0, n, b = time.monotonic(), 0, 0
                for lst in ("train", "val"):
                    got = fetch(f"s3://bench/data/{lst}.txt", digest, cache)
                    n, b = n + got.files, b + got.bytes
                print(f"fetch ({label} cache): {n} files, {size_text(b)} in {time.monotonic() - t0:.2f} s")
            spec = TrainSpec(train="s3://bench/data/train.txt", val="s3://bench/data/val.txt", pretrained=False,
                             epochs=1, train_manifest_sha256=digest, val_manifest_sha256=digest)
            for label, job in (("empty", "job1"), ("warm", "job2")):
                total, fetch_s, n = first_chunk(spec, tmp / "worker", tmp / job)
                print(f"first chunk ({label} cache): {total:.2f} s, of which {fetch_s:.2f} s fetching {n} files"
                      + (" (the prepared-data and feature caches are built too)" if label == "empty" else ""))
            print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
