"""Chunk training, the worker's core: load the full state at a step, train a range of steps, save.

Written as a plain loop over the LightningModule rather than a Lightning Trainer: exact resumption
mid-epoch needs the data position and RNG state in the checkpoint, which Lightning's own
checkpoints do not reliably restore (Lightning #17543, #18098, #20550).
"""
from __future__ import annotations

import contextlib
import platform
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch.utils.data import DataLoader

from segmodel import checkpoint, determinism
from segmodel.data import SegmentationDataset, epoch_order
from segmodel.lists import read_list
from segmodel.errors import CheckpointError, TrainingError
from segmodel.layout import JobLayout
from segmodel.net import SegNet, build_model, model_from_state
from segmodel.spec import ChunkPlan, TrainSpec

CHECKPOINT_FORMAT = 1


# `stop()` between steps: None to go on, or why the chunk ends at the step just done.
StopCheck = Callable[[], "str | None"]


@dataclass
class ChunkResult:
    start_step: int
    end_step: int
    epoch: float
    loss_last: float
    loss_mean: float
    seconds: float
    images_per_s: float
    checkpoint_sha256: str
    environment: dict[str, Any]
    stopped: str | None = None  # why it ended before the planned end, if it did

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def environment(device: torch.device) -> dict[str, Any]:
    """Where a chunk ran: bitwise equality holds only across equal values of these."""
    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def pick_device(spec: TrainSpec) -> torch.device:
    return torch.device("cuda") if spec.queue == "gpu" and torch.cuda.is_available() else torch.device("cpu")


def _fresh_state(spec: TrainSpec, layout: JobLayout, device: torch.device) -> tuple[SegNet, torch.optim.Optimizer]:
    """Step 0: the seeded model, or the job's copy of its init weights, with a fresh optimizer (as
    the student's manual relay had). The RNG is seeded and drawn from the same either way."""
    torch.manual_seed(spec.seed)
    if spec.init_weights is None:
        model = build_model(spec)
    else:
        model = build_model(spec.model_copy(update={"pretrained": False, "pretrained_path": None}))
        try:
            model.load_state_dict(checkpoint.load(layout.init_weights))
        except CheckpointError as exc:  # retrying or rolling back cannot bring it back
            raise TrainingError(f"the job's copy of its init weights is unusable: {exc}") from exc
    model.to(device)
    return model, model.configure_optimizers()


def _restore(spec: TrainSpec, path: Path, device: torch.device, step: int) -> tuple[SegNet, torch.optim.Optimizer]:
    state = checkpoint.load(path)
    if state.get("step") != step or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: holds step {state.get('step')} (format {state.get('format')}), expected step {step}")
    # The backbone's weights come from the checkpoint: never download them again to resume.
    model = model_from_state(spec, _with_backbone(path, state)).to(device)
    optimizer = model.configure_optimizers()
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return model, optimizer


def _with_backbone(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The full model state: a slim checkpoint names the job's backbone file by its checksum."""
    if "backbone_sha256" not in state:
        return state["model"]
    backbone = path.parent / "backbone.pt"
    if checkpoint.verified_digest(backbone) != state["backbone_sha256"]:
        raise CheckpointError(f"{backbone}: not the backbone {path.name} was trained with")
    return {**checkpoint.load(backbone), **state["model"]}


def model_state(path: Path) -> dict[str, Any]:
    """The full model state_dict a chunk checkpoint stands for (a slim one completed from the
    job's backbone file)."""
    return _with_backbone(path, checkpoint.load(path))


def _slim(layout: JobLayout, model: SegNet) -> dict[str, Any]:
    """What a chunk checkpoint must hold of the model: the trainable parameters and buffers. The
    frozen ones never change, so they go to the job's backbone file once (~10 MB of AlexNet)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    full = _cpu_state(model.state_dict())
    if not frozen:
        return {"model": full}
    if not checkpoint.is_valid(layout.backbone):
        checkpoint.save({n: full[n] for n in sorted(frozen)}, layout.backbone)
    return {"model": {n: t for n, t in full.items() if n not in frozen},
            "backbone_sha256": checkpoint.verified_digest(layout.backbone)}


def _cpu_state(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in sd.items()}


def _optimizer_cpu_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    sd = optimizer.state_dict()
    return {"state": {k: _cpu_state(v) for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}


def _batches(plan: ChunkPlan, n: int, seed: int, batch_size: int, start: int, end: int) -> list[list[int]]:
    """The sample indices of the job's steps [start, end): they depend only on (seed, epoch, step).
    The epoch is counted from the job's start_epoch, so a job continuing a relay at epoch 21 draws
    epoch 22's order as a job from scratch would."""
    batches: list[list[int]] = []
    orders: dict[int, list[int]] = {}
    for g in range(start, end):
        epoch, s = divmod(g, plan.steps_per_epoch)
        epoch += plan.first_epoch
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch).tolist()
        batches.append(orders[epoch][s * batch_size : (s + 1) * batch_size])
    return batches


def _begin(
    spec: TrainSpec, job_dir: Path | str, start: int, end: int, device: torch.device, n_samples: int,
) -> tuple[JobLayout, ChunkPlan, SegNet, torch.optim.Optimizer]:
    """Validate the step range and bring up the model and optimizer as they were at `start`."""
    layout = JobLayout(Path(job_dir))
    plan = ChunkPlan(spec, n_samples)
    if not 0 <= start < end <= plan.total_steps:
        raise ValueError(f"step range [{start}, {end}) outside the job's 0..{plan.total_steps}")
    if start == 0:
        model, optimizer = _fresh_state(spec, layout, device)
    else:
        model, optimizer = _restore(spec, layout.checkpoint(start), device, start)
    model.train()
    return layout, plan, model, optimizer


