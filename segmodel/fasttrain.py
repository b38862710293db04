"""Fast chunk training: the contract of `train.train_steps`, over 10x the seed loop's throughput.

What makes it fast (each keeps the objective within float rounding of the seed's):
* the data is decoded and resized once per dataset, into a memory-mapped cache (`segmodel.cache`);
* with a frozen backbone, its features are computed once per (data, backbone weights, device type;
  `segmodel.features`)
  and the head trains from them;
* the bilinear upsample to 240x240 + cross-entropy, 75% of the seed's step, is computed by
  `segmodel.fastloss` in cache-sized row blocks with its gradient in the same pass.
bench/epoch.py measures it against the seed's Lightning loop (bench/README.md).

Same checkpoints, weight<E>.pt files, ChunkResult, data order and RNG state as `train_steps`. The
loss and the gradients agree with the seed path's within float rounding, not bit for bit
(tests/test_fast.py: 1e-5 relative; with the frozen backbone the weights and Adam's state after
ten steps agree within 1e-5 of their largest entry too; with a trainable backbone Adam turns the
rounding of near-zero gradient entries into lr-sized update differences). A job must therefore
keep one engine for its whole life: a field of its spec. Within the fast engine the relay stays
exact: any chunking, in any process, gives bitwise equal weights (tested), since the caches are
read, never recomputed per chunk, and every operation is deterministic.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from segmodel import cache as caches
from segmodel import features
from segmodel import determinism
from segmodel.lists import read_list
from segmodel.fastloss import head_cross_entropy, single_threaded, upsample_cross_entropy
from segmodel.spec import TrainSpec
from segmodel.train import ChunkResult, StopCheck, _batches, _begin, _run_steps, pick_device


def train_steps_fast(
    spec: TrainSpec,
    job_dir: Path | str,
    start: int,
    end: int,
    *,
    storage_cache: Path | str,
    device: torch.device | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_progress: caches.Progress | None = None,
    stop: StopCheck | None = None,
) -> ChunkResult:
    """Train global steps [start, end) like `train.train_steps`, from caches under `storage_cache`.

    `storage_cache` is a local or shared folder (e.g. `<storage>/cache`); the first chunk of a
    dataset builds the caches there (`on_progress(stage, done, total)` reports it), later chunks
    and jobs reuse them.
    """
    device = device or pick_device(spec)
    deterministic = determinism.prepare(device, spec.freeze_backbone)
    samples = read_list(spec.train)
    layout, plan, model, optimizer = _begin(spec, job_dir, start, end, device, len(samples))
    data = caches.data_cache(samples, spec.height, spec.width, spec.num_classes, storage_cache, progress=on_progress)
    size = (spec.height, spec.width)
    env: dict[str, Any] = {"engine": "fast", **deterministic, "data_cache": data.key}
    feats: features.FeatureCache | None = None
    if features_cacheable(spec, model.features):
        feats = features.feature_cache(data, model.features, storage_cache, device, progress=on_progress)
        env["feature_cache"] = feats.key
    env["arithmetic"] = arithmetic(device, thread_invariant=feats is not None and device.type == "cpu")
    env["cache_build_s"] = round(data.built_s + (feats.built_s if feats is not None else 0.0), 3)
    batches = _batches(plan, len(samples), spec.seed, spec.batch_size, start, end)

    def step_loss(indices: list[int]) -> tuple[torch.Tensor, int]:
        if feats is not None and device.type == "cpu":  # head and loss per image: thread-count invariant
            return head_cross_entropy(feats.batch(indices), model.conv_to101, data.label_batch(indices), size), len(indices)
        if feats is not None:
            z = model.conv_to101(feats.batch(indices).to(device, non_blocking=True))
            y = data.label_batch(indices)
        else:
            x, y = data.batch(indices)
            z = model.conv_to101(model.features(x.to(device, non_blocking=True)))
        return upsample_cross_entropy(z, y.to(device, non_blocking=True), size), len(indices)

    # Adam's elementwise update is split across threads in pieces whose vectorized and scalar
    # parts depend on the thread count; on one thread it is one piece everywhere.
    return _run_steps(layout, plan, model, optimizer, device, start, end, batches, step_loss, on_step, env,
                      optimizer_context=single_threaded if device.type == "cpu" else contextlib.nullcontext,
                      keep_checkpoints=spec.keep_checkpoints, stop=stop)


def arithmetic(device: torch.device, *, thread_invariant: bool) -> dict[str, Any]:
    """What decides a chunk's bits besides its inputs: recorded with every chunk. With
    `thread_invariant`, the work is split per image and summed in image order, so the thread
    count is not among them; the CPU's kernel family and the libraries' caps are."""
    return {
        "partition": "image" if thread_invariant else "library",
        "thread_invariant": thread_invariant,
        "cpu_capability": torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None,
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def features_cacheable(spec: TrainSpec, backbone: torch.nn.Module) -> bool:
    """Frozen, deterministic backbone and no random augmentation (the seed has none; an
    augmentation setting, if one is ever added, must turn this off)."""
    return spec.freeze_backbone and features.cacheable_backbone(backbone)
