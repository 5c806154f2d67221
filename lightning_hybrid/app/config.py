"""Typed configuration of the training app, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` extend these schemas (``defaults: [base_...]``), so a wrong key or a
wrong type in a file or on the command line is refused by OmegaConf with a message that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class StrategyConfig:
    """``name``: ``hybrid_sgd`` or ``ddp`` (Lightning's, for comparison); the rest configure hybrid_sgd.
    ``scheduled``: the ``threshold`` group's schedule moves K (else K stays at ``threshold``)."""

    name: str = "hybrid_sgd"
    scheduled: bool = False
    threshold: Any = "50%"  # an int count, "sync", "async" or "p%"
    pull_work: Optional[bool] = None
    group_scaling: str = "step"  # step | auto | momentum | sqrt_step | none (lightning_hybrid.group_scaling)
    max_staleness: Optional[int] = None  # drop gradients staler than this many updates
    staleness_scaling: bool = True  # weigh each gradient by 1 / (1 + staleness in sync updates)
    overlap_push: bool = False
    shard_server: bool = False  # every rank serves a slice of the model (element-wise optimizers)
    shard_weights: Optional[list[float]] = None  # each rank's share of a sharded model (e.g. its link's rate)
    pipeline_pushes: bool = False  # send the next gradient while the last answer comes in (staler)
    overlap_answers: bool = False  # with shard_server and overlap_push: stripes stepped and answered as they complete
    answer_dtype: Optional[str] = None  # e.g. bfloat16: the server's answers in it (half their bytes)
    push_dtype: Optional[str] = None  # e.g. bfloat16: the workers' gradients in it (half their bytes)
    nonfinite: str = "skip"  # skip | stop
    recovery_dir: Optional[str] = None  # recovery checkpoints (default under torchrun --max-restarts: see README)
    recovery_every: float = 60.0  # seconds between periodic recovery checkpoints
    peer_timeout: float = 600.0


@dataclass
class ThresholdConfig:
    """A threshold schedule applied by ThresholdScheduler; ``name: none`` keeps K fixed. A ramp without a
    ``length`` spans the run (``trainer.max_time``, else ``max_epochs``, else ``max_steps``)."""

    name: str = "none"
    options: dict[str, Any] = field(default_factory=dict)  # passed to make_schedule(name, **options)
    length: Optional[int] = None  # a ramp's length in what `progress` counts; null: the run's own
    every_n_steps: Optional[int] = None
    # epochs | steps | time (percent of trainer.max_time): what `length` counts; null: the run's bound
    progress: Optional[str] = None


@dataclass
class ModelConfig:
    """``name``: ``mlp`` (uses ``hidden``, ``depth``, ``batch_norm``) or ``cnn`` (uses ``channels``)."""

    name: str = "mlp"
    hidden: int = 128
    depth: int = 1
    batch_norm: bool = False
    channels: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adam | adamw | rmsprop
    momentum: float = 0.9  # sgd and rmsprop
    weight_decay: float = 0.0
    lr_step: int = 0


@dataclass
class DataConfig:
    """``name``: ``digits`` (ships with scikit-learn), ``mnist`` or ``cifar10`` (files in ``root``)."""

    name: str = "digits"
    root: Optional[str] = None
    batch_size: int = 32
    seed: int = 0


@dataclass
class LoggerConfig:
    """``name``: ``wandb`` (offline unless ``mode: online``) or ``csv``."""

    name: str = "wandb"
    project: str = "lightning-hybrid"
    mode: str = "offline"


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = 2
    num_nodes: int = 1
    max_epochs: int = 5
    max_time: Optional[str] = None
    enable_progress_bar: bool = False


@dataclass
class DelayDistributionConfig:
    kind: str = "fixed"  # fixed | uniform | pareto
    scale: float = 0.0  # seconds
    shape: float = 2.0  # pareto tail index


@dataclass
class DelaysConfig:
    """Simulated workers (``lightning_hybrid.app.delays``): every rank sleeps ``extra`` per step (simulated
    compute); ``ranks`` are ``slowdown`` times slower in all and add ``communication`` delays."""

    ranks: list[int] = field(default_factory=list)
    slowdown: float = 1.0
    extra: DelayDistributionConfig = field(default_factory=DelayDistributionConfig)
    communication: DelayDistributionConfig = field(default_factory=DelayDistributionConfig)


@dataclass
class TrainConfig:
    strategy: StrategyConfig = MISSING
    threshold: ThresholdConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    trainer: TrainerConfig = MISSING
    delays: DelaysConfig = field(default_factory=DelaysConfig)
    seed: int = 0
    probe_every: float = 0.0  # seconds between rank 0's quick accuracy probes (result.json "probes"); 0: none


def register_configs() -> None:
    """Register the schemas the YAML files under ``conf/`` extend."""
    store = ConfigStore.instance()
    store.store(name="base_train", node=TrainConfig)
    for group, schema in (
        ("strategy", StrategyConfig),
        ("threshold", ThresholdConfig),
        ("model", ModelConfig),
        ("data", DataConfig),
        ("logger", LoggerConfig),
        ("trainer", TrainerConfig),
    ):
        store.store(group=group, name=f"base_{group}", node=schema)
