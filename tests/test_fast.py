"""The fast engine: the fused upsample + cross-entropy, the data and feature caches, and chunk
training from them (same contract as train_steps, exact across chunkings, within float rounding
of the seed's arithmetic)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import segmodel.fastloss as fastloss
from segmodel import cache as caches
from segmodel import features
from segmodel import checkpoint
from segmodel.data import SegmentationDataset
from segmodel.lists import read_list
from segmodel.errors import DataError
from segmodel.fasttrain import train_steps_fast
from worker.trainer_env import choose_threads, worker_env
from segmodel.layout import JobLayout
from segmodel.model import SegmentationNN
from segmodel.spec import TrainSpec
from segmodel.synthetic import generate
from segmodel.train import train_steps
from conftest import assert_equal_weights, tiny_spec

# Tolerances. The loss: 1e-5 relative (observed ~1e-7). The gradient w.r.t. the logits: 1e-5 of its
# largest entry against PyTorch's float32 reference, and 1e-6 against a float64 reference (the
# fused path is closer to the exact value than the float32 reference is). Weights after training
# from the same start: 1e-5 of their largest entry (observed ~5e-7 after 10 Adam steps).
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5
WEIGHT_RTOL = 1e-5


def _loss_and_grad(fn, z: torch.Tensor, t: torch.Tensor, size: tuple[int, int]):  # type: ignore[no-untyped-def]
    zz = z.clone().requires_grad_()
    loss = fn(zz, t, size)
    loss.backward()
    return loss.detach(), zz.grad


def _ref_and_fast(z: torch.Tensor, t: torch.Tensor, size: tuple[int, int]):  # type: ignore[no-untyped-def]
    return [_loss_and_grad(fn, z, t, size) for fn in (fastloss.reference_loss, fastloss.upsample_cross_entropy)]


def _targets(gen: torch.Generator, n: int, c: int, h: int, w: int, void: float = 0.3) -> torch.Tensor:
    t = torch.randint(0, c, (n, h, w), generator=gen)
    t[torch.rand(n, h, w, generator=gen) < void] = 0
    return t


@pytest.mark.parametrize("out_in", [(240, 6), (240, 1), (37, 5), (23, 3), (9, 4), (1, 3), (64, 2)])
def test_interp_matrix_is_pytorchs(out_in: tuple[int, int]) -> None:
    out, inn = out_in
    basis = torch.eye(inn).reshape(inn, 1, inn, 1)  # upsampling a unit vector reads off one column
    cols = F.interpolate(basis, size=(out, 1), mode="bilinear", align_corners=True)[:, 0, :, 0]
    assert torch.equal(fastloss.interp_matrix(out, inn, torch.float32, torch.device("cpu")), cols.T)


@pytest.mark.parametrize(
    "shape",
    [(4, 101, 6, 6, 240, 240), (1, 101, 6, 6, 240, 240), (3, 7, 5, 3, 37, 23), (2, 5, 2, 3, 96, 128), (2, 5, 1, 1, 64, 64)],
)
def test_fast_loss_matches_reference(shape: tuple[int, ...]) -> None:
    n, c, h, w, hh, ww = shape
    gen = torch.Generator().manual_seed(sum(shape))
    z = torch.randn(n, c, h, w, generator=gen) * 3
    t = _targets(gen, n, c, hh, ww)
    (l_ref, g_ref), (l_fast, g_fast) = _ref_and_fast(z, t, (hh, ww))
    assert abs(l_fast.item() - l_ref.item()) <= LOSS_RTOL * abs(l_ref.item())
    assert l_fast.dtype == l_ref.dtype and l_fast.shape == l_ref.shape
    assert g_fast.shape == z.shape
    l64, g64 = _loss_and_grad(fastloss.reference_loss, z.double(), t, (hh, ww))
    scale = g64.abs().max().item()
    assert (g_fast.double() - g64).abs().max().item() <= 1e-6 * scale
    if h > 1 and w > 1:
        # (a 1x1 grid sums 4096 pixels into each entry: there the float32 reference itself is off
        # by ~1.5e-5 of the largest entry, so it is only compared with the float64 one above)
        assert (g_fast - g_ref).abs().max().item() <= GRAD_RTOL * g_ref.abs().max().item()
    assert abs(l_fast.item() - l64.item()) <= LOSS_RTOL * abs(l64.item())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))])
def test_fast_loss_batched_path(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several images per pass with blocks of whole cells, as on CUDA (forced here on the CPU too)."""
    if device == "cpu":
        monkeypatch.setattr(fastloss, "_group_size", lambda z, hh, ww: z.shape[0])
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(5, 101, 6, 6, generator=gen) * 3
    t = _targets(gen, 5, 101, 240, 240)
    (l_ref, g_ref), (l_fast, g_fast) = _ref_and_fast(z.to(device), t.to(device), (240, 240))
    assert abs(l_fast.item() - l_ref.item()) <= LOSS_RTOL * abs(l_ref.item())
    assert (g_fast - g_ref).abs().max().item() <= GRAD_RTOL * g_ref.abs().max().item()


