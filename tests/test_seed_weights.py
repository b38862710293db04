"""The seed's own class loads Relay's weight files strictly, and Relay loads the seed's files;
legacy `classifier.*` files still load."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torchvision.models import alexnet

from conftest import tiny_spec
from segmodel import checkpoint
from segmodel.engine import train_range
from segmodel.layout import JobLayout
from segmodel.model import SegmentationNN, build_model, seed_names
from segmodel.train import train_steps


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