def _run_steps(
    layout: JobLayout,
    plan: ChunkPlan,
    model: SegNet,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    start: int,
    end: int,
    batches: Iterable[Any],
    step_loss: Callable[[Any], tuple[torch.Tensor, int]],
    on_step: Callable[[dict[str, Any]], None] | None,
    env_extra: dict[str, Any] | None = None,
    optimizer_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    keep_checkpoints: int | None = None,
    stop: StopCheck | None = None,
) -> ChunkResult:
    """The step loop shared by every way of computing a batch's loss: `step_loss(batch)` returns
    (loss, images in the batch). Saves weight<E>.pt at each epoch end and the full state at `end`,
    or at the step after which `stop()` first answered a reason (at least one step is trained).
    The optimizer steps inside `optimizer_context()` (the fast engine: on one thread)."""
    t0 = time.perf_counter()
    losses: list[float] = []
    images = 0
    stopped: str | None = None
    for g, batch in enumerate(batches, start=start):
        t_step = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, n = step_loss(batch)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss {loss.item()} at step {g} (epoch {plan.weight_epoch(g) + 1})")
        loss.backward()
        with optimizer_context():
            optimizer.step()
        value = loss.item()
        losses.append(value)
        images += n
        done = g + 1
        if done % plan.steps_per_epoch == 0:
            checkpoint.save(_cpu_state(model.state_dict()), layout.weight(plan.weight_epoch(done)))
        if on_step is not None:
            dt = time.perf_counter() - t_step
            on_step({"step": done, "epoch": plan.epoch_of(done), "loss": value, "lr": optimizer.param_groups[0]["lr"],
                     "step_s": dt, "images_per_s": n / dt if dt > 0 else 0.0})
        if done < end and stop is not None and (stopped := stop()) is not None:
            end = done  # the same state a chunk planned to end here saves: the job's bits do not change
            break
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": end,
        **_slim(layout, model),
        "optimizer": _optimizer_cpu_state(optimizer),
        "rng_cpu": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    digest = checkpoint.save(state, layout.checkpoint(end))
    if keep_checkpoints is not None:
        layout.prune_checkpoints(keep_checkpoints)  # the start checkpoint stays: keep >= 2
    seconds = time.perf_counter() - t0
    return ChunkResult(
        start_step=start, end_step=end, epoch=plan.epoch_of(end),
        loss_last=losses[-1], loss_mean=sum(losses) / len(losses),
        seconds=seconds, images_per_s=images / seconds if seconds > 0 else 0.0,
        checkpoint_sha256=digest, environment={**environment(device), **(env_extra or {})}, stopped=stopped,
    )


def train_steps(
    spec: TrainSpec,
    job_dir: Path | str,
    start: int,
    end: int,
    *,
    device: torch.device | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    stop: StopCheck | None = None,
) -> ChunkResult:
    """Train global steps [start, end) from the full-state checkpoint at `start` (or the seed at 0).

    Writes weight<E>.pt for every epoch E completed in the range and the full-state checkpoint at
    `end`, both atomically. Same spec and start state, same bits out, whichever process runs it
    (on CUDA: with the deterministic kernels of `segmodel.determinism`).
    """
    device = device or pick_device(spec)
    env = {"engine": "seed", **determinism.prepare(device, spec.freeze_backbone)}
    dataset = SegmentationDataset(spec.train, spec.height, spec.width, spec.num_classes)
    layout, plan, model, optimizer = _begin(spec, job_dir, start, end, device, len(dataset))
    # On CUDA the seed's upsample backward and loss are atomic, not reproducible: see determinism.
    seed_kernels = determinism.use_seed_kernels(device)
    loader = DataLoader(
        dataset,
        batch_sampler=_batches(plan, len(dataset), spec.seed, spec.batch_size, start, end),
        num_workers=spec.num_workers,
        pin_memory=device.type == "cuda",
        # Its own generator: a DataLoader otherwise draws a seed from the global RNG, which would
        # make the saved RNG state depend on how the job was chunked.
        generator=torch.Generator().manual_seed(spec.seed),
    )

    def step_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        x, y = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = model.compute_loss(x, y) if seed_kernels else determinism.seed_loss(model, x, y)
        return loss, x.shape[0]

    return _run_steps(layout, plan, model, optimizer, device, start, end, loader, step_loss, on_step, env,
                      keep_checkpoints=spec.keep_checkpoints, stop=stop)


def chunk_range(spec: TrainSpec, chunk: int) -> tuple[int, int]:
    """The global steps [start, end) of chunk k."""
    plan = ChunkPlan(spec, len(read_list(spec.train)))
    if not 0 <= chunk < plan.n_chunks:
        raise ValueError(f"chunk {chunk} outside the job's 0..{plan.n_chunks - 1}")
    return plan.start(chunk), plan.end(chunk)


def train_chunk(spec: TrainSpec, job_dir: Path | str, chunk: int, **kwargs: Any) -> ChunkResult:
    """Train chunk k: from the checkpoint that chunk k-1 wrote to the one chunk k+1 starts from."""
    return train_steps(spec, job_dir, *chunk_range(spec, chunk), **kwargs)
