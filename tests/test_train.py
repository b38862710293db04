"""The key guarantee: one job trained uninterrupted, one epoch per fresh process, or in chunks that
cross epoch boundaries ends with the same bits: weights, optimizer state and every weight<E>.pt."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from segmodel import checkpoint
from segmodel.errors import CheckpointError, TrainingError
from segmodel.layout import JobLayout
from segmodel.model import SegmentationNN
from segmodel.net import SegNet
from segmodel.spec import ChunkPlan, TrainSpec
from segmodel.synthetic import generate
from segmodel.train import ChunkResult, model_state, train_chunk, train_steps

SIZE = 64
EPOCHS = 3
N_TRAIN = 20
BATCH = 4
STEPS_PER_EPOCH = 5  # ceil(20 / 4)
TOTAL = EPOCHS * STEPS_PER_EPOCH

CHUNK_SCRIPT = """
import json, sys
from segmodel.spec import TrainSpec
from segmodel.train import train_chunk
spec = TrainSpec.model_validate_json(sys.argv[1])
print("RESULT " + json.dumps(train_chunk(spec, sys.argv[2], int(sys.argv[3])).to_dict()))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("data"), train=N_TRAIN, val=4, size=SIZE, seed=3)


@pytest.fixture(scope="module")
def spec(data: dict[str, Path]) -> TrainSpec:
    return TrainSpec(
        train=str(data["train"]), val=str(data["val"]), epochs=EPOCHS, batch_size=BATCH,
        height=SIZE, width=SIZE, pretrained=False, seed=11, keep_checkpoints=1000,  # later tests start from any of them
    )


@pytest.fixture(scope="module")
def uninterrupted(spec: TrainSpec, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ChunkResult]:
    d = tmp_path_factory.mktemp("a_uninterrupted")
    return d, train_steps(spec, d, 0, TOTAL)


@pytest.fixture(scope="module")
def per_process(spec: TrainSpec, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    d = tmp_path_factory.mktemp("b_per_process")
    s = spec.model_copy(update={"chunk_steps": None})
    plan = ChunkPlan(s, N_TRAIN)
    assert plan.n_chunks == EPOCHS
    results = []
    for k in range(plan.n_chunks):
        proc = subprocess.run(
            [sys.executable, "-c", CHUNK_SCRIPT, s.model_dump_json(), str(d), str(k)],
            capture_output=True, text=True, timeout=120, env={**os.environ},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
    return d, results


@pytest.fixture(scope="module")
def small_chunks(spec: TrainSpec, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ChunkResult]]:
    d = tmp_path_factory.mktemp("c_small_chunks")
    s = spec.model_copy(update={"chunk_steps": 3})
    plan = ChunkPlan(s, N_TRAIN)
    assert plan.n_chunks == 5
    # chunks [0,3) [3,6) [6,9) [9,12) [12,15): four of them cross an epoch boundary (5, 10)
    return d, [train_chunk(s, d, k) for k in range(plan.n_chunks)]


def _ways(uninterrupted, per_process, small_chunks) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    return {"uninterrupted": uninterrupted[0], "per_process": per_process[0], "small_chunks": small_chunks[0]}


def _assert_state_equal(a: Any, b: Any, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_state_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_plan() -> None:
    s = TrainSpec(train="t", val="v", epochs=EPOCHS, batch_size=BATCH, chunk_steps=3)
    plan = ChunkPlan(s, N_TRAIN)
    assert (plan.steps_per_epoch, plan.total_steps, plan.n_chunks) == (STEPS_PER_EPOCH, TOTAL, 5)
    assert [(plan.start(k), plan.end(k)) for k in range(5)] == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15)]
    assert ChunkPlan(s.model_copy(update={"chunk_steps": None}), N_TRAIN).n_chunks == EPOCHS
    assert ChunkPlan(s, 21).steps_per_epoch == 6  # a last partial batch is a step


