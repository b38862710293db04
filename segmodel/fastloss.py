"""The head's loss without the full-resolution logits: bilinear upsample + cross-entropy, fused.

The seed computes `CrossEntropyLoss(ignore_index=0)(Upsample((H, W), bilinear, align_corners=True)(z))`
for features-level logits z (N, C, h, w) = (16, 101, 6, 6): a 16x101x240x240 tensor (372 MB) is
written, read back by the loss, and its gradient written and read again. That is ~75% of a step.

Here the same value and its gradient come from one pass over row blocks that stay in cache:

* An align_corners bilinear upsample is separable and linear, with PyTorch's own weights (built
  with its float arithmetic, `_interp_weights`): along the width a tiny GEMM with A_w (W, w) turns
  an image's grid rows into full-width rows Y; along the height, output row i lies in the grid cell
  k = i0(i) and is Y[k] + l1(i) * (Y[k+1] - Y[k]), one broadcast multiply-add per block.
* Per image and per block of rows of one cell: the logits U of those rows, the target logit
  gathered, exp in place, the per-pixel sum over classes, then in the same buffer the gradient of
  the mean loss w.r.t. U, (softmax - onehot) * valid / n, contracted back onto the grid rows k and
  k+1 (sums over the block's rows weighted by l0 and l1). The loss being a scalar, its gradient is
  known in the forward pass; `backward` only scales it. A last tiny GEMM with A_w finishes it.
* Logits are carried in base 2 (times log2 e): torch.exp2 is ~3x faster than torch.exp on CPU and
  stays fast where results are subnormal. The sum of exps is the same quantity.
* Overflow: exp is taken of U - max(z[i]) (the image's largest logit bounds every interpolated
  logit, bilinear weights being convex), so exp <= 1. If some pixel's classes all sit so far below
  that bound that their exps underflow (sum < 1e-30), the image is redone with each pixel's own
  max subtracted, as PyTorch does. Either way log-sum-exp is exact to float rounding.
* CPU: a void pixel (target == ignore_index) adds exactly nothing to the loss or its gradient, so
  each row block computes only the columns that hold a counted pixel (`_image`); its gradient goes
  straight onto the grid through those columns' rows of A_w. ADE20K's "thing" classes leave much
  of an image void: the benchmark's data keeps ~51% of the block columns (the step 1.3-1.45x
  faster), the real sample in tests/data ~9%.
* CPU: images run in parallel on a small thread pool, as many threads as torch's intra-op count,
  each running torch single-threaded (`_one_torch_thread`): two thousand small ops per step,
  each an OpenMP fork/join, collapse when the machine is oversubscribed (a descheduled team
  member stalls every barrier: 0.2 s/step became 2-5 s on a shared 2-core machine); whole images
  per thread have no barriers. Each image's arithmetic is then the same whatever the thread count,
  and per-image results are summed in image order: the bits do not depend on the thread count
  (tested on 1, 2 and 3 threads). The per-image function is compiled with TorchScript where
  available (`_compiled`): it then runs without the GIL, so the threads do not hand it back and
  forth at every op.
* CUDA: all images of a batch at once, whole cells per block (memory permitting).

Value and gradient match the reference within float rounding (tests/test_fast.py checks 1e-5
relative; observed ~1e-7 on the loss and ~2e-6 of the largest entry on the gradient, closer to a
float64 reference than PyTorch's own float32 path). Not bitwise: the order of the operations
differs. Deterministic for the same inputs and device, on any thread count (no atomics:
gather/scatter touch each pixel's one class once), so training with it is exact across chunkings
and across workers with different core counts.

An all-void batch (no pixel != ignore_index) gives what PyTorch gives: a nan loss (0/0 mean) and a
zero gradient.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from typing import Any, List, Optional, Tuple

import torch

# _group's constants: log2(e), ln(2), and `tiny`: a per-pixel sum of exps below 1e-30 redoes the
# image with the exact per-pixel max.
_CPU_BLOCK_BYTES = 2 << 20  # one row block's logits, per thread: ~a core's L2 (best of 0.7-3 MB, measured)
_CUDA_BLOCK_BYTES = 1 << 30


def _interp_weights(out_size: int, in_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(i0, l1) of align_corners=True linear interpolation: out[i] = (1 - l1) x[i0] + l1 x[i1].

    ATen's arithmetic (UpSample.h: area_pixel_compute_scale, guard_index_and_lambda) in the
    tensor's opmath type (float for float32, double for float64): scale = (in-1)/(out-1),
    src = scale * i, i0 = min(floor(src), in-1), l1 = clamp(src - i0, 0, 1), i1 = i0 + (i0 < in-1).
    """
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    if out_size > 1:
        scale = torch.tensor(float(in_size - 1), dtype=opmath) / torch.tensor(float(out_size - 1), dtype=opmath)
    else:
        scale = torch.zeros((), dtype=opmath)
    src = scale * torch.arange(out_size, dtype=opmath)
    i0 = torch.clamp(torch.floor(src).long(), max=in_size - 1)
    l1 = torch.clamp(src - i0.to(opmath), 0.0, 1.0)
    return i0, l1


