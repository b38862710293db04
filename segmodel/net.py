"""SegNet: the seed's network, exactly (frozen AlexNet features, 1x1 conv, bilinear upsample), as a
plain nn.Module: what the engines build and train. `segmodel.model.SegmentationNN` is the same
network as a LightningModule, the seed's class, for users' code and Lightning's Trainer. Kept
apart so that a trainer does not import Lightning: 0.3-1 s of every trainer's start on 2 cores."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import AlexNet_Weights, alexnet

from segmodel.errors import PretrainedWeightsUnavailable
from segmodel.spec import TrainSpec


# Relay's files before it took the seed's names called the 1x1 conv `classifier`. The one mapping
# from those names to the seed's: one way, since every file Relay writes uses the seed's names.
LEGACY_NAMES = {"classifier.": "conv_to101."}


def seed_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """`state_dict` with legacy `classifier.*` keys renamed `conv_to101.*` (other keys as they are).

    A key is renamed only where the seed's name is absent, so a file holding both keeps both and a
    strict load reports the stray one. Optimizer states need no mapping: they index parameters by
    position, and the 1x1 conv's parameters kept theirs.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key
        for old, seed in LEGACY_NAMES.items():
            if key.startswith(old) and seed + key[len(old):] not in state_dict:
                new = seed + key[len(old):]
        out[new] = value
    return out


def _alexnet_features(pretrained: bool, pretrained_path: str | None) -> nn.Sequential:
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise PretrainedWeightsUnavailable(
                f"pretrained_path {path} does not exist; put AlexNet's ImageNet weights "
                f"(alexnet-owt-7be5be79.pth) there, or train without them (--no-pretrained)"
            )
        net = alexnet(weights=None)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # not a torch file, or not AlexNet's state_dict
            raise PretrainedWeightsUnavailable(
                f"pretrained_path {path} is not an AlexNet state_dict ({exc.__class__.__name__}: {exc}); "
                f"use torchvision's alexnet-owt-7be5be79.pth, or train without it (--no-pretrained)"
            ) from exc
        return net.features
    if not pretrained:
        return alexnet(weights=None).features
    weights = AlexNet_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return alexnet(weights=weights).features
    except Exception as exc:  # offline: URLError, socket errors, a partial download
        raise PretrainedWeightsUnavailable(
            f"ImageNet weights for AlexNet could not be downloaded ({exc.__class__.__name__}: {exc}). "
            f"Put {Path(weights.url).name} at {cached} (TORCH_HOME decides the folder), "
            f"or pass its path as pretrained_path, or train without them (--no-pretrained)"
        ) from exc


class SegNet(nn.Module):
    """The seed's network. Parameter names are the seed's (`features`, `conv_to101`, `upsample`), so
    its own class loads Relay's weight files strictly, and Relay loads its files strictly."""

    def __init__(
        self,
        num_classes: int = 101,
        height: int = 240,
        width: int = 240,
        lr: float = 1e-2,
        optimizer: str = "adam",
        freeze_backbone: bool = True,
        pretrained: bool = False,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        self.lr, self.optimizer_name = lr, optimizer
        self.features = _alexnet_features(pretrained, pretrained_path)
        if freeze_backbone:
            for p in self.features.parameters():
                p.requires_grad_(False)
        self.conv_to101 = nn.Conv2d(256, num_classes, kernel_size=1)
        self.upsample = nn.Upsample(size=(height, width), mode="bilinear", align_corners=True)
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=0, reduction="mean")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.conv_to101(self.features(x)))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As nn.Module's, after mapping legacy names (`seed_names`): every load of weights or of a
        full-state checkpoint's model goes through here."""
        return super().load_state_dict(seed_names(state_dict), strict=strict, assign=assign)

    def compute_loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self(images), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(trainable, lr=self.lr)
        return torch.optim.Adam(trainable, lr=self.lr)


def build_model(spec: TrainSpec) -> SegNet:
    return SegNet(
        num_classes=spec.num_classes,
        height=spec.height,
        width=spec.width,
        lr=spec.lr,
        optimizer=spec.optimizer,
        freeze_backbone=spec.freeze_backbone,
        pretrained=spec.pretrained,
        pretrained_path=spec.pretrained_path,
    )


def model_from_state(spec: TrainSpec, state: Mapping[str, Any]) -> SegNet:
    """The job's model holding `state` (a full state_dict, loaded strictly). Built on the meta device,
    it takes the tensors as they are: no download of the backbone, no initialising of AlexNet's
    58 M-parameter classifier only to drop it (a quarter second on CPU), no copy."""
    with torch.device("meta"):
        model = build_model(spec.model_copy(update={"pretrained": False, "pretrained_path": None}))
    model.load_state_dict(state, assign=True)
    return model
