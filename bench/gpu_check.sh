#!/usr/bin/env bash
# On a CUDA machine: is each engine exact there? bench/gpu_check.py trains the same small job twice
# per engine (in one go, and in chunks that cross epoch boundaries) on CUDA and compares the two
# with torch.equal: one RESULT line per engine, with the device; exit status 1 if one differs.
# It needs only the torch stack (torch, torchvision, pytorch-lightning, numpy, pillow), runs in
# 39 s on an H200 (measured), and writes under OUT_DIR.
#
# RELAY_CHECK_DEVICE=cpu runs the same check on the CPU (RELAY_CHECK_SIZE=64 makes it quick there).
# RELAY_CHECK_FULL=1 then also runs the old speed checks where the whole Relay stack is installed
# (celery, fastapi, pydantic-settings...): the job through the embedded relay on the gpu and cpu
# queues, bench/epoch.py on CUDA and the fast engine's CUDA tests (several minutes more).
#
# Usage: bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${1:-/tmp/relay-gpu-check}
device=${RELAY_CHECK_DEVICE:-cuda}
size=${RELAY_CHECK_SIZE:-240}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$py" bench/gpu_check.py --device "$device" --size "$size" --out "$out/exact"
status=$?

if [ "${RELAY_CHECK_FULL:-0}" != 1 ]; then
  exit "$status"
fi
if ! "$py" -c 'import celery, fastapi, pydantic_settings, click, rich, httpx' 2>/dev/null; then
  echo "skipped the relay and epoch speed checks: they need Relay's whole stack (celery, fastapi, pydantic-settings, ...)"
  exit "$status"
fi
"$py" -m scheduler.cli data synthetic "$out/data" --train 64 --val 8 --seed 1
"$py" bench/evaluate.py --images 64 --queue gpu --out "$out/eval-bench"
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
exit "$status"
