"""``ThresholdScheduler``: sets K from a schedule as training goes on, and logs what the hybrid does."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.data import extract_batch_size

from lightning_hybrid.thresholds import AdaSyncSchedule, Schedule, ThresholdSpec, has_length, make_schedule

if TYPE_CHECKING:
    from pytorch_lightning.callbacks import Timer

    from lightning_hybrid.strategy import HybridSGDStrategy


def _callback_bases() -> tuple[type, ...]:
    """Lightning's ``Callback`` of ``pytorch_lightning`` and, when installed, of the unified ``lightning`` package:
    one ``ThresholdScheduler`` class then serves either trainer (and passes LightningCLI's type checks of both)."""
    if importlib.util.find_spec("lightning") is None:
        return (pl.Callback,)
    import lightning.pytorch

    return (pl.Callback, lightning.pytorch.Callback)


def _classes(name: str, *modules: str) -> tuple[type, ...]:
    """Class ``name`` of each of ``modules`` imported so far: a trainer's strategy, callbacks or loggers come from
    a Lightning namespace (and a strategy copy) that was imported to make them."""
    return tuple(getattr(sys.modules[module], name) for module in modules if module in sys.modules)


def _timers(trainer: pl.Trainer) -> list[Timer]:
    """The trainer's ``Timer`` callbacks with a budget (``Trainer(max_time=...)``), of either namespace."""
    timer = _classes("Timer", "pytorch_lightning.callbacks", "lightning.pytorch.callbacks")
    return [c for c in trainer.callbacks if isinstance(c, timer) and c.time_remaining() is not None]


# The strategy for pytorch_lightning, and its copy for the unified package (see lightning_api).
STRATEGY_MODULES = ("lightning_hybrid.strategy", "lightning_hybrid.lightning.strategy")


class ThresholdScheduler(*_callback_bases()):
    """Sets the strategy's threshold K from ``schedule`` at every epoch start (or every ``every_n_steps``
    steps) and logs telemetry through the trainer's loggers. One class for ``pytorch_lightning`` and
    ``lightning.pytorch`` Trainers alike: it is a ``Callback`` of both.

    Args:
        schedule: a schedule from :mod:`lightning_hybrid.thresholds` (e.g. ``LinearSchedule(1, "sync", 10)``), or
            the name of one (``"linear"``, ``"cosine"``, ...: see ``make_schedule``) built from ``start``, ``end``
            and ``length``. A named schedule without a ``length`` spans the run: with ``max_time`` the elapsed
            share of the budget; else with ``max_epochs`` it reaches ``end`` in the last epoch (a one-epoch run
            stays at ``start``); else with ``max_steps`` the server rank's own steps (rank 0's global step: with
            pulled work other ranks take other counts). ``"switch"`` and ``"adasync"`` have no length.
        start: a named schedule's first K (``None``: the schedule's default, ``"async"`` for a ramp).
        end: a named schedule's last K (``None``: the schedule's default, ``"sync"`` for a ramp).
        length: a named schedule's length, in what ``progress`` counts (``None``: the run's own, see above).
        options: a named schedule's other options (e.g. ``{"steps": 4}`` of ``"step"``, ``{"at": 5}`` of
            ``"switch"``), as ``make_schedule`` takes them.
        every_n_steps: also update K every so many steps of the server's rank (progress counted in steps);
            ``None`` updates at epoch starts only (progress counted in epochs).
        progress: what the schedule's length counts: ``"epochs"``, ``"steps"`` (the server rank's steps, with
            ``every_n_steps``) or ``"time"``: the percentage of ``Trainer(max_time=...)`` elapsed, so a schedule of
            ``length=100`` spans the whole budget whatever the speed of the method (fair in a fixed-time
            comparison). K is then set on rank 0 at epoch starts and every ``every_n_steps`` steps (default 10).
            ``None``: ``"epochs"``, or for a named schedule without a length the run's bound (see above).
            AdaSync reads the loss, not progress: it moves at epoch starts in every mode.
        monitor: the logged training loss an adaptive schedule (AdaSync) reads, averaged over ranks.

    Logged at every epoch end: ``hybrid/threshold``, ``hybrid/version``, ``hybrid/staleness_{mean,max,p50,p95}``,
    ``hybrid/gradients_per_update``, ``hybrid/rejected``, ``hybrid/dropped`` (gradients staler than
    ``max_staleness``), the epoch's mean ``hybrid/step_scale`` (an update's step relative to a sync update's, see
    ``group_scaling``, times its gradients' mean staleness weight) and, for optimizers with momentum,
    ``hybrid/momentum``, and per worker ``hybrid/worker{r}/steps``,
    ``.../wait_fraction`` (share of the epoch spent waiting for the server) and ``.../samples_per_s``; with a
    ``WandbLogger`` also ``hybrid/staleness`` as a ``wandb.Histogram`` of the epoch's gradients. K and the
    mean staleness show in the progress bar.
    """

    def __init__(
        self,
        schedule: Union[str, Schedule] = "linear",
        start: Optional[ThresholdSpec] = None,
        end: Optional[ThresholdSpec] = None,
        length: Optional[int] = None,
        options: Optional[dict[str, Any]] = None,
        every_n_steps: Optional[int] = None,
        monitor: str = "train_loss_epoch",
        progress: Optional[Literal["epochs", "steps", "time"]] = None,
    ):
        named = {k: v for k, v in dict(start=start, end=end, length=length).items() if v is not None}
        named.update(options or {})
        if isinstance(schedule, str):
            make_schedule(schedule, **named)  # an unknown name or a bad option fails here, with the known names
        elif not callable(schedule):
            raise TypeError(f"schedule must be a threshold schedule or its name, got {type(schedule).__name__}")
        elif named:
            raise ValueError(f"start, end, length and options build a named schedule; set them on {schedule} itself")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive int or None, got {every_n_steps!r}")
        if progress not in (None, "epochs", "steps", "time"):
            raise ValueError(f"progress must be 'epochs', 'steps' or 'time', got {progress!r}")
        if progress == "steps" and every_n_steps is None:
            raise ValueError("progress='steps' counts steps between updates of K: give every_n_steps as well")
        self._name, self._options = (schedule, named) if isinstance(schedule, str) else (None, {})
        self.schedule: Schedule = make_schedule(schedule, **named) if isinstance(schedule, str) else schedule
        self._every_n_steps = every_n_steps
        self._progress = progress
        self.every_n_steps = every_n_steps or (10 if progress == "time" else None)
        self.progress: str = progress or "epochs"
        self.monitor = monitor
        self._timer: Optional[Timer] = None
        self._budget = 0.0  # seconds of max_time
        self._figures_before: dict[str, float] = {}
        self._counts: Counter = Counter()
        self._epoch_started = 0.0
        self._samples = 0

    # ------------------------------------------------------------------ setting K
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy, _classes("HybridSGDStrategy", *STRATEGY_MODULES)):
            raise ValueError(
                f"ThresholdScheduler sets the threshold of strategy='hybrid_sgd', but this trainer uses "
                f"{type(trainer.strategy).__name__}: use Trainer(strategy='hybrid_sgd') or remove the callback."
            )
        if stage == "fit" and self._name is not None and has_length(self._name) and "length" not in self._options:
            self._span_the_run(trainer)
        try:  # both ends of the schedule must fit N
            self.schedule(0, trainer.world_size)
            self.schedule(10**9, trainer.world_size)
        except ValueError as err:
            raise ValueError(
                f"the threshold schedule {self.schedule} does not fit {trainer.world_size} workers: {err}"
            ) from err
        if self.progress == "time":
            timers = _timers(trainer)
            if not timers:
                raise ValueError(
                    "ThresholdScheduler(progress='time') counts the share of the time budget: set "
                    "Trainer(max_time=...), or count progress in 'epochs' or 'steps'"
                )
            self._timer = timers[0]
            self._budget = timers[0].time_remaining() + timers[0].time_elapsed()  # before training starts

    def _span_the_run(self, trainer: pl.Trainer) -> None:
        """A named schedule without a length spans the run: its time budget, epochs or steps (see the class)."""
        has_time = bool(_timers(trainer))
        epochs, steps = trainer.max_epochs or -1, trainer.max_steps
        progress = self._progress or next(
            (kind for kind, bound in (("time", has_time), ("epochs", epochs > 0), ("steps", steps > 0)) if bound), None
        )
        if progress is None or (progress == "epochs" and epochs <= 0) or (progress == "steps" and steps <= 0):
            raise ValueError(
                f"ThresholdScheduler({self._name!r}) spans the run, but the Trainer has no max_time, max_epochs or "
                "max_steps to span: give the schedule a length, or the Trainer a bound"
            )
        length = {"time": 100, "epochs": max(epochs - 1, 1), "steps": steps}[progress]
        self.schedule = make_schedule(self._name, **self._options, length=length)
        self.progress = progress
        self.every_n_steps = self._every_n_steps or (10 if progress in ("time", "steps") else None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:  # a resumed run's counters start where the checkpoint left them
            self._epoch_means(trainer.strategy.progress, has_momentum=False)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        adaptive = isinstance(self.schedule, AdaSyncSchedule)
        if adaptive or self.progress == "epochs":
            loss = self._mean_loss(trainer) if adaptive else None  # a collective: every rank
            trainer.strategy.threshold = self.schedule(trainer.current_epoch, trainer.world_size, loss=loss)
        elif self.progress == "time" and trainer.is_global_zero:
            trainer.strategy.threshold = self.schedule(self._percent_of_budget(), trainer.world_size)
        self._epoch_started, self._samples = time.perf_counter(), 0
        trainer.strategy.reset_worker_counters()

    def _percent_of_budget(self) -> float:
        assert self._timer is not None
        return min(100.0, 100 * self._timer.time_elapsed("train") / self._budget) if self._budget > 0 else 100.0

    def _mean_loss(self, trainer: pl.Trainer) -> Optional[float]:
        """The monitored loss averaged over ranks, so every rank computes the same K (a collective)."""
        value = trainer.callback_metrics.get(self.monitor)
        local = torch.tensor([float(value) if value is not None else float("nan")], device=trainer.strategy.root_device)
        mean = float(trainer.strategy.reduce(local, reduce_op="mean"))
        return None if np.isnan(mean) else mean

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if isinstance(self.schedule, AdaSyncSchedule) or not trainer.is_global_zero:
            return
        if self.every_n_steps and step and step % self.every_n_steps == 0:
            progress = self._percent_of_budget() if self.progress == "time" else step
            trainer.strategy.threshold = self.schedule(progress, trainer.world_size)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += extract_batch_size(batch)
        strategy = trainer.strategy
        pl_module.log("K", float(strategy.threshold), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        pl_module.log("stale", strategy.staleness.mean, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ telemetry
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy: HybridSGDStrategy = trainer.strategy
        seconds = time.perf_counter() - self._epoch_started
        mine = torch.tensor(
            [strategy.steps, strategy.wait_seconds, seconds, self._samples],
            dtype=torch.float64,
            device=strategy.root_device,
        )
        # Every rank has pushed its last gradient of the epoch once it reaches the barrier, and none pushes
        # again before the all_gather below, which rank 0 joins only after it read the server: so the
        # server's figures are exactly this epoch's (a rank already in the next epoch would raise K early).
        strategy.barrier("hybrid_sgd epoch telemetry")
        server = self._server_figures(trainer) if trainer.is_global_zero else None
        workers = strategy.all_gather(mine).reshape(trainer.world_size, 4).cpu().tolist()  # every rank takes part
        if server is None:
            return
        server_figures, staleness_counts = server
        metrics = {**server_figures, "epoch": float(trainer.current_epoch)}
        for rank, (steps, waited, elapsed, samples) in enumerate(workers):
            metrics[f"hybrid/worker{rank}/steps"] = steps
            metrics[f"hybrid/worker{rank}/wait_fraction"] = waited / elapsed if elapsed else 0.0
            metrics[f"hybrid/worker{rank}/samples_per_s"] = samples / elapsed if elapsed else 0.0
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._log_histogram(trainer, staleness_counts)

    def _server_figures(self, trainer: pl.Trainer) -> tuple[dict[str, float], Counter]:
        """The server's counters on rank 0, and the staleness of every gradient it applied so far."""
        strategy: HybridSGDStrategy = trainer.strategy
        progress, stats = strategy.progress, strategy.staleness
        sizes = Counter({int(k): v for k, v in progress.get("update_sizes", {}).items()})
        figures = {
            "hybrid/threshold": float(strategy.threshold),
            "hybrid/version": float(strategy.version),
            "hybrid/staleness_mean": stats.mean,
            "hybrid/staleness_max": float(stats.max),
            "hybrid/staleness_p50": float(stats.quantile(0.5)),
            "hybrid/staleness_p95": float(stats.quantile(0.95)),
            "hybrid/gradients_per_update": sum(k * n for k, n in sizes.items()) / max(sum(sizes.values()), 1),
            "hybrid/rejected": float(sum(progress.get("rejected", {}).values())),
            "hybrid/dropped": float(sum(progress.get("dropped", {}).values())),
        }
        has_momentum = "momentum" in trainer.strategy.optimizers[0].param_groups[0]
        figures.update(self._epoch_means(progress, has_momentum))
        return figures, Counter(stats.counts)

    def _epoch_means(self, progress: dict[str, Any], has_momentum: bool) -> dict[str, float]:
        """This epoch's mean step scale and momentum of the server's updates (see ``GroupScale``)."""
        now = {key: float(progress.get(key, 0.0)) for key in ("version", "step_scale_total", "momentum_total")}
        before, self._figures_before = self._figures_before, now
        updates = now["version"] - before.get("version", 0.0)
        if updates <= 0:
            return {}
        means = {"hybrid/step_scale": (now["step_scale_total"] - before.get("step_scale_total", 0.0)) / updates}
        if has_momentum:
            means["hybrid/momentum"] = (now["momentum_total"] - before.get("momentum_total", 0.0)) / updates
        return means

    def _log_histogram(self, trainer: pl.Trainer, counts: Counter) -> None:
        """The staleness of this epoch's gradients as a wandb.Histogram, for W&B loggers."""
        epoch_counts = counts - self._counts
        self._counts = Counter(counts)
        if not epoch_counts:
            return
        wandb_logger = _classes("WandbLogger", "pytorch_lightning.loggers", "lightning.pytorch.loggers")
        for logger in trainer.loggers:
            if isinstance(logger, wandb_logger):
                import wandb

                top = max(epoch_counts)
                values = np.array([epoch_counts.get(s, 0) for s in range(top + 1)])
                histogram = wandb.Histogram(np_histogram=(values, np.arange(top + 2)))
                logger.experiment.log({"hybrid/staleness": histogram, "trainer/global_step": trainer.global_step})
