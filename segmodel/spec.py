"""A job's training spec: every setting that decides the final weights, validated once."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainSpec(BaseModel):
    """Immutable once submitted. Defaults are the seed's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(
        None, pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$",
        description="a name to find the job by (unique among jobs; starts with a letter); does not change training",
    )
    train: str = Field(description="list file of training samples")
    val: str = Field(description="list file of validation samples")
    epochs: int = Field(20, ge=1, le=10_000)
    chunk_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="steps per chunk; default: one epoch per chunk"
    )
    seed: int = Field(0, ge=0, le=2**63 - 1)
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(1e-2, gt=0, le=10)
    optimizer: Literal["adam", "sgd"] = "adam"
    height: int = Field(240, ge=64, le=4096)
    width: int = Field(240, ge=64, le=4096)
    num_classes: int = Field(101, ge=2, le=256)
    freeze_backbone: bool = True
    pretrained: bool = Field(True, description="ImageNet AlexNet weights for the backbone")
    pretrained_path: str | None = Field(None, description="local file with AlexNet weights")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes")
    queue: Literal["cpu", "gpu"] = "cpu"
    engine: Literal["fast", "seed"] = Field(
        "fast",
        description="fast: cached data and features, fused loss (10x+); seed: the seed's arithmetic exactly. "
        "The two agree within float rounding, so a job keeps one engine for its whole life.",
    )


class ChunkPlan:
    """Maps a job to its steps and chunks. Chunk k covers global steps [start(k), end(k))."""

    def __init__(self, spec: TrainSpec, n_train: int) -> None:
        if n_train <= 0:
            raise ValueError("a job needs at least one training sample")
        self.steps_per_epoch = math.ceil(n_train / spec.batch_size)
        self.total_steps = spec.epochs * self.steps_per_epoch
        self.chunk_steps = spec.chunk_steps or self.steps_per_epoch
        self.n_chunks = math.ceil(self.total_steps / self.chunk_steps)

    def start(self, chunk: int) -> int:
        return min(chunk * self.chunk_steps, self.total_steps)

    def end(self, chunk: int) -> int:
        return min((chunk + 1) * self.chunk_steps, self.total_steps)

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch
