"""SegmentationNN: the seed's model, exactly (frozen AlexNet features, 1x1 conv, bilinear upsample)."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torchvision.models import AlexNet_Weights, alexnet

from segmodel.errors import PretrainedWeightsUnavailable
from segmodel.spec import TrainSpec


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


class SegmentationNN(pl.LightningModule):
    """The seed's network. Parameter names are the seed's, so its own code loads our weights."""

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
        self.save_hyperparameters()
        self.features = _alexnet_features(pretrained, pretrained_path)
        if freeze_backbone:
            for p in self.features.parameters():
                p.requires_grad_(False)
        self.classifier = nn.Conv2d(256, num_classes, kernel_size=1)
        self.upsample = nn.Upsample(size=(height, width), mode="bilinear", align_corners=True)
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=0, reduction="mean")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.classifier(self.features(x)))

    def compute_loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self(images), targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(*batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(trainable, lr=self.hparams.lr)
        return torch.optim.Adam(trainable, lr=self.hparams.lr)


def build_model(spec: TrainSpec) -> SegmentationNN:
    return SegmentationNN(
        num_classes=spec.num_classes,
        height=spec.height,
        width=spec.width,
        lr=spec.lr,
        optimizer=spec.optimizer,
        freeze_backbone=spec.freeze_backbone,
        pretrained=spec.pretrained,
        pretrained_path=spec.pretrained_path,
    )
