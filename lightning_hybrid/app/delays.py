"""Straggler and delay injection, to simulate heterogeneous workers as the paper does.

``InjectDelays`` sleeps just before each push (after forward and backward). Every rank sleeps a
simulated compute time ``extra`` per step (so that a tiny model behaves like a real one); the slowed
``ranks`` take ``slowdown`` times as long in all (measured compute plus ``extra``) and add a
communication delay. Each delay is drawn from a :class:`DelayDistribution` (fixed, uniform or
heavy-tailed Pareto).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl


@dataclass(frozen=True)
class DelayDistribution:
    """Seconds per step: ``fixed`` (``scale``), ``uniform`` in ``[0, 2·scale]`` (mean ``scale``) or
    ``pareto`` (scale ``scale``, tail index ``shape``: a smaller shape gives a heavier tail)."""

    kind: str = "fixed"
    scale: float = 0.0
    shape: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "pareto"):
            raise ValueError(f"delay kind must be 'fixed', 'uniform' or 'pareto', got {self.kind!r}")
        if self.scale < 0 or self.shape <= 0:
            raise ValueError(f"delay scale must be >= 0 and shape > 0, got scale={self.scale}, shape={self.shape}")

    def sample(self, generator: random.Random) -> float:
        if self.kind == "fixed" or self.scale == 0:
            return self.scale
        if self.kind == "uniform":
            return generator.uniform(0, 2 * self.scale)
        return self.scale * generator.paretovariate(self.shape)


class InjectDelays(pl.Callback):
    """Before every push, every rank sleeps a draw of ``extra``; ``ranks`` also sleep ``slowdown - 1``
    times their push's compute (measured plus ``extra``) and a draw of ``communication``. Seeded per rank."""

    def __init__(
        self,
        ranks: Sequence[int],
        slowdown: float = 1.0,
        extra: DelayDistribution = DelayDistribution(),
        communication: DelayDistribution = DelayDistribution(),
        seed: int = 0,
    ) -> None:
        if slowdown < 1:
            raise ValueError(f"slowdown must be at least 1 (1 = no slowdown), got {slowdown}")
        self.ranks, self.slowdown = frozenset(ranks), slowdown
        self.extra, self.communication, self.seed = extra, communication, seed
        self.slept = 0.0
        self._generator = random.Random(seed)
        self._started = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if any(not 0 <= rank < trainer.world_size for rank in self.ranks):
            raise ValueError(f"delayed ranks {sorted(self.ranks)} must lie in [0, {trainer.world_size - 1}]")
        self._generator = random.Random(self.seed * 1_000_003 + trainer.global_rank)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._started = time.perf_counter()

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        extra = self.extra.sample(self._generator)
        pause = extra
        if trainer.global_rank in self.ranks:
            compute = time.perf_counter() - self._started + extra
            pause += (self.slowdown - 1) * compute + self.communication.sample(self._generator)
        self.slept += pause
        time.sleep(pause)
        # a batch whose gradient was dropped as too stale is computed again (max_staleness): its compute is
        # measured from here, not from the batch's start (which made each retry's pause grow threefold)
        self._started = time.perf_counter()