def test_fast_loss_uint8_targets_and_large_logits() -> None:
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(2, 11, 4, 6, generator=gen) * 300  # logits far beyond exp's range
    t = _targets(gen, 2, 11, 50, 70)
    (l_ref, g_ref), (l_fast, g_fast) = _ref_and_fast(z, t, (50, 70))
    assert abs(l_fast.item() - l_ref.item()) <= LOSS_RTOL * abs(l_ref.item())
    assert (g_fast - g_ref).abs().max() <= GRAD_RTOL * g_ref.abs().max()
    l8 = fastloss.upsample_cross_entropy(z, t.to(torch.uint8), (50, 70))
    assert torch.equal(l8, l_fast)


def test_fast_loss_underflow_falls_back_to_the_exact_max(monkeypatch: pytest.MonkeyPatch) -> None:
    """One corner of the grid 400 above the rest: far from it every class's exp underflows
    against the image's max, and that image is redone with the per-pixel max."""
    z = torch.full((2, 4, 3, 3), -200.0)
    z[0, 1, 0, 0] = 200.0
    z += torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    t = _targets(torch.Generator().manual_seed(2), 2, 4, 40, 40, void=0.1)
    calls: list[bool] = []
    real = fastloss._compiled(torch.device("cpu"), 1)

    def spy(*args):  # type: ignore[no-untyped-def]
        calls.append(args[-1])  # exact_max
        return real(*args)

    monkeypatch.setattr(fastloss, "_compiled", lambda device, group: spy)
    l64, g64 = _loss_and_grad(fastloss.reference_loss, z.double(), t, (40, 40))
    l_fast, g_fast = _loss_and_grad(fastloss.upsample_cross_entropy, z, t, (40, 40))
    assert sorted(calls) == [False, False, True]  # both images, then the first one again
    assert torch.isfinite(l_fast) and abs(l_fast.item() - l64.item()) <= LOSS_RTOL * abs(l64.item())
    # logits of +-200 carry float32 rounding of ~3e-5 absolute: here PyTorch's float32 path is off
    # from the float64 one by ~1e-6 of the largest entry, the fused one (base-2 logits) by ~6e-6
    assert (g_fast.double() - g64).abs().max() <= GRAD_RTOL * g64.abs().max()


def test_fast_loss_all_void_is_nan_like_pytorch() -> None:
    z = torch.randn(2, 5, 3, 3)
    t = torch.zeros(2, 16, 16, dtype=torch.long)
    (l_ref, g_ref), (l_fast, g_fast) = _ref_and_fast(z, t, (16, 16))
    assert torch.isnan(l_ref) and torch.isnan(l_fast)
    assert torch.equal(g_fast, g_ref) and not g_fast.any()


def test_fast_loss_rejects_bad_targets() -> None:
    z = torch.randn(1, 5, 2, 2)
    with pytest.raises(IndexError):
        fastloss.upsample_cross_entropy(z, torch.full((1, 8, 8), 5), (8, 8))
    with pytest.raises(ValueError):
        fastloss.upsample_cross_entropy(z, torch.ones(1, 8, 9, dtype=torch.long), (8, 8))


