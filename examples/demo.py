"""Demo: hybrid parameter-server SGD with several CPU worker processes on scikit-learn's digits.

python examples/demo.py --workers 3 --threshold 2 --epochs 5
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch

import lightning_hybrid  # noqa: F401  (registers strategy="hybrid_sgd")
from lightning_hybrid.data import DigitsDataModule
from lightning_hybrid.models import MLPClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3, help="worker processes (N)")
    parser.add_argument("--threshold", default="2", help="K: a count, 'sync', 'async' or a percentage such as '50%%'")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    threshold = int(args.threshold) if args.threshold.isdigit() else args.threshold

    torch.set_num_threads(1)
    pl.seed_everything(args.seed, workers=True)
    strategy = lightning_hybrid.HybridSGDStrategy(threshold=threshold)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.workers,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = MLPClassifier(lr=0.05)
    data = DigitsDataModule(batch_size=32, seed=args.seed)
    trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics  # from the validation after the last epoch, synced over ranks
    if trainer.is_global_zero:
        stats = strategy.staleness
        sizes = dict(sorted(strategy.update_sizes.items()))
        print(f"\nhybrid_sgd on digits: {args.workers} worker processes (pid {os.getpid()} is rank 0 and the server)")
        print(f"  threshold K          {strategy.threshold} of {args.workers}")
        print(f"  updates applied      {strategy.version}")
        print(f"  gradients per update {sizes}")
        print(
            f"  staleness            mean {stats.mean:.2f}, max {stats.max}, counts {dict(sorted(stats.counts.items()))}"
        )
        print(f"  validation           loss {metrics['val_loss']:.4f}, accuracy {metrics['val_acc']:.4f}")


if __name__ == "__main__":
    main()
