"""Storage that stays small: chunk checkpoints hold what trains (the frozen backbone once per job),
only the newest are kept, every weight<E>.pt stays; exactness and the rewind still hold."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import assert_equal_weights, tiny_spec
from segmodel import checkpoint
from segmodel.engine import train_chunk, train_range
from segmodel.layout import JobLayout
from segmodel.train import model_state


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_forty_chunk_job_takes_its_weights_plus_ten_percent(tiny_data: dict[str, Path], tmp_path: Path) -> None:
    # 16 images, batch 4: 4 steps an epoch; 20 epochs in chunks of 2 steps = 40 chunks.
    spec = tiny_spec(tiny_data, epochs=20, chunk_steps=2)
    assert spec.keep_checkpoints == 3
    cache = tmp_path / "cache"
    ref_dir, job_dir = tmp_path / "ref", tmp_path / "job"
    train_range(spec, ref_dir, 0, 80, cache_dir=cache)
    layout = JobLayout(job_dir)
    for chunk in range(30):
        train_chunk(spec, job_dir, chunk, cache_dir=cache)
    assert layout.checkpoint_steps() == [60, 58, 56]
    slim = checkpoint.load(layout.checkpoint(60))
    assert set(slim["model"]) == {"conv_to101.weight", "conv_to101.bias"} and slim["backbone_sha256"]
    assert layout.checkpoint(60).stat().st_size * 20 < layout.backbone.stat().st_size  # ~0.3 MB vs ~10 MB

    # The newest checkpoint goes bad: the job rewinds to the one before, which retention kept.
    data = bytearray(layout.checkpoint(60).read_bytes())
    data[len(data) // 2] ^= 0xFF
    layout.checkpoint(60).write_bytes(bytes(data))
    assert layout.newest_good_checkpoint(before=60) == 58
    train_range(spec, job_dir, 58, 60, cache_dir=cache)
    for chunk in range(30, 40):
        train_chunk(spec, job_dir, chunk, cache_dir=cache)

    for epoch in range(1, 21):
        assert_equal_weights(checkpoint.load(layout.weight(epoch)), checkpoint.load(JobLayout(ref_dir).weight(epoch)))
    assert_equal_weights(model_state(layout.checkpoint(80)), model_state(JobLayout(ref_dir).checkpoint(80)))
    weights = _bytes(layout.weights_dir)
    total = _bytes(job_dir)
    assert total <= 1.10 * weights, f"{total} bytes on disk for {weights} bytes of weight<E>.pt"
    assert layout.checkpoint_steps() == [80, 78, 76]


def test_full_checkpoints_from_before_still_load(tiny_data: dict[str, Path], tmp_path: Path) -> None:
    """A chunk checkpoint holding the whole model (as written before) resumes to the same bits."""
    spec = tiny_spec(tiny_data)
    cache = tmp_path / "cache"
    train_range(spec, tmp_path / "a", 0, 12, cache_dir=cache)
    train_range(spec, tmp_path / "b", 0, 6, cache_dir=cache)
    b = JobLayout(tmp_path / "b")
    state = checkpoint.load(b.checkpoint(6))
    full = {k: v for k, v in state.items() if k != "backbone_sha256"}
    checkpoint.save({**full, "model": model_state(b.checkpoint(6))}, b.checkpoint(6))
    checkpoint.remove(b.backbone)
    train_range(spec, b.root, 6, 12, cache_dir=cache)
    assert_equal_weights(checkpoint.load(b.weight(3)), checkpoint.load(JobLayout(tmp_path / "a").weight(3)))
    assert torch.equal(model_state(b.checkpoint(12))["features.0.weight"], model_state(JobLayout(tmp_path / "a").checkpoint(12))["features.0.weight"])
