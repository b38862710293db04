"""SegmentationNN: the seed's parameter counts and shapes, and how pretrained weights are had or refused."""

import socket
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from pytorch_lightning.utilities.model_summary import ModelSummary
from torchvision.models import alexnet

from segmodel.errors import PretrainedWeightsUnavailable
from segmodel.model import SegmentationNN
from segmodel.net import SegNet, build_model
from segmodel.spec import TrainSpec

FEATURE_PARAMS = 2_469_696  # AlexNet features (5 convs)
CLASSIFIER_PARAMS = 256 * 101 + 101  # 1x1 conv to 101 classes = 25,957


def _counts(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def test_parameter_counts_match_the_seed() -> None:
    model = SegmentationNN(pretrained=False)
    assert CLASSIFIER_PARAMS == 25_957
    assert _counts(model) == (CLASSIFIER_PARAMS, FEATURE_PARAMS)
    summary = ModelSummary(model)
    assert summary.trainable_parameters == 25_957
    assert summary.total_parameters - summary.trainable_parameters == 2_469_696
    assert summary.total_parameters == 2_469_696 + 25_957
    text = str(summary)
    assert any(line.split() == ["26.0", "K", "Trainable", "params"] for line in text.splitlines())
    assert any(line.split() == ["2.5", "M", "Non-trainable", "params"] for line in text.splitlines())


def test_build_model_from_spec_matches_seed_counts() -> None:
    spec = TrainSpec(train="t.txt", val="v.txt", pretrained=False)
    model = build_model(spec)
    assert _counts(model) == (CLASSIFIER_PARAMS, FEATURE_PARAMS)
    assert isinstance(model, SegNet) and model.conv_to101.out_channels == 101
    # seed parameter names: its own code loads our state dicts
    names = set(model.state_dict())
    assert {"features.0.weight", "features.10.bias", "conv_to101.weight", "conv_to101.bias"} <= names
    assert len(names) == 12


def test_default_output_shape() -> None:
    model = SegmentationNN(pretrained=False).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 240, 240))
    assert out.shape == (2, 101, 240, 240)


def test_small_output_shape_and_loss() -> None:
    model = SegmentationNN(num_classes=7, height=64, width=96, pretrained=False)
    x = torch.randn(3, 3, 64, 96)
    y = torch.randint(0, 7, (3, 64, 96))
    assert model(x).shape == (3, 7, 64, 96)
    loss = model.compute_loss(x, y)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_unfrozen_backbone_is_trainable() -> None:
    model = SegmentationNN(pretrained=False, freeze_backbone=False)
    assert all(p.requires_grad for p in model.features.parameters())
    assert _counts(model) == (FEATURE_PARAMS + CLASSIFIER_PARAMS, 0)
    opt = model.configure_optimizers()
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == FEATURE_PARAMS + CLASSIFIER_PARAMS


def test_frozen_backbone_optimizer_holds_classifier_only() -> None:
    model = SegmentationNN(pretrained=False)
    assert not any(p.requires_grad for p in model.features.parameters())
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == CLASSIFIER_PARAMS
    assert isinstance(SegmentationNN(pretrained=False, optimizer="sgd").configure_optimizers(), torch.optim.SGD)


def test_the_seed_class_is_the_engines_network_with_lightnings_hooks(tmp_path: Path) -> None:
    """SegmentationNN (what users and Lightning's Trainer get) is SegNet (what the engines train)
    plus the seed's hooks: the same names and the same outputs, and Lightning fits it."""
    torch.manual_seed(0)
    seed = SegmentationNN(num_classes=7, height=64, width=64, lr=0.1, pretrained=False)
    net = SegNet(num_classes=7, height=64, width=64, pretrained=False)
    net.load_state_dict(seed.state_dict())  # strict: the same names and shapes
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 7, (4, 64, 64))
    assert torch.equal(seed.eval()(x), net.eval()(x))
    assert isinstance(seed, pl.LightningModule) and not isinstance(net, pl.LightningModule)
    assert (seed.hparams.num_classes, seed.hparams.lr, seed.hparams.optimizer) == (7, 0.1, "adam")
    before = seed.conv_to101.weight.detach().clone()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(seed.train(), DataLoader(TensorDataset(x, y), batch_size=2))
    assert trainer.global_step == 2 and not torch.equal(seed.conv_to101.weight, before)


@pytest.mark.timeout(60)
def test_pretrained_offline_raises_quickly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch_home = tmp_path / "torch_home"
    torch_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    # Hermetic even on a machine with internet: any network lookup fails as it would offline.
    def offline(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    t0 = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        SegmentationNN(pretrained=True)
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    assert "--no-pretrained" in msg
    assert "alexnet-owt-7be5be79.pth" in msg
    assert str(torch_home / "hub" / "checkpoints") in msg  # where to put the file
    assert "pretrained_path" in msg


def test_pretrained_path_missing_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "alexnet.pth"
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        SegmentationNN(pretrained=True, pretrained_path=str(missing))
    msg = str(info.value)
    assert str(missing) in msg
    assert "--no-pretrained" in msg
    # build_model passes it through too
    spec = TrainSpec(train="t.txt", val="v.txt", pretrained_path=str(missing))
    with pytest.raises(PretrainedWeightsUnavailable):
        build_model(spec)


def test_pretrained_path_loads_exact_feature_weights(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    reference = alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(reference.state_dict(), path)
    torch.manual_seed(999)  # a different init, so equality can only come from the file
    model = SegmentationNN(pretrained=True, pretrained_path=str(path))
    ref = reference.features.state_dict()
    got = model.features.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # still frozen
    assert not any(p.requires_grad for p in model.features.parameters())
    # and a model without pretrained weights differs
    plain = SegmentationNN(pretrained=False)
    assert not torch.equal(plain.features[0].weight, ref["0.weight"])


def test_pretrained_path_unreadable_file_raises(tmp_path: Path) -> None:
    bad = tmp_path / "alexnet.pth"
    bad.write_bytes(b"not a torch file" * 10)
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        SegmentationNN(pretrained=True, pretrained_path=str(bad))
    assert str(bad) in str(info.value)