def _interp_matrix(out_size: int, in_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(out_size, in_size) matrix M with up(x) = M @ x, holding PyTorch's weights."""
    i0, l1 = _interp_weights(out_size, in_size, dtype)
    l0 = torch.ones((), dtype=l1.dtype) - l1
    i1 = i0 + (i0 < in_size - 1).long()
    m = torch.zeros(out_size, in_size, dtype=l1.dtype)
    rows = torch.arange(out_size)
    m.index_put_((rows, i0), l0, accumulate=True)
    m.index_put_((rows, i1), l1, accumulate=True)
    return m.to(dtype=dtype, device=device)


_CACHE: dict[tuple[Any, ...], Any] = {}


def interp_matrix(out_size: int, in_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = ("matrix", out_size, in_size, dtype, str(device))
    if key not in _CACHE:
        _CACHE[key] = _interp_matrix(out_size, in_size, dtype, device)
    return _CACHE[key]


Block = tuple[int, int, int, torch.Tensor, torch.Tensor]


def _row_blocks(height: int, h: int, rows: int, dtype: torch.dtype, device: torch.device) -> list[Block]:
    """Blocks (k, r0, r1, l1, weights) of at most `rows` output rows, all in grid cell k, cells split
    evenly. l1 (r, 1) and weights (2, r) = [l0; l1]: PyTorch's weights of those rows on grid rows k, k+1."""
    key = ("blocks", height, h, rows, dtype, str(device))
    if key not in _CACHE:
        i0, l1 = _interp_weights(height, h, dtype)
        l0 = torch.ones((), dtype=l1.dtype) - l1
        weights = torch.stack([l0, l1]).to(dtype=dtype, device=device)
        blocks = []
        for k in range(h):
            cell = (i0 == k).nonzero().flatten()
            if not len(cell):
                continue
            first, count = int(cell[0]), len(cell)
            parts = -(-count // rows)
            bounds = [first + count * j // parts for j in range(parts + 1)]
            blocks += [(k, a, b, weights[1, a:b].reshape(-1, 1), weights[:, a:b].contiguous())
                       for a, b in zip(bounds, bounds[1:])]
        _CACHE[key] = blocks
    return _CACHE[key]


def _rows_per_block(z: torch.Tensor, group: int, height: int, width: int) -> int:
    per_row = group * z.shape[1] * width * z.element_size()
    budget = _CUDA_BLOCK_BYTES if z.device.type == "cuda" else _CPU_BLOCK_BYTES
    return max(1, min(height, budget // per_row))


def _group_size(z: torch.Tensor, height: int, width: int) -> int:
    """Images per pass: one on CPU (its row blocks fit in cache); on CUDA as many as fit the budget."""
    if z.device.type != "cuda":
        return 1
    per_image = z.shape[1] * height * width * z.element_size()
    return max(1, min(z.shape[0], _CUDA_BLOCK_BYTES // per_image))


def _group(
    z: torch.Tensor, target: torch.Tensor, ignore_index: int, inv_n: float, a_w: torch.Tensor,
    blocks: List[Tuple[int, int, int, torch.Tensor, torch.Tensor]], rows: int, want_grad: bool, exact_max: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], bool]:
    """One pass over a group of G images (CUDA's; the CPU runs `_image`): (their share of the mean
    loss, the sum of their valid pixels' nll * inv_n, as float64; its gradient d/dz (G, C, h, w) or
    None; whether some pixel's sum of exps underflowed). TorchScript-compatible (see _compiled)."""
    log2e, ln2, tiny = 1.4426950408889634, 0.6931471805599453, 1e-30  # (TorchScript takes no float globals)
    g, c, h = z.size(0), z.size(1), z.size(2)
    height, width = target.size(1), target.size(2)
    cw = c * width
    # Y (G, h, C*W): the grid rows upsampled along the width, in base-2 units, shifted by the
    # image's max except in the exact pass (which subtracts each pixel's own max instead: shifting
    # too would only add rounding, logits of +-200 becoming -400); D = Y[k+1] - Y[k], 0 for the last.
    if exact_max:
        zs = z * log2e
    else:
        zs = (z - z.amax(dim=[1, 2, 3], keepdim=True)).mul_(log2e)
    y = torch.matmul(zs, a_w.t()).permute(0, 2, 1, 3).reshape(g, h, cw)
    d = torch.zeros_like(y)
    torch.sub(y[:, 1:], y[:, :-1], out=d[:, :-1])
    valid = (target != ignore_index).unsqueeze(2)  # (G, H, 1, W)
    # class ids to gather; void pixels gather some class (the ignore index itself when it is one), with weight 0
    if 0 <= ignore_index < c:
        tg = target.unsqueeze(2).long()
    else:
        tg = torch.where(valid, target.unsqueeze(2), 0).long()
    vg = valid.to(z.dtype).mul_(inv_n)
    nvg = vg.neg()
    acc = torch.zeros([g, h, cw], dtype=z.dtype, device=z.device)  # dL/dY
    work = torch.empty([g * rows * cw], dtype=z.dtype, device=z.device)
    inv_s = torch.empty([g, rows, 1, width], dtype=z.dtype, device=z.device)
    s_all = torch.empty([g, height, 1, width], dtype=z.dtype, device=z.device)
    ut_all = torch.empty_like(s_all)
    for k, r0, r1, l1, lw in blocks:
        r = r1 - r0
        u = work[: g * r * cw].view(g, r, cw)
        torch.addcmul(y[:, k : k + 1], l1, d[:, k : k + 1], out=u)  # rows of cell k: Y[k] + l1 (Y[k+1] - Y[k])
        u4 = u.view(g, r, c, width)
        tb = tg[:, r0:r1]
        if exact_max:
            u4.sub_(u4.amax(dim=[2], keepdim=True))
        torch.gather(u4, 2, tb, out=ut_all[:, r0:r1])
        torch.exp2(u, out=u)
        s = s_all[:, r0:r1]
        torch.sum(u4, dim=[2], keepdim=True, out=s)
        if want_grad:
            u4.mul_(torch.div(vg[:, r0:r1], s, out=inv_s[:, :r]))  # softmax * valid / n
            u4.scatter_add_(2, tb, nvg[:, r0:r1])  # - onehot * valid / n
            if k + 1 == h:  # the last grid row: i1 = i0, both weights land on it
                acc[:, k].add_(u.sum(dim=1))
            elif g == 1:  # sum_i l0[i] G[i] onto grid row k, sum_i l1[i] G[i] onto row k + 1
                acc[0, k : k + 2].addmm_(lw, u[0])
            else:
                acc[:, k : k + 2].add_(torch.matmul(lw, u))
    underflow = bool((s_all < tiny).any())  # if not, every log below is finite
    share = s_all.log_().sub_(ut_all, alpha=ln2).mul_(vg).sum(dtype=torch.float64)  # sum of nll * valid / n
    grad: Optional[torch.Tensor] = None
    if want_grad:
        # d/dz[g, c, k, l] = sum_j dL/dY[g, k, c, j] * A_w[j, l]
        grad = torch.matmul(acc.view(g, h, c, width), a_w).permute(0, 2, 1, 3)
    return share, grad, underflow


def _image(
    z: torch.Tensor, target: torch.Tensor, ignore_index: int, inv_n: float, a_w: torch.Tensor,
    blocks: List[Tuple[int, int, int, torch.Tensor, torch.Tensor]], rows: int, want_grad: bool, exact_max: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], bool]:
    """_group for one image (1, C, h, w) on the CPU, computing only the columns of each row block
    that hold a counted pixel (see the module's docstring). TorchScript-compatible."""
    log2e, ln2, tiny = 1.4426950408889634, 0.6931471805599453, 1e-30  # (TorchScript takes no float globals)
    c, h, w = z.size(1), z.size(2), z.size(3)
    height, width = target.size(1), target.size(2)
    if exact_max:
        zs = z[0] * log2e
    else:
        zs = (z[0] - z.amax()).mul_(log2e)
    # yd (h, 2C, W): per grid row k, Y[k] (the grid row upsampled along the width) over D[k] =
    # Y[k+1] - Y[k] (0 for the last), so that one index_select takes both at a block's columns
    y = torch.matmul(zs, a_w.t()).permute(1, 0, 2)
    yd = torch.zeros([h, 2, c, width], dtype=z.dtype)
    yd[:, 0] = y
    torch.sub(y[1:], y[:-1], out=yd[:-1, 1])
    yd = yd.view(h, 2 * c, width)
    valid = target[0] != ignore_index  # (H, W)
    # each block's columns with a counted pixel, from per-column counts of valid rows above each row
    above = torch.zeros([height + 1, width], dtype=torch.int32)
    torch.cumsum(valid, dim=0, dtype=torch.int32, out=above[1:])
    bounds = torch.tensor([[b[1], b[2]] for b in blocks], dtype=torch.long)
    hit = (above.index_select(0, bounds[:, 1]) - above.index_select(0, bounds[:, 0])) > 0  # (blocks, W)
    counts: List[int] = hit.sum(dim=1).tolist()
    hit_cols = hit.nonzero()[:, 1]  # block after block, columns ascending
    if 0 <= ignore_index < c:
        tg = target[0].long()
    else:
        tg = torch.where(valid, target[0], 0).long()
    vg = valid.to(z.dtype).mul_(inv_n)
    work = torch.empty([rows * c * width], dtype=z.dtype)
    # per computed pixel, packed block after block: sum of exps, target logit (base 2), valid / n
    s_all = torch.empty([height * width], dtype=z.dtype)
    ut_all = torch.empty_like(s_all)
    v_all = torch.empty_like(s_all)
    first, used = 0, 0  # into hit_cols; into the packed per-pixel buffers
    # d/dz as (w, h * C): the projection onto the grid columns is then an (w, m) @ (m, C) product,
    # 3x faster than (C, m) @ (m, w) (MKL on an output 6 wide)
    grad_t = torch.zeros([w, h * c], dtype=z.dtype)
    for b, (k, r0, r1, l1, lw) in enumerate(blocks):
        m = counts[b]
        cols = hit_cols[first : first + m]
        first += m
        if m == 0:
            continue
        r = r1 - r0
        u = work[: r * c * m].view(r, c * m)
        ydb = yd[k].index_select(1, cols)  # (2C, m)
        torch.addcmul(ydb[:c].reshape(1, c * m), l1, ydb[c:].reshape(1, c * m), out=u)
        u3 = u.view(r, c, m)
        tb = tg[r0:r1].index_select(1, cols).view(r, 1, m)
        vb = v_all[used : used + r * m].view(r, 1, m)
        torch.index_select(vg[r0:r1], 1, cols, out=vb.view(r, m))
        if exact_max:
            u3.sub_(u3.amax(dim=1, keepdim=True))
        torch.gather(u3, 1, tb, out=ut_all[used : used + r * m].view(r, 1, m))
        torch.exp2(u, out=u)
        s = s_all[used : used + r * m].view(r, 1, m)
        torch.sum(u3, dim=[1], keepdim=True, out=s)
        used += r * m
        if want_grad:
            u3.mul_(vb / s)  # softmax * valid / n
            u3.scatter_add_(1, tb, vb.neg())  # - onehot * valid / n
            a_sel = a_w.index_select(0, cols).t()  # (w, m): the kept columns' weights on the grid columns
            if k + 1 == h:  # the last grid row: i1 = i0, both weights land on it
                grad_t[:, k * c : (k + 1) * c].addmm_(a_sel, u3.sum(dim=0).t())
            else:  # rows k and k + 1: sum_i l0[i] G[i] and sum_i l1[i] G[i], then onto the grid columns
                grad_t[:, k * c : (k + 2) * c].addmm_(a_sel, torch.mm(lw, u).view(2 * c, m).t())
    s_used = s_all[:used]
    underflow = bool((s_used < tiny).any())  # if not, every log below is finite
    share = s_used.log().sub_(ut_all[:used], alpha=ln2).mul_(v_all[:used]).sum(dtype=torch.float64)
    if not want_grad:
        return share, None, underflow
    return share, grad_t.view(w, h, c).permute(2, 1, 0).unsqueeze(0), underflow


_COMPILED: dict[str, Any] = {}


def _compiled(device: torch.device, group: int) -> Any:
    """The pass for this device and group size (`_image` for one image on the CPU, else `_group`),
    compiled by TorchScript, or the plain function where that is unavailable.

    The compiled function runs without Python and without the GIL: two pool threads running
    images side by side no longer hand the GIL back and forth at every op (thousands of futex
    calls per step, measured). Same kernels in the same order: bitwise the same results (tested).
    torch.jit.script is deprecated in favour of torch.compile, which needs a C++ compiler at run
    time on CPU (the worker image has none) and ~40 s per process to compile; RELAY_FASTLOSS_SCRIPT=0
    turns it off.
    """
    plain = _image if device.type == "cpu" and group == 1 else _group
    if plain.__name__ not in _COMPILED:
        fn: Any = plain
        if os.environ.get("RELAY_FASTLOSS_SCRIPT", "1") != "0":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn = torch.jit.script(plain)
            except Exception:  # no TorchScript in this build, or it cannot compile the function
                fn = plain
        _COMPILED[plain.__name__] = fn
    return _COMPILED[plain.__name__]


# ---- CPU thread pool: each thread runs torch single-threaded ----------------------------------------

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != size:
            if _POOL is not None:
                _POOL.shutdown(wait=True)
            _POOL = ThreadPoolExecutor(max_workers=size, thread_name_prefix="fastloss", initializer=_one_torch_thread)
            _POOL_SIZE = size
        return _POOL


def _one_torch_thread() -> None:
    """Each pool thread's own OpenMP count is 1 from its first op. Left to torch's lazy per-thread
    init, a fresh thread's first ops ran with another count, so the first step after a process
    started differed in the last bit from the same step in a warm process: a chunk resumed on a
    fresh worker did not end bitwise equal to the uninterrupted run (tests/test_fast.py)."""
    torch.set_num_threads(1)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch (OpenMP and MKL) on one thread in the calling thread inside the block, which gets its
    count back after (the count is per thread: the pool's threads keep their 1, `_one_torch_thread`).
    Adam's update runs in it, so its elementwise pieces are split the same way on every machine."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _POOL, _POOL_SIZE, _POOL_LOCK
    _POOL, _POOL_SIZE, _POOL_LOCK = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


# ---- the loss ---------------------------------------------------------------------------------------

def _valid_pixels(target: torch.Tensor, classes: int, ignore_index: int) -> int:
    """The pixels the mean loss counts (target != ignore_index); every class id must be in range."""
    valid = target != ignore_index
    lo, hi = (int(v) for v in torch.aminmax(target if 0 <= ignore_index < classes else torch.where(valid, target, 0)))
    if lo < 0 or hi >= classes:
        raise IndexError(f"target class id out of range [0, {classes}): min {lo}, max {hi}")
    return int(torch.count_nonzero(valid))


def upsample_cross_entropy_with_grad(
    z: torch.Tensor, target: torch.Tensor, size: tuple[int, int], ignore_index: int = 0, want_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, d loss / d z) of CrossEntropyLoss(ignore_index)(Upsample(size, bilinear, align_corners)(z), target).

    Never holds more than a cache-sized block of the (N, C, H, W) logits per thread (on CUDA: up
    to 1 GiB).
    """
    if z.dim() != 4 or target.dim() != 3 or target.shape[0] != z.shape[0] or tuple(target.shape[1:]) != tuple(size):
        raise ValueError(f"expected z (N, C, h, w) and target (N, {size[0]}, {size[1]}), got {tuple(z.shape)} and {tuple(target.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"z must be floating point, got {z.dtype}")
    height, width = int(size[0]), int(size[1])
    n_img, c, h, w = z.shape
    z = z.detach().contiguous()
    target = target.to(z.device)
    n_valid = _valid_pixels(target, c, ignore_index)
    if n_valid == 0:  # what PyTorch gives: a mean over nothing
        return torch.tensor(math.nan, dtype=z.dtype, device=z.device), torch.zeros_like(z) if want_grad else None
    a_w = interp_matrix(width, w, z.dtype, z.device)
    group = _group_size(z, height, width)
    blocks = _row_blocks(height, h, _rows_per_block(z, group, height, width), z.dtype, z.device)
    rows = max(b[2] - b[1] for b in blocks)
    grad = torch.empty_like(z) if want_grad else None
    group_fn = _compiled(z.device, group)

    def one(a: int, exact_max: bool = False) -> tuple[torch.Tensor, bool]:
        b = min(n_img, a + group)
        total, g, underflow = group_fn(z[a:b], target[a:b], ignore_index, 1.0 / n_valid, a_w, blocks, rows, want_grad, exact_max)
        if grad is not None:
            grad[a:b] = g
        return total, underflow

    totals = _each_image(z.device, list(range(0, n_img, group)), one)
    return _sum_in_order(totals).to(z.dtype), grad


def _each_image(device: torch.device, starts: list[int], one: Any) -> list[torch.Tensor]:
    """`one(start, exact_max) -> (share, underflow)` for every start, on the CPU pool (each image
    single-threaded); starts whose sum of exps underflowed are redone with the exact max."""
    def each(subset: list[int], exact_max: bool) -> list[tuple[torch.Tensor, bool]]:
        threads = torch.get_num_threads()
        if device.type != "cpu" or threads == 1:
            return [one(a, exact_max) for a in subset]
        return list(_pool(threads).map(lambda a: one(a, exact_max), subset))

    results = dict(zip(starts, each(starts, False)))
    flagged = [a for a, (_, underflow) in results.items() if underflow]
    if flagged:  # redo with each pixel's own max subtracted, as PyTorch does
        results.update(zip(flagged, each(flagged, True)))
    return [results[a][0] for a in starts]


def _sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    """parts[0] + parts[1] + ... left to right: one fixed order, whoever computed the parts."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def head_cross_entropy_with_grads(
    f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, size: tuple[int, int],
    ignore_index: int = 0, want_grad: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
    """(loss, (d/df, d/dweight, d/dbias)) of the fused loss of a 1x1 convolution head on features f.

    The partition of the work is fixed by the batch, never by the machine: each image's logits
    z_i = W f_i + b, its share of the loss, its gradients and its contributions to d/dW and d/db
    are computed by one thread running torch single-threaded, and the per-image results are then
    summed in image order. The thread count only decides which thread computes which image, so
    the bits are the same on 1, 2 or 16 threads (tested across processes) - unlike a batched
    convolution, whose weight-gradient reduction is split across threads.
    """
    if f.dim() != 4 or weight.dim() != 4 or weight.shape[1] != f.shape[1] or weight.shape[2:] != (1, 1):
        raise ValueError(f"expected features (N, Cin, h, w) and a 1x1 weight (C, Cin, 1, 1), got {tuple(f.shape)} and {tuple(weight.shape)}")
    n_img, cin, h, w = f.shape
    c = weight.shape[0]
    height, width = int(size[0]), int(size[1])
    if target.dim() != 3 or target.shape[0] != n_img or tuple(target.shape[1:]) != (height, width):
        raise ValueError(f"expected target ({n_img}, {height}, {width}), got {tuple(target.shape)}")
    f = f.detach().contiguous()
    w2 = weight.detach().reshape(c, cin).contiguous()
    b2 = bias.detach().reshape(c, 1) if bias is not None else torch.zeros(c, 1, dtype=f.dtype, device=f.device)
    target = target.to(f.device)
    n_valid = _valid_pixels(target, c, ignore_index)
    if n_valid == 0:  # what PyTorch gives: a mean over nothing
        zeros = (torch.zeros_like(f), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias))
        return torch.tensor(math.nan, dtype=f.dtype, device=f.device), zeros if want_grad else None
    probe = torch.empty(1, c, h, w, dtype=f.dtype, device=f.device)
    a_w = interp_matrix(width, w, f.dtype, f.device)
    blocks = _row_blocks(height, h, _rows_per_block(probe, 1, height, width), f.dtype, f.device)
    rows = max(b[2] - b[1] for b in blocks)
    group_fn = _compiled(f.device, 1)
    parts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def one(i: int, exact_max: bool = False) -> tuple[torch.Tensor, bool]:
        fi = f[i].reshape(cin, h * w)
        zi = torch.addmm(b2, w2, fi).view(1, c, h, w)
        share, g, underflow = group_fn(zi, target[i : i + 1], ignore_index, 1.0 / n_valid, a_w, blocks, rows, want_grad, exact_max)
        if g is not None and not underflow:
            g2 = g.reshape(c, h * w)
            parts[i] = (torch.mm(w2.t(), g2).view(cin, h, w), torch.mm(g2, fi.t()), g2.sum(dim=1))
        return share, underflow

    total = _sum_in_order(_each_image(f.device, list(range(n_img)), one)).to(f.dtype)
    if not want_grad:
        return total, None
    d_f = torch.stack([parts[i][0] for i in range(n_img)])
    d_w = _sum_in_order([parts[i][1] for i in range(n_img)]).view_as(weight)
    d_b = _sum_in_order([parts[i][2] for i in range(n_img)]).view_as(bias) if bias is not None else None
    return total, (d_f, d_w, d_b)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,  # type: ignore[override]
                height: int, width: int, ignore_index: int) -> torch.Tensor:
        want = any(ctx.needs_input_grad[:3])
        loss, grads = head_cross_entropy_with_grads(f, weight, bias, target, (height, width), ignore_index, want_grad=want)
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grads = ctx.grads
        ctx.grads = None
        out = [g * grad_output if g is not None and need else None for g, need in zip(grads, ctx.needs_input_grad[:3])]
        return (*out, None, None, None, None)


def head_cross_entropy(f: torch.Tensor, conv: torch.nn.Conv2d, target: torch.Tensor, size: tuple[int, int], ignore_index: int = 0) -> torch.Tensor:
    """upsample_cross_entropy(conv(f), ...) for a 1x1 convolution `conv`, differentiable in its
    weight and bias (and f), with arithmetic that does not depend on the thread count."""
    return _HeadCrossEntropy.apply(f, conv.weight, conv.bias, target, int(size[0]), int(size[1]), int(ignore_index))


class _UpsampleCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, target: torch.Tensor, height: int, width: int, ignore_index: int) -> torch.Tensor:  # type: ignore[override]
        loss, grad = upsample_cross_entropy_with_grad(z, target, (height, width), ignore_index, want_grad=ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None


def upsample_cross_entropy(z: torch.Tensor, target: torch.Tensor, size: tuple[int, int], ignore_index: int = 0) -> torch.Tensor:
    """Differentiable loss equal (to float rounding) to the seed's upsample + CrossEntropyLoss(mean)."""
    return _UpsampleCrossEntropy.apply(z, target, int(size[0]), int(size[1]), int(ignore_index))


def reference_loss(z: torch.Tensor, target: torch.Tensor, size: tuple[int, int], ignore_index: int = 0) -> torch.Tensor:
    """The seed's formulation, for tests and benchmarks."""
    up = torch.nn.functional.interpolate(z, size=size, mode="bilinear", align_corners=True)
    return torch.nn.functional.cross_entropy(up, target.long(), ignore_index=ignore_index)
