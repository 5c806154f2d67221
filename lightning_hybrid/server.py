"""The parameter server: master parameters, the optimizer, and K-threshold aggregation.

Pure torch and thread-safe, so it can be driven in one process (tests) or by the receiver threads of
:mod:`lightning_hybrid.endpoint`. Semantics (README, *How it works*):

* pushed gradients collect in a pending set P; once ``|P| >= K`` one optimizer step applies
  their mean, the version rises by one, and every worker in P is answered;
* the staleness of a gradient is ``version - worker_version`` at the moment it is applied;
* a *drain* is a barrier: a draining worker pushes nothing until every active worker drains;
  then pending gradients are applied (even fewer than K) and all receive the latest parameters;
* a worker that *leaves* no longer counts: K is capped at the number of active workers;
* with ``early_pushes`` a worker may push its next gradient before its answer (a pipelined worker): that push is
  held, and arrives the moment its worker's pending gradient has been applied;
* gradients holding NaN or Inf are rejected and counted; the master weights are untouched;
* an update of k gradients is sized to its group (:mod:`lightning_hybrid.group_scaling`), and a gradient staler
  than ``max_staleness`` is dropped: counted, and its worker answered at once with the latest parameters so that
  it computes its batch again.

A sharded server runs one :class:`ParameterServer` (shard 0, which decides every update's group and every drop)
and one :class:`FollowerServer` per other shard (which applies the same groups and drops the same gradients).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_hybrid.errors import ProtocolError
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.group_scaling import GroupScaling, apply_scales
from lightning_hybrid.staleness import StalenessStats

if TYPE_CHECKING:
    from lightning_hybrid.chunkwise import ChunkStepper

# The "version" of a decision that drops the listed worker's gradient (updates produce versions from 1 on).
DROPPED = 0
# The "version" of a decision that asks every shard for a snapshot at the listed version (a recovery point).
RECOVERY_POINT = -2


@dataclass(frozen=True)
class GradientClipping:
    """Clipping of the aggregated gradient, as DDP clips the averaged one: by ``"norm"`` or ``"value"``."""

    value: float
    algorithm: str = "norm"

    def __post_init__(self) -> None:
        if self.algorithm not in ("norm", "value"):
            raise ValueError(f"gradient clipping algorithm must be 'norm' or 'value', got {self.algorithm!r}")
        if not self.value > 0:
            raise ValueError(f"gradient clipping value must be positive, got {self.value}")

    def apply(self, params: Sequence[Tensor]) -> None:
        with_grads = [p for p in params if p.grad is not None]  # torch's clip_grad_value_ fails on none (frozen)
        if not with_grads:
            return
        if self.algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(with_grads, self.value)
        else:
            torch.nn.utils.clip_grad_value_(with_grads, self.value)


@dataclass(frozen=True)
class Release:
    """Workers to answer now, and the master parameters they receive."""

    workers: tuple[int, ...]
    version: int
    params: list[Tensor]
    drained: bool = False
    answers_drain: bool = False  # every worker it answers asked to drain: see wire.WireFormat
    rejected: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()  # their gradients were staler than max_staleness: compute the batch again
    staleness: dict[int, int] = field(default_factory=dict)
    in_place: bool = False  # params are the worker's own idle gradient buffer, not a snapshot to recycle
    applied: int = 0  # gradients applied in all, by every update up to ``version``


@dataclass(frozen=True)
class _HeldPush:
    """A push as it arrived (see :meth:`ParameterServer.push`), until the server takes it."""

    gradient: Sequence[Tensor]
    version: int
    drain: bool
    finite: bool
    work: Optional[int]
    unused: frozenset[int]


@dataclass(frozen=True)
class ServerSnapshot:
    """The server's whole training state at one version, copied under its lock (see :meth:`ParameterServer.snapshot`):
    what a recovery checkpoint needs when no other rank can be asked."""

    master: list[Tensor]  # the master parameters, shaped as the model's, in the server's parameter order
    optimizer_state: dict[str, Any]
    progress: dict[str, Any]
    absorbed: frozenset[int]  # work ids whose gradients the master holds (see ``push``)


def optimizer_parameters(optimizer: Optimizer) -> list[Tensor]:
    """Every parameter ``optimizer`` steps, group after group: the order of the server's flat layout."""
    return [param for group in optimizer.param_groups for param in group["params"]]


def steps_exactly(optimizer: Optimizer, groups: Sequence[Sequence[Tensor]]) -> bool:
    """Whether ``optimizer``'s param groups hold ``groups`` and nothing else, in that order (the very tensors)."""
    mine = [group["params"] for group in optimizer.param_groups]
    return len(mine) == len(groups) and all(
        len(a) == len(b) and all(x is y for x, y in zip(a, b)) for a, b in zip(mine, groups)
    )


