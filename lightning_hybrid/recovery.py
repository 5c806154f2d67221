"""Recovery checkpoints: files that are complete on disk or absent, newest first, a few kept.

The server's rank writes them alone, with no collective (see ``HybridSGDStrategy(recovery_dir=...)``): every
``recovery_every`` seconds while training runs, and once more when the run fails (a lost worker, SIGTERM), when
the other ranks may be dead. Each is written to a hidden temporary name and renamed into place, so a reader never
sees half a file: a process killed while writing leaves only a temporary that no one loads (and that the next
write removes). Names sort by the wall-clock time of writing, so the newest is the last of a restarted run too.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from lightning_fabric.plugins import CheckpointIO
from torch import Tensor

from lightning_hybrid.elastic import restart_round
from lightning_hybrid.server import ServerSnapshot
from lightning_hybrid.work import done_by_epoch

log = logging.getLogger(__name__)

_PREFIX, _SUFFIX = "recovery-", ".ckpt"
CHECKPOINT_KEY = "hybrid_sgd"  # the strategy's entry in a Lightning checkpoint


class RecoveryDir:
    """A folder of recovery checkpoints on storage every node sees; keeps the newest ``keep``."""

    def __init__(self, path: str | os.PathLike, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep} must be at least 1")
        self.path = Path(path)
        self.keep = keep

    def save(self, checkpoint: dict[str, Any], checkpoint_io: CheckpointIO, version: int) -> Path:
        """Write ``checkpoint`` (a Lightning checkpoint dict) as the newest recovery checkpoint."""
        self.path.mkdir(parents=True, exist_ok=True)
        name = f"{_PREFIX}{time.time_ns():020d}-v{version}{_SUFFIX}"
        partial = self.path / f".{name}.partial"
        checkpoint_io.save_checkpoint(checkpoint, partial)
        os.replace(partial, self.path / name)
        self._prune()
        return self.path / name

    def checkpoints(self) -> list[Path]:
        """The recovery checkpoints on disk, oldest first."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if p.name.startswith(_PREFIX) and p.name.endswith(_SUFFIX))

    def newest(self) -> Optional[Path]:
        """The newest recovery checkpoint that is a whole file (torch's zip format ends with its directory: a
        truncated file, e.g. of a full disk, has none and is passed over with a warning)."""
        for path in reversed(self.checkpoints()):
            if zipfile.is_zipfile(path):
                return path
            log.warning("hybrid_sgd: recovery checkpoint %s is incomplete (not a whole torch file); skipped", path)
        return None

    def clear(self) -> None:
        """Remove every recovery checkpoint: the run they would resume has finished."""
        for path in self.checkpoints() + self._partials():
            path.unlink(missing_ok=True)

    def _partials(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name.startswith(f".{_PREFIX}")] if self.path.is_dir() else []

    def _prune(self) -> None:
        for path in self.checkpoints()[: -self.keep] + self._partials():
            path.unlink(missing_ok=True)


class RecoveryWriter:
    """The server's rank's writer: a periodic checkpoint every ``every`` seconds, written in a thread so that
    training goes on, and a last one at a failure, waited for (the process is about to end)."""

    def __init__(self, directory: RecoveryDir, every: float, checkpoint_io: CheckpointIO) -> None:
        self.directory = directory
        self.every = every
        self._checkpoint_io = checkpoint_io
        self._last = time.monotonic()
        self._thread: Optional[threading.Thread] = None

    def due(self) -> bool:
        """A periodic checkpoint is due (and the last one is written)."""
        writing = self._thread is not None and self._thread.is_alive()
        return not writing and time.monotonic() - self._last >= self.every

    def write(self, checkpoint: dict[str, Any], version: int, why: str, wait: bool) -> None:
        """Write ``checkpoint``, which must share no tensor that training still changes."""
        self.join()
        self._last = time.monotonic()
        if wait:
            self._save(checkpoint, version, why)
            return
        self._thread = threading.Thread(
            target=self._save, args=(checkpoint, version, why), name="hybrid-sgd-recovery", daemon=True
        )
        self._thread.start()

    def join(self) -> None:
        """Wait for a periodic checkpoint being written."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _save(self, checkpoint: dict[str, Any], version: int, why: str) -> None:
        started = time.perf_counter()
        try:
            path = self.directory.save(checkpoint, self._checkpoint_io, version)
        except Exception:  # a full disk must not end training; the older checkpoints stay
            log.exception("hybrid_sgd: could not write the %s recovery checkpoint to %s", why, self.directory.path)
            return
        level = logging.WARNING if why == "failure" else logging.INFO  # the periodic ones would fill the console
        log.log(
            level,
            "hybrid_sgd: %s recovery checkpoint %s (version %d) in %.2f s",
            why,
            path,
            version,
            time.perf_counter() - started,
        )


def recovery_checkpoint(
    checkpoint: dict[str, Any],
    snapshot: ServerSnapshot,
    module: torch.nn.Module,
    parameters: Sequence[Tensor],
    epoch: int,
    resumed: Mapping[int, Sequence[int]],
    taken: Optional[int],
    why: str,
) -> dict[str, Any]:
    """Lightning's checkpoint of the server's rank (its loops, callbacks, ...) made a recovery checkpoint: the
    model's parameters become the server's master weights (``parameters``, the server's order, name them), every
    other tensor a copy, and the server's counters and absorbed batches join it.

    ``resumed``: batches of each epoch trained before this fit resumed (not in this server's ledger); ``taken``:
    batches of ``epoch`` that all ranks took in this fit, of which those not absorbed will be trained again."""
    names = {id(param): name for name, param in module.named_parameters()}
    state = {key: value.detach().clone() for key, value in checkpoint["state_dict"].items()}
    for param, master in zip(parameters, snapshot.master):
        state[names[id(param)]] = master
    absorbed = done_by_epoch(snapshot.absorbed)
    done = {e: sorted(set(absorbed.get(e, ())) | set(resumed.get(e, ()))) for e in set(absorbed) | set(resumed)}
    work = {
        "epoch": epoch,
        "done": done.get(epoch, []),
        "later_epochs": {e: batches for e, batches in done.items() if e > epoch},
    }
    recovery = {"why": why, "round": restart_round(), "taken": taken, "absorbed": len(absorbed.get(epoch, ()))}
    rest = copy.deepcopy({k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")})
    return {
        **rest,
        "state_dict": state,
        "optimizer_states": checkpoint["optimizer_states"],
        CHECKPOINT_KEY: {**snapshot.progress, "work": work, "recovery": recovery},
    }
