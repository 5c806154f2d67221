"""Recovery checkpoints: files that are complete on disk or absent, newest first, a few kept.

The server's rank writes them alone, with no collective (see ``HybridSGDStrategy(recovery_dir=...)``): every
``recovery_every`` seconds while training runs, and once more when the run fails (a lost worker, SIGTERM), when
the other ranks may be dead. Each is written to a hidden temporary name and renamed into place, so a reader never
sees half a file: a process killed while writing leaves only a temporary that no one loads (and that the next
write removes). Names sort by the wall-clock time of writing, so the newest is the last of a restarted run too.

A sharded server has no rank that holds the whole state: at a *recovery point* shard 0 asks every shard for its
snapshot at one version (a decision on the channels it already has, no collective), and each shard writes its
*part*; global rank 0's part also holds its Lightning checkpoint. The next run joins the newest complete set of
parts into one recovery checkpoint. When a rank is lost nothing more is written (its slice died with it): the run
resumes from the last complete recovery point; at a relayed SIGTERM, with every rank alive, shard 0 asks for one
more point.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from lightning_fabric.plugins import CheckpointIO
from torch import Tensor
from torch.optim import Optimizer

from lightning_hybrid.elastic import restart_round
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.server import ServerSnapshot, optimizer_parameters
from lightning_hybrid.shards import ShardPlan
from lightning_hybrid.work import done_by_epoch

log = logging.getLogger(__name__)

_PREFIX, _PART_PREFIX, _SUFFIX = "recovery-", "part-", ".ckpt"
_PART_NAME = re.compile(r"part-r(\d+)-n(\d+)-v(\d+)-(\d+)\.ckpt")  # restart round, shards, version, shard
CHECKPOINT_KEY = "hybrid_sgd"  # the strategy's entry in a Lightning checkpoint
PART_KEY = "hybrid_sgd_part"  # a shard's state at a recovery point, in its part file


@dataclass(frozen=True)
class Shard:
    """Which shard of how many a part belongs to."""

    index: int
    count: int


class RecoveryDir:
    """A folder of recovery checkpoints on storage every node sees; keeps the newest ``keep``."""

    def __init__(self, path: str | os.PathLike, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep} must be at least 1")
        self.path = Path(path)
        self.keep = keep

    def save(
        self, checkpoint: dict[str, Any], checkpoint_io: CheckpointIO, version: int, shard: Optional[Shard] = None
    ) -> Path:
        """Write ``checkpoint`` (a Lightning checkpoint dict) as the newest recovery checkpoint, or as ``shard``'s
        part of the recovery point at ``version``."""
        self.path.mkdir(parents=True, exist_ok=True)
        if shard is None:
            name = f"{_PREFIX}{time.time_ns():020d}-v{version}{_SUFFIX}"
        else:
            name = f"{_PART_PREFIX}r{restart_round()}-n{shard.count}-v{version}-{shard.index}{_SUFFIX}"
        own = f"{_PREFIX}*" if shard is None else f"{_PART_PREFIX}*-{shard.index}{_SUFFIX}"
        for stale in self._partials(own):  # this writer's own, left by a process killed while writing
            stale.unlink(missing_ok=True)
        partial = self.path / f".{name}.partial"
        checkpoint_io.save_checkpoint(checkpoint, partial)
        os.replace(partial, self.path / name)
        if shard is None or shard.index == 0:  # global rank 0 tidies up
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

    def join_newest_parts(self, checkpoint_io: CheckpointIO) -> None:
        """Where the newest complete set of shards' parts is newer than the newest recovery checkpoint, join it into
        one (see :func:`join_parts`); the parts go."""
        complete = [paths for paths in self._part_sets() if all(zipfile.is_zipfile(p) for p in paths)]
        if not complete:
            return
        paths = max(complete, key=lambda paths: paths[0].stat().st_mtime_ns)
        newest = self.newest()
        if newest is not None and newest.stat().st_mtime_ns > paths[0].stat().st_mtime_ns:
            return
        parts = [torch.load(path, map_location="cpu", weights_only=False) for path in paths]
        version = parts[0][CHECKPOINT_KEY]["version"]
        joined = self.save(join_parts(parts), checkpoint_io, version)
        log.warning("hybrid_sgd: joined the %d shards' parts of recovery point %d into %s", len(parts), version, joined)
        for path in self._parts():
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every recovery checkpoint: the run they would resume has finished."""
        for path in self.checkpoints() + self._parts() + self._partials():
            path.unlink(missing_ok=True)

    def _parts(self) -> list[Path]:
        return [p for p in self.path.iterdir() if _PART_NAME.fullmatch(p.name)] if self.path.is_dir() else []

    def _part_sets(self) -> list[list[Path]]:
        """The sets of parts that every shard wrote (in shard order), each of one recovery point."""
        sets: dict[tuple[str, ...], dict[int, Path]] = {}
        for path in self._parts():
            match = _PART_NAME.fullmatch(path.name)
            assert match is not None
            sets.setdefault(match.groups()[:3], {})[int(match[4])] = path
        return [[parts[s] for s in range(int(key[1]))] for key, parts in sets.items() if len(parts) == int(key[1])]

    def _partials(self, pattern: str = "*") -> list[Path]:
        """Files half-written by a killed writer (hidden, ``.partial``), whose name matches ``pattern``."""
        return list(self.path.glob(f".{pattern}.partial")) if self.path.is_dir() else []

    def _prune(self) -> None:
        """Keeps the newest ``keep`` checkpoints and complete sets of parts, and every part written since the oldest
        kept set (a shard may be writing its part of a newer point now)."""
        kept = sorted(self._part_sets(), key=lambda paths: paths[0].stat().st_mtime_ns)[-self.keep :]
        since = kept[0][0].stat().st_mtime_ns if kept else 0
        keep = {path for paths in kept for path in paths}
        old_parts = [p for p in self._parts() if p not in keep and p.stat().st_mtime_ns < since]
        for path in self.checkpoints()[: -self.keep] + old_parts:
            path.unlink(missing_ok=True)


