"""Bitwise-reproducible chunks on CUDA, and the record of whether a chunk had them.

On CPU the kernels Relay trains with are deterministic for a given thread count. On CUDA two of the
seed's are not: the backward of the bilinear upsample and nll_loss2d's forward sum accumulate with
atomicAdd in whatever order the threads arrive (`torch.use_deterministic_algorithms(True)` refuses
the latter), so the same job ran twice gives different weights. On CUDA the seed engine therefore
computes the same function with deterministic kernels (`seed_loss`): PyTorch's own upsample
forward; its backward as two matmuls with PyTorch's interpolation weights; the loss as log_softmax,
a gather (each gradient entry written once) and a tree-reduced sum over valid pixels over their
count. cuDNN is held to deterministic algorithms and cuBLAS to a fixed workspace; the fast engine
has no atomics to begin with (`segmodel.fastloss`). On CPU the seed's arithmetic runs unchanged.

`RELAY_CUDA_DETERMINISTIC=0` uses PyTorch's own CUDA kernels instead, and the chunk says so.
Not covered on CUDA: a trainable backbone (its pooling backward is not checked here); such chunks
record `deterministic: false`.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from segmodel.fastloss import interp_matrix


def cuda_deterministic() -> bool:
    return os.environ.get("RELAY_CUDA_DETERMINISTIC", "1") != "0"


def prepare(device: torch.device, freeze_backbone: bool) -> dict[str, Any]:
    """Set the process up for this chunk's device; returns what the chunk's record says about it."""
    if device.type != "cuda":
        return {"deterministic": True}
    if not cuda_deterministic():
        torch.backends.cudnn.deterministic = False
        return {"deterministic": False, "why_not": "RELAY_CUDA_DETERMINISTIC=0: PyTorch's atomic CUDA kernels"}
    # Read by cuBLAS when it first makes a handle: set before any CUDA work in this process.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if not freeze_backbone:
        return {"deterministic": False, "why_not": "trainable backbone on CUDA"}
    return {"deterministic": True}


def use_seed_kernels(device: torch.device) -> bool:
    """Whether the seed engine runs the seed's own kernels (CPU, or CUDA with determinism off)."""
    return device.type != "cuda" or not cuda_deterministic()


class _Upsample(torch.autograd.Function):
    """Bilinear align_corners upsample: PyTorch's forward, a deterministic backward.

    The upsample is A_h z A_w^T with PyTorch's interpolation weights, so its gradient is
    A_h^T g A_w: two matmuls instead of ATen's atomicAdd scatter."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, height: int, width: int) -> torch.Tensor:  # type: ignore[override]
        ctx.in_size = (z.shape[-2], z.shape[-1])
        return F.interpolate(z, size=(height, width), mode="bilinear", align_corners=True)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (h, w), (height, width) = ctx.in_size, g.shape[-2:]
        a_h = interp_matrix(height, h, g.dtype, g.device)
        a_w = interp_matrix(width, w, g.dtype, g.device)
        return torch.matmul(torch.matmul(a_h.t(), g), a_w), None, None


def seed_loss(model: Any, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The seed's `CrossEntropyLoss(ignore_index)(upsample(conv_to101(features(x))))` (mean over
    valid pixels) with deterministic CUDA kernels; equal to it within float rounding."""
    up = model.upsample
    if up.mode != "bilinear" or not up.align_corners:
        raise ValueError(f"expected the seed's bilinear align_corners upsample, got {up}")
    height, width = up.size
    logits = _Upsample.apply(model.conv_to101(model.features(images)), int(height), int(width))
    ignore = model.loss_fn.ignore_index
    t = targets.long()
    valid = t != ignore
    logp = torch.log_softmax(logits, dim=1)
    picked = logp.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    return -torch.where(valid, picked, 0.0).sum() / valid.sum()
