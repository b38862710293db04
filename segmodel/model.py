"""SegmentationNN: the seed's class, a LightningModule: `segmodel.net.SegNet` (the network Relay's
engines train, parameter names and arithmetic the seed's) with the seed's Lightning hooks, so that
`pytorch_lightning.Trainer(...).fit(SegmentationNN(), loader)` trains it as the student did."""
from __future__ import annotations

import inspect
from typing import Any

import pytorch_lightning as pl
import torch

from segmodel.net import SegNet


class SegmentationNN(SegNet, pl.LightningModule):
    __signature__ = inspect.signature(SegNet)  # SegNet's arguments: what help() and editors show

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        bound = self.__signature__.bind(*args, **kwargs)
        bound.apply_defaults()
        self.save_hyperparameters(dict(bound.arguments))  # hparams by name, as the seed's class had them

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(*batch)
        self.log("train_loss", loss)
        return loss