def test_final_state_is_identical_three_ways(uninterrupted, per_process, small_chunks) -> None:  # type: ignore[no-untyped-def]
    ways = _ways(uninterrupted, per_process, small_chunks)
    states = {name: {**checkpoint.load(JobLayout(d).checkpoint(TOTAL)), "model": model_state(JobLayout(d).checkpoint(TOTAL))}
              for name, d in ways.items()}
    ref = states["uninterrupted"]
    assert ref["step"] == TOTAL
    opt_state = ref["optimizer"]["state"]
    assert len(opt_state) == 2  # conv_to101 weight and bias: the backbone is frozen
    for v in opt_state.values():
        assert {"exp_avg", "exp_avg_sq", "step"} <= v.keys()
        assert float(v["step"]) == TOTAL
    for name, st in states.items():
        assert st["step"] == TOTAL and st["format"] == ref["format"]
        assert st["model"].keys() == ref["model"].keys()
        for k in ref["model"]:
            assert torch.equal(st["model"][k], ref["model"][k]), f"{name}: model {k}"
        _assert_state_equal(st["optimizer"]["state"], opt_state, f"{name}: optimizer.state")
        _assert_state_equal(st["optimizer"]["param_groups"], ref["optimizer"]["param_groups"], f"{name}: param_groups")
    # training did something: the 1x1 conv moved away from its seeded init
    torch.manual_seed(11)
    init = SegmentationNN(num_classes=101, height=SIZE, width=SIZE, pretrained=False).state_dict()
    assert not torch.equal(init["conv_to101.weight"], ref["model"]["conv_to101.weight"])
    assert torch.equal(init["features.0.weight"], ref["model"]["features.0.weight"])  # frozen


def test_epoch_weights_load_with_the_seed_code_and_are_identical(uninterrupted, per_process, small_chunks) -> None:  # type: ignore[no-untyped-def]
    ways = _ways(uninterrupted, per_process, small_chunks)
    model = SegmentationNN(num_classes=101, height=SIZE, width=SIZE, pretrained=False)
    for epoch in range(1, EPOCHS + 1):
        loaded = {}
        for name, d in ways.items():
            path = d / "weights" / f"weight{epoch}.pt"
            assert path == JobLayout(d).weight(epoch)
            assert checkpoint.is_valid(path), path
            sd = torch.load(path)  # as the seed does
            model.load_state_dict(sd)  # strict
            loaded[name] = {k: v.clone() for k, v in model.state_dict().items()}
        for name, sd in loaded.items():
            for k, v in loaded["uninterrupted"].items():
                assert torch.equal(sd[k], v), f"weight{epoch}.pt {name}: {k}"
    # no weight for a step past the end, and epochs differ from one another
    a = ways["uninterrupted"]
    assert sorted(p.name for p in (a / "weights").glob("*.pt")) == [f"weight{e}.pt" for e in range(1, EPOCHS + 1)]
    w1, w3 = (torch.load(a / "weights" / f"weight{e}.pt") for e in (1, EPOCHS))
    assert not torch.equal(w1["conv_to101.weight"], w3["conv_to101.weight"])


def test_epoch_weights_match_the_checkpoint_at_epoch_end(small_chunks) -> None:  # type: ignore[no-untyped-def]
    d, _ = small_chunks
    final = model_state(JobLayout(d).checkpoint(TOTAL))
    last = torch.load(JobLayout(d).weight(EPOCHS))
    assert final.keys() == last.keys()
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_chunk_checkpoints_written(small_chunks, per_process) -> None:  # type: ignore[no-untyped-def]
    d, results = small_chunks
    assert JobLayout(d).checkpoint_steps() == [15, 12, 9, 6, 3]
    assert [(r.start_step, r.end_step) for r in results] == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15)]
    assert results[-1].epoch == EPOCHS
    for r in results:
        path = JobLayout(d).checkpoint(r.end_step)
        assert checkpoint.verified_bytes(path)
        assert (path.parent / (path.name + ".sha256")).read_text().split()[0] == r.checkpoint_sha256
    d, results_b = per_process
    assert JobLayout(d).checkpoint_steps() == [15, 10, 5]
    assert [r["end_step"] for r in results_b] == [5, 10, 15]


def test_no_temporary_files_left(uninterrupted, per_process, small_chunks) -> None:  # type: ignore[no-untyped-def]
    for d in _ways(uninterrupted, per_process, small_chunks).values():
        for folder in (d / "checkpoints", d / "weights"):
            names = os.listdir(folder)
            assert names, folder
            assert not [n for n in names if n.endswith(".tmp") or ".tmp" in n], (folder, names)
            for n in names:
                if n.endswith(".pt"):
                    assert n + ".sha256" in names


def test_loss_decreases(per_process) -> None:  # type: ignore[no-untyped-def]
    _, results = per_process
    means = [r["loss_mean"] for r in results]
    assert all(m == m and m < 10 for m in means)
    assert means[-1] < means[0], means


