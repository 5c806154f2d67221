"""Training runs that the multi-process tests launch as real scripts.

Lightning's launcher starts every other rank by re-running this script with the same command line,
exactly as a user's script runs, so each scenario is a plain function of the command line: a
subcommand whose arguments are the fields of its own dataclass (``python tests/scenarios.py
SCENARIO --help`` lists them). Each rank writes what the test checks into ``--out`` (``rank{r}.pt``)
and the test process reads it back.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import time
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from pytorch_lightning.strategies import DDPStrategy

import lightning_hybrid
from lightning_hybrid.app.data import DigitsDataModule
from lightning_hybrid.app.delays import DelayDistribution, InjectDelays
from lightning_hybrid.app.models import MLPClassifier
from lightning_hybrid.elastic import restart_round


def trainer(strategy: Any, args: Launch, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
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


def stamp_fault(out: Path) -> None:
    """Write the wall-clock moment of an injected fault to ``out/fault_at``: a test bounds the time from the fault to
    the end of every rank, not from launch (starting three processes under a loaded machine takes tens of seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "fault_at").exists():  # the first time: a step that runs again does not move it
        (out / "fault_at").write_text(repr(time.time()))


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
    """Rank ``nan_rank``'s gradient on its global step ``nan_step`` holds NaN in the first parameter only (so in one
    shard's slice of a sharded server; the loss is NaN too). It also logs a per-step ``sync_dist=True`` value, which
    must not make workers wait for each other."""

    def __init__(self, nan_rank: int, nan_step: int, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_rank, self.nan_step, self.out = nan_rank, nan_step, out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("loss_synced", loss, on_step=True, on_epoch=True, sync_dist=True)
        if self.global_rank == self.nan_rank and self.trainer.global_step == self.nan_step:
            stamp_fault(self.out)
            loss = loss + float("nan") * next(self.parameters()).sum()
        return loss


class SkippedBranch(MLPClassifier):
    """An MLP with a side branch that rank r leaves out of its training steps whose optimizer step s has
    ``s % every <= r``: every rank leaves it out when ``s % every == 0`` (no gradient uses it), the higher ranks at
    the next steps (some use it). Its parameters come last, so a streamed gradient's first chunk waits for them."""

    def __init__(self, every: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every = every
        self.branch = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if self.training and self.trainer.global_step % self.every <= self.global_rank:
            return logits
        return logits + self.branch(x.flatten(1))


class FirstLayerFrozenIn(MLPClassifier):
    """An MLP whose first layer is frozen in the epochs ``frozen`` (``requires_grad`` off from such an epoch's start,
    on again at the next one's), as Lightning's BaseFinetuning freezes and unfreezes. ``detach``: the same for DDP,
    whose reducer keeps the parameters that required grad when it was built (an unfrozen layer would train apart on
    every rank, Lightning issue 20340): the layer stays trainable and its output is detached in those epochs, so
    that it gets no gradient (with ``find_unused_parameters``)."""

    def __init__(self, frozen: tuple[int, ...], detach: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frozen, self.detach = frozen, detach
        self.net[1].requires_grad_(detach or 0 not in frozen)  # as when fit starts

    def on_train_epoch_start(self) -> None:
        if not self.detach:
            self.net[1].requires_grad_(self.current_epoch not in self.frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detach and self.training and self.current_epoch in self.frozen:
            return self.net[2:](self.net[:2](x).detach())  # [Flatten, Linear] and the rest
        return self.net(x)


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

    def __init__(self, read_estimated_steps: bool = False, one_cycle: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batches: dict[int, dict[int, list[int]]] = {}
        self.computed = 0
        self.read_estimated_steps, self.one_cycle = read_estimated_steps, one_cycle

    def configure_optimizers(self) -> Any:
        if self.read_estimated_steps:  # as a OneCycleLR is sized
            assert self.trainer.estimated_stepping_batches > 0
        optimizer = super().configure_optimizers()
        if not self.one_cycle:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)  # DDP's steps, no headroom
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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


class DieInFirstRound(Callback):
    """Rank ``rank`` SIGKILLs itself at its global step ``step``, in torchrun's first round only (a lost worker
    that a restart replaces); with ``node`` its torchrun agent first (the whole node is lost)."""

    def __init__(self, rank: int, step: int, node: bool = False) -> None:
        self.rank, self.step, self.node = rank, step, node

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if restart_round() == 0 and trainer.global_rank == self.rank and trainer.global_step == self.step:
            (Path(os.environ["SCENARIO_OUT"]) / "killed-at").write_text(str(time.time()))
            if self.node:
                os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


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


# --------------------------------------------------------------------------- command line
def option(default: Any = MISSING, help: str | None = None) -> Any:
    """A scenario argument with the text ``--help`` shows for it; no default: a required one."""
    return field(default=default, metadata={"help": help})


def threshold_spec(value: str) -> int | str:
    """K as the strategy takes it: a number of gradients, or a spec such as "sync", "async", "50%"."""
    return int(value) if value.isdigit() else value


def floats(value: str) -> tuple[float, ...]:
    """Comma-separated numbers, e.g. ``--shard-weights 1,2,0.5``."""
    return tuple(float(v) for v in value.split(","))


def ints(value: str) -> tuple[int, ...]:
    """Comma-separated whole numbers, e.g. ``--frozen-epochs 0,2``."""
    return tuple(int(v) for v in value.split(","))


def rank_step_k(value: str) -> tuple[int, int, int]:
    rank, step, k = (int(v) for v in value.split(":"))
    return rank, step, k


def rank_step(value: str) -> tuple[int, int]:
    rank, step = (int(v) for v in value.split(":"))
    return rank, step


Threshold = Annotated[int | str, threshold_spec]
ThresholdChange = Annotated[tuple[int, int, int], rank_step_k]
RankStep = Annotated[tuple[int, int], rank_step]


@dataclass(kw_only=True)
class Launch:
    """What every scenario takes: where each rank writes its results, and this node's processes."""

    out: Path = option(help="each rank writes rank{r}.pt (and what the scenario records) here")
    devices: int = option(2, "processes on this node (Lightning's devices)")
    num_nodes: int = option(1, "nodes (Lightning's num_nodes): launch this once per node, e.g. by torchrun")
    accelerator: str = "cpu"


@dataclass(kw_only=True)
class Seeded(Launch):
    """A run that trains: the seed of the weights and the data, and the model's learning rate."""

    seed: int = 7
    lr: float = 0.05


@dataclass(kw_only=True)
class Epochs(Seeded):
    epochs: int = option(2, "max_epochs")


@dataclass(kw_only=True)
class Batches(Epochs):
    batches: int | None = option(None, "limit_train_batches")


@dataclass(kw_only=True)
class Slowed:
    """One worker slower than the others (the SlowRank callback)."""

    slow_rank: int = option(-1, "the rank slowed at every training step (-1: none)")
    delay: float = option(0.0, "seconds the slowed rank sleeps before each training step")


@dataclass(kw_only=True)
class OneGpu:
    """What a bare machine with one GPU needs (tests/test_gpu.py): two ranks on one device, no scikit-learn."""

    process_group_backend: str | None = option(
        None, "Lightning's default group's backend; gloo lets two ranks share a GPU (nccl, the GPU default, refuses)"
    )
    random_data: bool = option(False, "random data of the digits' shapes (digits needs scikit-learn)")


class RandomDigits(DigitsDataModule):
    """As many samples of the digits' shapes (64 features, 10 classes) as digits has, drawn from the seed."""

    def load(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        x, y = torch.randn(1797, 64, generator=generator), torch.randint(0, 10, (1797,), generator=generator)
        cut = int(len(x) * (1 - self.val_fraction))
        return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def digits(args: OneGpu, seed: int) -> DigitsDataModule:
    return (RandomDigits if args.random_data else DigitsDataModule)(seed=seed)


SCENARIOS: dict[str, tuple[Callable[[Any], None], type[Launch]]] = {}


def scenario(function: Callable[[Any], None]) -> Callable[[Any], None]:
    """Registers ``function`` as a subcommand taking the dataclass its ``args`` is annotated with."""
    SCENARIOS[function.__name__] = function, typing.get_type_hints(function)["args"]
    return function


def add_arguments(parser: argparse.ArgumentParser, spec: type[Launch]) -> None:
    """One ``--kebab-case`` option per field of ``spec``: a flag for a bool, choices for a Literal, the
    parser an Annotated type carries or the field's own type for the rest; required where it has no default."""
    hints = typing.get_type_hints(spec, include_extras=True)
    for f in fields(spec):
        flag, kind, text = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata.get("help")
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=text)
            continue
        if type(None) in typing.get_args(kind):  # X | None: an X, None when absent
            (kind,) = (k for k in typing.get_args(kind) if k is not type(None))
        if typing.get_origin(kind) is Literal:
            parse: dict[str, Any] = {"choices": typing.get_args(kind)}
        else:
            parse = {"type": kind.__metadata__[0] if typing.get_origin(kind) is Annotated else kind}
        if f.default is MISSING:
            parser.add_argument(flag, required=True, help=text, **parse)
        else:
            text = " ".join(filter(None, (text, "(default: %(default)s)")))
            parser.add_argument(flag, default=f.default, help=text, **parse)


# --------------------------------------------------------------------------- scenarios
@dataclass(kw_only=True)
class DdpEquivalence(OneGpu, Batches):
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    batch_norm: bool = False
    overlap_push: bool = False
    overlap_answers: bool = False
    shard_server: bool = False
    shard_weights: Annotated[tuple[float, ...], floats] | None = option(None, "each rank's share, e.g. 1,2,0.5")
    frozen_first_layer: bool = option(False, "its requires_grad off, still in the optimizer (weight decay skips it)")
    skip_branch_every: int = option(
        0, "a side branch unused at some steps (see SkippedBranch); DDP then finds unused parameters (0: none)"
    )
    frozen_epochs: Annotated[tuple[int, ...], ints] | None = option(
        None,
        "epochs in which the first layer is frozen, e.g. 0,2 (see FirstLayerFrozenIn); DDP finds unused parameters",
    )


@scenario
def ddp_equivalence(args: DdpEquivalence) -> None:
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
            DDPStrategy(
                process_group_backend=args.process_group_backend,
                find_unused_parameters=args.skip_branch_every > 0 or bool(args.frozen_epochs),
            )
            if name == "ddp"
            else lightning_hybrid.HybridSGDStrategy(
                threshold="sync",
                overlap_push=args.overlap_push,
                overlap_answers=args.overlap_answers,
                shard_server=args.shard_server,
                shard_weights=args.shard_weights,
                process_group_backend=args.process_group_backend,
            )
        )
        run = trainer(strategy, args, **fit_kwargs)
        if args.frozen_epochs:
            model: MLPClassifier = FirstLayerFrozenIn(args.frozen_epochs, detach=name == "ddp", **model_kwargs)
        elif args.skip_branch_every:
            model = SkippedBranch(args.skip_branch_every, **model_kwargs)
        else:
            model = MLPClassifier(**model_kwargs)
        results["initial"] = weights(model)
        if args.frozen_first_layer:
            next(m for m in model.net if isinstance(m, torch.nn.Linear)).requires_grad_(False)
        run.fit(model, datamodule=digits(args, args.seed))
        results[name] = weights(model)
        results[f"{name}_lr"] = run.optimizers[0].param_groups[0]["lr"]
        if name == "hybrid_sgd":
            results["version"] = strategy.version
            results["update_sizes"] = dict(strategy.update_sizes)
            results["updates_stepped_ahead"] = strategy.progress.get("updates_stepped_ahead")
    save(args.out, run.global_rank, **results)


@dataclass(kw_only=True)
class Straggler(OneGpu, Slowed, Batches):
    threshold: Threshold = "sync"
    static_shards: bool = option(
        False, "pull_work=False: Lightning's equal static shards (else the strategy's default)"
    )
    nonfinite: Literal["skip", "stop"] = "skip"
    shard_server: bool = False
    overlap_push: bool = False
    overlap_answers: bool = False
    pipeline_pushes: bool = False
    answer_dtype: str | None = option(None, "HybridSGDStrategy(answer_dtype=...), e.g. bfloat16")
    push_dtype: str | None = option(None, "HybridSGDStrategy(push_dtype=...), e.g. bfloat16")
    nan_rank: int = option(-1, "the rank whose loss is NaN once")
    nan_step: int = option(-1, "the global step of that rank at which its loss is NaN")
    max_time: str | None = option(None, "Trainer(max_time), DD:HH:MM:SS")
    checkpoint_every: int | None = option(None, "a ModelCheckpoint and a barrier every this many steps")
    set_threshold: ThresholdChange | None = option(None, "RANK:STEP:K: rank RANK alone sets K at its global step STEP")


@scenario
def straggler(args: Straggler) -> None:
    """One slowed worker under threshold K; optionally a NaN gradient and a max_time budget."""
    pl.seed_everything(args.seed)
    slow = SlowRank(slow_rank=args.slow_rank, delay=args.delay)
    evaluation = ModelAtEvaluation()
    strategy = lightning_hybrid.HybridSGDStrategy(
        threshold=args.threshold,
        pull_work=False if args.static_shards else None,
        nonfinite=args.nonfinite,
        peer_timeout=60,
        shard_server=args.shard_server,
        overlap_push=args.overlap_push,
        overlap_answers=args.overlap_answers,
        pipeline_pushes=args.pipeline_pushes,
        answer_dtype=args.answer_dtype,
        push_dtype=args.push_dtype,
        process_group_backend=args.process_group_backend,
    )
    extra: dict[str, Any] = {"max_time": args.max_time} if args.max_time else {}
    callbacks: list[Callback] = [slow, evaluation]
    if args.checkpoint_every:
        # a checkpoint and a user's barrier (any collective) in the middle of an epoch
        callbacks.append(ModelCheckpoint(args.out / "ckpts", every_n_train_steps=args.checkpoint_every, save_top_k=-1))
        callbacks.append(BarrierEvery(args.checkpoint_every))
        extra["enable_checkpointing"] = True
    if args.set_threshold:
        callbacks.append(SetThreshold(*args.set_threshold))
    run = trainer(
        strategy, args, max_epochs=args.epochs, limit_train_batches=args.batches, callbacks=callbacks, **extra
    )
    model = NaNOnce(nan_rank=args.nan_rank, nan_step=args.nan_step, out=args.out, lr=args.lr)
    data = digits(args, args.seed)
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


@dataclass(kw_only=True)
class Resume(Batches):
    phase: Literal["full", "first", "second", "restore"] = "full"
    threshold: Threshold = "sync"
    optimizer: str = "sgd"
    shard_server: bool = False
    overlap_answers: bool = option(False, "with overlap_push: a striped sharded server")


@scenario
def resume(args: Resume) -> None:
    """Checkpoints: ``--phase full`` trains straight through; ``first`` trains and saves; ``second`` resumes
    and trains on; ``restore`` only restores (its epochs are done) and saves again."""
    pl.seed_everything(args.seed)
    strategy = lightning_hybrid.HybridSGDStrategy(
        threshold=args.threshold,
        shard_server=args.shard_server,
        overlap_push=args.overlap_answers,
        overlap_answers=args.overlap_answers,
    )
    run = trainer(strategy, args, max_epochs=args.epochs, limit_train_batches=args.batches)
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


@dataclass(kw_only=True)
class Pulled(Slowed, Epochs):
    phase: Literal["full", "twice", "preempt", "resume", "loops"] = "full"
    threshold: Threshold = "sync"
    max_staleness: int | None = None
    shard_server: bool = False
    sigterm_step: int = option(-1, "phase preempt: rank 1 sends itself SIGTERM at this global step")
    max_steps: int = option(-1, "phase loops: Trainer(max_steps)")
    estimated_steps: bool = option(
        False, "configure_optimizers reads trainer.estimated_stepping_batches (it loads the train loader early)"
    )
    one_cycle: bool = option(False, "a OneCycleLR stepped per step, of estimated_stepping_batches steps")


@scenario
def pulled(args: Pulled) -> None:
    """Pulled work with slowed workers; ``--phase preempt`` stops by SIGTERM at rank 1's step
    ``--sigterm-step`` and checkpoints, ``--phase resume`` continues from that checkpoint."""
    os.environ["SCENARIO_PHASE"] = args.phase
    pl.seed_everything(args.seed)
    ckpt = args.out / "preempted.ckpt"
    callbacks: list[Callback] = [SlowRank(slow_rank=args.slow_rank, delay=args.delay)]
    if args.phase == "preempt":
        callbacks += [SigtermAt(rank=1, step=args.sigterm_step), OnExceptionCheckpoint(args.out, "preempted")]
    if args.phase == "twice":  # a first, separate trainer in the same processes before the one recorded
        first = trainer(lightning_hybrid.HybridSGDStrategy(threshold=args.threshold), args, max_epochs=1)
        first.fit(RecordIndices(lr=args.lr), datamodule=IndexedDigits())
    strategy = lightning_hybrid.HybridSGDStrategy(
        threshold=args.threshold, max_staleness=args.max_staleness, shard_server=args.shard_server
    )
    extra: dict[str, Any] = {"enable_checkpointing": args.phase in ("preempt", "loops")}
    if args.phase == "loops":  # Lightning's own loop features: max_steps, progress bar, epoch-end checkpoints
        callbacks.append(ModelCheckpoint(args.out / "ckpts", save_top_k=-1))
        extra.update(max_steps=args.max_steps, enable_progress_bar=True)
    run = trainer(strategy, args, max_epochs=args.epochs, callbacks=callbacks, **extra)
    model = RecordIndices(lr=args.lr, read_estimated_steps=args.estimated_steps, one_cycle=args.one_cycle)
    run.fit(model, datamodule=IndexedDigits(), ckpt_path=ckpt if args.phase == "resume" else None)
    schedules = [config.scheduler for config in run.lr_scheduler_configs]  # the user's own again after fit
    save(
        args.out / args.phase,
        run.global_rank,
        schedule_steps=[scheduler.last_epoch for scheduler in schedules],
        schedule_totals=[scheduler.total_steps for scheduler in schedules],
        synchronous_steps=strategy.synchronous_steps,
        version=strategy.version,
        dropped=dict(strategy.dropped),
        global_step=run.global_step,
        epoch=run.current_epoch,
        weights=weights(model),
    )


@dataclass(kw_only=True)
class Telemetry(Slowed, Batches):
    """Only the shared arguments: the schedule, the loggers and K's start are the scenario's own."""


@scenario
def telemetry(args: Telemetry) -> None:
    """ThresholdScheduler with a linear schedule from 1 to N over ``--epochs - 1`` epochs, an offline
    WandbLogger and a CSVLogger side by side."""
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    pl.seed_everything(args.seed)
    schedule = lightning_hybrid.LinearSchedule(start="async", end="sync", length=args.epochs - 1)
    loggers = [WandbLogger(project="hybrid-tests", save_dir=str(args.out), offline=True), CSVLogger(args.out)]
    callbacks: list[Callback] = [lightning_hybrid.ThresholdScheduler(schedule), SlowRank(args.slow_rank, args.delay)]
    run = trainer(
        lightning_hybrid.HybridSGDStrategy(threshold="async"),
        args,
        max_epochs=args.epochs,
        logger=loggers,
        callbacks=callbacks,
        limit_train_batches=args.batches,
    )
    run.fit(MLPClassifier(lr=args.lr), datamodule=DigitsDataModule(seed=args.seed))


@scenario
def mismatched_model(args: Launch) -> None:
    """Every rank builds a different model: setup must refuse it."""
    run = trainer(lightning_hybrid.HybridSGDStrategy(), args, max_epochs=1)
    run.fit(MLPClassifier(hidden=16 + run.global_rank), datamodule=DigitsDataModule())


@scenario
def mismatched_options(args: Launch) -> None:
    """Rank 1 (its own config, as on another node) sends gradients in bfloat16: setup must refuse it."""
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # Lightning's launcher sets it in the processes it starts
    strategy = lightning_hybrid.HybridSGDStrategy(push_dtype="bfloat16" if rank == 1 else None)
    trainer(strategy, args, max_epochs=1).fit(MLPClassifier(), datamodule=DigitsDataModule())


@dataclass(kw_only=True)
class LostWorker(Launch):
    lost_rank: int = option(help="the rank lost at its global step 5")
    hang: float = option(0.0, "seconds the lost rank hangs; 0: it kills itself with SIGKILL instead")
    threshold: Threshold = "sync"
    peer_timeout: float = 60.0
    shard_server: bool = False


@scenario
def lost_worker(args: LostWorker) -> None:
    """Rank ``--lost-rank`` kills itself with SIGKILL at its step 5 (``--hang 0``) or hangs for ``--hang`` s."""

    class Killer(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *rest: Any) -> None:
            if trainer.global_rank == args.lost_rank and trainer.global_step == 5:
                stamp_fault(args.out)
                if args.hang:
                    time.sleep(args.hang)
                else:
                    os.kill(os.getpid(), signal.SIGKILL)

    run = trainer(
        lightning_hybrid.HybridSGDStrategy(
            threshold=args.threshold, peer_timeout=args.peer_timeout, shard_server=args.shard_server
        ),
        args,
        max_epochs=2,  # the rank is lost in the first epoch
        callbacks=[Killer()],
    )
    run.fit(MLPClassifier(), datamodule=DigitsDataModule())


@dataclass(kw_only=True)
class Nodes(Slowed, Batches):
    threshold: Threshold = "sync"
    peer_timeout: float = 60.0
    pg_timeout: float = option(1800.0, "seconds, Lightning's collectives")
    checkpoint_every: int | None = option(None, "a ModelCheckpoint every this many steps")
    resume_from: Path | None = option(None, "a checkpoint to resume from")


@scenario
def nodes(args: Nodes) -> None:
    """Launched once per node (by torchrun or by hand): ``num_nodes`` x ``devices`` workers; optionally
    slowed, checkpointed every ``--checkpoint-every`` steps, or resumed from ``--resume-from``."""
    pl.seed_everything(args.seed)
    strategy = lightning_hybrid.HybridSGDStrategy(
        threshold=args.threshold, peer_timeout=args.peer_timeout, timeout=timedelta(seconds=args.pg_timeout)
    )
    callbacks: list[Callback] = [SlowRank(slow_rank=args.slow_rank, delay=args.delay)]
    if args.checkpoint_every:
        callbacks.append(ModelCheckpoint(args.out / "ckpts", every_n_train_steps=args.checkpoint_every, save_top_k=-1))
    run = trainer(
        strategy,
        args,
        max_epochs=args.epochs,
        limit_train_batches=args.batches,
        callbacks=callbacks,
        enable_checkpointing=bool(args.checkpoint_every),
    )
    model = MLPClassifier(lr=args.lr)
    run.fit(model, datamodule=DigitsDataModule(seed=args.seed), ckpt_path=args.resume_from)
    save(
        args.out,
        run.global_rank,
        world_size=run.world_size,
        node_rank=run.node_rank,
        restart_round=restart_round(),
        version=strategy.version,
        global_step=run.global_step,
        update_sizes=dict(strategy.update_sizes),
        weights=weights(model),
    )


@dataclass(kw_only=True)
class Recover(Epochs):
    threshold: Threshold = "async"
    die_in_first_round: RankStep | None = option(None, "RANK:STEP: that rank SIGKILLs itself in torchrun's round 0")
    node_dies: bool = option(False, "the dying rank SIGKILLs its torchrun agent first: its whole node is lost")
    recovery_every: float = option(60.0, "seconds between periodic recovery checkpoints")
    default_folder: bool = option(False, "no recovery_dir: the strategy's default folder under torchrun")
    static: bool = option(False, "pull_work=False: static shards (numbered batches, rank r every N-th)")
    sharded: bool = option(False, "shard_server=True: recovery points written by every shard")
    step_delay: float = option(0.0, "seconds every rank sleeps before each training step")
    alone_step_delay: float | None = option(
        None, "seconds instead, while the round has fewer ranks than asked for (time for a node to join)"
    )
    hidden: int = option(128, "the MLP's hidden width")
    depth: int = option(1, "the MLP's hidden layers")


class EveryStepSleeps(Callback):
    """Every rank sleeps ``seconds`` before each training step; ``alone_seconds`` instead while the round has fewer
    than ``full_world`` ranks, so that a joining node finds the job still training however loaded the machine."""

    def __init__(self, seconds: float, alone_seconds: float | None = None, full_world: int = 0) -> None:
        self.seconds, self.alone_seconds, self.full_world = seconds, alone_seconds, full_world

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        alone = self.alone_seconds is not None and trainer.world_size < self.full_world
        time.sleep(self.alone_seconds if alone else self.seconds)


class LogTrainedBatches(Callback):
    """Every rank appends the epoch, time and sample indices of each batch it starts to
    ``trained-round{R}-of-{W}-rank{r}.txt`` (restart count R and world size W: a node that joins starts a round without
    a restart), flushed at once (a SIGKILL loses none); rank 0 of a resumed run writes which samples the recovery
    checkpoint held."""

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        name = f"trained-round{restart_round()}-of-{trainer.world_size}-rank{trainer.global_rank}.txt"
        out = Path(os.environ["SCENARIO_OUT"]) / name
        self.file = out.open("a")
        self.on_train_epoch_start(trainer, module)  # Lightning does not call it for an epoch resumed mid-way

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        resumed = trainer.strategy.resumed
        if trainer.global_rank == 0 and resumed is not None and trainer.current_epoch in resumed["done"]:
            sampler = trainer.train_dataloader.batch_sampler
            held = [i for batch in resumed["done"].get(trainer.current_epoch, []) for i in sampler.indices(batch)]
            out = Path(os.environ["SCENARIO_OUT"]) / f"resumed-epoch{trainer.current_epoch}.pt"
            torch.save({**resumed, "samples": held}, out)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.file.write(f"{trainer.current_epoch} {time.time()} {' '.join(map(str, batch[2].tolist()))}\n")
        self.file.flush()


@scenario
def recover(args: Recover) -> None:
    """Under ``torchrun --max-restarts``: a rank SIGKILLs itself in round 0; round 1 resumes from the recovery
    checkpoint (written by the server's rank at the failure, or periodically when the server's rank is the one
    lost) and trains the rest."""
    pl.seed_everything(args.seed)
    os.environ["SCENARIO_PHASE"] = f"round{restart_round()}"
    folder = None if args.default_folder else args.out / "recovery"
    strategy = lightning_hybrid.HybridSGDStrategy(
        threshold=args.threshold,
        peer_timeout=60,
        recovery_dir=folder,
        recovery_every=args.recovery_every,
        pull_work=False if args.static else None,
        shard_server=args.sharded,
    )
    sleeps = EveryStepSleeps(args.step_delay, args.alone_step_delay, args.num_nodes * args.devices)
    callbacks: list[Callback] = [LogTrainedBatches(), sleeps]
    if args.die_in_first_round:
        callbacks.append(DieInFirstRound(*args.die_in_first_round, node=args.node_dies))
    run = trainer(strategy, args, max_epochs=args.epochs, callbacks=callbacks, default_root_dir=args.out)
    model = RecordIndices(lr=args.lr, hidden=args.hidden, depth=args.depth)
    run.fit(model, datamodule=IndexedDigits(num_workers=0))
    save(
        args.out,
        run.global_rank,
        weights=weights(model),
        restart_round=restart_round(),
        world_size=run.world_size,
        epochs=run.current_epoch,
        version=strategy.version,
        resumed=strategy.resumed,
        recovery_files=sorted(p.name for p in (folder or args.out / "hybrid_sgd_recovery").glob("*")),
    )


@dataclass(kw_only=True)
class Namespace(Batches):
    namespace: Literal["pytorch_lightning", "lightning"] = option(
        "lightning", "whose Trainer, LightningModule and callbacks: pytorch_lightning or the unified package"
    )
    threshold: Threshold = "sync"


def digits_classifier(lightning_module: type) -> Any:
    """A small digits MLP on ``lightning_module`` (the app's models are pytorch_lightning's), SGD with momentum and
    weight decay; its losses logged once per epoch, synced over ranks."""

    class DigitsClassifier(lightning_module):
        def __init__(self, lr: float) -> None:
            super().__init__()
            self.lr = lr
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

        def loss(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.loss(batch)
            self.log("train_loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", self.loss(batch), sync_dist=True)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)

    return DigitsClassifier


@scenario
def namespace(args: Namespace) -> None:
    """The main paths on one namespace's Trainer: fit with an explicit strategy instance (the import path that
    serves the namespace), ``ThresholdScheduler`` telemetry to a CSVLogger and an epoch-end checkpoint; validate;
    then a fresh Trainer with the strategy by name resumes the checkpoint and trains one more epoch."""
    if args.namespace == "lightning":
        import lightning.pytorch as package

        from lightning_hybrid.lightning import HybridSGDStrategy
    else:
        import pytorch_lightning as package

        from lightning_hybrid import HybridSGDStrategy
    package.seed_everything(args.seed)
    (x, y), (vx, vy) = DigitsDataModule(seed=args.seed).load()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(vx, vy), batch_size=256)
    model = digits_classifier(package.LightningModule)(args.lr)
    common = dict(
        accelerator=args.accelerator,
        devices=args.devices,
        limit_train_batches=args.batches,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    latest = package.callbacks.ModelCheckpoint(args.out / "checkpoints")  # no monitor: the newest epoch's
    first = package.Trainer(
        strategy=HybridSGDStrategy(threshold=args.threshold),
        max_epochs=args.epochs,
        logger=package.loggers.CSVLogger(args.out, name="csv"),
        callbacks=[lightning_hybrid.ThresholdScheduler("linear", start=args.threshold, end="sync"), latest],
        **common,
    )
    first.fit(model, train, val)
    fitted, version = weights(model), first.strategy.version
    (validated,) = first.validate(model, val, verbose=False)
    second = package.Trainer(
        strategy="hybrid_sgd_sync", max_epochs=args.epochs + 1, logger=False, enable_checkpointing=False, **common
    )
    resumed = digits_classifier(package.LightningModule)(args.lr)
    second.fit(resumed, train, val, ckpt_path=latest.best_model_path)
    save(
        args.out,
        first.global_rank,
        strategies=(type(first.strategy).__module__, type(second.strategy).__module__),
        fitted=fitted,
        version=version,
        val_loss=float(validated["val_loss"]),
        resumed_version=second.strategy.version,
        resumed_weights=weights(resumed),
    )


@dataclass(kw_only=True)
class Soak(Seeded):
    max_time: str = option(help="Trainer(max_time), DD:HH:MM:SS: how long it trains")
    shard_server: bool = False
    pipeline_pushes: bool = False
    overlap_answers: bool = option(False, "with overlap_push: stripes stepped ahead whenever K = N")


@scenario
def soak(args: Soak) -> None:
    """Minutes of training: random per-step delays (heavy-tailed on a slowed rank), K changed at random
    every 3 steps, pulled work; every rank records its pushes and its memory at each epoch end."""
    pl.seed_everything(args.seed)
    strategy = lightning_hybrid.HybridSGDStrategy(
        threshold="async",
        pull_work=True,
        peer_timeout=60,
        shard_server=args.shard_server,
        pipeline_pushes=args.pipeline_pushes,
        overlap_push=args.overlap_answers,
        overlap_answers=args.overlap_answers,
    )
    delays = InjectDelays(
        ranks=[args.devices - 1], slowdown=2.0, extra=DelayDistribution("pareto", 0.002, 1.5), seed=args.seed
    )
    changes = RandomThreshold(every=3, seed=args.seed)
    run = trainer(strategy, args, max_time=args.max_time, max_epochs=-1, callbacks=[delays, changes])
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
    parser = argparse.ArgumentParser(description=__doc__)
    subcommands = parser.add_subparsers(dest="scenario", required=True)
    for name, (function, spec) in SCENARIOS.items():
        doc = function.__doc__ or ""
        add_arguments(subcommands.add_parser(name, help=doc.partition(".")[0], description=doc), spec)
    chosen = vars(parser.parse_args())
    function, spec = SCENARIOS[chosen.pop("scenario")]
    args = spec(**chosen)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["SCENARIO_OUT"] = str(args.out)
    function(args)


if __name__ == "__main__":
    main()
