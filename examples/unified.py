"""The strategy from the unified ``lightning`` package: ``import lightning as L``.

``import lightning_hybrid`` registers ``"hybrid_sgd"`` (and its variants) with ``lightning`` as well as with
``pytorch_lightning``. An explicit instance for an ``L.Trainer`` comes from ``lightning_hybrid.lightning``;
``ThresholdScheduler`` serves both. Needs ``pip install 'lightning-hybrid[lightning]'``.

    python examples/unified.py --workers 2 --epochs 4
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import lightning_hybrid
from lightning_hybrid.lightning import HybridSGDStrategy


class DigitsMLP(L.LightningModule):
    """A small MLP on scikit-learn's 8x8 digits."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits(seed: int) -> tuple[DataLoader, DataLoader]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = order[:1437], order[1437:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=32, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (N)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threshold", default=None, help="a constant K (e.g. 1, 50%%, sync) instead of the ramp")
    args = parser.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(0)
    if args.threshold is None:  # by name, K rising from async to sync over the epochs
        strategy, callbacks = "hybrid_sgd", [lightning_hybrid.ThresholdScheduler("linear")]
    else:  # an explicit instance: the class of this namespace
        threshold = int(args.threshold) if args.threshold.isdigit() else args.threshold
        strategy, callbacks = HybridSGDStrategy(threshold=threshold), []
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.workers,
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train, val = digits(seed=0)
    trainer.fit(DigitsMLP(), train, val)
    if trainer.is_global_zero:
        metrics = trainer.callback_metrics
        print(
            f"lightning.pytorch + {type(trainer.strategy).__module__}.HybridSGDStrategy: K {trainer.strategy.threshold}"
            f" of {args.workers}, {trainer.strategy.version} updates, val_loss {metrics['val_loss']:.4f},"
            f" val_acc {metrics['val_acc']:.4f}"
        )


if __name__ == "__main__":
    main()
