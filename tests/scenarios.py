"""Training runs that the multi-process tests launch as real scripts.

Lightning's launcher starts every other rank by re-running this script, exactly as a user's
script runs, so each scenario is a plain function of the command line. Each rank writes what
the test checks into ``--out`` (``rank{r}.pt``) and the test process reads it back.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint

import lightning_hybrid
from lightning_hybrid.app.data import DigitsDataModule
from lightning_hybrid.app.delays import DelayDistribution, InjectDelays
from lightning_hybrid.app.models import MLPClassifier


def trainer(strategy: Any, devices: int, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator=os.environ.get("SCENARIO_ACCELERATOR", "cpu"),
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(strategy=strategy, **options)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save(out: Path, rank: int, **results: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(results, out / f"rank{rank}.pt")


class SlowRank(Callback):
    """Slows every training step of ``slow_rank`` by ``delay`` seconds; records each rank's pid and exception."""

    def __init__(self, slow_rank: int = -1, delay: float = 0.0) -> None:
        self.slow_rank, self.delay = slow_rank, delay

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        (Path(os.environ["SCENARIO_OUT"]) / f"pid{trainer.global_rank}").write_text(str(os.getpid()))

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        (Path(os.environ["SCENARIO_OUT"]) / f"exception{trainer.global_rank}").write_text(type(exception).__name__)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_rank == self.slow_rank:
            time.sleep(self.delay)


class SetThreshold(Callback):
    """Rank ``rank`` alone sets K at its global step ``step``; the server applies it for every rank."""

    def __init__(self, rank: int, step: int, threshold: int) -> None:
        self.rank, self.step, self.threshold = rank, step, threshold

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            trainer.strategy.threshold = self.threshold


class BarrierEvery(Callback):
    """A collective on the default group every ``steps`` steps, as user callbacks do."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step % self.steps == 0:
            trainer.strategy.barrier()


class NaNOnce(MLPClassifier):
    """Rank ``nan_rank`` returns a NaN loss on its global step ``nan_step``. It also logs a per-step
    ``sync_dist=True`` value, which must not make workers wait for each other."""

    def __init__(self, nan_rank: int, nan_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_rank, self.nan_step = nan_rank, nan_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("loss_synced", loss, on_step=True, on_epoch=True, sync_dist=True)
        if self.global_rank == self.nan_rank and self.trainer.global_step == self.nan_step:
            loss = loss * float("nan")
        return loss


class ModelAtEvaluation(Callback):
    """Records the parameters every rank evaluates with (after the strategy's drain)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {}

    def _record(self, stage: str, module: pl.LightningModule) -> None:
        self.seen.setdefault(stage, []).append(torch.cat([p.detach().flatten() for p in module.parameters()]))

    def on_validation_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if args[1] == 0:
            self._record("validate", module)

    def on_test_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if args[1] == 0:
            self._record("test", module)

    def on_predict_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if args[1] == 0:
            self._record("predict", module)


class IndexedDigits(pl.LightningDataModule):
    """Digits whose batches carry each sample's index, loaded by a user-style DataLoader
    (a worker process, a custom collate function, drop_last=False)."""

    def __init__(self, num_workers: int = 1) -> None:
        super().__init__()
        self.inner, self.num_workers = DigitsDataModule(seed=3), num_workers

    def setup(self, stage: str) -> None:
        self.inner.setup(stage)
        x, y = self.inner.train_set.tensors
        self.train_set = torch.utils.data.TensorDataset(x, y, torch.arange(len(x)))

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=16, shuffle=True, num_workers=self.num_workers, collate_fn=collate_with_index
        )

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.inner.val_dataloader()


