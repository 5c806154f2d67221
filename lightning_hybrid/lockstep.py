"""Every private part of Lightning that hybrid_sgd reads or replaces, each replacement with its restore.

DDP keeps ranks in lockstep: Lightning broadcasts rank 0's SIGTERM flag and a step-interval Timer's verdict at
every step, and clips each rank's local gradient. A rank waiting in the parameter server for K gradients cannot
join such a collective, so these pieces are replaced for one fit (the signals ride on the server's answers, the
server clips the aggregated gradient) and restored after it. Read from pytorch-lightning 2.6.6: on a Lightning
upgrade, this file is the one to check. (``HybridSGDStrategy`` also uses the state it inherits from
``DDPStrategy``, e.g. ``_launcher`` and ``_layer_sync``, as any subclass does.)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import subprocess
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch.distributed as dist

from lightning_hybrid.endpoint import release_blocked_threads
from lightning_hybrid.server import GradientClipping

from .lightning_api import (
    _PATH,
    Callback,
    Timer,
    _destroy_dist_connection,
    _SubprocessScriptLauncher,
    _sync_module_states,
    lightning_ddp,
    lightning_launcher,
    pl,
)

Restore = Callable[[], None]

# Rank 0's parameters and buffers to every rank, as DDP's constructor does (no DDP wrapper here).
sync_module_states = _sync_module_states


def destroy_process_groups_at_exit() -> None:
    """Destroy the process groups before the interpreter finalises, as Lightning does for NCCL only: a gloo group
    freed during finalisation can abort the process after a clean run (SIGABRT, "terminate called without an
    active exception": seen once in CI after Trainer.test; torch PR 179291 explains it), and so can a server
    thread still blocked in gloo after a failed run: those end first. Registered once."""
    atexit.unregister(_end_distributed)
    atexit.register(_end_distributed)


def _end_distributed() -> None:
    release_blocked_threads()
    _destroy_dist_connection()


def saves_by_steps_or_time(callback: Callback) -> bool:
    """A ModelCheckpoint that saves every n training steps or every time interval (not at epoch ends)."""
    return bool(getattr(callback, "_every_n_train_steps", 0) or getattr(callback, "_train_time_interval", None))


def take_gradient_clipping(trainer: pl.Trainer) -> tuple[Optional[GradientClipping], Optional[Restore]]:
    """Move clipping from the workers' local gradients to the server's aggregated one (nothing to restore when
    the Trainer clips nothing)."""
    value, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
    if not value:
        return None, None

    def restore() -> None:
        trainer.gradient_clip_val = value

    trainer.gradient_clip_val = None
    # Lightning stores the algorithm as a GradClipAlgorithmType, whose str() is not its value
    return GradientClipping(float(value), str(getattr(algorithm, "value", algorithm) or "norm")), restore


def replace_lockstep_checks(
    trainer: pl.Trainer, on_sigterm: Callable[[int], None], on_time_up: Callable[[], None]
) -> list[Restore]:
    """Lightning broadcasts rank 0's SIGTERM flag on every step and from its SIGTERM handler, and a step-interval
    Timer broadcasts its verdict; instead ``on_sigterm(signum)`` and ``on_time_up()`` are called on this rank alone.
    (Signal handlers are registered after the strategy's ``setup``, so the replaced notifier is the one used.)"""
    restores: list[Restore] = []
    epoch_loop = trainer.fit_loop.epoch_loop
    epoch_loop._broadcast_sigterm_tensor = lambda: None
    restores.append(lambda: vars(epoch_loop).pop("_broadcast_sigterm_tensor", None))
    connector = trainer._signal_connector
    connector._sigterm_notifier_fn = lambda signum, frame: on_sigterm(signum)
    restores.append(lambda: vars(connector).pop("_sigterm_notifier_fn", None))
    for callback in trainer.callbacks:
        if isinstance(callback, Timer) and callback._interval == "step":
            timer = callback

            def check_time_remaining(_trainer: Any, timer: Timer = timer) -> None:
                if timer._duration is not None and timer.time_elapsed() >= timer._duration:
                    on_time_up()

            timer._check_time_remaining = check_time_remaining
            restores.append(lambda timer=timer: vars(timer).pop("_check_time_remaining", None))
    return restores


def epoch_ends_after_this_step(trainer: pl.Trainer) -> bool:
    """This rank's epoch has no batch left after the running one."""
    return trainer.fit_loop.epoch_loop._num_ready_batches_reached()


def inside_training_batch(trainer: pl.Trainer) -> bool:
    """A training batch is running (between its start and its end), where collectives would chain the workers."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return trainer.training and progress.ready > progress.completed


def tell_lightning_of_sigterm(trainer: pl.Trainer) -> bool:
    """Mark SIGTERM as received, as Lightning's own handler would have; False if it was already."""
    connector = trainer._signal_connector
    if connector.received_sigterm:
        return False
    connector.received_sigterm = True
    return True


def launched_children(launcher: Any) -> list[subprocess.Popen]:
    """The processes Lightning's subprocess launcher started on this node (none for other launchers)."""
    return list(launcher.procs) if isinstance(launcher, _SubprocessScriptLauncher) else []


@contextlib.contextmanager
def children_command(command: Callable[[int], tuple[Any, str]]) -> Iterator[None]:
    """While Lightning's subprocess launcher starts the children, a Hydra job's children run ``command(rank)``
    (Lightning looks its ``_hydra_subprocess_cmd`` up by name when the children start)."""
    lightnings_own = lightning_launcher._hydra_subprocess_cmd
    lightning_launcher._hydra_subprocess_cmd = command
    try:
        yield
    finally:
        lightning_launcher._hydra_subprocess_cmd = lightnings_own


def dump_checkpoint(trainer: pl.Trainer) -> dict[str, Any]:
    """The checkpoint ``trainer.save_checkpoint`` would write, built on this rank without its barrier."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def resume_from(trainer: pl.Trainer, choose: Callable[[Optional[_PATH]], Optional[_PATH]]) -> None:
    """``fit`` restores from ``choose(ckpt_path)`` instead of the user's ``ckpt_path``. Lightning restores through
    ``_restore_modules_and_callbacks`` after the strategy's ``setup_environment``; the replacement restores itself
    on its first call."""
    connector = trainer._checkpoint_connector
    lightnings_own = connector._restore_modules_and_callbacks

    def restore_chosen(checkpoint_path: Optional[_PATH] = None, weights_only: Optional[bool] = None) -> None:
        vars(connector).pop("_restore_modules_and_callbacks", None)
        lightnings_own(choose(checkpoint_path), weights_only)

    connector._restore_modules_and_callbacks = restore_chosen


@contextlib.contextmanager
def default_group_on(store: dist.Store) -> Iterator[None]:
    """While ``DDPStrategy.setup_distributed`` runs, the default process group forms on ``store`` instead of the
    env:// rendezvous (Lightning looks its ``_init_dist_connection`` up by name in its DDP module)."""
    lightnings_own = lightning_ddp._init_dist_connection
    lightning_ddp._init_dist_connection = functools.partial(lightnings_own, store=store)
    try:
        yield
    finally:
        lightning_ddp._init_dist_connection = lightnings_own
