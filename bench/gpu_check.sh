#!/usr/bin/env bash
# On a CUDA machine: the same small job through the embedded relay on the gpu queue (CUDA) and on
# the cpu queue, chunk speeds side by side; then bench/epoch.py on CUDA (the seed's loop and the
# fast engine) and the fast engine's CUDA tests.  Usage: bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${1:-/tmp/relay-gpu-check}
mkdir -p "$out"
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
"$py" -m scheduler.cli data synthetic "$out/data" --train 64 --val 8 --seed 1
for queue in gpu cpu; do
  RELAY_STORAGE="$out/storage-$queue" "$py" -m scheduler.cli run --train "$out/data/train.txt" --val "$out/data/val.txt" \
    --epochs 3 --chunk-steps 2 --no-pretrained --queue "$queue" | tail -3
done
"$py" - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
for queue in ("gpu", "cpu"):
    state = json.loads(next((Path(sys.argv[1]) / f"storage-{queue}" / "jobs").glob("*/state.json")).read_text())
    chunks = [h for h in state["history"] if h["seconds"] > 0]
    env = chunks[0]["environment"]
    print(f"{queue} queue: {len(chunks)} chunks on {env['device']} {env.get('gpu', '')} ({env['threads']} threads): "
          f"median {statistics.median(h['images_per_s'] for h in chunks):.1f} images/s, "
          f"median chunk {statistics.median(h['seconds'] for h in chunks):.3f} s, state {state['status']}")
PY
"$py" bench/epoch.py --device cuda --images 160 --steps 12 --fast-steps 60 --no-seed-in-worker-env --out "$out/epoch"
"$py" -m pytest -q -p no:cacheprovider tests/test_fast.py -k "cuda or batched" 2>&1 | tail -3
