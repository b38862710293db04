"""Which engine trains a job, by its spec: the fast one (caches, fused loss) or the seed's exact
arithmetic. Both write the same checkpoints and weight files; each is exact across chunkings."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from segmodel import fasttrain, train
from segmodel.spec import TrainSpec


def train_range(spec: TrainSpec, job_dir: Path | str, start: int, end: int, *, cache_dir: Path | str, **kwargs: Any) -> train.ChunkResult:
    """Train global steps [start, end) of the job with its engine; caches live under cache_dir."""
    if spec.engine == "fast":
        return fasttrain.train_steps_fast(spec, job_dir, start, end, storage_cache=cache_dir, **kwargs)
    return train.train_steps(spec, job_dir, start, end, **kwargs)


def train_chunk(spec: TrainSpec, job_dir: Path | str, chunk: int, *, cache_dir: Path | str, **kwargs: Any) -> train.ChunkResult:
    """Chunk k of the job with its engine."""
    return train_range(spec, job_dir, *train.chunk_range(spec, chunk), cache_dir=cache_dir, **kwargs)
