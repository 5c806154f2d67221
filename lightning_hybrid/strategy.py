"""``HybridSGDStrategy``: Lightning glue for hybrid synchronous/asynchronous parameter-server SGD.

Processes are launched and the default process group is set up exactly as Lightning's DDP does
(so ``torchrun``, SLURM and ``num_nodes > 1`` work, the DistributedSampler is injected and
``barrier``/``broadcast``/metric syncs keep working). What changes is the optimizer step: each
worker runs the closure (forward, backward, accumulation, precision) as Lightning does, pushes its
gradient to the parameter server on global rank 0 (or, with ``shard_server=True``, each slice of it
to the rank that serves that slice), waits for the answer and loads the new parameters. Workers
never step the optimizer themselves.

Rules a user can rely on:

* The server applies a copy of the optimizer ``configure_optimizers`` returns, with the
  hyperparameters (e.g. a scheduled ``lr``) of rank 0's optimizer at the moment of each update.
* Gradient clipping (``Trainer(gradient_clip_val=...)``) applies on the server to the averaged
  gradient, as DDP clips the averaged one.
* Buffers (BatchNorm statistics) stay local while training; at every drain (validation, checkpoint,
  end of every epoch and of fit) every rank takes rank 0's, as DDP's ``broadcast_buffers`` does.
* Drains keep every rank on the same, latest model for validation, checkpoints and the end of fit.
* Per-step collectives that would chain workers together are replaced: SIGTERM and the ``max_time``
  budget travel in the server's answers, and ``self.log(..., sync_dist=True)`` inside
  ``training_step`` is not synchronised across ranks (epoch-level values still are).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import subprocess
import time
import zlib
from collections import Counter
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning_fabric.strategies import _StrategyRegistry
from lightning_fabric.utilities.distributed import _destroy_dist_connection
from lightning_fabric.utilities.exceptions import MisconfigurationException
from lightning_fabric.utilities.types import _PATH, ReduceOp
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.overrides.distributed import _sync_module_states
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
from pytorch_lightning.trainer.states import RunningStage, TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_hybrid.endpoint import ServerEndpoint
from lightning_hybrid.errors import HybridSGDError, NonFiniteGradientError
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.group_scaling import check_group_scaling, check_rule_name
from lightning_hybrid.launcher import HydraJobLauncher
from lightning_hybrid.links import AnyServerLink, LocalServerLink, RemoteServerLink, ServerLink, ShardedServerLink
from lightning_hybrid.overlap import GradientStream
from lightning_hybrid.server import (
    FollowerServer,
    GradientClipping,
    ParameterServer,
    check_max_staleness,
    clone_optimizer,
)
from lightning_hybrid.shards import ELEMENTWISE_OPTIMIZERS, ShardPlan
from lightning_hybrid.staleness import StalenessStats
from lightning_hybrid.thresholds import ThresholdSpec, check_threshold_spec, resolve_threshold
from lightning_hybrid.wire import SERVER_RANK, STOP_FLAGS, AbortCode, Flag, Reply
from lightning_hybrid.work import PulledBatchSampler, pulled_dataloader

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "hybrid_sgd"
# Fits started in this process, by any strategy instance: rank 0's count names each fit's keys in the
# store that lives as long as the process group (workers may be fresh processes, e.g. per sweep job).
_SESSIONS = itertools.count(1)


def _on_host(value: Any) -> Any:
    return value.cpu() if isinstance(value, Tensor) else value


class _PushingOptimizer:
    """Stands in for the user's optimizer in Lightning's precision plugin: ``step`` runs the closure,
    then pushes the gradient instead of stepping. Everything else is the user's optimizer.

    ``push`` returns False when the server dropped the gradient as too stale and answered with its latest
    parameters: the closure then runs again on them (as LBFGS calls its closure several times), so the batch
    is still trained once."""

    def __init__(self, optimizer: Optimizer, push: Callable[[Any], bool]) -> None:
        self._optimizer = optimizer
        self._push = push

    def step(self, closure: Callable[[], Any], **_: Any) -> Any:
        while True:
            loss = closure()
            if self._push(loss):
                return loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


class HybridSGDStrategy(DDPStrategy):
    """Hybrid parameter-server SGD: an update per ``threshold`` (K) gradients, from async (K=1) to sync (K=N).

    Args:
        threshold: K, how many gradients the server waits for before one update: an int in ``[1, N]``,
            ``"sync"`` (N), ``"async"`` (1) or a percentage of the N workers such as ``"50%"``
            (``ceil(p/100 * N)``). Can be changed while training runs through :attr:`threshold`.
        pull_work: whether workers pull batches of each epoch from a shared counter (fast workers take more,
            every sample still once per epoch) instead of Lightning's equal static shards. ``None``: pull
            when the initial K is below N, static when K = N (so that K = N reproduces DDP exactly).
        group_scaling: how far an update of k gradients moves the model (see :mod:`lightning_hybrid.group_scaling`):
            ``"step"`` (default: k/N of a sync update, on SGD's gradient or another optimizer's learning rate, so the
            learning rate tuned for DDP is safe at every K and K = N is exactly DDP), ``"auto"`` (SGD's momentum
            scaled to the group, else ``"step"``), ``"momentum"``, ``"sqrt_step"`` (sqrt(k/N)) or ``"none"`` (the
            plain mean with the user's step, as before this option).
        max_staleness: drop a gradient staler than this many updates: it is counted (``hybrid/dropped``) and its
            worker computes the batch again on the latest parameters. ``None`` (default) applies every gradient.
            Mind stragglers: at K = 1 a worker s times slower than N - 1 others sees staleness near s(N - 1).
        staleness_scaling: weigh each gradient by ``1 / (1 + staleness)`` before averaging (staleness-aware
            step size). On by default: asynchrony acts like extra momentum (a gradient s updates stale lands as if
            momentum carried it s more steps), and with ``group_scaling`` this weight is what kept the hybrid below
            sync's loss at sync's learning rate (README, *measured*). A full group (K = N) is never stale, so
            K = N stays exactly DDP.
        overlap_push: send a remote CPU worker's gradient in 1 MiB chunks while backward still runs, as
            DDP overlaps its all-reduce. It then communicates gradients as backward leaves them: hooks that
            change gradients afterwards (``on_after_backward``, ``on_before_optimizer_step``) do not reach
            the server. Off by default: on a 2-core machine over loopback it changed throughput by -3 % to
            +4 % (noise), since sending costs the same cores as backward; try it where a NIC moves the bytes.
        shard_server: serve the parameters from every rank, each holding ``1/N`` of the master weights and
            optimizer state (as BytePS does), instead of all from global rank 0: every rank then moves what a ring
            all-reduce moves, and no rank carries all traffic and every update. Shard 0 chooses the groups of
            K gradients (any K, schedules too) and the other shards apply the same groups. Needs an element-wise
            optimizer (SGD, Adam, AdamW, RMSprop, ...); clipping by norm and ``overlap_push`` are refused. Off
            by default.
        nonfinite: what a gradient holding NaN or Inf does: ``"skip"`` (it is rejected, counted and logged,
            the master weights untouched, training goes on) or ``"stop"`` (rejected, then the run stops on
            every rank with :class:`NonFiniteGradientError` naming the rank and step).
        peer_timeout: seconds a worker waits for the server's answer, or for one of its sends to go out,
            before it fails with a clear error (a hung, lost or cut-off peer). Raise it when stragglers are
            legitimately slower.
        timeout: timeout of the process groups (Lightning's default group and the server's channels).
        start_method: ``"popen"`` (default: a script launched per process, like DDP; works with torchrun
            and SLURM) or ``"spawn"``/``"fork"``/``"forkserver"``.
    """

    strategy_name = "hybrid_sgd"

    def __init__(
        self,
        threshold: ThresholdSpec = "50%",
        pull_work: Optional[bool] = None,
        group_scaling: Literal["step", "auto", "momentum", "sqrt_step", "none"] = "step",
        max_staleness: Optional[int] = None,
        staleness_scaling: bool = True,
        overlap_push: bool = False,
        shard_server: bool = False,
        nonfinite: Literal["skip", "stop"] = "skip",
        peer_timeout: float = 600.0,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        check_threshold_spec(threshold)
        if not peer_timeout > 0:
            raise ValueError(f"peer_timeout must be a positive number of seconds, got {peer_timeout!r}")
        if pull_work not in (None, True, False):
            raise ValueError(f"pull_work must be True, False or None (automatic), got {pull_work!r}")
        self._threshold_spec = threshold
        self._pull_work = pull_work
        check_rule_name(group_scaling)
        check_max_staleness(max_staleness)
        self._group_scaling = group_scaling
        self._max_staleness = max_staleness
        self._staleness_scaling = bool(staleness_scaling)
        self._overlap_push = bool(overlap_push)
        self._shard_server = bool(shard_server)
        if self._shard_server and self._overlap_push:
            raise ValueError(
                "overlap_push streams a gradient to one server; with shard_server=True each rank serves a slice: "
                "choose one of them"
            )
        if max_staleness is not None and self._overlap_push:
            raise ValueError(
                "max_staleness computes a dropped gradient's batch again, but overlap_push has sent it during "
                "backward already: remove one of them"
            )
        if nonfinite not in ("skip", "stop"):
            raise ValueError(f"nonfinite must be 'skip' or 'stop', got {nonfinite!r}")
        self._nonfinite = nonfinite
        self._peer_timeout = float(peer_timeout)
        self._resume_work: Optional[dict[str, Any]] = None
        self._channels: Optional[dict[int, dist.ProcessGroup]] = None
        self._reset_session()

    def _reset_session(self) -> None:
        """Per-``fit`` state: each fit starts a new server at version 0 (a checkpoint restores it), as
        Lightning builds new optimizers for each fit."""
        self._endpoint: Optional[ServerEndpoint] = None  # this rank's server (rank 0's, or every rank's shard)
        self._link: Optional[AnyServerLink] = None
        self._plan: Optional[ShardPlan] = None  # with shard_server
        self._shard_progress: Optional[list[dict[str, Any]]] = None  # every shard's counters, for a checkpoint
        self._shard_scalars: Optional[list[dict[int, dict[str, Any]]]] = None  # shards' step counts, likewise
        self._stream: Optional[GradientStream] = None
        self._params: list[Tensor] = []
        self._buffers: list[Tensor] = []
        self._layout: Optional[FlatLayout] = None
        self._buffer_layout: Optional[FlatLayout] = None
        self._gradient: list[Tensor] = []
        self._flat_params: list[Tensor] = []  # the model's parameters live in these (FlatLayout.bind)
        self._version = 0
        self._threshold: Optional[int] = None
        self._threshold_request = 0
        self._local_stop = Flag.NONE  # stop signals raised on this rank, sent with every message
        self._server_stop = Flag.NONE  # stop signals the server relayed: every rank acts on them alike
        self._drained = True  # nothing pushed since the last drain: every rank holds the latest model
        self._restore: list[Callable[[], None]] = []
        self.worker_staleness = StalenessStats()
        self.steps = 0  # optimizer steps of this rank since the last reset_worker_counters()
        self.wait_seconds = 0.0  # time of those spent waiting for the server's answers
        self._rejected: Counter = Counter()
        self._dropped: Counter = Counter()
        self._dropped_in_a_row = 0
        self._update_sizes: Counter = Counter()
        self._final_progress: Optional[dict[str, Any]] = None
        self._session_id = 0
        self._pulling = False
        self._sampler: Optional[PulledBatchSampler] = None
        self._work_state: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ public state
    @property
    def threshold(self) -> int:
        """K, the gradients per update. Setting it on any rank takes effect at the server's next event."""
        if self._endpoint is not None:
            return self._endpoint.server.threshold
        if self._threshold is not None:
            return self._threshold
        return resolve_threshold(self._threshold_spec, self.world_size)

    @threshold.setter
    def threshold(self, value: ThresholdSpec) -> None:
        k = resolve_threshold(value, self.world_size)
        self._threshold = k
        if self._endpoint is not None:
            self._endpoint.apply_requests(Flag.NONE, k)
        if self._link is not None and (self._endpoint is None or self._plan is not None):
            self._threshold_request = k  # with a sharded server shard 0 hears of it with the next push
        elif self._link is None:
            self._threshold_spec = k

    @property
    def version(self) -> int:
        """Updates applied by the server: exact on the server's rank, as of the last answer elsewhere. With a
        sharded server, global rank 0 reports its own shard's counters (here and in the properties below)."""
        return self._endpoint.server.version if self._endpoint is not None else self._version

    @property
    def staleness(self) -> StalenessStats:
        """Staleness of applied gradients: all workers' on the server's rank (0), this worker's own elsewhere."""
        return self._endpoint.server.stats if self._endpoint is not None else self.worker_staleness

    @property
    def update_sizes(self) -> Counter:
        """How many updates held each number of gradients (global rank 0 only; empty elsewhere)."""
        return self._endpoint.server.update_sizes if self._endpoint is not None else self._update_sizes

    @property
    def rejected(self) -> Counter:
        """Gradients rejected for NaN/Inf, per worker: all workers' on rank 0, this worker's own elsewhere."""
        if self._endpoint is not None:
            return self._endpoint.server.rejected
        return self._rejected

    @property
    def dropped(self) -> Counter:
        """Gradients dropped as staler than ``max_staleness``, per worker: all workers' on rank 0, this worker's
        own elsewhere."""
        if self._endpoint is not None:
            return self._endpoint.server.dropped
        return self._dropped

    @property
    def progress(self) -> dict[str, Any]:
        """The server's counters (version, threshold, staleness, rejected, update sizes, flushed updates):
        live on global rank 0 while fitting and kept after; other ranks know their version and K only."""
        return self._progress_state()

    def reset_worker_counters(self) -> None:
        """Count this worker's steps and waiting time anew (the threshold callback does at every epoch)."""
        self.steps, self.wait_seconds = 0, 0.0

    @property
    def server(self) -> Optional[ParameterServer]:
        """The parameter server while ``fit`` runs: on global rank 0; with ``shard_server`` every rank's own shard."""
        return self._endpoint.server if self._endpoint is not None else None

    # ------------------------------------------------------------------ set-up
    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._start_method == "popen":  # children run their parent's one Hydra job, also under --multirun
            assert self.cluster_environment is not None
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        # Destroy the process groups before the interpreter finalises, as Lightning does for NCCL only: a gloo
        # group freed during finalisation can abort the process after a clean run (SIGABRT, "terminate called
        # without an active exception": seen once in CI after Trainer.test; torch PR 179291 explains it).
        atexit.unregister(_destroy_dist_connection)
        atexit.register(_destroy_dist_connection)
        if self._channels is None:
            # new_group is collective: every rank creates every channel, in the same order. A sharded server
            # needs one channel per pair of ranks (each serves the other), a single one one per worker.
            self._channels = {}
            servers = range(self.world_size) if self._shard_server else [SERVER_RANK]
            for server in servers:
                for worker in range(server + 1, self.world_size):
                    group = dist.new_group([server, worker], backend="gloo", timeout=self._timeout)
                    if self.global_rank in (server, worker):
                        self._channels[worker if self.global_rank == server else server] = group

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._check_trainer(trainer)
        super().setup(trainer)
        if fitting:
            self._start_session(trainer)

    @override
    def configure_ddp(self) -> None:
        """No DDP wrapper: check that every rank built the same model, then start from rank 0's weights."""
        self._check_same_model_everywhere()
        _sync_module_states(self.model)

    def _check_trainer(self, trainer: "pl.Trainer") -> None:
        module = trainer.lightning_module
        fix = "use strategy='ddp' for it"
        if not module.automatic_optimization:
            raise MisconfigurationException(
                "hybrid_sgd applies every update on the parameter server and supports automatic optimization only: "
                f"remove `self.automatic_optimization = False`, or {fix}."
            )
        if is_overridden("configure_gradient_clipping", module):
            raise MisconfigurationException(
                "hybrid_sgd clips the aggregated gradient on the parameter server, so a custom "
                "`configure_gradient_clipping` cannot run: remove it and set `Trainer(gradient_clip_val=..., "
                f"gradient_clip_algorithm=...)`, or {fix}."
            )
        if self._layer_sync is not None:
            raise MisconfigurationException(
                "SyncBatchNorm synchronises every forward pass and would chain asynchronous workers together: "
                "remove `Trainer(sync_batchnorm=True)` (hybrid_sgd shares rank 0's BatchNorm statistics at every drain)."
            )
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise MisconfigurationException(
                "precision='16-mixed' uses a GradScaler that steps the local optimizer, which hybrid_sgd never does: "
                "use precision='bf16-mixed' or '32-true'."
            )

    def _check_same_model_everywhere(self) -> None:
        params = list(self.model.parameters())
        signature = repr([(tuple(p.shape), str(p.dtype)) for p in params]).encode()
        mine = torch.tensor(
            [len(params), sum(p.numel() for p in params), zlib.crc32(signature)], device=self.root_device
        )
        everyone = self.all_gather(mine).reshape(self.world_size, 3).cpu()
        for rank, theirs in enumerate(everyone.tolist()):
            if theirs != everyone[0].tolist():
                raise MisconfigurationException(
                    f"rank {rank} built a model with {theirs[0]} parameter tensors ({theirs[1]} elements) but rank 0 "
                    f"built {int(everyone[0, 0])} ({int(everyone[0, 1])} elements), or their shapes or dtypes differ: "
                    "build the same model on every rank (no rank-dependent layers; call seed_everything first)."
                )

    def _start_session(self, trainer: "pl.Trainer") -> None:
        self._reset_session()
        if len(self.optimizers) != 1:
            raise MisconfigurationException(
                f"hybrid_sgd serves exactly one optimizer, but configure_optimizers returned {len(self.optimizers)}: "
                "return a single optimizer (use parameter groups for different settings)."
            )
        optimizer = self.optimizers[0]
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        if not self._params:
            raise MisconfigurationException("the optimizer holds no parameters: nothing for hybrid_sgd to train.")
        self._check_update_rules(trainer, optimizer)
        self._buffers = list(self.lightning_module.buffers())
        self._layout = FlatLayout.of(self._params)
        self._buffer_layout = FlatLayout.of(self._buffers)
        self._gradient = self._layout.allocate(self.root_device)
        self._flat_params = self._layout.allocate(self.root_device)
        self._layout.bind(self._params, self._flat_params, keep="params")
        self._threshold = resolve_threshold(self._threshold_spec, self.world_size)
        self._session_id = self.broadcast(next(_SESSIONS))  # rank 0's: a fresh child process counts from 1
        self._pulling = self._threshold < self.world_size if self._pull_work is None else self._pull_work
        if self._pulling:
            self._check_pulled_work(trainer)
        if self._shard_server:
            self._start_sharded(trainer, optimizer)
        elif self.global_rank == SERVER_RANK:
            self._endpoint = self._start_server(
                trainer, optimizer, self._params, self._buffer_layout, self._flat_params
            )
            self._link = LocalServerLink(self._endpoint)
        else:
            self._take_gradient_clipping(trainer)
            assert self._channels is not None
            self._link = self._remote_link(SERVER_RANK, self._layout, self._buffer_layout, self._flat_params)
            if self._overlap_push and self.root_device.type == "cpu":
                self._stream = GradientStream(self._params, self._layout, self._gradient, self._link)
        self._replace_lockstep_checks(trainer)

    def _start_server(
        self,
        trainer: "pl.Trainer",
        optimizer: Optimizer,
        params: list[Tensor],
        buffer_layout: FlatLayout,
        local_params: list[Tensor],
        group_sizes: Optional[list[int]] = None,
        shards: int = 1,
    ) -> ServerEndpoint:
        """This rank's server over ``params`` (the whole model, or this rank's shard of it, one of ``shards``),
        serving every channel. Of a sharded server, shard 0 decides every update's group, the others follow."""
        follower = shards > 1 and self.global_rank != 0
        server = (FollowerServer if follower else ParameterServer)(
            params,
            lambda master: clone_optimizer(optimizer, master, group_sizes),
            num_workers=self.world_size,
            threshold=self._threshold,
            gradient_clipping=self._take_gradient_clipping(trainer),
            hyperparameters=lambda: optimizer.param_groups,
            device=self.root_device,
            staleness_scaling=self._staleness_scaling,
            group_scaling=self._group_scaling,
            max_staleness=self._max_staleness,
        )
        endpoint = ServerEndpoint(
            server,
            self._channels or {},
            buffer_layout,
            read_buffers=lambda out: buffer_layout.pack(self._buffers, out),
            peer_timeout=self._peer_timeout,
            local_params=local_params,
            rank=self.global_rank,
            followers=range(1, shards) if shards > 1 and not follower else (),
            coordinator=0 if follower else None,
        )
        endpoint.start()
        return endpoint

    def _remote_link(
        self, server_rank: int, layout: FlatLayout, buffer_layout: FlatLayout, params: list[Tensor]
    ) -> RemoteServerLink:
        """A link to the server on ``server_rank``; a CPU model's flat ``params`` receive the answers directly."""
        assert self._channels is not None
        return RemoteServerLink(
            self.global_rank,
            self._channels[server_rank],
            layout,
            buffer_layout,
            self._peer_timeout,
            receive_into=params if self.root_device.type == "cpu" else None,
            pin_memory=self.root_device.type == "cuda",
            server_rank=server_rank,
        )

    def _start_sharded(self, trainer: "pl.Trainer", optimizer: Optimizer) -> None:
        """Every rank serves its shard of the model and talks to every shard (see :class:`ShardPlan`)."""
        self._check_shardable(trainer, optimizer)
        assert self._layout is not None and self._buffer_layout is not None
        rank, plan = self.global_rank, ShardPlan(self._layout, self.world_size)
        no_buffers = FlatLayout.of([])  # rank 0's module buffers travel with shard 0's answers only
        param_slices = [plan.views(shard, self._flat_params) for shard in range(plan.shards)]
        self._endpoint = self._start_server(
            trainer,
            optimizer,
            plan.piece_tensors(rank, self._params),
            self._buffer_layout if rank == 0 else no_buffers,
            param_slices[rank],
            plan.group_sizes(rank, optimizer),
            shards=plan.shards,
        )
        links: list[ServerLink] = [
            LocalServerLink(self._endpoint)
            if shard == rank
            else self._remote_link(
                shard, plan.layouts[shard], self._buffer_layout if shard == 0 else no_buffers, param_slices[shard]
            )
            for shard in range(plan.shards)
        ]
        self._link = ShardedServerLink(rank, links, plan, self._gradient, self._flat_params, param_slices)
        self._plan = plan

    def _check_shardable(self, trainer: "pl.Trainer", optimizer: Optimizer) -> None:
        fix = "or use HybridSGDStrategy(shard_server=False)"
        if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
            names = ", ".join(o.__name__ for o in ELEMENTWISE_OPTIMIZERS)
            raise MisconfigurationException(
                f"shard_server=True steps slices of parameters, which is exact for element-wise optimizers only; "
                f"{type(optimizer).__name__} is not one of {names}: use one of them, {fix}."
            )
        if trainer.gradient_clip_val and (trainer.gradient_clip_algorithm or "norm") == "norm":
            raise MisconfigurationException(
                "clipping by norm needs the norm of the whole aggregated gradient, which no shard of a sharded "
                f"server holds: use Trainer(gradient_clip_algorithm='value'), {fix}."
            )

    def _check_update_rules(self, trainer: "pl.Trainer", optimizer: Optimizer) -> None:
        """On every rank, before any server starts: a rule the optimizer cannot take stops every rank alike."""
        try:
            check_group_scaling(self._group_scaling, optimizer)
        except ValueError as err:
            raise MisconfigurationException(f"hybrid_sgd: {err}.") from err
        if self._max_staleness is None:
            return
        if trainer.accumulate_grad_batches > 1:
            raise MisconfigurationException(
                "max_staleness computes a dropped gradient's batch again, but with accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches} the earlier accumulated batches are gone: remove max_staleness "
                "or accumulate_grad_batches."
            )
        if self._max_staleness < self.world_size - 1:
            rank_zero_warn(
                f"hybrid_sgd: max_staleness={self._max_staleness} is below N - 1 = {self.world_size - 1}, the "
                "staleness even equal workers see at K = 1: most asynchronous gradients will be dropped and "
                "computed again. Raise it to at least a few times N - 1.",
                category=UserWarning,
            )

    def _check_pulled_work(self, trainer: "pl.Trainer") -> None:
        """With pulled work ranks train different numbers of batches per epoch, so nothing may be
        triggered by a rank's batch or step count."""
        fix = "or use HybridSGDStrategy(pull_work=False)"
        if trainer.val_check_interval != 1.0:
            raise MisconfigurationException(
                f"val_check_interval={trainer.val_check_interval!r} validates after a number of batches, but with "
                "pulled work every rank trains a different number of batches per epoch: validate at epoch ends "
                f"(val_check_interval=1.0), {fix}."
            )
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "_every_n_train_steps", 0) or getattr(callback, "_train_time_interval", None):
                raise MisconfigurationException(
                    "ModelCheckpoint(every_n_train_steps=... or train_time_interval=...) would save at different "
                    "moments on ranks that train different numbers of batches (pulled work): save at epoch ends "
                    f"(every_n_epochs), {fix}."
                )

    def _take_gradient_clipping(self, trainer: "pl.Trainer") -> Optional[GradientClipping]:
        """Move clipping from the workers' local gradients to the server's aggregated one."""
        value, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        if not value:
            return None
        trainer.gradient_clip_val = None

        def restore() -> None:
            trainer.gradient_clip_val = value

        self._restore.append(restore)
        # Lightning stores the algorithm as a GradClipAlgorithmType, whose str() is not its value
        return GradientClipping(float(value), str(getattr(algorithm, "value", algorithm) or "norm"))

    def _replace_lockstep_checks(self, trainer: "pl.Trainer") -> None:
        """Lightning broadcasts rank 0's SIGTERM flag on every step and from its SIGTERM handler, and a
        step-interval Timer broadcasts its verdict; here those signals ride on the server's answers
        instead, so no rank waits for another. (Signal handlers are registered after ``setup``.)"""
        epoch_loop = trainer.fit_loop.epoch_loop
        epoch_loop._broadcast_sigterm_tensor = lambda: None
        self._restore.append(lambda: vars(epoch_loop).pop("_broadcast_sigterm_tensor", None))
        connector = trainer._signal_connector
        connector._sigterm_notifier_fn = lambda signum, frame: self._note_sigterm(connector, signum)
        self._restore.append(lambda: vars(connector).pop("_sigterm_notifier_fn", None))
        for callback in trainer.callbacks:
            if isinstance(callback, Timer) and callback._interval == "step":
                timer = callback
                timer._check_time_remaining = lambda _trainer, timer=timer: self._check_time_budget(timer)
                self._restore.append(lambda timer=timer: vars(timer).pop("_check_time_remaining", None))

    def _note_sigterm(self, connector: Any, signum: int) -> None:
        """Lightning's SIGTERM notifier minus its broadcast: forward the signal to the processes this rank
        launched and send it with the next message. Lightning's own checks are told only when the server
        relays it (see :meth:`_act_on_stop`), so that every rank stops at the same drain."""
        log.info("[rank %d] received SIGTERM (%d)", self.global_rank, signum)
        if not self._local_stop & Flag.SIGTERM and self.launcher is not None:
            self.launcher.kill(signum)
        self._local_stop |= Flag.SIGTERM

    def _check_time_budget(self, timer: Timer) -> None:
        if timer._duration is not None and timer.time_elapsed() >= timer._duration:
            self._local_stop |= Flag.STOP

    # ------------------------------------------------------------------ collectives on the default group
    # A rank blocked in the server waiting for K gradients cannot join a collective, so while fitting every
    # collective is preceded by a drain (a no-op when nothing was pushed since the last one), except the
    # per-step `sync_dist` reduction, which stays local instead of chaining workers together every step.
    def _inside_training_batch(self) -> bool:
        trainer = self.lightning_module.trainer
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return trainer.training and progress.ready > progress.completed

    def _drain_before_collective(self) -> None:
        if self._link is not None and not self._drained:
            self.drain()

    @override
    def reduce(
        self, tensor: Tensor, group: Optional[Any] = None, reduce_op: Optional[Union[ReduceOp, str]] = "mean"
    ) -> Tensor:
        if self._link is not None and isinstance(tensor, Tensor) and self._inside_training_batch():
            rank_zero_warn(
                "hybrid_sgd: a per-step `sync_dist=True` would make every worker wait for the others on every step; "
                "the per-step value is logged unsynchronised (epoch-level values are still synced).",
                category=UserWarning,
            )
            return tensor
        self._drain_before_collective()
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        self._drain_before_collective()
        super().barrier(*args, **kwargs)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        self._drain_before_collective()
        return super().broadcast(obj, src)

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        self._drain_before_collective()
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    # ------------------------------------------------------------------ the step
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union["pl.LightningModule", torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        if self._link is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        # decided before the closure runs backward, so that the gradient can stream out during backward
        # (a stop signal raised during backward then travels with the next message)
        final = self._is_final_step_of_epoch()
        threshold = self._take_threshold_request()
        if self._stream is not None:
            self._stream.arm(self._version, self._local_stop | (Flag.DRAIN if final else Flag.NONE), threshold)
        pushing = _PushingOptimizer(optimizer, functools.partial(self._exchange, final=final, threshold=threshold))
        try:
            return self.precision_plugin.optimizer_step(
                pushing, model=model or self.lightning_module, closure=closure, **kwargs
            )
        except BaseException:
            if self._stream is not None and self._stream.incomplete:
                assert isinstance(self._link, RemoteServerLink)
                self._link.abandon()
            raise
        finally:
            if self._stream is not None:
                self._stream.disarm()

    def _exchange(self, loss: Any, final: bool, threshold: int) -> bool:
        """Push this worker's gradient, wait for the server's answer and load the new parameters. False: the
        server dropped the gradient as too stale, and the batch must be computed again."""
        assert self._link is not None and self._layout is not None
        flags = self._local_stop
        started = time.perf_counter()
        if loss is None:  # training_step returned None: Lightning skips the step, so no gradient
            if final:
                reply = self._link.drain(flags, threshold)
            else:
                reply, self._threshold_request = None, self._threshold_request or threshold
        elif self._stream is not None:
            self._drained = False
            self._stream.finish()
            reply = self._link.await_reply()
        else:
            self._layout.pack([p.grad for p in self._params], self._gradient)
            self._drained = False
            reply = self._link.push(
                self._gradient, self._version, flags | (Flag.DRAIN if final else Flag.NONE), threshold
            )
        if reply is not None and reply.flags & Flag.DROPPED:
            self._absorb(reply)
            self.wait_seconds += time.perf_counter() - started
            return False
        if reply is not None:
            self._absorb(reply)
            if self._server_stop and not final:
                self._absorb(self._link.drain(self._local_stop))
            if final or self._server_stop:
                self._drained = True
        self.wait_seconds += time.perf_counter() - started
        self.steps += 1
        self._act_on_stop()
        return True

    def _is_final_step_of_epoch(self) -> bool:
        """True when no step of this rank follows in this epoch: then the push also drains, so that no
        gradient stays pending while ranks enter epoch-end collectives."""
        trainer = self.lightning_module.trainer
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop._num_ready_batches_reached():
            return True
        if trainer.max_steps >= 0 and trainer.global_step + 1 >= trainer.max_steps:
            self._local_stop |= Flag.STOP  # with pulled work other ranks are at other steps: all stop here
            return True
        return False

    def _act_on_stop(self) -> None:
        """After a drain that brought a relayed SIGTERM, every rank stops here, as Lightning's DDP does
        (once: drains during the exception's handling, e.g. an OnExceptionCheckpoint, must not raise again)."""
        connector = self.lightning_module.trainer._signal_connector
        if self._server_stop & Flag.SIGTERM and not connector.received_sigterm:
            connector.received_sigterm = True
            raise SIGTERMException()

    def _take_threshold_request(self) -> int:
        request, self._threshold_request = self._threshold_request, 0
        return request

    def _absorb(self, reply: Reply) -> None:
        assert self._layout is not None and self._buffer_layout is not None
        if reply.params is not self._flat_params:
            for mine, received in zip(self._flat_params, reply.params):
                mine.copy_(received)
        self._layout.bind(self._params, self._flat_params, keep="buffers")
        if reply.buffers is not None:
            self._buffer_layout.unpack(reply.buffers, self._buffers)
        self._version = reply.version
        self._threshold = reply.threshold
        if reply.staleness is not None:
            self.worker_staleness.record(self.global_rank, reply.staleness)
        if reply.flags & Flag.REJECTED:
            self._rejected[self.global_rank] += 1
            if self._nonfinite == "stop":
                raise NonFiniteGradientError(
                    f"hybrid_sgd: rank {self.global_rank}'s gradient at step {self.lightning_module.trainer.global_step} "
                    "held NaN or Inf; the server rejected it (the master weights are untouched) and "
                    "nonfinite='stop' ends the run. Lower the learning rate or check the data, then resume from "
                    "the last checkpoint; nonfinite='skip' would skip such gradients and go on."
                )
            log.warning(
                "hybrid_sgd: rank %d's gradient held NaN or Inf and was rejected; the master weights are untouched "
                "(%d rejected on this rank so far)",
                self.global_rank,
                self._rejected[self.global_rank],
            )
        self._count_drop(bool(reply.flags & Flag.DROPPED))
        self._server_stop |= reply.flags & STOP_FLAGS
        if reply.flags & Flag.STOP:
            self.lightning_module.trainer.should_stop = True

    def _count_drop(self, dropped: bool) -> None:
        if not dropped:
            self._dropped_in_a_row = 0
            return
        self._dropped[self.global_rank] += 1
        self._dropped_in_a_row += 1
        if self._dropped_in_a_row == 3:
            log.warning(
                "hybrid_sgd: rank %d's last 3 gradients were staler than max_staleness=%d and dropped; it computes "
                "its batch again each time, and trains only when the others wait (e.g. at the epoch's end). Raise "
                "max_staleness above this worker's usual staleness (about its slowdown times N - 1 at K = 1).",
                self.global_rank,
                self._max_staleness,
            )

    def drain(self) -> None:
        """Apply pending gradients and give every rank the latest parameters and rank 0's buffers."""
        if self._link is not None:
            self._absorb(self._link.drain(self._local_stop, self._take_threshold_request()))
            self._drained = True
            self._act_on_stop()

    # ------------------------------------------------------------------ pulled work
    @override
    def process_dataloader(self, dataloader: object) -> object:
        """While fitting with pulled work, the training DataLoader gets a :class:`PulledBatchSampler`."""
        trainer = self.lightning_module.trainer
        if not (self._pulling and self._link is not None and trainer.state.stage == RunningStage.TRAINING):
            return dataloader
        if not isinstance(dataloader, DataLoader):
            raise MisconfigurationException(
                f"pulled work needs a torch DataLoader, got {type(dataloader).__name__}: "
                "use HybridSGDStrategy(pull_work=False)."
            )
        try:
            pulled = pulled_dataloader(
                dataloader,
                rank=self.global_rank,
                num_workers=self.world_size,
                store=dist.distributed_c10d._get_default_store(),
                namespace=f"hybrid_sgd/fit{self._session_id}",
            )
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self._sampler = pulled.batch_sampler
        resume, self._resume_work = self._resume_work, None
        if resume is not None and resume["epoch"] == trainer.current_epoch:
            self._sampler.resume(resume["epoch"], resume["done"])
        return pulled

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._sampler is not None:
            self._sampler.trained += 1

    def _gather_work_state(self) -> Optional[dict[str, Any]]:
        """Which batches of the running epoch the ranks have trained on, for a mid-epoch checkpoint
        (``None`` between epochs). Collective: every rank saving the checkpoint calls it."""
        sampler = self._sampler
        if sampler is None or sampler.epoch != self.lightning_module.trainer.current_epoch:
            return None
        mine = torch.zeros(sampler.num_batches, dtype=torch.int32, device=self.root_device)
        mine[list(sampler.done)] = 1
        mine[sampler.yielded[: sampler.trained]] = 1
        done = self.all_gather(mine).reshape(self.world_size, -1).amax(0).cpu().nonzero().flatten().tolist()
        return {"epoch": sampler.epoch, "done": done} if len(done) < sampler.num_batches else None

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_validation_start(self) -> None:
        self.drain()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        self.drain()
        self._work_state = self._gather_work_state()
        if self._plan is not None and self._endpoint is not None:
            self._shard_progress = self._gather_to_zero(self._endpoint.server.progress_state())
        return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The server's optimizer state, in the unsharded format. With a sharded server this is collective (every
        rank calls it when Lightning dumps a checkpoint) and only global rank 0 gets the state."""
        if self._endpoint is None:
            return super().optimizer_state(optimizer)
        state = self._endpoint.server.optimizer.state_dict()
        if self._plan is not None:
            # on the host: pieces gathered from other GPUs would arrive on their devices and not concatenate
            state["state"] = {i: {k: _on_host(v) for k, v in entry.items()} for i, entry in state["state"].items()}
            shard_states = self._gather_to_zero(state)
            if shard_states is None:
                return {}
            state, self._shard_scalars = self._plan.merge_states(shard_states, optimizer.param_groups)
        for saved, local in zip(state["param_groups"], optimizer.param_groups):
            saved.update({k: v for k, v in local.items() if k != "params"})
        return state

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        if self.is_global_zero:
            checkpoint[CHECKPOINT_KEY] = self._progress_state()
            if self._shard_progress is not None:  # each shard's own version, counters and step counts
                checkpoint[CHECKPOINT_KEY].update(shards=self._shard_progress, shard_scalars=self._shard_scalars)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _gather_to_zero(self, obj: Any) -> Optional[list[Any]]:
        """Every rank's ``obj`` on global rank 0 (``None`` elsewhere); collective on the default group."""
        gathered: Optional[list[Any]] = [None] * self.world_size if self.is_global_zero else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def _progress_state(self) -> dict[str, Any]:
        if self._endpoint is not None:
            state = self._endpoint.server.progress_state()
        else:
            state = self._final_progress or {"version": self._version, "threshold": self.threshold}
        return {**state, "work": self._work_state} if self._work_state is not None else state

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        progress = checkpoint.get(CHECKPOINT_KEY)
        if progress is not None:
            self._version = int(progress["version"])
            self._threshold = int(progress["threshold"])
            self._resume_work = progress.get("work")
        if self._endpoint is None:
            return
        server = self._endpoint.server
        state = checkpoint["optimizer_states"][0]
        if self._plan is None:
            server.optimizer.load_state_dict(state)
            if progress is not None:
                server.load_progress_state(progress)
        else:
            # a checkpoint of as many shards restores each shard's own counters; any other (unsharded, DDP,
            # another world size) gives every shard the whole server's
            shards = (progress or {}).get("shards")
            same = shards is not None and len(shards) == self.world_size
            rank = self.global_rank
            server.optimizer.load_state_dict(
                self._plan.shard_state(rank, state, progress["shard_scalars"][rank] if same else None)
            )
            if progress is not None:
                server.load_progress_state(shards[rank] if same else progress)
                assert isinstance(self._link, ShardedServerLink)
                self._link.versions = [s["version"] for s in shards] if same else [self._version] * self.world_size
        for optimizer in self.optimizers:
            optimizer.state.clear()  # the server's copy is the one that steps

    @override
    def on_train_end(self) -> None:
        self._end_session()

    @override
    def on_exception(self, exception: BaseException) -> None:
        if isinstance(exception, HybridSGDError):  # said first: Lightning's launcher may SIGKILL this process soon
            log.error("[rank %d] %s", self.global_rank, exception)
        super().on_exception(exception)
        self._end_session(error=None if isinstance(exception, SIGTERMException) else exception)
        if isinstance(exception, HybridSGDError):
            self._stop_local_children()

    def _stop_local_children(self, grace: float = 3.0) -> None:
        """A hung worker must not outlive the run: the processes this rank launched get ``grace`` seconds
        to exit after the abort, then SIGKILL (Lightning's own observer only acts on children that exit)."""
        launcher = self._launcher
        if not isinstance(launcher, _SubprocessScriptLauncher):
            return
        deadline = time.monotonic() + grace
        for process in launcher.procs:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("hybrid_sgd: killing worker process %d, which did not stop after the abort", process.pid)
                process.kill()

    def _end_session(self, error: Optional[BaseException] = None, clean: bool = True) -> None:
        """Final drain, then this worker leaves; rank 0 keeps the server optimizer's final state.

        After an ``error`` the other ranks are told at once (rather than waiting for ``peer_timeout``)."""
        link, self._link = self._link, None
        if self._stream is not None:
            self._stream.close()  # the gradient hooks leave the model with the session
            self._stream = None
        if link is None:
            return
        try:
            if error is not None and self._endpoint is not None:
                rank = self.global_rank
                self._endpoint.abort(AbortCode.SERVER_FAILED, rank, f": rank {rank} raised {type(error).__name__}")
            elif error is not None:
                link.leave(Flag.FAILED)
            else:
                if clean:
                    self._absorb(link.drain(self._local_stop))
                link.leave(self._local_stop)
        except HybridSGDError:
            if error is None and clean:
                raise
            log.debug("hybrid_sgd: could not leave cleanly", exc_info=True)
        if self._endpoint is not None:
            self._endpoint.close(timeout=self._peer_timeout if error is None else 1.0)
            server = self._endpoint.server
            if self._plan is None or error is None:  # gathering shards is collective: not after an error
                if self._plan is not None:  # kept for a checkpoint saved after fit
                    self._shard_progress = self._gather_to_zero(server.progress_state())
                state = self.optimizer_state(self.optimizers[0])
                if state:
                    self.optimizers[0].load_state_dict(state)
            self._version, self._threshold = server.version, server.threshold
            self.worker_staleness = server.stats
            self._update_sizes = server.update_sizes
            self._rejected = server.rejected
            self._dropped = server.dropped
            self._final_progress = server.progress_state()
            self._endpoint = None

    @override
    def teardown(self) -> None:
        self._end_session(clean=False)
        for restore in reversed(self._restore):
            restore()
        self._restore = []
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name,
                cls,
                description="Hybrid synchronous/asynchronous parameter-server SGD (K-of-N gradients per update)",
            )
