"""Which engine trains a job, by its spec: the fast one (caches, fused loss) or the seed's exact
arithmetic. Both write the same checkpoints and weight files; each is exact across chunkings."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from segmodel import fasttrain, train
from segmodel.cache import Progress
from segmodel.lists import read_list
from segmodel.layout import JobLayout
from segmodel.spec import ChunkPlan, TrainSpec


def train_range(spec: TrainSpec, job_dir: Path | str, start: int, end: int, *, cache_dir: Path | str,
                on_progress: Progress | None = None, **kwargs: Any) -> train.ChunkResult:
    """Train global steps [start, end) of the job with its engine; caches live under cache_dir
    (their builds report to `on_progress`). With spec.val_every, each validated epoch ended in the
    range adds a point to the job's validation curve."""
    if spec.engine == "fast":
        result = fasttrain.train_steps_fast(spec, job_dir, start, end, storage_cache=cache_dir, on_progress=on_progress, **kwargs)
    else:
        result = train.train_steps(spec, job_dir, start, end, **kwargs)
    if spec.val_every:
        _validate_epochs(spec, JobLayout(Path(job_dir)), start, result.end_step, cache_dir, on_progress)
    return result


def _validate_epochs(spec: TrainSpec, layout: JobLayout, start: int, end: int, cache_dir: Path | str,
                     on_progress: Progress | None) -> None:
    from segmodel.jobs import append_jsonl  # the one way to append to a job's logs
    from segmodel.evaluate import validate

    plan = ChunkPlan(spec, len(read_list(spec.train)))
    for step in range(start + 1, end + 1):
        epoch = plan.weight_epoch(step)
        if step % plan.steps_per_epoch == 0 and epoch % spec.val_every == 0:
            scores = validate(spec, layout.weight(epoch), cache_dir=cache_dir, on_progress=on_progress)
            append_jsonl(layout.validation_file, {"epoch": epoch, "step": step, **scores, "at": time.time()})


def train_chunk(spec: TrainSpec, job_dir: Path | str, chunk: int, *, cache_dir: Path | str, **kwargs: Any) -> train.ChunkResult:
    """Chunk k of the job with its engine."""
    return train_range(spec, job_dir, *train.chunk_range(spec, chunk), cache_dir=cache_dir, **kwargs)
