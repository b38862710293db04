"""The seed's own class loads Relay's weight files strictly, and Relay loads the seed's files;
legacy `classifier.*` files still load."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from fastapi.testclient import TestClient
from torch import nn
from torchvision.models import alexnet

from conftest import assert_equal_weights, tiny_spec
from scheduler.api import make_api
from worker.broker import Broker
from scheduler.control import Control, SpecRejected, TransitionRefused
from segmodel.jobs import JobNotFound, JobState, JobStatus
from segmodel import checkpoint, determinism, train
from segmodel.data import epoch_order
from segmodel.engine import train_chunk, train_range
from segmodel.errors import InitWeightsError
from segmodel.evaluate import evaluate
from segmodel.initweights import read_init_weights
from segmodel.layout import JobLayout
from segmodel.model import SegmentationNN
from segmodel.net import build_model, seed_names
from segmodel.spec import ChunkPlan, TrainSpec
from segmodel.train import train_steps
from worker import tasks
from worker.lease import FileLeases
from worker.registry import WorkerRegistry
from worker.settings import Settings


class SeedSegmentationNN(pl.LightningModule):
    """The seed's class as the student has it: its three attribute names, run as one Sequential."""

    def __init__(self, num_classes: int = 101, height: int = 240, width: int = 240) -> None:
        super().__init__()
        self.features = alexnet(weights=None).features
        self.conv_to101 = nn.Conv2d(256, num_classes, 1)
        self.upsample = nn.Upsample(size=(height, width), mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Sequential(self.features, self.conv_to101, self.upsample)(x)


def _legacy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict as Relay wrote it before it took the seed's names."""
    return {k.replace("conv_to101.", "classifier.", 1): v for k, v in sd.items()}


def test_relay_weight_file_loads_strictly_into_the_seed_class(tiny_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for engine in ("seed", "fast"):
        spec = tiny_spec(tiny_data, epochs=1, engine=engine)
        job = tmp_path / engine
        train_range(spec, job, 0, 4, cache_dir=tmp_path / "cache")
        path = JobLayout(job).weight(1)
        seed_model = SeedSegmentationNN(num_classes=spec.num_classes, height=spec.height, width=spec.width)
        seed_model.load_state_dict(torch.load(path))  # the student's line, strict by default
        relay_model = build_model(spec)
        relay_model.load_state_dict(torch.load(path))
        x = torch.randn(2, 3, spec.height, spec.width, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            assert torch.equal(seed_model.eval()(x), relay_model.eval()(x)), engine
        assert set(torch.load(path)) == set(seed_model.state_dict())


def test_seed_file_loads_strictly_into_relay() -> None:
    torch.manual_seed(4)
    seed_model = SeedSegmentationNN()
    model = SegmentationNN(pretrained=False)
    model.load_state_dict(seed_model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), seed_model.state_dict().values()))


def test_legacy_names_map_one_way() -> None:
    sd = SegmentationNN(pretrained=False).state_dict()
    legacy = _legacy(sd)
    assert "classifier.weight" in legacy and "conv_to101.weight" not in legacy
    assert seed_names(legacy).keys() == sd.keys()
    assert seed_names(sd).keys() == sd.keys()  # the seed's names stay
    both = {**sd, "classifier.weight": sd["conv_to101.weight"]}
    assert "classifier.weight" in seed_names(both)  # never overwrites: a strict load reports it
    model = SegmentationNN(pretrained=False)
    model.load_state_dict(legacy)
    assert torch.equal(model.conv_to101.weight, sd["conv_to101.weight"])


def test_legacy_full_state_checkpoint_resumes_bitwise(tiny_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A job whose checkpoints were written with `classifier.*` names continues as if renamed."""
    spec = tiny_spec(tiny_data, engine="seed")
    ref, old = tmp_path / "ref", tmp_path / "old"
    train_steps(spec, ref, 0, 12)
    train_steps(spec, old, 0, 6)
    layout = JobLayout(old)
    state = checkpoint.load(layout.checkpoint(6))
    checkpoint.save({**state, "model": _legacy(state["model"])}, layout.checkpoint(6))
    train_steps(spec, old, 6, 12)
    got, want = checkpoint.load(layout.checkpoint(12)), checkpoint.load(JobLayout(ref).checkpoint(12))
    assert got["model"].keys() == want["model"].keys()
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
    for i, s in want["optimizer"]["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][i][k], s[k]) for k in s)


# ---- starting a job from a file ------------------------------------------------------------------

def _seed_file(path: Path, spec: TrainSpec, seed: int = 21) -> dict[str, torch.Tensor]:
    """What the student has: torch.save(model.state_dict()) of the seed's class, some epochs in."""
    torch.manual_seed(seed)
    model = SeedSegmentationNN(num_classes=spec.num_classes, height=spec.height, width=spec.width)
    with torch.no_grad():
        model.conv_to101.weight.mul_(3.0)  # anything a fresh Relay model would not have
    torch.save(model.state_dict(), path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_init_weights_job_first_chunk_starts_from_those_tensors(tiny_data, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "weight21.pt"
    spec = tiny_spec(tiny_data, epochs=23, engine="seed", init_weights=str(source), start_epoch=21)
    tensors = _seed_file(source, spec)
    control = Control(Settings(storage=tmp_path / "storage"))
    job_id, state = control.submit(spec)
    layout = control.store.layout(job_id)
    stored = control.store.spec(job_id)
    assert stored.init_weights == str(source) and stored.init_weights_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert checkpoint.is_valid(layout.init_weights)
    assert (state.start_epoch, state.total_steps, state.n_chunks) == (21, 8, 3)
    source.unlink()  # the job has its own copy

    seen: list[dict[str, torch.Tensor]] = []
    real = train._run_steps

    def spy(layout_, plan, model, optimizer, *args: Any, **kwargs: Any) -> Any:  # type: ignore[no-untyped-def]
        if not seen:
            assert not optimizer.state  # a fresh optimizer, as in the student's manual relay
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(layout_, plan, model, optimizer, *args, **kwargs)

    monkeypatch.setattr(train, "_run_steps", spy)
    result = train_chunk(stored, layout.root, 0, cache_dir=tmp_path / "cache")
    assert seen[0].keys() == tensors.keys()
    assert all(torch.equal(seen[0][k], tensors[k]) for k in tensors), "chunk 0 began from other tensors"
    assert result.epoch == 21 + 3 / 4
    # weight files continue the numbering: chunk 0 (3 steps) ends inside epoch 22
    assert sorted(p.name for p in layout.weights_dir.glob("*.pt")) == []
    train_chunk(stored, layout.root, 1, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in layout.weights_dir.glob("*.pt")) == ["weight22.pt"]


def test_start_epoch_draws_that_epochs_data_order(tiny_data) -> None:  # type: ignore[no-untyped-def]
    spec = tiny_spec(tiny_data, epochs=23, init_weights="x.pt", start_epoch=21)
    plan = ChunkPlan(spec, 16)
    batches = train._batches(plan, 16, spec.seed, spec.batch_size, 0, 8)
    order = [epoch_order(16, spec.seed, e).tolist() for e in (21, 22)]
    assert batches == [order[e][s * 4:(s + 1) * 4] for e in (0, 1) for s in range(4)]
    assert plan.weight_epoch(4) == 22 and plan.epoch_of(6) == 22.5


def test_init_weights_job_exact_across_chunkings(tiny_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "seed.pt"
    for engine in ("seed", "fast"):
        spec = tiny_spec(tiny_data, epochs=4, engine=engine, init_weights=str(source), start_epoch=2)
        _seed_file(source, spec)
        control = Control(Settings(storage=tmp_path / f"storage-{engine}"))
        finals = []
        for chunk_steps in (3, 8):
            job_id, _ = control.submit(spec.model_copy(update={"chunk_steps": chunk_steps}))
            stored, layout = control.store.spec(job_id), control.store.layout(job_id)
            for k in range(ChunkPlan(stored, 16).n_chunks):
                train_chunk(stored, layout.root, k, cache_dir=tmp_path / "cache")
            finals.append(checkpoint.load(layout.weight(4)))
            assert not layout.weight(2).exists() and checkpoint.is_valid(layout.weight(3))
        assert_equal_weights(*finals)


def _bad_files(tmp_path: Path, spec: TrainSpec) -> list[tuple[Path, list[str]]]:
    """(file, words its error must contain)."""
    good = SegmentationNN(pretrained=False, num_classes=spec.num_classes).state_dict()
    cases: list[tuple[str, Any, list[str]]] = [
        ("missing.pt", None, ["no such file"]),
        ("text.pt", b"not a torch file", ["weights_only=True"]),
        ("fewer.pt", {k: v for k, v in good.items() if not k.startswith("conv_to101")}, ["missing keys", "conv_to101.weight", "conv_to101.bias"]),
        ("extra.pt", {**good, "head.weight": torch.zeros(2)}, ["unexpected keys", "head.weight"]),
        ("classes.pt", SegmentationNN(pretrained=False, num_classes=7).state_dict(), ["conv_to101.weight (file (7, 256, 1, 1)", "model (101, 256, 1, 1)"]),
        ("double.pt", {k: v.double() for k, v in good.items()}, ["torch.float64"]),
        ("full.pt", {"format": 1, "step": 4, "model": good, "optimizer": {}}, ["full-state checkpoint"]),
        ("nan.pt", {**good, "conv_to101.bias": torch.full((101,), float("nan"))}, ["non-finite", "conv_to101.bias"]),
    ]
    out = []
    for name, content, words in cases:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        out.append((path, [str(path), *words]))
    return out


def test_bad_init_weights_are_refused_naming_the_file_and_keys(tiny_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = tiny_spec(tiny_data)
    for path, words in _bad_files(tmp_path, spec):
        with pytest.raises(InitWeightsError) as info:
            read_init_weights(path, spec)
        assert all(w in str(info.value) for w in words), (words, str(info.value))
    legacy = tmp_path / "legacy.pt"
    torch.save(_legacy(SegmentationNN(pretrained=False).state_dict()), legacy)
    sd, _ = read_init_weights(legacy, spec)  # an old Relay weight file is fine
    assert "conv_to101.weight" in sd
    with pytest.raises(InitWeightsError, match="differs from init_weights_sha256"):
        read_init_weights(legacy, spec.model_copy(update={"init_weights_sha256": "0" * 64}))


def test_api_refuses_bad_init_weights_with_422_and_creates_nothing(tiny_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    storage = tmp_path / "storage"
    client = TestClient(make_api(Settings(storage=storage)))
    spec = tiny_spec(tiny_data)
    base = {"train": spec.train, "val": spec.val, "epochs": 2, "pretrained": False, "height": 64, "width": 64}
    for path, words in _bad_files(tmp_path, spec):
        r = client.post("/api/jobs", json={**base, "init_weights": str(path)})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", "init_weights"] and all(w in detail["msg"] for w in words), detail
    r = client.post("/api/jobs", json={**base, "start_epoch": 3})  # start_epoch without weights
    assert r.status_code == 422 and "init_weights" in r.text
    good = tmp_path / "good.pt"
    _seed_file(good, spec)
    r = client.post("/api/jobs", json={**base, "init_weights": str(good), "start_epoch": 2})
    assert r.status_code == 422 and "above start_epoch" in r.text  # epochs 2 <= start_epoch 2
    assert not (storage / "jobs").exists() or not any((storage / "jobs").iterdir())
    r = client.post("/api/jobs", json={**base, "init_weights": str(good), "start_epoch": 1})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["spec"]["init_weights_sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert job["progress"]["epoch"] == 1 and job["progress"]["start_epoch"] == 1


def test_cli_run_refuses_bad_init_weights_with_exit_2(tiny_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "weights.pt"
    torch.save({"conv_to101.weight": torch.zeros(3)}, bad)
    storage = tmp_path / "storage"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}, "RELAY_STORAGE": str(storage)}
    base = [sys.executable, "-m", "scheduler.cli", "run", "--train", str(tiny_data["train"]), "--val", str(tiny_data["val"]),
            "--epochs", "2", "--no-pretrained", "--height", "64", "--width", "64"]
    r = subprocess.run([*base, "--init-weights", str(bad)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert str(bad) in r.stderr and "missing keys" in r.stderr and "features.0.weight" in r.stderr
    r = subprocess.run([*base, "--start-epoch", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "start_epoch needs init_weights" in r.stderr, r.stderr
    assert not (storage / "jobs").exists() or not any((storage / "jobs").iterdir())


# ---- the deterministic formulation the seed engine uses on CUDA ------------------------------------

def test_deterministic_seed_loss_matches_the_seeds_within_rounding() -> None:
    torch.manual_seed(0)
    model = SegmentationNN(num_classes=11, height=64, width=80, pretrained=False)
    x = torch.randn(3, 3, 64, 80)
    y = torch.randint(0, 11, (3, 64, 80))
    ref = model.compute_loss(x, y)
    (g_ref,) = torch.autograd.grad(ref, [model.conv_to101.weight])
    got = determinism.seed_loss(model, x, y)
    (g_got,) = torch.autograd.grad(got, [model.conv_to101.weight])
    assert torch.allclose(got, ref, rtol=1e-5, atol=0)
    assert torch.allclose(g_got, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))
    assert determinism.use_seed_kernels(torch.device("cpu"))  # CPU keeps the seed's arithmetic
    assert determinism.prepare(torch.device("cpu"), True) == {"deterministic": True}


# ---- extend ----------------------------------------------------------------------------------------

class InlineTrainer:
    """The trainer's work done in this process: the real chunk training and evaluation."""

    pid = None
    waited_s = 0.0  # for a starting trainer's imports: none here

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def start(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def run(self, request: dict[str, Any], tick: Any) -> dict[str, Any]:
        spec = TrainSpec.model_validate(request["spec"])
        if request["op"] == "train":
            return train_range(spec, request["job_dir"], request["start"], request["end"], cache_dir=self.cache).to_dict()
        return evaluate(spec, Path(request["job_dir"]), Path(request["weights"]))


def _drive(rt: tasks.Runtime, job_id: str) -> JobState:
    """Hand the job its tasks until it ends, as the workers would."""
    while (state := rt.store.state(job_id)).status.active:
        if state.training_done:
            tasks.handle_evaluate(rt, job_id)
        else:
            tasks.handle_train(rt, job_id, state.chunk)
    return state


def test_extend_2_to_4_epochs_equals_a_4_epoch_job(tiny_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(storage=tmp_path / "storage", node="w1")
    control = Control(settings)
    rt = tasks.Runtime(settings=settings, store=control.store, broker=Broker(control.app, settings),
                       leases=FileLeases(settings.storage, 30), trainer=InlineTrainer(tmp_path / "cache"),  # type: ignore[arg-type]
                       registry=WorkerRegistry(settings.storage, "w1", ["cpu"]))
    # 4 steps an epoch in chunks of 3: the 2-epoch job ends mid-grid (step 8), so the extension restarts it
    spec = tiny_spec(tiny_data, epochs=2, chunk_steps=3)
    job_id, _ = control.submit(spec)
    with pytest.raises(TransitionRefused, match="only a succeeded job"):
        control.extend(job_id, 4)
    assert _drive(rt, job_id).status == JobStatus.succeeded
    layout = control.store.layout(job_id)
    two = checkpoint.load(layout.weight(2))
    with pytest.raises(SpecRejected, match="not more than the 2 epochs"):
        control.extend(job_id, 2)

    control.extend(job_id, 4)
    state = control.store.state(job_id)
    assert (state.status, state.chunk, state.step, state.n_chunks, state.restarts) == (JobStatus.running, 3, 8, 6, [8])
    assert control.store.spec(job_id).extended_at == (2,)
    assert _drive(rt, job_id).status == JobStatus.succeeded
    assert json.loads(layout.report_file.read_text())["weights"] == "weight4.pt"  # evaluated again
    history = control.store.state(job_id).history
    assert [(h.start_step, h.end_step) for h in history] == [(0, 3), (3, 6), (6, 8), (8, 11), (11, 14), (14, 16)]

    ref = tmp_path / "ref"
    train_range(tiny_spec(tiny_data, epochs=4, chunk_steps=3), ref, 0, 16, cache_dir=tmp_path / "cache")
    assert_equal_weights(checkpoint.load(layout.weight(4)), checkpoint.load(JobLayout(ref).weight(4)))
    assert_equal_weights(checkpoint.load(layout.weight(2)), two)
    got, want = checkpoint.load(layout.checkpoint(16)), checkpoint.load(JobLayout(ref).checkpoint(16))
    for i, s in want["optimizer"]["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][i][k], s[k]) for k in s)
    assert torch.equal(got["rng_cpu"], want["rng_cpu"])


def test_extend_refuses_without_the_final_checkpoint(tiny_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(storage=tmp_path / "storage", node="w1")
    control = Control(settings)
    job_id, _ = control.submit(tiny_spec(tiny_data, epochs=1))

    def done(s: JobState) -> None:
        s.chunk, s.step = s.n_chunks, s.total_steps
        s.set_status(JobStatus.succeeded, "test")

    control.store.update(job_id, done)
    before = control.store.layout(job_id).spec_file.read_bytes()
    with pytest.raises(TransitionRefused, match="final full-state checkpoint"):
        control.extend(job_id, 3)
    assert control.store.layout(job_id).spec_file.read_bytes() == before
    assert control.store.state(job_id).status == JobStatus.succeeded
    with pytest.raises(JobNotFound):
        control.extend("no-such-job", 3)