def collate_with_index(samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, index = (torch.stack(column) for column in zip(*samples))
    return x, y, index


class RecordIndices(MLPClassifier):
    """Records the sample indices each rank trains on, per epoch, and how many training steps it computed;
    writes them when fit ends or fails. A batch computed again (its gradient was dropped as too stale) is
    recorded once: its indices are kept by batch."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batches: dict[int, dict[int, list[int]]] = {}
        self.computed = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        self.batches.setdefault(self.current_epoch, {})[batch_idx] = index.tolist()
        self.computed += 1
        return super().training_step((x, y), batch_idx)

    def on_train_end(self) -> None:
        self.write()

    def write(self) -> None:
        out, phase = Path(os.environ["SCENARIO_OUT"]), os.environ["SCENARIO_PHASE"]
        seen = {epoch: [i for batch in batches.values() for i in batch] for epoch, batches in self.batches.items()}
        torch.save(seen, out / f"indices-{phase}-rank{self.global_rank}.pt")
        (out / f"computed-{phase}-rank{self.global_rank}").write_text(str(self.computed))


class SigtermAt(Callback):
    """Rank ``rank`` sends itself SIGTERM at its global step ``step`` (a preemption)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        module.write()


# --------------------------------------------------------------------------- scenarios
def ddp_equivalence(args: argparse.Namespace) -> None:
    """Lightning DDP, then hybrid_sgd with K = N, from the same seed and data."""
    model_kwargs: dict[str, Any] = dict(
        optimizer=args.optimizer, lr=args.lr, lr_step=1, batch_norm=args.batch_norm, weight_decay=args.weight_decay
    )
    fit_kwargs: dict[str, Any] = dict(max_epochs=args.epochs, limit_train_batches=args.batches)
    if args.optimizer == "sgd":
        fit_kwargs.update(gradient_clip_val=0.5, accumulate_grad_batches=2)
        if args.shard_server:  # no shard holds the whole gradient's norm
            fit_kwargs.update(gradient_clip_algorithm="value", gradient_clip_val=0.05)
    results = {}
    for name in ("ddp", "hybrid_sgd"):
        pl.seed_everything(args.seed)
        strategy = (
            "ddp"
            if name == "ddp"
            else lightning_hybrid.HybridSGDStrategy(
                threshold="sync", overlap_push=args.overlap_push, shard_server=args.shard_server
            )
        )
        run = trainer(strategy, args.devices, **fit_kwargs)
        model = MLPClassifier(**model_kwargs)
        run.fit(model, datamodule=DigitsDataModule(seed=args.seed))
        results[name] = weights(model)
        results[f"{name}_lr"] = run.optimizers[0].param_groups[0]["lr"]
        if name == "hybrid_sgd":
            results["version"] = strategy.version
            results["update_sizes"] = dict(strategy.update_sizes)
    save(args.out, int(os.environ.get("LOCAL_RANK", 0)), **results)


def straggler(args: argparse.Namespace) -> None:
    """One slowed worker under threshold K; optionally a NaN gradient and a max_time budget."""
    pl.seed_everything(args.seed)
    slow = SlowRank(slow_rank=args.slow_rank, delay=args.delay)
    evaluation = ModelAtEvaluation()
    strategy = lightning_hybrid.HybridSGDStrategy(
        threshold=args.threshold,
        pull_work=args.pull_work,
        nonfinite=args.nonfinite,
        peer_timeout=60,
        shard_server=args.shard_server,
    )
    extra: dict[str, Any] = {"max_time": args.max_time} if args.max_time else {}
    callbacks: list[Callback] = [slow, evaluation]
    if args.checkpoint_every:
        # a checkpoint and a user's barrier (any collective) in the middle of an epoch
        callbacks.append(ModelCheckpoint(args.out / "ckpts", every_n_train_steps=args.checkpoint_every, save_top_k=-1))
        callbacks.append(BarrierEvery(args.checkpoint_every))
        extra["enable_checkpointing"] = True
    if args.set_threshold:
        rank, step, k = (int(v) for v in args.set_threshold.split(":"))
        callbacks.append(SetThreshold(rank, step, k))
    run = trainer(
        strategy, args.devices, max_epochs=args.epochs, limit_train_batches=args.batches, callbacks=callbacks, **extra
    )
    model = NaNOnce(nan_rank=args.nan_rank, nan_step=args.nan_step, lr=args.lr)
    data = DigitsDataModule(seed=args.seed)
    run.fit(model, datamodule=data)
    run.test(model, datamodule=data, verbose=False)
    run.predict(model, datamodule=data)
    save(
        args.out,
        run.global_rank,
        version=strategy.version,
        threshold=strategy.threshold,
        update_sizes=dict(strategy.update_sizes),
        progress=strategy.progress,
        staleness=strategy.staleness.state_dict(),
        worker_staleness=strategy.worker_staleness.state_dict(),
        rejected=dict(strategy.rejected),
        evaluated=evaluation.seen,
        weights=weights(model),
        global_step=run.global_step,
    )


def resume(args: argparse.Namespace) -> None:
    """Checkpoints: ``--phase full`` trains straight through; ``first`` trains and saves; ``second`` resumes
    and trains on; ``restore`` only restores (its epochs are done) and saves again."""
    pl.seed_everything(args.seed)
    strategy = lightning_hybrid.HybridSGDStrategy(threshold=args.threshold, shard_server=args.shard_server)
    run = trainer(strategy, args.devices, max_epochs=args.epochs, limit_train_batches=args.batches)
    model = MLPClassifier(optimizer=args.optimizer, lr=args.lr, lr_step=1, batch_norm=True)
    ckpt = args.out / "epoch1.ckpt"
    resuming = args.phase in ("second", "restore")
    run.fit(model, datamodule=DigitsDataModule(seed=args.seed), ckpt_path=ckpt if resuming else None)
    if args.phase in ("first", "restore"):
        run.save_checkpoint(ckpt if args.phase == "first" else args.out / "restored.ckpt")
    save(
        args.out / args.phase,
        run.global_rank,
        weights=weights(model),
        version=strategy.version,
        threshold=strategy.threshold,
        lr=run.optimizers[0].param_groups[0]["lr"],
        optimizer=run.optimizers[0].state_dict() if run.is_global_zero else None,
    )


def pulled(args: argparse.Namespace) -> None:
    """Pulled work with slowed workers; ``--phase preempt`` stops by SIGTERM at rank 1's step
    ``--nan-step`` and checkpoints, ``--phase resume`` continues from that checkpoint."""
    os.environ["SCENARIO_PHASE"] = args.phase
    pl.seed_everything(args.seed)
    ckpt = args.out / "preempted.ckpt"
    callbacks: list[Callback] = [SlowRank(slow_rank=args.slow_rank, delay=args.delay)]
    if args.phase == "preempt":
        callbacks += [SigtermAt(rank=1, step=args.nan_step), OnExceptionCheckpoint(args.out, "preempted")]
    if args.phase == "twice":  # a first, separate trainer in the same processes before the one recorded
        first = trainer(lightning_hybrid.HybridSGDStrategy(threshold=args.threshold), args.devices, max_epochs=1)
        first.fit(RecordIndices(lr=args.lr), datamodule=IndexedDigits())
    strategy = lightning_hybrid.HybridSGDStrategy(
        threshold=args.threshold,
        pull_work=args.pull_work,
        max_staleness=args.max_staleness,
        shard_server=args.shard_server,
    )
    extra: dict[str, Any] = {"enable_checkpointing": args.phase in ("preempt", "loops")}
    if args.phase == "loops":  # Lightning's own loop features: max_steps, progress bar, epoch-end checkpoints
        callbacks.append(ModelCheckpoint(args.out / "ckpts", save_top_k=-1))
        extra.update(max_steps=args.batches, enable_progress_bar=True)
    run = trainer(strategy, args.devices, max_epochs=args.epochs, callbacks=callbacks, **extra)
    model = RecordIndices(lr=args.lr)
    run.fit(model, datamodule=IndexedDigits(), ckpt_path=ckpt if args.phase == "resume" else None)
    save(
        args.out / args.phase,
        run.global_rank,
        version=strategy.version,
        dropped=dict(strategy.dropped),
        global_step=run.global_step,
        epoch=run.current_epoch,
        weights=weights(model),
    )


def telemetry(args: argparse.Namespace) -> None:
    """ThresholdScheduler with a linear schedule from 1 to N over ``--epochs - 1`` epochs, an offline
    WandbLogger and a CSVLogger side by side."""
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    pl.seed_everything(args.seed)
    schedule = lightning_hybrid.LinearSchedule(start="async", end="sync", length=args.epochs - 1)
    loggers = [WandbLogger(project="hybrid-tests", save_dir=str(args.out), offline=True), CSVLogger(args.out)]
    callbacks: list[Callback] = [lightning_hybrid.ThresholdScheduler(schedule), SlowRank(args.slow_rank, args.delay)]
    run = trainer(
        lightning_hybrid.HybridSGDStrategy(threshold="async"),
        args.devices,
        max_epochs=args.epochs,
        logger=loggers,
        callbacks=callbacks,
        limit_train_batches=args.batches,
    )
    run.fit(MLPClassifier(lr=args.lr), datamodule=DigitsDataModule(seed=args.seed))


def mismatched_model(args: argparse.Namespace) -> None:
    """Every rank builds a different model: setup must refuse it."""
    run = trainer(lightning_hybrid.HybridSGDStrategy(), args.devices, max_epochs=1)
    run.fit(MLPClassifier(hidden=16 + run.global_rank), datamodule=DigitsDataModule())


def lost_worker(args: argparse.Namespace) -> None:
    """Rank ``--slow-rank`` kills itself with SIGKILL at its step 5 (``--delay 0``) or hangs for ``--delay`` s."""

    class Killer(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *rest: Any) -> None:
            if trainer.global_rank == args.slow_rank and trainer.global_step == 5:
                if args.delay:
                    time.sleep(args.delay)
                else:
                    os.kill(os.getpid(), signal.SIGKILL)

    run = trainer(
        lightning_hybrid.HybridSGDStrategy(
            threshold=args.threshold, peer_timeout=args.peer_timeout, shard_server=args.shard_server
        ),
        args.devices,
        max_epochs=args.epochs,
        callbacks=[Killer()],
    )
    run.fit(MLPClassifier(), datamodule=DigitsDataModule())


def nodes(args: argparse.Namespace) -> None:
    """Launched once per node (by torchrun or by hand): ``num_nodes`` x ``devices`` workers; optionally
    slowed, checkpointed every ``--checkpoint-every`` steps, or resumed from ``--resume``."""
    pl.seed_everything(args.seed)
    strategy = lightning_hybrid.HybridSGDStrategy(
        threshold=args.threshold, peer_timeout=args.peer_timeout, timeout=timedelta(seconds=args.pg_timeout)
    )
    callbacks: list[Callback] = [SlowRank(slow_rank=args.slow_rank, delay=args.delay)]
    if args.checkpoint_every:
        callbacks.append(ModelCheckpoint(args.out / "ckpts", every_n_train_steps=args.checkpoint_every, save_top_k=-1))
    run = trainer(
        strategy,
        args.devices,
        num_nodes=args.num_nodes,
        max_epochs=args.epochs,
        limit_train_batches=args.batches,
        callbacks=callbacks,
        enable_checkpointing=bool(args.checkpoint_every),
    )
    model = MLPClassifier(lr=args.lr)
    run.fit(model, datamodule=DigitsDataModule(seed=args.seed), ckpt_path=args.resume)
    save(
        args.out,
        run.global_rank,
        world_size=run.world_size,
        node_rank=run.node_rank,
        version=strategy.version,
        global_step=run.global_step,
        update_sizes=dict(strategy.update_sizes),
        weights=weights(model),
    )


class RandomThreshold(Callback):
    """Rank 0 sets a random K every ``every`` steps; also samples this process's resident memory."""

    def __init__(self, every: int, seed: int) -> None:
        self.every, self.random = every, random.Random(seed)
        self.rss_mib: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == 0 and trainer.global_step % self.every == 0:
            trainer.strategy.threshold = self.random.randint(1, trainer.world_size)

    def on_train_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        with open("/proc/self/statm") as statm:
            self.rss_mib.append(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)


def soak(args: argparse.Namespace) -> None:
    """Minutes of training: random per-step delays (heavy-tailed on a slowed rank), K changed at random
    every 3 steps, pulled work; every rank records its pushes and its memory at each epoch end."""
    pl.seed_everything(args.seed)
    strategy = lightning_hybrid.HybridSGDStrategy(
        threshold="async", pull_work=True, peer_timeout=60, shard_server=args.shard_server
    )
    delays = InjectDelays(
        ranks=[args.devices - 1], slowdown=2.0, extra=DelayDistribution("pareto", 0.002, 1.5), seed=args.seed
    )
    changes = RandomThreshold(every=3, seed=args.seed)
    run = trainer(strategy, args.devices, max_time=args.max_time, max_epochs=-1, callbacks=[delays, changes])
    model = MLPClassifier(lr=args.lr)
    run.fit(model, datamodule=DigitsDataModule(seed=args.seed))
    save(
        args.out,
        run.global_rank,
        pushes=strategy.steps,
        epochs=run.current_epoch,
        rss_mib=changes.rss_mib,
        update_sizes=dict(strategy.update_sizes),
        rejected=dict(strategy.rejected),
        version=strategy.version,
        weights=weights(model),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-staleness", type=int, default=None)
    parser.add_argument("--batch-norm", action="store_true")
    parser.add_argument("--overlap-push", action="store_true")
    parser.add_argument("--shard-server", action="store_true")
    parser.add_argument("--threshold", default="sync")
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--nan-rank", type=int, default=-1)
    parser.add_argument("--nan-step", type=int, default=-1)
    parser.add_argument("--nonfinite", default="skip")
    parser.add_argument("--max-time", default=None)
    parser.add_argument("--phase", default="full")
    parser.add_argument("--peer-timeout", type=float, default=60.0)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", default=None, help="a checkpoint to resume from")
    parser.add_argument("--pg-timeout", type=float, default=1800.0, help="seconds, Lightning's collectives")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--set-threshold", default="", help="RANK:STEP:K")
    parser.add_argument("--pull-work", default=None, type=lambda v: {"true": True, "false": False}[v])
    args = parser.parse_args()
    if args.threshold.isdigit():
        args.threshold = int(args.threshold)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["SCENARIO_OUT"] = str(args.out)
    os.environ["SCENARIO_ACCELERATOR"] = args.accelerator
    os.environ.setdefault("SCENARIO_PHASE", args.phase)
    globals()[args.scenario](args)


if __name__ == "__main__":
    main()
