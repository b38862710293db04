"""The trainer process's environment: thread counts for the machine and glibc allocator settings.

Kept free of torch so the Celery worker can build it without importing torch itself.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def _cgroup_cpus() -> float | None:
    """CPUs allowed by a cgroup v2 quota (docker --cpus), if any."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def _threads_per_core() -> int:
    try:
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text().strip()
    except OSError:
        return 1
    count = 0
    for part in siblings.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi) - int(lo) + 1 if hi else 1
    return max(1, count)


def choose_threads() -> int:
    """Torch threads for this machine: one per physical core the process may use.

    Hyperthread siblings share the FPU and the L2 the loss's row blocks are sized for, so they
    slow it down; a cgroup quota caps the count. The value is a property of the machine, so every
    chunk on the same kind of machine uses the same count (the relay's bitwise guarantee holds
    across equal thread counts; ChunkResult.environment records it).
    """
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(1, logical // _threads_per_core())
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return n


# RELAY_CPU_ISA=avx2: every library's CPU kernels capped at AVX2, so x86 workers of different
# models (AVX2 or AVX-512) run the same code paths. ATen's vector kernels, MKL's conditional
# numerical reproducibility branch and oneDNN's ISA cap are each read once, at process start.
# It costs speed on AVX-512 machines (~1.5x on the fast engine's step, measured on a busy
# 2-core VM), so it is a choice for mixed fleets, not the default.
PORTABLE_ISA = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def worker_env(base: dict[str, str] | None = None, threads: int | None = None) -> dict[str, str]:
    """The environment for the trainer subprocess: thread counts and glibc malloc settings.

    glibc reads MALLOC_* only at process start, hence an environment rather than a call. By
    default glibc gives every allocation above its mmap threshold (at most 32 MiB by itself) fresh
    pages and returns them on free: the seed engine's 16x101x240x240 tensors (372 MB) page-fault
    in again on every step. With these settings they come from the heap and freed memory stays for
    the next step: measured on 2 cores, the seed's step went from 1.03 s with 364,000 minor page
    faults and 0.79 s of system time to 0.67 s with ~0 faults. The fast engine's buffers are
    cache-sized and reused, so it is unaffected. The price: the trainer keeps up to ~2 GiB of freed
    memory for reuse instead of returning it to the system.
    * MALLOC_MMAP_THRESHOLD_=1 GiB: allocations below it come from the heap;
    * MALLOC_TRIM_THRESHOLD_=2 GiB, MALLOC_TOP_PAD_=256 MiB: the heap is not shrunk after each step
      nor grown a page at a time;
    * MALLOC_ARENA_MAX=2: few arenas, so memory freed by one thread is found by the next.
    OMP_NUM_THREADS / MKL_NUM_THREADS: `choose_threads()`. The fast engine's arithmetic does not
    depend on the thread count; RELAY_CPU_ISA (see PORTABLE_ISA) pins it across CPU models.
    Values already set in `base` win.
    """
    env = dict(os.environ if base is None else base)
    n = str(threads or choose_threads())
    wanted = {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
        "MALLOC_TRIM_THRESHOLD_": str(2 << 30),
        "MALLOC_TOP_PAD_": str(256 << 20),
        "MALLOC_ARENA_MAX": "2",
    }
    isa = env.get("RELAY_CPU_ISA", "")
    if isa:
        if isa not in PORTABLE_ISA:
            raise ValueError(f"RELAY_CPU_ISA={isa!r}: expected one of {sorted(PORTABLE_ISA)} or unset")
        wanted.update(PORTABLE_ISA[isa])
    for k, v in wanted.items():
        env.setdefault(k, v)
    return env