@pytest.mark.parametrize("group", [1, 3])
def test_compiled_and_plain_python_agree_bitwise(group: int) -> None:
    """Both passes: one image with void columns skipped (the CPU's), several at once (CUDA's)."""
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(group, 11, 4, 5, generator=gen)
    t = _targets(gen, group, 11, 30, 41)
    t[:, :, 10:25] = 0  # void columns in every block
    compiled = fastloss._compiled(torch.device("cpu"), group)
    plain = fastloss._image if group == 1 else fastloss._group
    assert compiled is not plain  # TorchScript is available here: the fast path is in use
    blocks = fastloss._row_blocks(30, 4, 7, torch.float32, torch.device("cpu"))
    a_w = fastloss.interp_matrix(41, 5, torch.float32, torch.device("cpu"))
    for exact in (False, True):
        args = (z, t, 0, 1e-3, a_w, blocks, 7, True, exact)
        ref = plain(*args)
        for _ in range(4):  # past TorchScript's profiling runs, into its optimised graph
            for x, y in zip(compiled(*args), ref):
                assert torch.equal(x, y) if torch.is_tensor(x) else x == y


def test_fast_loss_with_void_regions() -> None:
    """Void as ADE20K's "thing" classes leave it, in regions: whole row blocks, column bands and an
    all-void image beside counted ones. The CPU pass skips what is void; the result is PyTorch's."""
    gen = torch.Generator().manual_seed(13)
    z = torch.randn(4, 101, 6, 6, generator=gen) * 3
    t = torch.randint(1, 101, (4, 240, 240), generator=gen)
    t[0, :100] = 0  # the first blocks wholly void
    t[0, :, 30:200] = 0  # a band of void columns through every block
    t[1] = 0  # an all-void image in the batch
    t[2, 120:, :] = 0  # the last grid row's block void
    t[3, 50:60, 7] = 0  # a few void pixels: every column kept
    (l_ref, g_ref), (l_fast, g_fast) = _ref_and_fast(z, t, (240, 240))
    l64, g64 = _loss_and_grad(fastloss.reference_loss, z.double(), t, (240, 240))
    assert abs(l_fast.item() - l64.item()) <= LOSS_RTOL * abs(l64.item())
    assert (g_fast.double() - g64).abs().max().item() <= 1e-6 * g64.abs().max().item()
    assert (g_fast - g_ref).abs().max().item() <= GRAD_RTOL * g_ref.abs().max().item()
    assert not g_fast[1].any()  # nothing counted in the void image: its gradient is exactly 0


def test_fast_loss_leaves_the_thread_count_alone() -> None:
    before = torch.get_num_threads()
    fastloss.upsample_cross_entropy(torch.randn(3, 5, 2, 2), torch.randint(0, 5, (3, 20, 20)), (20, 20))
    assert torch.get_num_threads() == before


def test_fast_loss_blocks_are_small() -> None:
    z = torch.randn(16, 101, 6, 6)
    rows = fastloss._rows_per_block(z, 1, 240, 240)
    assert rows < 240 and rows * 101 * 240 * 4 <= fastloss._CPU_BLOCK_BYTES


# ---- training -------------------------------------------------------------------------------------

