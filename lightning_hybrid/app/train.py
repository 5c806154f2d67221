"""The Hydra training app behind ``lightning-hybrid-train`` (and ``python examples/train.py``): builds one job's
strategy, data, model, logger and callbacks from the config under ``conf/``, trains, and writes the job's
``result.json`` (final validation metrics, updates, staleness) into its output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_warn

import lightning_hybrid
from lightning_hybrid.app.config import StrategyConfig, TrainConfig, register_configs
from lightning_hybrid.app.data import CIFAR10DataModule, DigitsDataModule, MNISTDataModule
from lightning_hybrid.app.delays import DelayDistribution, InjectDelays
from lightning_hybrid.app.models import CNNClassifier, MLPClassifier
from lightning_hybrid.app.wandb_run import wandb_logger
from lightning_hybrid.launcher import LAUNCH_VARIABLES, HydraJobLauncher

CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()


class HydraDDPStrategy(DDPStrategy):
    """Lightning's DDP, launched so that each Hydra job's children run that job only (for comparisons)."""

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


def build_strategy(config: TrainConfig) -> pl.strategies.Strategy:
    strategy = config.strategy
    if strategy.name == "ddp":
        # a sweep's DDP baseline beside hybrid jobs may carry their keys: said, not refused
        ignored = [
            f"strategy.{f.name}={getattr(strategy, f.name)!r}"
            for f in dataclasses.fields(StrategyConfig)
            if f.name not in ("name", "scheduled") and getattr(strategy, f.name) != _default_of(f)
        ]
        if ignored:
            rank_zero_warn(f"strategy=ddp ignores the hybrid_sgd options {', '.join(ignored)}")
        return HydraDDPStrategy()
    if strategy.name != "hybrid_sgd":
        raise ValueError(f"strategy.name must be 'hybrid_sgd' or 'ddp', got {strategy.name!r}")
    return lightning_hybrid.HybridSGDStrategy(
        threshold=strategy.threshold,
        pull_work=strategy.pull_work,
        group_scaling=strategy.group_scaling,
        max_staleness=strategy.max_staleness,
        staleness_scaling=strategy.staleness_scaling,
        overlap_push=strategy.overlap_push,
        shard_server=strategy.shard_server,
        shard_weights=strategy.shard_weights,
        pipeline_pushes=strategy.pipeline_pushes,
        overlap_answers=strategy.overlap_answers,
        answer_dtype=strategy.answer_dtype,
        push_dtype=strategy.push_dtype,
        nonfinite=strategy.nonfinite,
        recovery_dir=strategy.recovery_dir,
        recovery_every=strategy.recovery_every,
        peer_timeout=strategy.peer_timeout,
    )


def _default_of(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def build_logger(config: TrainConfig, output_dir: str) -> Any:
    logger = config.logger
    if logger.name == "csv":
        return pl.loggers.CSVLogger(output_dir)
    if logger.name != "wandb":
        raise ValueError(f"logger.name must be 'wandb' or 'csv', got {logger.name!r}")
    hydra_config = HydraConfig.get()
    sweep = Path(hydra_config.sweep.dir).name if hydra_config.mode.name == "MULTIRUN" else None
    return wandb_logger(
        project=logger.project,
        save_dir=output_dir,
        offline=logger.mode != "online",
        group=sweep,
        name=hydra_config.job.override_dirname or None,
        config=OmegaConf.to_container(config, resolve=True),  # type: ignore[arg-type]
    )


class ValidationCurve(pl.Callback):
    """Wall-clock seconds since training started, with the validation metrics, at every validation.

    With ``probe_every`` seconds, global rank 0 also measures its current model (under the hybrid: the master as
    of its last answer) on the first ``probe_samples`` validation samples that often (``probes``): validation runs
    at epoch ends only, too coarse for the time to a target accuracy when a synchronous epoch takes the whole
    budget. The probe costs rank 0 alike under every strategy."""

    def __init__(self, probe_every: float = 0.0, probe_samples: int = 2000) -> None:
        self.points: list[dict[str, float]] = []
        self.probes: list[dict[str, float]] = []
        self.probe_every, self.probe_samples = probe_every, probe_samples
        self._started = self._probed = 0.0
        self._probe_set: tuple[torch.Tensor, ...] = ()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = self._probed = time.perf_counter()
        if self.probe_every and trainer.is_global_zero:  # sliced and moved once, not at every probe
            self._probe_set = tuple(
                t[: self.probe_samples].to(pl_module.device) for t in trainer.datamodule.val_set.tensors
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if not (self.probe_every and trainer.is_global_zero and now - self._probed >= self.probe_every):
            return
        self._probed = now
        x, y = self._probe_set
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module(x)
        pl_module.train(was_training)
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        accuracy = float((logits.argmax(-1) == y).float().mean())
        self.probes.append({"seconds": now - self._started, "probe_loss": loss, "probe_acc": accuracy})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        self.points.append({"seconds": time.perf_counter() - self._started, "epoch": trainer.current_epoch, **metrics})


def build_threshold_scheduler(config: TrainConfig) -> Optional[lightning_hybrid.ThresholdScheduler]:
    """The ``threshold`` group's schedule when the strategy is scheduled (a ramp without a length spans the run);
    a constant one at the strategy's K for a hybrid strategy that is not, so that every hybrid_sgd job of a sweep
    (``strategy=hybrid,sync,async``) logs the same ``hybrid/`` telemetry (staleness, update sizes) to compare."""
    if config.strategy.name != "hybrid_sgd":
        return None
    if not config.strategy.scheduled or config.threshold.name == "none":
        return lightning_hybrid.ThresholdScheduler(lightning_hybrid.ConstantSchedule(config.strategy.threshold))
    return lightning_hybrid.ThresholdScheduler(
        config.threshold.name,
        options=dict(config.threshold.options),
        length=config.threshold.length,
        every_n_steps=config.threshold.every_n_steps,
        progress=config.threshold.progress,  # type: ignore[arg-type]
    )


def build_data(config: TrainConfig) -> pl.LightningDataModule:
    data = config.data
    if data.name == "digits":
        return DigitsDataModule(batch_size=data.batch_size, seed=data.seed)
    if data.name not in ("mnist", "cifar10"):
        raise ValueError(f"data.name must be 'digits', 'mnist' or 'cifar10', got {data.name!r}")
    if not data.root:
        raise ValueError(f"data={data.name} reads your own files: set data.root=/path/to/them")
    module = MNISTDataModule if data.name == "mnist" else CIFAR10DataModule
    return module(hydra.utils.to_absolute_path(data.root), batch_size=data.batch_size, seed=data.seed)


def build_model(config: TrainConfig, data: pl.LightningDataModule) -> pl.LightningModule:
    model, shape = config.model, data.shape
    common = dict(
        lr=model.lr,
        optimizer=model.optimizer,
        momentum=model.momentum,
        lr_step=model.lr_step,
        weight_decay=model.weight_decay,
    )
    if model.name == "mlp":
        features = int(torch.tensor(shape).prod())
        return MLPClassifier(features, hidden=model.hidden, depth=model.depth, batch_norm=model.batch_norm, **common)
    if model.name != "cnn":
        raise ValueError(f"model.name must be 'mlp' or 'cnn', got {model.name!r}")
    if len(shape) != 3:
        raise ValueError(f"model=cnn needs image data (mnist, cifar10); data={config.data.name} is flat: use model=mlp")
    return CNNClassifier(in_channels=shape[0], image_size=shape[1], channels=model.channels, **common)


def train(config: TrainConfig) -> dict[str, Any]:
    torch.set_num_threads(1)
    pl.seed_everything(config.seed, workers=True)
    output_dir = HydraConfig.get().runtime.output_dir
    curve = ValidationCurve(probe_every=config.probe_every)
    callbacks: list[pl.Callback] = [curve]
    scheduler = build_threshold_scheduler(config)
    if scheduler is not None:
        callbacks.append(scheduler)
    delays = config.delays
    if delays.ranks or delays.extra.scale:
        callbacks.append(
            InjectDelays(
                delays.ranks,
                slowdown=delays.slowdown,
                extra=DelayDistribution(**delays.extra),
                communication=DelayDistribution(**delays.communication),
                seed=config.seed,
            )
        )
    data = build_data(config)
    trainer = pl.Trainer(
        strategy=build_strategy(config),
        logger=build_logger(config, output_dir),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=output_dir,
        **OmegaConf.to_container(config.trainer),  # type: ignore[arg-type]
    )
    trainer.fit(build_model(config, data), datamodule=data)
    result: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    steps = trainer.strategy.all_gather(torch.tensor(trainer.global_step, device=trainer.strategy.root_device))
    result["steps_per_rank"] = steps.flatten().tolist()
    result["curve"] = curve.points
    result["probes"] = curve.probes
    if isinstance(trainer.strategy, lightning_hybrid.HybridSGDStrategy):
        result.update(version=trainer.strategy.version, staleness_mean=trainer.strategy.staleness.mean)
    if trainer.is_global_zero:
        Path(output_dir, "result.json").write_text(json.dumps(result, indent=2))
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(config: DictConfig) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    before = {key: os.environ.get(key) for key in LAUNCH_VARIABLES}
    try:
        train(config)  # type: ignore[arg-type]
    finally:
        release_job_processes(before)


def release_job_processes(environment: dict[str, Any]) -> None:
    """A sweep runs its jobs one after another in this process: the next job must launch and connect
    worker processes of its own and log to a W&B run of its own, so this job's run is finished and the
    process group and the variables Lightning's launcher set go."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in environment.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
