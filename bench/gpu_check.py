"""Exactness on a device: each engine trains the same job twice, in one go and in chunks that cross
epoch boundaries, and the two must end `torch.equal` (weights, Adam state, every weight<E>.pt).

    python bench/gpu_check.py                    # on cuda
    python bench/gpu_check.py --device cpu --size 64   # the same check here, small

One line per engine with the device; exit status 1 if an engine that claims determinism differs.
On CUDA it also runs the seed engine with PyTorch's own (atomic) kernels, RELAY_CUDA_DETERMINISTIC=0,
for comparison: that line is information, not a failure.

The chunks run in this process through `segmodel.engine.train_range` with explicit step ranges, so
only the torch stack is needed (torch, torchvision, pytorch-lightning, numpy, pillow): no Celery,
Redis or API. GPU images often lack pydantic, which `segmodel.spec` uses; then a minimal stand-in
for it is installed that applies the spec's defaults and after-validators only (the specs here are
fixed and valid, so pydantic's checks would change nothing).
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _pydantic_standin() -> types.ModuleType:
    required = object()

    class FieldInfo:
        def __init__(self, default: Any = required, **_: Any) -> None:
            self.default = default

    class BaseModel:
        def __init__(self, **values: Any) -> None:
            cls = type(self)
            names = [n for k in reversed(cls.__mro__) for n in getattr(k, "__annotations__", {}) if n != "model_config"]
            for name in dict.fromkeys(names):
                default = getattr(cls, name, required)
                default = default.default if isinstance(default, FieldInfo) else default
                value = values.pop(name, default)
                if value is required:
                    raise TypeError(f"{cls.__name__}: {name} is required")
                self.__dict__[name] = value
            if values:
                raise TypeError(f"{cls.__name__}: unexpected {sorted(values)}")
            for check in [v for k in cls.__mro__ for v in vars(k).values() if getattr(v, "_after", False)]:
                check(self)

        def model_copy(self, update: dict[str, Any] | None = None) -> Any:
            new = copy.copy(self)
            new.__dict__.update(update or {})
            return new

        def model_dump(self) -> dict[str, Any]:
            return dict(self.__dict__)

    def model_validator(mode: str) -> Any:
        def mark(fn: Any) -> Any:
            fn._after = True
            return fn
        return mark

    module = types.ModuleType("pydantic")
    module.BaseModel, module.Field, module.ConfigDict, module.model_validator = BaseModel, FieldInfo, dict, model_validator  # type: ignore[attr-defined]
    return module


try:
    import pydantic  # noqa: F401
except ModuleNotFoundError:
    sys.modules["pydantic"] = _pydantic_standin()

import torch  # noqa: E402

from segmodel import checkpoint  # noqa: E402
from segmodel.lists import read_list# noqa: E402
from segmodel.engine import train_range  # noqa: E402
from segmodel.layout import JobLayout  # noqa: E402
from segmodel.spec import ChunkPlan, TrainSpec  # noqa: E402
from segmodel.synthetic import generate  # noqa: E402


def _train(spec: TrainSpec, job: Path, ranges: list[tuple[int, int]], device: torch.device) -> list[dict[str, Any]]:
    """Each range as one chunk, in order; each run with its own caches, built on this device."""
    return [train_range(spec, job, a, b, cache_dir=job / "cache", device=device).environment for a, b in ranges]


def _differences(a: Any, b: Any, where: str = "") -> list[tuple[str, float]]:
    """(where, max |a - b|) for every tensor that is not torch.equal."""
    if torch.is_tensor(a):
        if a.shape == b.shape and torch.equal(a, b):
            return []
        diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else float("inf")
        return [(where, diff)]
    if isinstance(a, dict):
        return [d for k in a for d in _differences(a[k], b[k], f"{where}.{k}" if where else str(k))]
    if isinstance(a, (list, tuple)):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [(where, float("nan"))]


def check(engine: str, lists: dict[str, Path], out: Path, device: torch.device, size: int, native: bool = False) -> bool:
    """Train the job twice with this engine, print the result line; whether the two are torch.equal."""
    spec = TrainSpec(train=str(lists["train"]), val=str(lists["val"]), epochs=3, batch_size=8, height=size, width=size,
                     pretrained=False, seed=0, queue="gpu" if device.type == "cuda" else "cpu", engine=engine)
    plan = ChunkPlan(spec, len(read_list(spec.train)))
    total, cs = plan.total_steps, 4  # 6 steps an epoch: chunks of 4 cross every epoch boundary
    name = f"{engine}{'-native' if native else ''}"
    shutil.rmtree(out / name, ignore_errors=True)  # fresh caches: each run builds its own on this device
    t0 = time.perf_counter()
    one = _train(spec, out / name / "one-go", [(0, total)], device)
    chunked = _train(spec, out / name / "chunked", [(a, min(a + cs, total)) for a in range(0, total, cs)], device)
    seconds = time.perf_counter() - t0
    a, b = JobLayout(out / name / "one-go"), JobLayout(out / name / "chunked")
    diffs = _differences(checkpoint.load(a.checkpoint(total)), checkpoint.load(b.checkpoint(total)))
    for e in range(1, spec.epochs + 1):
        diffs += _differences(checkpoint.load(a.weight(e)), checkpoint.load(b.weight(e)), f"weight{e}.pt")
    env = one[0]
    where = f"{env['device']}" + (f" ({env['gpu']}, torch {env['torch']})" if "gpu" in env else f" (torch {env['torch']}, {env['threads']} threads)")
    claimed = all(e.get("deterministic") for e in one + chunked)
    label = f"{engine} engine" + (" with PyTorch's own CUDA kernels (RELAY_CUDA_DETERMINISTIC=0)" if native else "")
    how = f"{spec.epochs} epochs of {plan.steps_per_epoch} steps in one go vs {len(chunked)} chunks of {cs} steps, {seconds:.0f} s"
    if not diffs:
        print(f"RESULT {label} on {where}: EQUAL - weights, Adam state, RNG state and weight1-{spec.epochs}.pt torch.equal "
              f"({how}; chunks recorded deterministic={claimed})", flush=True)
    else:
        worst = max(diffs, key=lambda d: d[1])
        print(f"RESULT {label} on {where}: DIFFERENT - {len(diffs)} tensors differ, largest |diff| {worst[1]:.3g} in {worst[0]} "
              f"({how}; chunks recorded deterministic={claimed})", flush=True)
    return not diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=os.environ.get("RELAY_CHECK_DEVICE", "cuda"), help="cuda (default) or cpu")
    parser.add_argument("--size", type=int, default=240, help="image side: 240 is the seed's")
    parser.add_argument("--out", type=Path, default=Path("/tmp/relay-gpu-check/exact"))
    parser.add_argument("--engines", default="seed,fast")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"RESULT no CUDA device here (torch {torch.__version__}); run with --device cpu to check the CPU", flush=True)
        return 1
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {what}, torch {torch.__version__}, python {sys.version.split()[0]}", flush=True)
    lists = generate(args.out / "data", 48, 4, seed=1, size=max(64, args.size), classes=5)
    ok = all([check(engine, lists, args.out, device, args.size) for engine in args.engines.split(",")])
    if device.type == "cuda" and "seed" in args.engines.split(","):
        os.environ["RELAY_CUDA_DETERMINISTIC"] = "0"
        try:
            check("seed", lists, args.out, device, args.size, native=True)
        finally:
            os.environ.pop("RELAY_CUDA_DETERMINISTIC")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
