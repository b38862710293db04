"""SegmentationNN: the seed's class, a LightningModule: `segmodel.net.SegNet` (the network Relay's
engines train, parameter names and arithmetic the seed's) with the seed's Lightning hooks, so that
`pytorch_lightning.Trainer(...).fit(SegmentationNN(), loader)` trains it as the student did."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from segmodel.net import SegNet


class SegmentationNN(SegNet, pl.LightningModule):
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
        super().__init__(num_classes, height, width, lr, optimizer, freeze_backbone, pretrained, pretrained_path)
        self.save_hyperparameters()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(*batch)
        self.log("train_loss", loss)
        return loss