class RecoveryWriter:
    """The server's rank's writer: a periodic checkpoint every ``every`` seconds, written in a thread so that
    training goes on, and a last one at a failure, waited for (the process is about to end). A shard's writer
    (``shard``) writes its parts of the recovery points."""

    def __init__(
        self, directory: RecoveryDir, every: float, checkpoint_io: CheckpointIO, shard: Optional[Shard] = None
    ) -> None:
        self.directory = directory
        self.every = every
        self.shard = shard
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
            path = self.directory.save(checkpoint, self._checkpoint_io, version, self.shard)
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
    optimizer: Optimizer,
    epoch: int,
    resumed: Mapping[int, Sequence[int]],
    taken: Optional[int],
    why: str,
    sharded: bool = False,
    shard_weights: Optional[Sequence[float]] = None,
    stripe_elements: Optional[int] = None,
) -> dict[str, Any]:
    """Lightning's checkpoint of the server's rank (its loops, callbacks, ...) made a recovery checkpoint: the
    model's parameters become the server's master weights (``optimizer``'s parameters, the server's order, name
    them), every other tensor a copy, and the server's counters and absorbed batches join it. ``sharded``: the
    snapshot is shard 0's, and the checkpoint is global rank 0's part of a recovery point (see :func:`join_parts`;
    ``shard_weights`` and ``stripe_elements``: the server's plan, which placed the parts' pieces).

    ``resumed``: batches of each epoch trained before this fit resumed (not in this server's ledger); ``taken``:
    batches of ``epoch`` that all ranks took in this fit, of which those not absorbed will be trained again."""
    names = {id(param): name for name, param in module.named_parameters()}
    parameters = optimizer_parameters(optimizer)
    state = {key: value.detach().clone() for key, value in checkpoint["state_dict"].items()}
    if not sharded:
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
    hybrid = {**snapshot.progress, "work": work, "recovery": recovery}
    if not sharded:
        return {**rest, "state_dict": state, "optimizer_states": checkpoint["optimizer_states"], CHECKPOINT_KEY: hybrid}
    hybrid["shard_set"] = {  # what joining the parts needs: the whole model's layout and the user's groups
        "names": [names[id(p)] for p in parameters],
        "shapes": [p.shape for p in parameters],
        "dtypes": [p.dtype for p in parameters],
        "shard_weights": shard_weights,
        "stripe_elements": stripe_elements,
        "param_groups": [
            {**{k: v for k, v in group.items() if k != "params"}, "params": list(range(len(group["params"])))}
            for group in optimizer.param_groups
        ],
    }
    return {**rest, "state_dict": state, CHECKPOINT_KEY: hybrid, PART_KEY: shard_part(snapshot)}


def shard_part(snapshot: ServerSnapshot) -> dict[str, Any]:
    """A shard's snapshot as its part of a recovery point, on the host (so that parts from several GPUs join)."""
    state = snapshot.optimizer_state
    return {
        "master": [t.cpu() for t in snapshot.master],
        "optimizer_state": {
            **state,
            "state": {
                i: {k: v.cpu() if isinstance(v, Tensor) else v for k, v in e.items()} for i, e in state["state"].items()
            },
        },
        "progress": snapshot.progress,
    }


def join_parts(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One recovery checkpoint from every shard's part of a recovery point (global rank 0's first): the master
    weights and optimizer state joined as the sharded checkpoint's gather joins them, each shard's counters kept."""
    checkpoint = dict(parts[0])
    hybrid = dict(checkpoint[CHECKPOINT_KEY])
    meta = hybrid.pop("shard_set")
    shard_parts = [part[PART_KEY] for part in parts]
    del checkpoint[PART_KEY]
    plan = ShardPlan(
        FlatLayout(meta["shapes"], meta["dtypes"]), len(parts), meta.get("shard_weights"), meta.get("stripe_elements")
    )
    whole = [torch.empty(shape, dtype=dtype) for shape, dtype in zip(meta["shapes"], meta["dtypes"])]
    for pieces, part in zip(plan.pieces, shard_parts):
        for (index, start, end), piece in zip(pieces, part["master"]):
            whole[index].view(-1)[start:end] = piece.reshape(-1)
    checkpoint["state_dict"] = {**checkpoint["state_dict"], **dict(zip(meta["names"], whole))}
    optimizer_state, scalars = plan.merge_states(
        [part["optimizer_state"] for part in shard_parts], meta["param_groups"]
    )
    checkpoint["optimizer_states"] = [optimizer_state]
    checkpoint[CHECKPOINT_KEY] = {
        **hybrid,
        "shards": [part["progress"] for part in shard_parts],
        "shard_scalars": scalars,
    }
    return checkpoint
