"""A job's training spec: every setting that decides the final weights, validated once."""
from __future__ import annotations

import bisect
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    chunk_minutes: float | None = Field(
        None, gt=0, le=10_080,
        description="a time budget per chunk instead of a step count: a worker trains from the job's step until "
        "this many minutes have passed (checked at step boundaries) or the job ends, then commits. Does not change training",
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
    val_every: int | None = Field(
        None, ge=1, le=10_000,
        description="score the validation set (mIoU, pixel accuracy) every this many epochs during training; "
        "default: only at the end. Does not change training",
    )
    keep_checkpoints: int = Field(
        3, ge=2, le=1_000_000,
        description="chunk checkpoints kept on storage, the newest (at least 2: a bad one rewinds to the one "
        "before); every weight<E>.pt is kept. Does not change training",
    )
    engine: Literal["fast", "seed"] = Field(
        "fast",
        description="fast: cached data and features, fused loss (10x+); seed: the seed's arithmetic exactly. "
        "The two agree within float rounding, so a job keeps one engine for its whole life. Within an engine "
        "any chunking gives torch.equal weights on one kind of device and thread count: on CPU, and on CUDA with "
        "deterministic kernels (each chunk records `deterministic`; RELAY_CUDA_DETERMINISTIC=0 turns them off).",
    )
    init_weights: str | None = Field(
        None, description="a state_dict to start from (the seed's format, or a Relay weight<E>.pt); "
        "copied into the job at submission, so the job does not depend on it afterwards",
    )
    init_weights_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="sha256 of init_weights; filled in at submission (when given, the file must match it)",
    )
    train_manifest_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the manifest of a pushed dataset's train list (s3:// train); filled in at submission, "
        "and workers fetch that dataset or refuse (when given, the manifest must match it)",
    )
    val_manifest_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="the same for the val list",
    )
    start_epoch: int = Field(
        0, ge=0, le=10_000,
        description="epochs init_weights has had: the job trains epochs start_epoch+1..epochs, each in the data "
        "order a job from scratch would give it, and writes weight<start_epoch+1>.pt first",
    )
    extended_at: tuple[int, ...] = Field(
        (), description="where `extend` continued the job: the epochs it had ended at (set by extend)",
        json_schema_extra={"readOnly": True},
    )

    @model_validator(mode="after")
    def _one_chunk_size(self) -> "TrainSpec":
        if self.chunk_steps is not None and self.chunk_minutes is not None:
            raise ValueError(f"chunk_steps ({self.chunk_steps}) and chunk_minutes ({self.chunk_minutes}) are two ways to "
                             f"size a chunk: give one")
        return self

    @model_validator(mode="after")
    def _epochs_in_order(self) -> "TrainSpec":
        if self.start_epoch and not self.init_weights:
            raise ValueError("start_epoch needs init_weights (the weights those epochs trained)")
        marks = (self.start_epoch, *self.extended_at, self.epochs)
        if any(a >= b for a, b in zip(marks, marks[1:])):
            raise ValueError(f"epochs {self.epochs} must be above start_epoch {self.start_epoch}"
                             + (f" and every extended_at {list(self.extended_at)}, in order" if self.extended_at else ""))
        return self


class ChunkPlan:
    """Maps a job to its steps and its planned chunks. Steps count from the job's start (step 0 is
    epoch `start_epoch`). The plan is a grid of `chunk_steps` (an epoch by default; with a time
    budget, the whole job), restarting where an `extend` continued the job. A chunk starts at the
    job's committed step and is planned to end at the next grid line (`planned_end`); a worker may
    end it sooner (a time budget, a signal, a pause), and the next chunk finishes the grid cell."""

    def __init__(self, spec: TrainSpec, n_train: int) -> None:
        if n_train <= 0:
            raise ValueError("a job needs at least one training sample")
        self.steps_per_epoch = math.ceil(n_train / spec.batch_size)
        self.first_epoch = spec.start_epoch
        self.total_steps = (spec.epochs - spec.start_epoch) * self.steps_per_epoch
        self.chunk_steps = spec.chunk_steps or (self.total_steps if spec.chunk_minutes else self.steps_per_epoch)
        self.restarts = [(e - spec.start_epoch) * self.steps_per_epoch for e in spec.extended_at]
        self._grid = _Grid(self.total_steps, self.chunk_steps, self.restarts)
        self.n_chunks = self._grid.n_chunks

    def start(self, chunk: int) -> int:
        """Where grid cell k begins (the chunk k of a job no worker ever stopped early)."""
        return self._grid.start(chunk)

    def end(self, chunk: int) -> int:
        return self._grid.start(chunk + 1)

    def planned_end(self, step: int) -> int:
        """Where a chunk that starts at `step` is planned to end: the next grid line."""
        return self._grid.start(self._grid.chunk_of(step) + 1)

    def chunks_left(self, step: int) -> int:
        """Planned chunks from `step` to the end."""
        return self.n_chunks - self._grid.chunk_of(step)

    def epoch_of(self, step: int) -> float:
        return self.first_epoch + step / self.steps_per_epoch

    def weight_epoch(self, step: int) -> int:
        """The epoch number a weight file written after `step` steps carries."""
        return self.first_epoch + step // self.steps_per_epoch


class _Grid:
    """Chunks of `chunk_steps` over [0, total), the grid starting afresh at each restart step."""

    def __init__(self, total: int, chunk_steps: int, restarts: list[int]) -> None:
        self.total, self.chunk_steps = total, chunk_steps
        self.bounds = [0, *restarts]
        self.first_chunks = [0]
        for a, b in zip(self.bounds, [*restarts, total]):
            self.first_chunks.append(self.first_chunks[-1] + math.ceil((b - a) / chunk_steps))
        self.n_chunks = self.first_chunks.pop()

    def start(self, chunk: int) -> int:
        if chunk >= self.n_chunks:
            return self.total
        i = bisect.bisect_right(self.first_chunks, chunk) - 1
        return self.bounds[i] + (chunk - self.first_chunks[i]) * self.chunk_steps

    def chunk_of(self, step: int) -> int:
        if step >= self.total:
            return self.n_chunks
        i = bisect.bisect_right(self.bounds, step) - 1
        return self.first_chunks[i] + (step - self.bounds[i]) // self.chunk_steps


def chunks_left(step: int, total: int, chunk_steps: int, restarts: list[int]) -> int:
    """Planned chunks from `step` to the end of a job's grid (for a job record without its spec)."""
    grid = _Grid(total, chunk_steps, restarts)
    return grid.n_chunks - grid.chunk_of(step)