def test_chunk_result_environment(uninterrupted, per_process) -> None:  # type: ignore[no-untyped-def]
    _, r = uninterrupted
    env = r.environment
    assert env["device"] == "cpu"
    assert env["threads"] == torch.get_num_threads()
    assert env["torch"] == torch.__version__
    assert r.start_step == 0 and r.end_step == TOTAL and r.epoch == EPOCHS
    assert r.images_per_s > 0 and r.seconds > 0
    _, results = per_process
    for res in results:
        assert {"device", "threads", "torch"} <= res["environment"].keys()
        # bitwise equality is claimed across equal environments: make sure these were
        assert res["environment"]["threads"] == env["threads"]
        assert res["environment"]["torch"] == env["torch"]


def test_corrupt_start_checkpoint_raises(spec: TrainSpec, small_chunks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, _ = small_chunks
    layout = JobLayout(tmp_path)
    layout.checkpoints_dir.mkdir(parents=True)
    good = JobLayout(src).checkpoint(6)
    path = layout.checkpoint(6)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    (path.parent / (path.name + ".sha256")).write_bytes((good.parent / (good.name + ".sha256")).read_bytes())
    with pytest.raises(CheckpointError) as info:
        train_steps(spec, tmp_path, 6, 9)
    assert str(path) in str(info.value)
    assert "checksum" in str(info.value)
    assert not layout.checkpoint(9).exists()


def test_missing_start_checkpoint_raises(spec: TrainSpec, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        train_steps(spec, tmp_path, 5, 10)
    assert str(JobLayout(tmp_path).checkpoint(5)) in str(info.value)


def test_resume_from_any_checkpoint_across_boundaries(spec: TrainSpec, small_chunks, uninterrupted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Start from chunk C's step-6 checkpoint and run [6, 15) in one go: same bits as the others."""
    src, _ = small_chunks
    layout = JobLayout(tmp_path)
    layout.checkpoints_dir.mkdir(parents=True)
    for name in ("step6.pt", "step6.pt.sha256", "backbone.pt", "backbone.pt.sha256"):
        (layout.checkpoints_dir / name).write_bytes((src / "checkpoints" / name).read_bytes())
    train_steps(spec, tmp_path, 6, TOTAL)
    got = checkpoint.load(layout.checkpoint(TOTAL))
    ref = checkpoint.load(JobLayout(uninterrupted[0]).checkpoint(TOTAL))
    _assert_state_equal(got["model"], ref["model"], "model")
    _assert_state_equal(got["optimizer"], ref["optimizer"], "optimizer")
    assert sorted(p.name for p in layout.weights_dir.glob("*.pt")) == ["weight2.pt", "weight3.pt"]


def test_step_range_validated(spec: TrainSpec, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        train_steps(spec, tmp_path, 0, TOTAL + 1)
    with pytest.raises(ValueError):
        train_steps(spec, tmp_path, 3, 3)
    with pytest.raises(ValueError):
        train_chunk(spec, tmp_path, EPOCHS)  # one epoch per chunk: chunks 0..EPOCHS-1


def test_nan_loss_raises_naming_the_step(spec: TrainSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = SegNet.compute_loss

    def nan_on_third(self, images, targets):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            return torch.tensor(float("nan"), requires_grad=True)
        return real(self, images, targets)

    monkeypatch.setattr(SegNet, "compute_loss", nan_on_third)
    with pytest.raises(TrainingError) as info:
        train_steps(spec, tmp_path, 0, STEPS_PER_EPOCH)
    assert "step 2" in str(info.value)
    assert "nan" in str(info.value).lower()
    assert JobLayout(tmp_path).checkpoint_steps() == []  # nothing half-trained was saved

    monkeypatch.setattr(SegNet, "compute_loss", lambda self, x, y: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError) as info:
        train_steps(spec, tmp_path, 0, 2)
    assert "step 0" in str(info.value)


def test_rng_state_identical_across_chunkings(uninterrupted, per_process, small_chunks) -> None:  # type: ignore[no-untyped-def]
    ways = _ways(uninterrupted, per_process, small_chunks)
    states = {name: checkpoint.load(JobLayout(d).checkpoint(TOTAL)) for name, d in ways.items()}
    for name, st in states.items():
        assert torch.equal(st["rng_cpu"], states["uninterrupted"]["rng_cpu"]), name
    # The files' bytes differ anyway: torch.save writes a random serialization id into each archive.


def test_empty_checksum_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    checkpoint.save({"a": torch.zeros(2)}, path)
    (tmp_path / "x.pt.sha256").write_text("")
    with pytest.raises(CheckpointError):
        checkpoint.load(path)
    assert not checkpoint.is_valid(path)
