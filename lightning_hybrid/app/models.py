"""Small classifiers for the demo, the app, the tests and the benchmarks: an MLP and a CNN."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}


class Classifier(pl.LightningModule):
    """Cross-entropy training, torchmetrics accuracy and the optimizer; subclasses build ``self.net``.

    ``optimizer`` is one of :data:`OPTIMIZERS` (``"sgd"`` and ``"rmsprop"`` with ``momentum``), each with
    ``weight_decay``; ``lr_step`` > 0 adds a StepLR that halves the learning rate every ``lr_step`` epochs.
    """

    def __init__(
        self, num_classes: int, lr: float, optimizer: str, momentum: float, lr_step: int, weight_decay: float = 0.0
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}")
        self.lr, self.optimizer_name, self.momentum, self.lr_step = lr, optimizer, momentum, lr_step
        self.weight_decay = weight_decay
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        # the step's value stays local (syncing it would chain the workers every step); the epoch's mean is
        # synced over ranks once per epoch, as Lightning advises and AdaSync reads it
        self.log("train_loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train_loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)
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
        options: dict[str, Any] = dict(lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name in ("sgd", "rmsprop"):
            options["momentum"] = self.momentum
        optimizer = OPTIMIZERS[self.optimizer_name](self.parameters(), **options)
        if self.lr_step <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.lr_step, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class MLPClassifier(Classifier):
    """An MLP over the flattened input: ``depth`` hidden layers of ``hidden`` units (optional BatchNorm)."""

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
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(num_classes, lr, optimizer, momentum, lr_step, weight_decay)
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = num_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden)]
            layers += [nn.BatchNorm1d(hidden)] if batch_norm else []
            layers += [nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))


class CNNClassifier(Classifier):
    """Two conv blocks (conv, ReLU, 2x2 max-pool) and a linear head, for 1x28x28 (MNIST) or 3x32x32
    (CIFAR-10) images."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        channels: int = 32,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        lr_step: int = 0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(num_classes, lr, optimizer, momentum, lr_step, weight_decay)
        self.save_hyperparameters()
        side = image_size // 4
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * side * side, num_classes),
        )
