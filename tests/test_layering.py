"""The layers: segmodel/ (model, training, storage, the job store) below worker/ below scheduler/."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BELOW = {"segmodel": {"worker", "scheduler"}, "worker": {"scheduler"}}


@pytest.mark.parametrize("package", sorted(BELOW))
def test_nothing_imports_upwards(package: str) -> None:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in BELOW[package]]
    assert not found, "\n".join(found)


def _loaded(modules: str, heavy: tuple[str, ...]) -> str:
    """Which of `heavy` importing `modules` in a fresh interpreter loads."""
    code = f"import sys, {modules}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("modules", ["worker.tasks", "scheduler.cli", "scheduler.control", "scheduler.api"])
def test_workers_and_the_cli_import_no_torch(modules: str) -> None:
    """The Celery worker process (leases, commits, hand-offs), the CLI, `relay run` and the API
    start without torch, numpy or PIL (seconds of imports): only trainer processes train, and the
    scheduler loads weights only to check a job's init weights."""
    assert _loaded(modules, ("torch", "numpy", "PIL")) == "[]"


@pytest.mark.parametrize("modules", ["segmodel.cache", "segmodel.samples"])
def test_the_data_layer_imports_no_torch(modules: str) -> None:
    """`relay data check` decodes every sample without importing torch (seconds on 2 cores), and
    the data cache is built the same way."""
    assert _loaded(modules, ("torch",)) == "[]"


def test_a_trainer_imports_no_lightning() -> None:
    """A trainer process trains and evaluates `segmodel.net.SegNet`; Lightning (0.3-1 s of a
    trainer's start on 2 cores) is the seed's class's (`segmodel.model`), for users' code."""
    assert _loaded("worker.trainer, segmodel.engine, segmodel.evaluate, segmodel.initweights", ("pytorch_lightning", "lightning")) == "[]"
