"""Demo: hybrid parameter-server SGD with several CPU worker processes on scikit-learn's digits.

K rises from 1 (asynchronous) to N (synchronous) over the epochs (ThresholdScheduler with a linear
schedule); the telemetry goes to an offline W&B run (no account needed; WANDB_MODE=online to upload).

    python examples/demo.py --workers 3 --epochs 5
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch

import lightning_hybrid
from lightning_hybrid.app.data import DigitsDataModule
from lightning_hybrid.app.models import MLPClassifier
from lightning_hybrid.app.wandb_run import wandb_logger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3, help="worker processes (N)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", default="demo_runs", help="where the W&B run is written")
    args = parser.parse_args()

    torch.set_num_threads(1)
    pl.seed_everything(args.seed, workers=True)
    scheduler = lightning_hybrid.ThresholdScheduler("linear")  # async to sync over the run's epochs
    strategy = lightning_hybrid.HybridSGDStrategy(threshold="async")
    offline = os.environ.get("WANDB_MODE", "offline") != "online"
    logger = wandb_logger(project="lightning-hybrid-demo", save_dir=args.save_dir, offline=offline)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.workers,
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[scheduler],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MLPClassifier(lr=0.05), datamodule=DigitsDataModule(batch_size=32, seed=args.seed))
    if trainer.is_global_zero:
        metrics = trainer.callback_metrics  # from the validation after the last epoch, synced over ranks
        stats, sizes = strategy.staleness, dict(sorted(strategy.update_sizes.items()))
        print(f"\nhybrid_sgd on digits: {args.workers} worker processes (rank 0, pid {os.getpid()}, hosts the server)")
        print(f"  threshold K          {scheduler.schedule} -> now {strategy.threshold} of {args.workers}")
        print(f"  updates applied      {strategy.version}")
        print(f"  gradients per update {sizes}")
        print(
            f"  staleness            mean {stats.mean:.2f}, max {stats.max}, counts {dict(sorted(stats.counts.items()))}"
        )
        print(f"  validation           loss {metrics['val_loss']:.4f}, accuracy {metrics['val_acc']:.4f}")
        run_dir = os.path.dirname(logger.experiment.dir)
        print(f"  W&B run              {run_dir} ({'offline' if offline else 'online'}; view: wandb leet {run_dir})")


if __name__ == "__main__":
    main()