def clone_optimizer(
    optimizer: Optimizer, params: Sequence[Tensor], group_sizes: Optional[Sequence[int]] = None
) -> Optimizer:
    """A new optimizer of the same class and hyperparameters over ``params``, grouped as ``optimizer``'s are.

    ``params`` are matched to ``optimizer``'s parameters in group order, ``group_sizes[g]`` of them to group ``g``
    (default: as many as ``optimizer``'s group holds; a server shard holds pieces of some parameters only).
    """
    groups, start = [], 0
    for index, group in enumerate(optimizer.param_groups):
        count = len(group["params"]) if group_sizes is None else group_sizes[index]
        groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": list(params[start : start + count])}
        )
        start += count
    if start != len(params):
        raise ValueError(f"the optimizer holds {start} parameters but {len(params)} were given")
    try:
        return type(optimizer)(groups, **_constructor_arguments(type(optimizer), optimizer.defaults))
    except TypeError as err:
        raise TypeError(
            f"cannot build a server-side copy of {type(optimizer).__name__} from its `defaults` ({err}); "
            "hybrid_sgd needs an optimizer whose constructor takes its own `defaults` as keyword arguments, "
            "as every torch.optim optimizer does"
        ) from err


def _constructor_arguments(kind: type[Optimizer], defaults: dict[str, Any]) -> dict[str, Any]:
    """The ``defaults`` that ``kind``'s constructor takes: a subclass may fix one of its base's (AdamW's defaults
    hold Adam's ``decoupled_weight_decay``, which AdamW's constructor does not take); the groups carry every value."""
    accepted = inspect.signature(kind.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return dict(defaults)
    return {name: value for name, value in defaults.items() if name in accepted}


def check_max_staleness(max_staleness: Optional[int]) -> None:
    if max_staleness is not None and (
        isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 1
    ):
        raise ValueError(
            f"max_staleness={max_staleness!r} must be a positive int (drop gradients staler than that many updates) "
            "or None (apply every gradient); 0 would drop every gradient that waited for another worker's update"
        )


def gradients_applied(update_sizes: Mapping[Any, int]) -> int:
    """Gradients applied in all, from the counts of updates by their size (``progress_state``'s
    ``update_sizes``, whose keys a checkpoint may hold as strings)."""
    return sum(int(size) * count for size, count in update_sizes.items())


def all_finite(tensor: Tensor) -> bool:
    """Exactly ``isfinite(tensor).all()``, in one pass without a mask in the common case: a NaN or Inf
    element makes the sum NaN or Inf; only a sum that overflows needs the element-wise check
    (17x faster for 1M float32 elements on one CPU thread: 0.16 ms against 2.8 ms)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


class ParameterServer:
    """Holds the master parameters and applies one optimizer step per K pushed gradients."""

    def __init__(
        self,
        params: Sequence[Tensor],
        make_optimizer: Callable[[list[Tensor]], Optimizer],
        num_workers: int,
        threshold: int,
        *,
        gradient_clipping: Optional[GradientClipping] = None,
        hyperparameters: Optional[Callable[[], Sequence[Mapping[str, Any]]]] = None,
        device: torch.device | str | None = None,
        staleness_scaling: bool = False,
        group_scaling: str = "none",
        max_staleness: Optional[int] = None,
        early_pushes: bool = False,
        layout: Optional[FlatLayout] = None,
    ) -> None:
        """``hyperparameters`` returns param groups whose values (e.g. a scheduled ``lr``) the server copies
        into its own optimizer before every step. ``staleness_scaling`` weighs each gradient by
        ``1 / (1 + s)`` before averaging, ``s`` its staleness counted in sync updates: how far the model moved
        since the gradient's parameters, each update counting as far as ``group_scaling`` sized it (see
        :meth:`_weight`; exact at arrival, since no update happens while a gradient is pending).
        ``group_scaling`` names the rule that sizes an update to its group of gradients
        (:mod:`lightning_hybrid.group_scaling`). A gradient staler than ``max_staleness`` updates is dropped (its
        staleness is known at arrival, for the same reason). ``early_pushes``: a worker may push once more while
        its gradient is pending (see :meth:`push`). ``layout``: the layout of ``params`` where its wire chunks are
        given (a striped shard's, see :class:`ShardPlan`)."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        check_max_staleness(max_staleness)
        device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
        self.layout = FlatLayout.of(params)
        if layout is not None:
            if (layout.slots, layout.sizes) != (self.layout.slots, self.layout.sizes):
                raise ValueError("the given layout does not describe the server's parameters")
            self.layout = layout
        self.num_workers = num_workers
        self._master = self.layout.allocate(device)
        with torch.no_grad():
            self.layout.pack([p.detach() for p in params], self._master)
        self.parameters = [torch.nn.Parameter(view) for view in self.layout.views(self._master)]
        self.optimizer = make_optimizer(self.parameters)
        self._scaling = GroupScaling(group_scaling, self.optimizer, num_workers)
        self._max_staleness = max_staleness
        self._sum: Optional[list[Tensor]] = None  # the pending gradients' (weighted) sum, see _accumulate
        self._device_sum: list[Tensor] = []  # the sum's own buffers, for gradients that arrive off the device
        self._spare_snapshots: list[list[Tensor]] = []  # see recycle()
        self._own_buffers: dict[int, Sequence[Tensor]] = {}  # see connect()
        self._gradient_clipping = gradient_clipping
        self._hyperparameters = hyperparameters
        self._staleness_scaling = staleness_scaling
        # how far the model has moved, in sync updates (each update's GroupScale.step), at every version a
        # gradient may still come for: from the oldest version an active worker was answered with (see _weight)
        self._moved_at: dict[int, float] = {0: 0.0}
        self._answered: dict[int, int] = dict.fromkeys(range(num_workers), 0)
        self._lock = threading.RLock()
        self._threshold = self._checked_threshold(threshold)
        self._version = 0
        self._pending: dict[int, int] = {}
        self._pending_work: dict[int, int] = {}  # work ids of pending gradients that carry one
        self._pending_unused: dict[int, frozenset[int]] = {}  # tensors a pending gradient did not use, if any
        self._early_pushes = early_pushes
        self._held: dict[int, _HeldPush] = {}  # a pipelined worker's next push, while its last one is pending
        # early_pushes: each worker's answer before its last, which its next gradient may have been computed on
        self._answered_before: dict[int, int] = {}
        self.absorbed: set[int] = set()  # work ids of applied (or rejected) gradients, until forgotten
        self._draining: set[int] = set()
        self._active: set[int] = set(range(num_workers))
        self.stats = StalenessStats()
        self.rejected: Counter = Counter()
        self._unreported_rejections: set[int] = set()
        self.dropped: Counter = Counter()  # gradients staler than max_staleness, per worker
        # sums over updates of the first parameter group's step scale (see GroupScale; times the mean staleness
        # weight) and momentum: telemetry
        self.step_scale_total = 0.0
        self.momentum_total = 0.0
        self.update_sizes: Counter = Counter()
        self.flushed_updates = 0  # updates of fewer than K gradients: nobody else would push before a drain
        self.updates_stepped_ahead = 0  # with a chunk stepper: updates it had stepped exactly (the rest: put back)
        self.update_seconds = 0.0  # server compute: arrival checks and sums, mean, clipping, step, snapshots
        self.stop_flags = 0
        self._on_decision: Optional[Callable[[int, tuple[int, ...]], None]] = None  # see connect()
        self._answers_in_place: frozenset[int] = frozenset()  # see connect()
        self._chunk_stepper: Optional[ChunkStepper] = None  # see connect()
        self._unsummed: dict[int, tuple[Sequence[Tensor], float]] = {}  # with a chunk stepper: see _take_gradient

    def connect(
        self,
        *,
        answers_in_place: Collection[int] = (),
        on_decision: Optional[Callable[[int, tuple[int, ...]], None]] = None,
        chunk_stepper: Optional[ChunkStepper] = None,
    ) -> None:
        """Wire the server to the runtime that delivers its answers (``ServerEndpoint``), before it serves.

        ``answers_in_place``: workers whose pushed gradient buffers are theirs alone (a remote worker's receive
        buffer): an answer to one of them alone is written into its last gradient buffer (see ``_release``).
        ``on_decision(version, workers)`` is called under the lock just before an update of those workers'
        gradients is applied, and with version :data:`DROPPED` when the one worker's gradient is dropped: shard 0
        of a sharded server tells the other shards, which then step in parallel with it. ``chunk_stepper``
        steps updates chunk by chunk ahead of the server (``overlap_answers``, :mod:`lightning_hybrid.chunkwise`);
        the server then sums a group's gradients only when the chunks stepped turn out not to be its update."""
        self._answers_in_place = frozenset(answers_in_place)
        self._on_decision = on_decision
        self._chunk_stepper = chunk_stepper

    # ------------------------------------------------------------------ queries
    @property
    def device(self) -> torch.device:
        return self._master[0].device if self._master else torch.device("cpu")

    @property
    def version(self) -> int:
        return self._version

    @property
    def threshold(self) -> int:
        return self._threshold

    @property
    def active_workers(self) -> frozenset[int]:
        return frozenset(self._active)

    @property
    def early_pushes(self) -> bool:
        return self._early_pushes

    @property
    def pending_workers(self) -> frozenset[int]:
        return frozenset(self._pending)

    @property
    def master(self) -> list[Tensor]:
        """The master parameters' flat buffers (of :attr:`layout`)."""
        return self._master

    @property
    def gradient_clipping(self) -> Optional[GradientClipping]:
        return self._gradient_clipping

    @property
    def steps_whole_groups(self) -> bool:
        """Every update takes every worker's gradient, one each (K = N, none has left, none pushes early): a chunk
        stepper may step an update before the server applies it. Read without the lock: the server checks the
        update when it applies it."""
        return self._threshold == self.num_workers == len(self._active) and not self._early_pushes

    def update_scales(self, count: int) -> list[Any]:
        """Copy the user's hyperparameters into the optimizer, and return each group's scale for an update of
        ``count`` gradients (:mod:`lightning_hybrid.group_scaling`). Takes no lock (a chunk stepper calls it)."""
        if self._hyperparameters is not None:
            for mine, theirs in zip(self.optimizer.param_groups, self._hyperparameters()):
                mine.update({k: v for k, v in theirs.items() if k != "params"})
        return self._scaling.scales(self.optimizer.param_groups, count)

    # ------------------------------------------------------------------ events
    def push(
        self,
        worker: int,
        gradient: Sequence[Tensor],
        version: int,
        *,
        drain: bool = False,
        nonfinite: bool = False,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> list[Release]:
        """A worker's gradient, computed on parameters at ``version``; with ``drain`` it also starts draining.
        ``nonfinite``: the worker found NaN/Inf in its whole gradient (of which a shard sees a part): reject it.
        ``work``: an id of the data the gradient came from (see :mod:`lightning_hybrid.work`); once the gradient is
        applied (or rejected: its data was used) the id joins :attr:`absorbed`, so that a recovery knows which data
        the master holds. A dropped gradient's data is not absorbed: its worker pushes it again. ``unused``: indices
        of tensors (of the layout) that got no gradient on the worker (zeros in ``gradient``): frozen ones
        (``requires_grad`` off at that step) and ones its forward left out. A tensor that no gradient of an update
        used gets no gradient in that update's step, so that the optimizer leaves it alone (weight decay and momentum
        included), as DDP leaves a frozen parameter and, with ``find_unused_parameters=True``, one that no rank used.

        The server may write into ``gradient``'s buffers until the worker is answered (see ``_accumulate``). With
        ``early_pushes``, a push while the worker's last gradient is pending is held (its buffers too) and arrives
        once that gradient is applied: as if pushed then, its staleness counted from ``version`` alike."""
        self._check_worker(worker)
        self._check_gradient(worker, gradient)
        finite = not nonfinite and all(all_finite(g) for g in gradient)  # outside the lock: checks overlap
        with self._lock:
            if self._early_pushes and worker in self._pending and worker in self._active:
                if worker in self._held:
                    raise ProtocolError(f"worker {worker} pushed a third gradient before its first was answered")
                self._check_version(worker, version)
                self._held[worker] = _HeldPush(gradient, version, drain, finite, work, unused)
                return []
            return self._take(worker, _HeldPush(gradient, version, drain, finite, work, unused))

    def _take(self, worker: int, push: _HeldPush) -> list[Release]:
        """A push arrives (see :meth:`push`); under the lock."""
        started = time.perf_counter()
        gradient, version, drain, finite, work = push.gradient, push.version, push.drain, push.finite, push.work
        self._check_waitable(worker)
        self._check_version(worker, version)
        if worker in self._answers_in_place:
            self._own_buffers[worker] = gradient
        if finite and self._drops(worker, version):
            # not even its drain counts: the worker pushes the batch again, with the drain, on the answer's
            # parameters (while the others drain nothing moves, so that push is fresh)
            self.dropped[worker] += 1
            self._withdraw(worker)
            return [self._release((worker,), dropped=(worker,), answers_drain=drain)]
        if drain:
            self._draining.add(worker)
        if not finite:
            self.rejected[worker] += 1
            self._withdraw(worker)
            if work is not None:
                self.absorbed.add(work)
            if drain:  # the worker hears of it when the drain completes
                self._unreported_rejections.add(worker)
                return self._settle()
            return [self._release((worker,), rejected=(worker,))] + self._settle()
        self._arrive(worker, gradient, version)
        if push.unused:
            self._pending_unused[worker] = push.unused
        if work is not None:
            self._pending_work[worker] = work
        self.update_seconds += time.perf_counter() - started
        return self._settle()

    def drain(self, worker: int) -> list[Release]:
        """The worker pushes nothing more until every active worker has drained."""
        with self._lock:
            self._check_waitable(worker)
            self._draining.add(worker)
            return self._settle()

    def leave(self, worker: int) -> list[Release]:
        """The worker is done (or gone): it is no longer waited for. A pending gradient of it is still applied."""
        with self._lock:
            self._check_worker(worker)
            self._active.discard(worker)
            self._draining.discard(worker)
            self._answered.pop(worker, None)
            self._answered_before.pop(worker, None)
            self._held.pop(worker, None)  # not absorbed: a recovery trains its batch again
            return self._settle()

    def set_threshold(self, threshold: int) -> list[Release]:
        """Change K; it takes effect now: lowering it below ``|P|`` applies the pending update at once."""
        with self._lock:
            self._threshold = self._checked_threshold(threshold)
            return self._settle()

    def request_stop(self, flags: int) -> None:
        """Remember stop signals (e.g. SIGTERM, time up) so that every answer carries them to all workers."""
        with self._lock:
            self.stop_flags |= flags

    # ------------------------------------------------------------------ state
    def snapshot(self, recovery_point: bool = False) -> ServerSnapshot:
        """Everything the server holds, consistent at one version: no update runs while it is copied. With
        ``recovery_point``, shard 0 of a sharded server also asks every other shard for its snapshot at this
        version (see :class:`FollowerServer`)."""
        with self._lock:
            if recovery_point and self._on_decision is not None:
                self._on_decision(RECOVERY_POINT, (self._version,))
            return self._snapshot()

    def _snapshot(self) -> ServerSnapshot:
        stepper = self._chunk_stepper
        with stepper.idle() if stepper is not None else contextlib.nullcontext():
            master = [p.detach().clone() for p in self.parameters]
            state = copy.deepcopy(self.optimizer.state_dict())
            if stepper is not None:  # chunks of the coming update may be stepped already
                stepper.before_update(master, state)
        return ServerSnapshot(
            master=master, optimizer_state=state, progress=self.progress_state(), absorbed=frozenset(self.absorbed)
        )

    def forget_absorbed(self, below: int) -> None:
        """Forget absorbed work ids below ``below`` (e.g. the ids of finished epochs)."""
        with self._lock:
            self.absorbed = {work for work in self.absorbed if work >= below}

    def progress_state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "version": self._version,
                "threshold": self._threshold,
                "num_workers": self.num_workers,
                "staleness": self.stats.state_dict(),
                "rejected": dict(self.rejected),
                "dropped": dict(self.dropped),
                "step_scale_total": self.step_scale_total,
                "momentum_total": self.momentum_total,
                "update_sizes": dict(self.update_sizes),
                "flushed_updates": self.flushed_updates,
                "updates_stepped_ahead": self.updates_stepped_ahead,
                "update_seconds": self.update_seconds,
            }

    def load_progress_state(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            self._version = int(state["version"])
            self._moved_at = {self._version: 0.0}  # every worker starts from the loaded master
            self._answered = dict.fromkeys(self._answered, self._version)
            self._answered_before = {}
            self._threshold = self._checked_threshold(int(state["threshold"]))
            self.stats = StalenessStats()
            self.stats.load_state_dict(state.get("staleness", {"counts": {}, "per_worker": {}}))
            self.rejected = Counter({int(k): v for k, v in state.get("rejected", {}).items()})
            self.dropped = Counter({int(k): v for k, v in state.get("dropped", {}).items()})
            self.step_scale_total = float(state.get("step_scale_total", 0.0))
            self.momentum_total = float(state.get("momentum_total", 0.0))
            self.update_sizes = Counter({int(k): v for k, v in state.get("update_sizes", {}).items()})
            self.flushed_updates = int(state.get("flushed_updates", 0))
            self.updates_stepped_ahead = int(state.get("updates_stepped_ahead", 0))
            self.update_seconds = float(state.get("update_seconds", 0.0))

    # ------------------------------------------------------------------ internals
    def _checked_threshold(self, threshold: int) -> int:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= self.num_workers:
            raise ValueError(
                f"threshold K={threshold!r} must be an int in [1, {self.num_workers}] for {self.num_workers} workers"
            )
        return threshold

    def _check_worker(self, worker: int) -> None:
        if not 0 <= worker < self.num_workers:
            raise ProtocolError(f"unknown worker {worker}: workers are 0..{self.num_workers - 1}")

    def _check_waitable(self, worker: int) -> None:
        self._check_worker(worker)
        if worker not in self._active:
            raise ProtocolError(f"worker {worker} has left and cannot push or drain any more")
        if worker in self._pending or worker in self._draining:
            raise ProtocolError(f"worker {worker} sent a message while it still waits for its answer")

    def _check_version(self, worker: int, version: int) -> None:
        if not 0 <= version <= self._version:
            raise ProtocolError(
                f"worker {worker} pushed a gradient for version {version}, but the server is at version "
                f"{self._version}: versions lie in [0, current]"
            )

    def _check_gradient(self, worker: int, gradient: Sequence[Tensor]) -> None:
        shapes = [(g.dtype, g.numel()) for g in gradient]
        expected = list(zip(self.layout.dtypes, self.layout.sizes))
        if shapes != expected or any(g.dim() != 1 for g in gradient):
            raise ProtocolError(
                f"worker {worker} pushed gradient buffers {shapes}, expected flat buffers {expected}: "
                "every rank must build the same model (same parameter shapes and dtypes, same order)"
            )

    def _arrive(self, worker: int, gradient: Sequence[Tensor], version: int) -> None:
        """A finite gradient joins the pending set; it is summed at once (overlapping the wait for the others)."""
        self._take_gradient(worker, gradient, self._weight(version))
        self._pending[worker] = version

    def _take_gradient(self, worker: int, gradient: Sequence[Tensor], weight: float) -> None:
        """Sum a pending gradient; with a chunk stepper, hold it until its update is applied (see _settle_chunks)."""
        if self._chunk_stepper is None:
            self._accumulate(gradient, weight)
        else:
            self._unsummed[worker] = (gradient, weight)

    def _withdraw(self, worker: int) -> None:
        """The worker's pending gradient will not be applied: chunks stepped with it are put back."""
        if self._chunk_stepper is not None:
            self._chunk_stepper.withdraw(worker)

    def _settle_chunks(self, group: tuple[int, ...], unused: frozenset[int]) -> bool:
        """Whether a chunk stepper already stepped exactly this update; if not (or without one) the group's
        gradients are in the pending sum when this returns."""
        if self._chunk_stepper is None:
            return False
        held = [self._unsummed.pop(worker) for worker in group]
        if self._chunk_stepper.settle(group, unused, all(weight == 1.0 for _, weight in held)):
            self.updates_stepped_ahead += 1
            return True
        for gradient, weight in held:
            self._accumulate(gradient, weight)
        return False

    def _drops(self, worker: int, version: int) -> bool:
        """Whether the gradient is staler than the bound; followers hear of it before the answer leaves."""
        if self._max_staleness is None or self._version - version <= self._max_staleness:
            return False
        if self._on_decision is not None:
            self._on_decision(DROPPED, (worker,))
        return True

    def _weight(self, version: int) -> float:
        """``1 / (1 + s)``, ``s`` the sync updates' worth the model moved since ``version``. Counted in updates,
        a gradient would weigh less when the same movement came in more, smaller updates (two updates of k/2
        gradients move as far as one of k under ``group_scaling="step"``); counted in movement it weighs the same.
        With ``group_scaling="none"`` every update counts 1: ``s`` is the staleness in updates."""
        if not self._staleness_scaling:
            return 1.0
        return 1.0 / (1 + self._moved_at[self._version] - self._moved_at[version])

    def _record_movement(self, step: float) -> None:
        """The update to the next version moved the model ``step`` sync updates; forget the versions that neither
        an active worker holds nor a pending gradient (of a worker that left since) was computed on."""
        self._moved_at[self._version + 1] = self._moved_at[self._version] + step
        versions = [*self._answered.values(), *self._answered_before.values(), *self._pending.values()]
        versions += [held.version for held in self._held.values()]
        oldest = min(versions, default=self._version + 1)
        for version in [v for v in self._moved_at if v < oldest]:
            del self._moved_at[version]

    def _settle(self) -> list[Release]:
        releases = []
        if self._pending:
            quorum = min(self._threshold, max(len(self._active), 1))
            everyone_waits = self._active <= (set(self._pending) | self._draining)
            if len(self._pending) >= quorum or everyone_waits:
                if len(self._pending) < quorum:
                    self.flushed_updates += 1
                releases.append(self._apply(tuple(self._pending)))
        return self._with_drained(releases)

    def _with_drained(self, releases: list[Release]) -> list[Release]:
        """Held pushes of workers just answered arrive; once every active worker drains and nothing is pending, all
        draining workers are answered."""
        # one at a time: taking one settles again, which takes the others
        while (worker := next((w for w in self._held if w not in self._pending), None)) is not None:
            releases = releases + self._take(worker, self._held.pop(worker))
        if self._draining and self._active <= self._draining and not self._pending:
            rejected = tuple(sorted(self._unreported_rejections & self._draining))
            releases.append(
                self._release(tuple(sorted(self._draining)), drained=True, answers_drain=True, rejected=rejected)
            )
            self._unreported_rejections.clear()
            self._draining.clear()
        return [r for r in releases if r.workers]

    def _accumulate(self, gradient: Sequence[Tensor], weight: float) -> None:
        """Add a gradient to the pending sum. The first one of an update *becomes* the sum when it lives on the
        server's device: its buffers (a receive buffer, or the local worker's packed gradient) are idle until
        its worker is answered, so the server needs no sum buffer of its own, no zeroing and no copy."""
        if self._sum is None:
            if all(g.device == self.device and g.is_contiguous() for g in gradient):
                self._sum = list(gradient)
                if weight != 1.0:
                    for g in self._sum:
                        g.mul_(weight)
                return
            if not self._device_sum:
                self._device_sum = self.layout.allocate(self.device)
            self._sum = self._device_sum
            for total, g in zip(self._sum, gradient):
                torch.mul(g.to(total.device), weight, out=total)
            return
        for total, g in zip(self._sum, gradient):
            total.add_(g.to(total.device), alpha=weight)

    def _apply(self, group: tuple[int, ...]) -> Release:
        """One optimizer step with the pending sum, which holds the gradients of exactly ``group``: their mean,
        clipped, then sized to the group (:mod:`lightning_hybrid.group_scaling`)."""
        if self._on_decision is not None:
            self._on_decision(self._version + 1, tuple(sorted(group)))
        started = time.perf_counter()
        count = len(group)
        unused = frozenset.intersection(*(self._pending_unused.pop(worker, frozenset()) for worker in group))
        stepped = self._settle_chunks(group, unused)
        scales = self.update_scales(count)
        weights = sum(self._weight(self._pending[worker]) for worker in group)  # as when they arrived: see _arrive
        self.step_scale_total += scales[0].step * weights / count
        self.momentum_total += scales[0].momentum or 0.0
        if not stepped:
            self._step_sum(count, scales, unused)
        staleness = {worker: self._version - self._pending.pop(worker) for worker in group}
        self.absorbed.update(self._pending_work.pop(worker) for worker in group if worker in self._pending_work)
        for worker, value in staleness.items():
            self.stats.record(worker, value)
        self.update_sizes[count] += 1
        self._record_movement(scales[0].step)
        self._version += 1
        answered = tuple(w for w in sorted(group) if w not in self._draining and w in self._active)
        release = self._release(answered, staleness=staleness, snapshot=not stepped)
        self.update_seconds += time.perf_counter() - started
        return release

    def _step_sum(self, count: int, scales: list[Any], unused: frozenset[int]) -> None:
        """One optimizer step with the pending sum of ``count`` gradients: their mean, clipped, then sized to the
        group; tensors in ``unused`` get no gradient."""
        assert self._sum is not None
        # without clipping, one gradient factor shared by every group joins the mean's division (one pass)
        folded = (
            scales[0].gradient if self._gradient_clipping is None and len({s.gradient for s in scales}) == 1 else 1.0
        )
        if folded != 1.0:
            for total in self._sum:
                total.mul_(folded / count)
            scales = [dataclasses.replace(scale, gradient=1.0) for scale in scales]
        elif count > 1:
            for total in self._sum:
                total.div_(count)
        for index, (param, grad) in enumerate(zip(self.parameters, self.layout.views(self._sum))):
            param.grad = None if index in unused else grad
        if self._gradient_clipping is not None:
            self._gradient_clipping.apply(self.parameters)
        restore = apply_scales(self.optimizer.param_groups, scales)
        self.optimizer.step()
        restore()
        for param in self.parameters:
            param.grad = None  # the sum's buffers go back to their worker with its answer
        self._sum = None

    def _release(self, workers: tuple[int, ...], snapshot: bool = True, **kwargs: Any) -> Release:
        """A snapshot of the master for ``workers``: later updates may happen while it is being sent (none where a
        chunk stepper already sent every chunk: ``snapshot=False``).

        An answer to one worker in ``answers_in_place`` (see :meth:`connect`) is written into that worker's last
        gradient buffer: it is idle (applied, rejected or summed) and the worker pushes into it again only after it has
        received this answer, so asynchronous training holds no snapshot per worker in flight. Other snapshots come
        from :meth:`recycle` where possible (a fresh 40 MB tensor costs 17 ms in page faults, a copy into a used one
        4 ms)."""
        params: list[Tensor] = []
        in_place = len(workers) == 1 and workers[0] in self._own_buffers
        if not snapshot:
            in_place = False
        elif in_place:
            params = list(self._own_buffers[workers[0]])
        elif workers:
            params = self._spare_snapshots.pop() if self._spare_snapshots else self.layout.allocate(self.device)
        for snapshot, master in zip(params, self._master):
            snapshot.copy_(master)
        if self._early_pushes:
            self._answered_before.update({w: self._answered.get(w, self._version) for w in workers})
        self._answered.update(dict.fromkeys(workers, self._version))
        applied = gradients_applied(self.update_sizes)
        return Release(
            workers=workers, version=self._version, params=params, in_place=in_place, applied=applied, **kwargs
        )

    def recycle(self, params: list[Tensor]) -> None:
        """A release's snapshot was delivered and nobody reads it any more: the next snapshot may reuse it."""
        with self._lock:
            if params and len(self._spare_snapshots) < 4:
                self._spare_snapshots.append(params)


class FollowerServer(ParameterServer):
    """A shard of a sharded server other than shard 0: it applies exactly the groups of gradients that shard 0
    (the coordinator) chose, in shard 0's order, so that every shard takes the same K-of-N decisions and keeps
    the same version. Shards that each took their own first K arrivals could choose different groups and then
    wait for each other forever (found by the soak test); shard 0 alone applies K and its schedule."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._arrived: dict[int, Sequence[Tensor]] = {}  # pending gradients, summed once their group is decided
        self._decisions: dict[int, tuple[int, ...]] = {}  # shard 0's groups by the version they produce
        self._coming_drops: Counter = Counter()  # shard 0 dropped these workers' gradients before they came here
        self._recovery_point: Optional[int] = None  # the version at which shard 0 asked for a snapshot
        self.on_recovery_point: Optional[Callable[[ServerSnapshot], None]] = None
        """Called under the lock with this shard's snapshot at every recovery point shard 0 asks for (it must only
        hand the snapshot on: the shard waits)."""

    def decide(self, version: int, group: Sequence[int]) -> list[Release]:
        """Shard 0's update to ``version`` applied the gradients of ``group``: apply the same here, in version
        order, once they have all arrived. ``version`` :data:`DROPPED`: shard 0 dropped the gradient of the one
        worker in ``group`` as too stale: drop it here too, whether it came already or comes later."""
        with self._lock:
            if version == RECOVERY_POINT and len(group) == 1:
                self._ask_snapshot(group[0])
                return []
            for worker in group:
                self._check_worker(worker)
            if version == DROPPED and len(group) == 1:
                return self._drop(group[0])
            if not group or version <= self._version or version in self._decisions:
                raise ProtocolError(
                    f"shard 0 decided update {version} with workers {list(group)}, but this shard is at version "
                    f"{self._version} and has decided {sorted(self._decisions)}: decisions are unique, non-empty "
                    "and come after the current version"
                )
            self._decisions[version] = tuple(group)
            return self._settle()

    def _ask_snapshot(self, version: int) -> None:
        """Shard 0 took its snapshot at ``version``: take this shard's there (now, or once it gets there; shard 0
        asks before it decides the next update, so no shard is past it)."""
        if version < self._version:
            raise ProtocolError(f"shard 0 asked for a snapshot at version {version}, this shard is at {self._version}")
        self._recovery_point = version
        self._take_recovery_point()

    def _take_recovery_point(self) -> None:
        if self._recovery_point == self._version:
            self._recovery_point = None
            if self.on_recovery_point is not None:
                self.on_recovery_point(self._snapshot())

    def _arrive(self, worker: int, gradient: Sequence[Tensor], version: int) -> None:
        self._arrived[worker] = gradient  # its buffer is idle until the worker is answered
        self._pending[worker] = version

    def _check_version(self, worker: int, version: int) -> None:
        """Workers send every shard the version shard 0 answered them with (so that every shard weighs and records
        a gradient's staleness alike); this shard may not have applied that update yet."""
        if version < 0:
            raise ProtocolError(f"worker {worker} pushed a gradient for version {version}: versions are >= 0")

    def _drops(self, worker: int, version: int) -> bool:
        """Shard 0 alone decides: the gradient is dropped here if shard 0 already dropped it."""
        if not self._coming_drops[worker]:
            return False
        self._coming_drops[worker] -= 1
        return True

    def _drop(self, worker: int) -> list[Release]:
        if worker not in self._arrived:
            self._coming_drops[worker] += 1
            return []
        del self._arrived[worker], self._pending[worker]
        self._pending_work.pop(worker, None)
        self._pending_unused.pop(worker, None)
        drain = worker in self._draining
        self._draining.discard(worker)  # a drain comes again with the batch
        self.dropped[worker] += 1
        self._withdraw(worker)
        return [self._release((worker,), dropped=(worker,), answers_drain=drain)] + self._settle()

    def _settle(self) -> list[Release]:
        releases = []
        while (group := self._decisions.get(self._version + 1)) is not None and all(
            worker in self._pending for worker in group
        ):
            del self._decisions[self._version + 1]
            started = time.perf_counter()
            for worker in group:  # weights as at shard 0, where no update happened while these were pending
                self._take_gradient(worker, self._arrived.pop(worker), self._weight(self._pending[worker]))
            self.update_seconds += time.perf_counter() - started
            releases.append(self._apply(group))
            self._take_recovery_point()
        return self._with_drained(releases)
