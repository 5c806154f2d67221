"""A small classifier for the demo, the tests and the benchmarks."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class MLPClassifier(pl.LightningModule):
    """An MLP with cross-entropy loss and torchmetrics accuracy.

    ``optimizer`` is ``"sgd"`` (with ``momentum``) or ``"adam"``; ``lr_step`` > 0 adds a StepLR
    that halves the learning rate every ``lr_step`` epochs.
    """

    def __init__(
        self,
        num_features: int = 64,
        num_classes: int = 10,
        hidden: int = 128,
        depth: int = 1,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        lr_step: int = 0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = num_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden)]
            layers += [nn.BatchNorm1d(hidden)] if batch_norm else []
            layers += [nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.val_accuracy(logits, y)
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean(), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr)
        if hp.lr_step <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.lr_step, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
