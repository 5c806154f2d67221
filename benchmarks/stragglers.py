"""Epoch time with one straggler: DDP, static async, and pulled-work async and hybrid, side by side.

    python benchmarks/stragglers.py                      # 4 CPU workers, rank 3 three times slower
    python benchmarks/stragglers.py --workers 4 --base-delay 0.02 --epochs 4

Every worker sleeps ``base-delay`` seconds per step on top of its compute, and the slow one sleeps so that
its whole step before the push (compute plus sleep) takes ``factor`` times as long (the library's
:class:`InjectDelays`): sleeping simulates heterogeneous machines without needing more cores than this
machine has. Each
configuration is a real multi-process Lightning run on scikit-learn's digits (1,437 training samples,
batch 32); epoch times are rank 0's training time per epoch, averaged over the epochs after the first.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from launch import run_configuration, write_result

import lightning_hybrid
from lightning_hybrid.app.data import DigitsDataModule
from lightning_hybrid.app.delays import DelayDistribution, InjectDelays
from lightning_hybrid.app.models import MLPClassifier

CONFIGURATIONS = {  # name: (strategy, threshold, pull_work, shard_server)
    "ddp": ("ddp", None, None, False),
    "async, static shards": ("hybrid_sgd", "async", False, False),
    "async, pulled work": ("hybrid_sgd", "async", True, False),
    "hybrid K=N/2, pulled": ("hybrid_sgd", "50%", True, False),
    "sync K=N, pulled": ("hybrid_sgd", "sync", True, False),
    "async, pulled, sharded": ("hybrid_sgd", "async", True, True),
    "hybrid K=N/2, pulled, sharded": ("hybrid_sgd", "50%", True, True),
}


class EpochTimer(pl.Callback):
    """Times each epoch's training and counts this rank's batches."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.batches = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.batches += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._start)


def run_one(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    name, threshold, pull, sharded = CONFIGURATIONS[args.configuration]
    strategy: Any = (
        name
        if name == "ddp"
        else lightning_hybrid.HybridSGDStrategy(threshold=threshold, pull_work=pull, shard_server=sharded)
    )
    timer = EpochTimer()
    straggle = InjectDelays(
        ranks=[args.workers - 1], slowdown=args.factor, extra=DelayDistribution("fixed", args.base_delay)
    )
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.workers,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, straggle],
    )
    trainer.fit(MLPClassifier(lr=0.05), datamodule=DigitsDataModule(batch_size=32))
    result = {
        "epoch_seconds": timer.epoch_seconds,
        "batches": timer.batches,
        "val_acc": float(trainer.callback_metrics["val_acc"]),
    }
    write_result(args.out, trainer.global_rank, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--configuration", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--base-delay", type=float, default=0.02, help="seconds per step on a normal worker")
    parser.add_argument("--factor", type=float, default=3.0, help="how much slower the last rank is")
    args = parser.parse_args()
    if args.run:
        run_one(args)
        return

    print(
        f"{args.workers} CPU workers, rank {args.workers - 1} {args.factor:g}x slower (every rank sleeps "
        f"{args.base_delay * 1000:g} ms per step on top of its compute; rank {args.workers - 1}'s compute and sleep "
        f"take {args.factor:g}x as long); digits, 1,437 samples per epoch; "
        f"{args.epochs} epochs; {os.cpu_count()} CPU cores"
    )
    header = f"{'configuration':<29} {'epoch s':>8} {'samples/s':>10} {'vs DDP':>7} {'batches/epoch per rank':>24} {'val acc':>8}"
    print(header)
    print("-" * len(header))
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        for configuration in CONFIGURATIONS:
            ranks = run_configuration(
                __file__,
                Path(tmp, configuration.replace(" ", "_").replace(",", "").replace("=", "").replace("/", "")),
                args.workers,
                "--configuration",
                configuration,
                "--epochs",
                str(args.epochs),
                "--base-delay",
                str(args.base_delay),
                "--factor",
                str(args.factor),
            )
            later = ranks[0]["epoch_seconds"][1:] or ranks[0]["epoch_seconds"]
            epoch = sum(later) / len(later)
            rate = 1437 / epoch
            baseline = baseline or rate
            batches = "/".join(f"{r['batches'] / args.epochs:g}" for r in ranks)
            print(
                f"{configuration:<29} {epoch:>8.3f} {rate:>10.0f} {rate / baseline:>6.2f}x {batches:>24} {ranks[0]['val_acc']:>8.3f}"
            )


if __name__ == "__main__":
    main()