N_TRAIN, BATCH, EPOCHS = 20, 4, 2
STEPS = EPOCHS * 5
CHUNK_SCRIPT = """
import sys
from segmodel.spec import TrainSpec
from segmodel.engine import train_chunk
train_chunk(TrainSpec.model_validate_json(sys.argv[1]), sys.argv[2], int(sys.argv[3]), cache_dir=sys.argv[4])
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("fastdata"), train=N_TRAIN, val=4, size=128, seed=4)


@pytest.fixture(scope="module")
def spec(data: dict[str, Path]) -> TrainSpec:
    # 96x128 inputs: AlexNet features of 2x3, so h != w in the fused loss as well
    return TrainSpec(train=str(data["train"]), val=str(data["val"]), epochs=EPOCHS, batch_size=BATCH,
                     height=96, width=128, pretrained=False, seed=5)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(spec: TrainSpec, cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("seed", "fast", "fast_chunks", "fast_epochs")}
    train_steps(spec, dirs["seed"], 0, STEPS)
    train_steps_fast(spec, dirs["fast"], 0, STEPS, storage_cache=cache_root)
    for a, b in ((0, 3), (3, 7), (7, STEPS)):  # chunks that cross the epoch boundary at 5
        train_steps_fast(spec, dirs["fast_chunks"], a, b, storage_cache=cache_root)
    for k in range(EPOCHS):  # one epoch per chunk, each in a process of its own
        proc = subprocess.run([sys.executable, "-c", CHUNK_SCRIPT, spec.model_dump_json(), str(dirs["fast_epochs"]), str(k),
                               str(cache_root)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return dirs


def _final(d: Path) -> dict:  # type: ignore[type-arg]
    return checkpoint.load(JobLayout(d).checkpoint(STEPS))


@pytest.mark.parametrize("way", ["fast_chunks", "fast_epochs"])
def test_fast_training_is_exact_across_chunkings(runs: dict[str, Path], way: str) -> None:
    a, b = _final(runs["fast"]), _final(runs[way])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for p, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][p][k]), (p, k)
    assert torch.equal(a["rng_cpu"], b["rng_cpu"])
    for e in range(1, EPOCHS + 1):
        wa, wb = (torch.load(JobLayout(runs[n]).weight(e)) for n in ("fast", way))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


RANGE_SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[5]))
from segmodel.spec import TrainSpec
from segmodel.engine import train_range
r = train_range(TrainSpec.model_validate_json(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), cache_dir=sys.argv[6])
assert r.environment["threads"] == int(sys.argv[5]), r.environment
"""


def test_fast_training_is_exact_across_thread_counts(spec: TrainSpec, cache_root: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    """The job's chunks on trainers of 1, 2 and 3 threads, alternately, each in a process of its
    own: the same bits as the uninterrupted run (made with this process's thread count)."""
    for (a, b), threads in zip(((0, 3), (3, 5), (5, 8), (8, STEPS)), (1, 2, 3, 1)):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, "-c", RANGE_SCRIPT, spec.model_dump_json(), str(tmp_path), str(a), str(b),
                               str(threads), str(cache_root)], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _final(runs["fast"]), _final(tmp_path)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for p, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][p][k]), (p, k)


def test_head_loss_is_the_same_on_any_thread_count(tmp_path: Path) -> None:
    """The per-image head + loss at the real size, run on 1, 2 and 3 threads: equal bits."""
    script = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
