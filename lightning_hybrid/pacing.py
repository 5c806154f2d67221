"""Per-step LR schedules paced by the server's progress.

DDP steps every rank's scheduler once per synchronous step, so a schedule sized by ``estimated_stepping_batches``
(e.g. ``OneCycleLR(total_steps=...)``) ends with the run. With pulled work each rank trains as many batches as its
speed allows: a fast rank would step its scheduler more often than DDP would (and OneCycleLR raises at its end), a
slow one less, and each shard of a sharded server, which takes its rank's hyperparameters, would step at another
rate. Paced, a scheduler steps once per N gradients the server applied: DDP's clock on every rank, whatever K.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ServerPacedScheduler:
    """Stands in for a user's scheduler in Lightning's ``lr_scheduler_configs`` while a fit pulls work: each
    ``step()`` (Lightning's, after each of this rank's optimizer steps) steps the scheduler as often as the
    server's progress has advanced since, in DDP steps (``synchronous_steps``), once per ``frequency`` of them
    counted over the fit (DDP counts a frequency's batches anew each epoch); anything else (``optimizer``,
    ``state_dict``, ``get_last_lr``, ...) is the scheduler's own."""

    def __init__(self, scheduler: Any, synchronous_steps: Callable[[], float], frequency: int = 1) -> None:
        self.scheduler = scheduler
        self._synchronous_steps = synchronous_steps
        self._frequency = frequency
        self._taken = 0  # steps of the scheduler this fit

    def step(self, *args: Any, **kwargs: Any) -> None:
        due = int(self._synchronous_steps() // self._frequency) - self._taken
        for _ in range(due):
            self.scheduler.step(*args, **kwargs)
        self._taken += max(due, 0)

    def __getattr__(self, name: str) -> Any:
        if name == "scheduler":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __repr__(self) -> str:
        return f"ServerPacedScheduler({self.scheduler!r}, frequency={self._frequency})"


def pace_step_schedulers(trainer: Any, synchronous_steps: Callable[[], float]) -> Callable[[], None]:
    """Paces every scheduler of ``interval="step"`` in ``trainer`` (a Lightning Trainer of either namespace; not
    ReduceLROnPlateau, which follows its metric); returns what puts the user's own schedulers back."""
    paced = [config for config in trainer.lr_scheduler_configs if config.interval == "step"]
    paced = [config for config in paced if not config.reduce_on_plateau]
    originals = [(config.scheduler, config.frequency) for config in paced]
    for config in paced:
        # Lightning calls step() after every step (the pacer counts the frequency in DDP steps): one after only
        # every n-th of a rank's own batches could leave the schedule behind at the fit's end and in a checkpoint
        config.scheduler = ServerPacedScheduler(config.scheduler, synchronous_steps, config.frequency)
        config.frequency = 1

    def restore() -> None:
        for config, (scheduler, frequency) in zip(paced, originals):
            config.scheduler, config.frequency = scheduler, frequency

    return restore
