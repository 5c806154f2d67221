"""Steps per second of hybrid_sgd (K = N and K = 1) against Lightning's DDP, side by side in one run.

    python benchmarks/throughput.py                      # 2 and 3 CPU workers, a 1.06M-parameter MLP
    python benchmarks/throughput.py --workers 2 --steps 100

Every configuration is a real multi-process Lightning run (this script relaunched with ``--run``).
Each rank times its steps after a warm-up; the table shows the mean per-rank step rate, the
workers' summed rate, the ratio to DDP with the same worker count, and on the server's rank the
time per update (mean gradient, optimizer step, parameter snapshot) and the bytes moved per step.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from launch import run_configuration, write_result
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_hybrid

FEATURES, CLASSES = 256, 10


class BenchmarkMLP(pl.LightningModule):
    """256 -> 1024 -> 768 -> 10: 1,058,058 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(FEATURES, 1024), nn.ReLU(), nn.Linear(1024, 768), nn.ReLU(), nn.Linear(768, CLASSES)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.times.append(time.perf_counter())

    def rate(self) -> float:
        timed = self.times[self.warmup :]
        return (len(timed) - 1) / (timed[-1] - timed[0])


def run_one(args: argparse.Namespace) -> None:
    """One configuration; Lightning's launcher starts the other ranks by re-running this command."""
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = TensorDataset(
        torch.randn(64 * args.steps * args.workers, FEATURES),
        torch.randint(0, CLASSES, (64 * args.steps * args.workers,)),
    )
    if args.strategy == "ddp":
        strategy: Any = "ddp"
    else:
        strategy = lightning_hybrid.HybridSGDStrategy(threshold=int(args.strategy.split("=")[1]))
    timer = StepTimer(warmup=min(10, args.steps // 4))
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.workers,
        max_epochs=1,
        limit_train_batches=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    model = BenchmarkMLP()
    trainer.fit(model, DataLoader(data, batch_size=64))
    result: dict[str, Any] = {"rate": timer.rate()}
    if args.strategy != "ddp" and trainer.is_global_zero:
        progress = strategy.progress
        result["updates"] = progress["version"]
        result["update_ms"] = 1000 * progress["update_seconds"] / max(progress["version"], 1)
    write_result(args.out, trainer.global_rank, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--steps", type=int, default=80, help="steps per worker")
    args = parser.parse_args()
    if args.run:
        args.workers = args.workers[0]
        run_one(args)
        return

    import tempfile

    numel = sum(p.numel() for p in BenchmarkMLP().parameters())
    print(
        f"model: {numel:,} parameters ({numel * 4 / 2**20:.1f} MiB float32); {args.steps} steps per worker; "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores"
    )
    header = f"{'workers':>7}  {'strategy':<14} {'steps/s per rank':>16} {'steps/s all':>11} {'vs DDP':>7} {'server ms/update':>16} {'MiB moved/step':>14}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            baseline = None
            for strategy in ("ddp", f"hybrid_sgd K={workers}", "hybrid_sgd K=1"):
                flag = "ddp" if strategy == "ddp" else f"threshold={strategy.split('=')[1]}"
                ranks = run_configuration(
                    __file__, Path(tmp, f"{workers}-{flag}"), workers, "--strategy", flag, "--steps", str(args.steps)
                )
                per_rank = sum(r["rate"] for r in ranks) / workers
                total = per_rank * workers
                baseline = baseline or total
                server = ranks[0]
                update_ms = f"{server['update_ms']:.2f}" if "update_ms" in server else "-"
                # a remote worker sends a gradient and receives parameters: 2 x model bytes per step
                moved = "-" if strategy == "ddp" else f"{2 * numel * 4 * (workers - 1) / workers / 2**20:.1f}"
                print(
                    f"{workers:>7}  {strategy:<14} {per_rank:>16.1f} {total:>11.1f} {total / baseline:>6.2f}x {update_ms:>16} {moved:>14}"
                )


if __name__ == "__main__":
    main()