import segmodel.fastloss as fl
gen = torch.Generator().manual_seed(0)
torch.manual_seed(0)
conv = torch.nn.Conv2d(256, 101, 1)
f = torch.randn(16, 256, 6, 6, generator=gen).relu()
t = torch.randint(0, 101, (16, 240, 240), generator=gen)
t[torch.rand(16, 240, 240, generator=gen) < 0.4] = 0
loss = fl.head_cross_entropy(f, conv, t, (240, 240))
loss.backward()
torch.save({"loss": loss.detach(), "w": conv.weight.grad, "b": conv.bias.grad}, sys.argv[2])
"""
    outs = []
    for threads in (1, 2, 3):
        out = tmp_path / f"{threads}.pt"
        proc = subprocess.run([sys.executable, "-c", script, str(threads), str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(torch.load(out))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]) and torch.equal(outs[0][k], outs[2][k]), k


def test_head_loss_matches_conv_and_reference() -> None:
    gen = torch.Generator().manual_seed(11)
    conv = torch.nn.Conv2d(32, 7, 1)
    f = torch.randn(3, 32, 3, 4, generator=gen).relu().requires_grad_()
    t = _targets(gen, 3, 7, 30, 41)
    grads = []
    for fn in (lambda: fastloss.reference_loss(conv(f), t, (30, 41)), lambda: fastloss.head_cross_entropy(f, conv, t, (30, 41))):
        conv.zero_grad()
        f.grad = None
        loss = fn()
        loss.backward()
        grads.append((loss.detach(), f.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    for ref, got in zip(*grads):
        assert (got - ref).abs().max() <= GRAD_RTOL * ref.abs().max()
    void = fastloss.head_cross_entropy(f, conv, torch.zeros(3, 30, 41, dtype=torch.long), (30, 41))
    assert torch.isnan(void)
    with pytest.raises(IndexError):
        fastloss.head_cross_entropy(f, conv, torch.full((3, 30, 41), 7), (30, 41))


def test_fast_training_matches_the_seed_path(runs: dict[str, Path]) -> None:
    seed, fast = _final(runs["seed"]), _final(runs["fast"])
    assert seed["step"] == fast["step"] == STEPS and seed["format"] == fast["format"]
    assert seed["model"].keys() == fast["model"].keys()
    assert torch.equal(seed["rng_cpu"], fast["rng_cpu"])  # same RNG draws (none) in both
    for k, v in seed["model"].items():
        if k.startswith("features."):
            assert torch.equal(v, fast["model"][k]), k  # frozen
        else:
            assert (v - fast["model"][k]).abs().max() <= WEIGHT_RTOL * v.abs().max(), k
    for p, st in seed["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            ref = st[k]
            assert (ref - fast["optimizer"]["state"][p][k]).abs().max() <= WEIGHT_RTOL * ref.abs().max(), (p, k)
    # the weight files load with the seed's own code
    model = SegmentationNN(num_classes=101, height=96, width=128, pretrained=False)
    for e in range(1, EPOCHS + 1):
        model.load_state_dict(torch.load(JobLayout(runs["fast"]).weight(e)))
    assert sorted(p.name for p in JobLayout(runs["fast"]).weights_dir.glob("*.pt")) == ["weight1.pt", "weight2.pt"]


def test_fast_chunk_result_and_metrics(spec: TrainSpec, cache_root: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    seen: list[dict] = []  # type: ignore[type-arg]
    r = train_steps_fast(spec, tmp_path, 0, 2, storage_cache=cache_root, on_step=seen.append)
    assert [m["step"] for m in seen] == [1, 2] and all(m["loss"] == m["loss"] for m in seen)
    assert r.start_step == 0 and r.end_step == 2 and r.images_per_s > 0
    assert r.environment["engine"] == "fast" and r.environment["threads"] == torch.get_num_threads()
    assert r.environment["arithmetic"]["thread_invariant"] and r.environment["arithmetic"]["partition"] == "image"
    assert r.environment["cache_build_s"] == 0  # built by the runs above
    assert checkpoint.is_valid(JobLayout(tmp_path).checkpoint(2))


def test_fast_training_unfrozen_backbone_uses_data_cache_only(spec: TrainSpec, cache_root: Path, tmp_path: Path) -> None:
    s = spec.model_copy(update={"freeze_backbone": False})
    fast: list[dict] = []  # type: ignore[type-arg]
    seed: list[dict] = []  # type: ignore[type-arg]
    r = train_steps_fast(s, tmp_path / "fast", 0, 2, storage_cache=cache_root, on_step=fast.append)
    assert "feature_cache" not in r.environment
    train_steps(s, tmp_path / "seed", 0, 2, on_step=seed.append)
    # The first step's loss comes from the same weights. Weights after Adam steps are not compared
    # here: Adam divides each gradient entry by its own magnitude, so conv weights whose gradient is
    # nearly zero (a sum of cancelling terms) turn rounding differences into update differences at
    # the scale of lr. The gradients themselves are compared in the next test.
    assert abs(fast[0]["loss"] - seed[0]["loss"]) <= LOSS_RTOL * seed[0]["loss"]
    assert checkpoint.is_valid(JobLayout(tmp_path / "fast").checkpoint(2))


def test_unfrozen_backbone_gradients_match(spec: TrainSpec, cache_root: Path) -> None:
    torch.manual_seed(0)
    model = SegmentationNN(num_classes=101, height=96, width=128, pretrained=False, freeze_backbone=False)
    x, y = caches.data_cache(spec.train, 96, 128, 101, cache_root).batch([3, 1, 4, 1])
    grads = []
    for loss_of in (lambda: model.compute_loss(x, y),
                    lambda: fastloss.upsample_cross_entropy(model.conv_to101(model.features(x)), y, (96, 128))):
        model.zero_grad()
        loss_of().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k, g in grads[0].items():
        assert (grads[1][k] - g).abs().max() <= GRAD_RTOL * g.abs().max(), k


def _final_at(d: Path, step: int) -> dict:  # type: ignore[type-arg]
    return checkpoint.load(JobLayout(d).checkpoint(step))


# ---- caches ---------------------------------------------------------------------------------------

def test_data_cache_reused_and_equal_to_the_dataset(data: dict[str, Path], tmp_path: Path) -> None:
    progress: list[tuple[str, int, int]] = []
    first = caches.data_cache(data["val"], 96, 128, 101, tmp_path, progress=lambda *a: progress.append(a))
    assert progress[-1] == ("data", 4, 4) and first.built_s > 0
    mtime = (first.path / "images.npy").stat().st_mtime_ns
    again = caches.data_cache(data["val"], 96, 128, 101, tmp_path, progress=lambda *a: progress.append(a))
    assert again.path == first.path and again.built_s == 0 and len(progress) == 1  # no work the second time
    assert (again.path / "images.npy").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [first.key]  # no temporary folders left
    ds = SegmentationDataset(data["val"], 96, 128, 101)
    x, y = again.batch([2, 0, 3])
    for j, i in enumerate([2, 0, 3]):
        xi, yi = ds[i]
        assert torch.equal(x[j], xi) and torch.equal(y[j], yi)  # bit for bit what the seed feeds
    assert isinstance(again.images, np.memmap)


def test_data_cache_key_follows_files_and_sizes(data: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "copy"
    root.mkdir()
    samples = read_list(data["val"])
    lines = []
    for k, s in enumerate(samples):  # a private copy of the val set to rewrite
        (root / f"{k}.jpg").write_bytes(s.image.read_bytes())
        (root / f"{k}.png").write_bytes(s.annotation.read_bytes())
        lines.append(f"{k}.jpg {k}.png\n")
    (root / "list.txt").write_text("".join(lines))
    key = caches.data_key(read_list(root / "list.txt"), 96, 128, 101)
    built = caches.data_cache(root / "list.txt", 96, 128, 101, tmp_path / "cache")
    assert built.key == key
    assert caches.data_key(read_list(root / "list.txt"), 96, 128, 101) == key  # stable
    assert caches.data_key(read_list(root / "list.txt"), 128, 128, 101) != key  # size
    assert caches.data_key(read_list(root / "list.txt"), 96, 128, 50) != key  # classes
    # rewrite one image with other pixels: new key, new cache with the new pixels
    noise = np.random.default_rng(0).integers(0, 255, size=(128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "1.jpg", quality=90)
    key2 = caches.data_key(read_list(root / "list.txt"), 96, 128, 101)
    assert key2 != key
    rebuilt = caches.data_cache(root / "list.txt", 96, 128, 101, tmp_path / "cache")
    assert rebuilt.key == key2 and rebuilt.built_s > 0
    assert not np.array_equal(rebuilt.images[1], built.images[1])
    assert np.array_equal(rebuilt.images[0], built.images[0])
    # same bytes, new mtime: a new key too (content_hash=True would keep it)
    st = (root / "2.png").stat()
    os.utime(root / "2.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert caches.data_key(read_list(root / "list.txt"), 96, 128, 101) != key2
    # a missing file names itself
    (root / "3.png").unlink()
    with pytest.raises(DataError) as info:
        caches.data_key(read_list(root / "list.txt"), 96, 128, 101)
    assert "3.png" in str(info.value) and "list.txt:4" in str(info.value)


def test_data_cache_key_names_files_by_their_real_paths(data: dict[str, Path], tmp_path: Path) -> None:
    """Reached through a linked folder, a linked file or a chain of links, the same files give the
    same key (each folder is resolved once, a linked file on its own); a dangling link names itself."""
    real = tmp_path / "real"
    real.mkdir()
    samples = read_list(data["val"])[:3]
    for k, s in enumerate(samples):
        (real / f"{k}.jpg").write_bytes(s.image.read_bytes())
        (real / f"{k}.png").write_bytes(s.annotation.read_bytes())
    (real / "list.txt").write_text("".join(f"{k}.jpg {k}.png\n" for k in range(3)))
    key = caches.data_key(read_list(real / "list.txt"), 96, 128, 101)
    (tmp_path / "via").symlink_to(real, target_is_directory=True)
    assert caches.data_key(read_list(tmp_path / "via" / "list.txt"), 96, 128, 101) == key
    links = tmp_path / "links"
    links.mkdir()
    for k in range(3):
        (links / f"{k}.jpg").symlink_to(real / f"{k}.jpg")
        (links / f"hop{k}.png").symlink_to(tmp_path / "via" / f"{k}.png")  # a link into a linked folder
        (links / f"{k}.png").symlink_to(links / f"hop{k}.png")  # and a link to that link
    (links / "list.txt").write_text("".join(f"{k}.jpg {k}.png\n" for k in range(3)))
    assert caches.data_key(read_list(links / "list.txt"), 96, 128, 101) == key
    (real / "2.png").rename(real / "gone.png")
    with pytest.raises(DataError) as info:
        caches.data_key(read_list(links / "list.txt"), 96, 128, 101)
    assert "2.png" in str(info.value) and "list.txt:3" in str(info.value)


def test_bad_sample_leaves_no_cache(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.jpg a.png\n")
    with pytest.raises(DataError):
        caches.data_cache(tmp_path / "list.txt", 64, 64, 101, tmp_path / "cache")
    assert list((tmp_path / "cache" / "data").iterdir()) == []


def test_feature_cache_keyed_by_backbone_weights(data: dict[str, Path], tmp_path: Path) -> None:
    d = caches.data_cache(data["val"], 96, 128, 101, tmp_path)
    torch.manual_seed(0)
    a = SegmentationNN(num_classes=101, height=96, width=128, pretrained=False).features
    torch.manual_seed(1)
    b = SegmentationNN(num_classes=101, height=96, width=128, pretrained=False).features
    fa = features.feature_cache(d, a, tmp_path)
    assert fa.built_s > 0 and fa.features.shape == (4, 256, 2, 3)
    assert features.feature_cache(d, a, tmp_path).built_s == 0  # reused
    fb = features.feature_cache(d, b, tmp_path)
    assert fb.key != fa.key and not np.array_equal(fa.features, fb.features)
    assert features.state_dict_digest(a) != features.state_dict_digest(b)
    assert features.feature_key(d.key, features.state_dict_digest(a), "cuda") != fa.key
    x, _ = d.batch(range(4))
    with torch.no_grad():
        assert torch.equal(fa.batch(range(4)), a(x))  # one build batch: the same computation
    a.requires_grad_(True)
    with pytest.raises(ValueError):
        features.feature_cache(d, a, tmp_path)  # a trainable backbone is never cached


@pytest.mark.parametrize("size", [(240, 240), (96, 128), (67, 93)])
def test_feature_builds_max_pool_channels_last_to_the_same_bits(size: tuple[int, int]) -> None:
    torch.manual_seed(sum(size))
    backbone = SegmentationNN(pretrained=False).features.eval()
    x = torch.randn(5, 3, *size)
    with torch.no_grad():
        assert torch.equal(features._forward(backbone, x), backbone(x))


def test_threads_and_worker_env() -> None:
    n = choose_threads()
    assert 1 <= n <= (os.cpu_count() or 1)
    env = worker_env({"PATH": "/bin", "MALLOC_ARENA_MAX": "4"}, threads=3)
    assert env["PATH"] == "/bin" and env["MALLOC_ARENA_MAX"] == "4"  # what the caller set wins
    assert env["OMP_NUM_THREADS"] == "3" and int(env["MALLOC_MMAP_THRESHOLD_"]) == 1 << 30
    assert "MKL_CBWR" not in env
    portable = worker_env({"RELAY_CPU_ISA": "avx2"})
    assert portable["ATEN_CPU_CAPABILITY"] == "avx2" and portable["MKL_CBWR"] == "AVX2" and portable["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    with pytest.raises(ValueError, match="RELAY_CPU_ISA"):
        worker_env({"RELAY_CPU_ISA": "sse"})


# ---- evaluation -----------------------------------------------------------------------------------

def test_fast_evaluation_equals_the_seed_path(spec: TrainSpec, runs: dict[str, Path], tmp_path: Path) -> None:
    """The same weights scored both ways: identical reports, on a set whose argmax has no ties."""
    from segmodel.evaluate import evaluate
    weights = JobLayout(runs["fast"]).weight(EPOCHS)
    model = SegmentationNN(num_classes=101, height=96, width=128, pretrained=False)
    model.load_state_dict(torch.load(weights))
    x, _ = caches.data_cache(spec.val, 96, 128, 101, tmp_path / "probe").batch(range(len(read_list(spec.val))))
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).values
    # no ties: every pixel's best class leads by far more than float32 rounding of these logits (~1e-7)
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-6
    stages: list[str] = []
    seed = evaluate(spec, tmp_path / "seed", weights)
    fast = evaluate(spec, tmp_path / "fast", weights, cache_dir=tmp_path / "cache", on_progress=lambda s, d, n: stages.append(s))
    assert seed["path"] == "seed" and fast["path"] == "fast"
    assert {"data", "features", "evaluate"} <= set(stages)
    for k in ("mean_iou", "pixel_accuracy", "per_class", "classes_evaluated", "val_samples"):
        assert fast[k] == seed[k], k
    assert (tmp_path / "fast" / "eval" / "predictions.png").read_bytes() == (tmp_path / "seed" / "eval" / "predictions.png").read_bytes()


@pytest.mark.parametrize("shape", [(101, 6, 6, 240, 240), (7, 2, 3, 96, 128), (5, 1, 4, 20, 30), (3, 1, 1, 8, 8)])
def test_upsampling_only_the_contenders_gives_the_full_argmax(shape: tuple[int, ...]) -> None:
    from segmodel.evaluate import contenders
    c, h, w, hh, ww = shape
    gen = torch.Generator().manual_seed(sum(shape))
    for scale in (0.1, 3.0, 30.0):
        z = torch.randn(c, h, w, generator=gen) * scale
        z[0] = z[1]  # exact ties too: argmax keeps the first
        up = lambda t: F.interpolate(t.unsqueeze(0), size=(hh, ww), mode="bilinear", align_corners=True)[0]  # noqa: E731
        keep = contenders(z)
        # as evaluation takes it: max's indices over the contenders, against the full argmax
        assert torch.equal(keep[up(z[keep]).max(dim=0).indices], up(z).argmax(dim=0))


def test_caches_hold_the_same_bytes_however_built(data: dict[str, Path], tmp_path: Path) -> None:
    """The data cache decoded on 1 or 4 threads, the feature cache computed by torch on 1 or 3
    threads (each in a process of its own): byte-identical files."""
    script = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from segmodel import cache as caches
from segmodel import features
from segmodel.model import SegmentationNN
torch.manual_seed(0)
model = SegmentationNN(num_classes=101, height=96, width=128, pretrained=False)
d = caches.data_cache(sys.argv[2], 96, 128, 101, sys.argv[3], threads=int(sys.argv[4]))
f = features.feature_cache(d, model.features, sys.argv[3])
print(d.path, f.path)
"""
    built = []
    for threads, decoders in ((1, 1), (3, 4)):
        proc = subprocess.run([sys.executable, "-c", script, str(threads), str(data["train"]), str(tmp_path / f"c{threads}"), str(decoders)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        built.append([Path(p) for p in proc.stdout.split()])
    for a, b in zip(*built):
        assert a.name == b.name  # same key
        for name in ("images.npy", "labels.npy", "features.npy"):
            if (a / name).exists():
                assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_chunks_resumed_in_fresh_two_thread_processes_equal_one_run(tiny_data: dict[str, Path], tmp_path: Path) -> None:
    """A chunk that starts a process (a fresh worker) computes its first step as a warm process
    does: two-step chunks, each in a process of its own with 2 torch threads, end bitwise equal to
    one uninterrupted process with 2 threads (the first step of a cold process used to differ)."""
    spec = tiny_spec(tiny_data, epochs=1, chunk_steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}

    def run(job: Path, a: int, b: int) -> None:
        proc = subprocess.run([sys.executable, "-c", RANGE_SCRIPT, spec.model_dump_json(), str(job), str(a), str(b), "2",
                               str(job / "cache")], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "one", 0, 4)
    for a in (0, 2):
        run(tmp_path / "chunks", a, a + 2)
    assert_equal_weights(checkpoint.load(JobLayout(tmp_path / "chunks").weight(1)), checkpoint.load(JobLayout(tmp_path / "one").weight(1)))
