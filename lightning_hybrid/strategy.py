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

import logging
import os
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_hybrid.elastic import nodes_in_this_round, restart_round, restart_round_store, restarts_allowed
from lightning_hybrid.errors import HybridSGDError
from lightning_hybrid.pacing import pace_step_schedulers
from lightning_hybrid.recovery import (
    CHECKPOINT_KEY,
    PART_KEY,
    RecoveryDir,
    RecoveryWriter,
    Shard,
    recovery_checkpoint,
    shard_part,
)
from lightning_hybrid.server import ParameterServer, ServerSnapshot
from lightning_hybrid.session import FITS_STARTED, Channels, SessionOptions, WorkerSession, with_hyperparameters
from lightning_hybrid.staleness import StalenessStats
from lightning_hybrid.thresholds import ThresholdSpec, check_threshold_spec, resolve_threshold
from lightning_hybrid.wire import Flag
from lightning_hybrid.work import EpochBatchSampler, epoch_dataloader, work_id

# Lightning's side, relative: see lightning_api.
from . import checks, lockstep
from .launcher import HydraJobLauncher
from .lightning_api import (
    _PATH,
    PYTORCH,
    STRATEGY_FOR,
    CheckpointIO,
    ClusterEnvironment,
    DDPStrategy,
    MisconfigurationException,
    Precision,
    ReduceOp,
    RunningStage,
    SIGTERMException,
    TrainerFn,
    _StrategyRegistry,
    default_pg_timeout,
    pl,
    rank_zero_info,
    rank_zero_warn,
)

log = logging.getLogger(__name__)


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
                # what the user's optimizer's step would mark (the server stepped its copy): else torch's LR
                # schedulers warn, wrongly, that they step before the optimizer and skip the schedule's first value
                self._optimizer._opt_called = True  # type: ignore[attr-defined]
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
        staleness_scaling: weigh each gradient by ``1 / (1 + s)`` before averaging (staleness-aware step size),
            ``s`` its staleness counted in sync updates: how far the model moved since the gradient's parameters,
            an update of k gradients counting k/N under ``group_scaling="step"`` (one update under ``"none"``), so
            that the same movement weighs a gradient alike however many updates it came in. On by default:
            asynchrony acts like extra momentum (a stale gradient lands as if momentum carried it further), and with
            ``group_scaling`` this weight is what kept the hybrid below sync's loss at sync's learning rate
            (README, *measured*). A full group (K = N) is never stale, so K = N stays exactly DDP.
        overlap_push: send a remote CPU worker's gradient in 1 MiB chunks while backward still runs, as
            DDP overlaps its all-reduce (sharded: each remote shard's slice as soon as backward produced it). It
            then communicates gradients as backward leaves them: hooks that change gradients afterwards
            (``on_after_backward``, ``on_before_optimizer_step``) do not reach the server. Off by default: on a 2-core
            machine over loopback it changed throughput by -3 % to +4 % (noise), since sending costs the same cores as
            backward; try it where a NIC moves the bytes.
        shard_server: serve the parameters from every rank, each holding ``1/N`` of the master weights and
            optimizer state (as BytePS does), instead of all from global rank 0: every rank then moves what a ring
            all-reduce moves, and no rank carries all traffic and every update. Shard 0 chooses the groups of
            K gradients (any K, schedules too) and the other shards apply the same groups. Needs an element-wise
            optimizer (SGD, Adam, AdamW, RMSprop, ...); clipping by norm is refused. Off by default.
        shard_weights: with ``shard_server``, each rank's share of the model (one number per global rank, e.g.
            its link's bandwidth): every update needs every shard, and a shard's link carries its slice to and from
            every worker, so a rank on a slower link should serve less. ``None`` (default): equal slices.
        pipeline_pushes: a worker sends its next gradient while the answer to its last one comes in, instead of
            waiting for that answer first: each step runs on parameters without the worker's own last update (every
            gradient staler by one step's updates: one at K = N, which is then no longer exactly DDP), and a
            worker's link carries both directions at once. For links, not cores: see README, *Pipelined pushes*. Not
            with ``max_staleness`` or ``overlap_push``. Off by default.
        overlap_answers: with ``shard_server`` and ``overlap_push``, each shard holds stripes of 1 MiB dealt in
            turn instead of one slice, steps each stripe as soon as every worker's gradient of it is in, and sends
            it to every worker at once, while later stripes are still coming (``lightning_hybrid.chunkwise``): at
            K = N the answer then overlaps the pushes, as DDP's ring overlaps its buckets. A stripe's step is
            checked when the server applies the whole update (a NaN/Inf verdict, a worker that left, a tensor no
            gradient used, a lowered K) and put back if it was not that update. CPU models with one parameter
            dtype; not with ``pipeline_pushes``, ``answer_dtype`` or ``push_dtype``. Off by default (README,
            *Measured on an emulated cluster*).
        answer_dtype: the dtype in which the server sends parameters to remote workers, e.g. ``"bfloat16"``:
            each answer takes half the bytes, a worker's traffic a quarter less (README, *Answers in bfloat16*), and
            each worker then computes its gradients on weights rounded to it, as bf16 autocast rounds them, while
            the master weights, the optimizer state and the gradients keep their precision. Answers to drains
            (validation, checkpoints, the end of fit) and the server's own rank's worker get the exact weights.
            ``None`` (default): the parameters' own dtype.
        push_dtype: the dtype in which remote workers send their gradients, e.g. ``"bfloat16"``: half a push's
            bytes, as DDP's ``bf16_compress_hook`` narrows its all-reduce; the server sums them at the parameters'
            precision (DDP's hook sums in bf16). The server's own rank's worker pushes in memory, exactly. Dtypes
            of a narrower range than float32's (float16) are refused. ``None`` (default): the gradients' own dtype.
        nonfinite: what a gradient holding NaN or Inf does: ``"skip"`` (it is rejected, counted and logged,
            the master weights untouched, training goes on) or ``"stop"`` (rejected, then the run stops on
            every rank with :class:`NonFiniteGradientError` naming the rank and step).
        recovery_dir: a folder (on storage every node sees) for recovery checkpoints, which make a lost worker cost
            its batch rather than the run: the server's rank alone writes one every ``recovery_every`` seconds and
            one more when the run fails (a lost worker, SIGTERM), holding the master weights, the optimizer state,
            the server's counters and which batches of the epoch the master holds (see
            :mod:`lightning_hybrid.recovery`). The next ``fit`` resumes from the newest of them when it is newer than
            its ``ckpt_path`` (as after ``torchrun --max-restarts``), with no change to the script; only batches whose
            gradients the master had not absorbed are trained again. A fit that ends cleanly removes them. Default
            ``None``: off, except under ``torchrun --max-restarts R`` with R > 0, where it is
            ``<default_root_dir>/hybrid_sgd_recovery``. With static shards (``pull_work=False``) an epoch becomes
            numbered batches, rank r taking every N-th, so that a resumed epoch skips those trained before (Lightning
            would replay it from its start). With ``shard_server=True`` a lost rank's slice dies with it: shard 0
            asks every shard for its snapshot at one version every ``recovery_every`` seconds (a recovery point, each
            shard writing its part), and once more at a SIGTERM (every rank alive, e.g. a node joining); after a
            lost rank the next run resumes from the last complete point.
        recovery_every: seconds between the periodic recovery checkpoints. The server's rank copies the server's
            state under its lock (stalling the server for the copy only) and writes the file in a thread.
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
        shard_weights: Optional[Sequence[float]] = None,
        pipeline_pushes: bool = False,
        overlap_answers: bool = False,
        answer_dtype: Union[str, torch.dtype, None] = None,
        push_dtype: Union[str, torch.dtype, None] = None,
        nonfinite: Literal["skip", "stop"] = "skip",
        recovery_dir: Optional[_PATH] = None,
        recovery_every: float = 60.0,
        peer_timeout: float = 600.0,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: checks.StartMethod = "popen",
    ) -> None:
        checks.check_start_method(start_method)
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
        checks.check_options(
            threshold, pull_work, group_scaling, max_staleness, overlap_push, nonfinite, peer_timeout, pipeline_pushes
        )
        checks.check_recovery(recovery_every)
        checks.check_overlap_answers(overlap_answers, shard_server, overlap_push, answer_dtype, push_dtype)
        checks.check_shard_weights(shard_weights, shard_server)
        self._threshold_spec = threshold
        self._pull_work = pull_work
        self._group_scaling = group_scaling
        self._max_staleness = max_staleness
        self._staleness_scaling = bool(staleness_scaling)
        self._overlap_push = bool(overlap_push)
        self._shard_server = bool(shard_server)
        self._shard_weights = None if shard_weights is None else tuple(float(w) for w in shard_weights)
        self._pipeline_pushes = bool(pipeline_pushes)
        self._overlap_answers = bool(overlap_answers)
        self._answer_dtype = checks.wire_dtype_of("answer_dtype", answer_dtype)
        self._push_dtype = checks.wire_dtype_of("push_dtype", push_dtype, float32_range=True)
        self._nonfinite = nonfinite
        self._peer_timeout = float(peer_timeout)
        self._recovery_dir = recovery_dir
        self._recovery_every = float(recovery_every)
        self._recovery: Optional[RecoveryWriter] = None  # on the server's rank while fitting with recovery
        # every rank, for the fit being set up: where recovery checkpoints go (then pushes carry their batch's id)
        self._fit_recovery: Optional[RecoveryDir] = None
        self._channels: Optional[Channels] = None
        self._session = WorkerSession()  # idle until fit starts one; keeps the last fit's counters after it
        self._restore: list[lockstep.Restore] = []
        self._session_id = 0
        self._batches: Optional[str] = None  # "pulled", "static" (numbered, for recovery) or Lightning's sampler
        self._sampler: Optional[EpochBatchSampler] = None
        self._resume_work: Optional[dict[str, Any]] = None
        self._resumed_done: dict[int, list[int]] = {}  # batches trained before this fit resumed, per epoch
        self._work_state: Optional[dict[str, Any]] = None
        self._snapshot: Optional[ServerSnapshot] = None  # while the server's rank dumps a recovery checkpoint
        self.resumed: Optional[dict[str, Any]] = None
        """What the last ``fit`` resumed from a recovery checkpoint: ``why`` it was written (``"periodic"`` or
        ``"failure"``), the restart ``round`` that wrote it, its ``version``, ``epoch`` and the batches ``done``
        per epoch (``None``: it did not resume from one)."""

    # ------------------------------------------------------------------ public state
    @property
    def threshold(self) -> int:
        """K, the gradients per update. Setting it on any rank during fit takes effect at the server's next event;
        set outside a fit, it is kept as given (e.g. ``"sync"``) and resolved for the next fit's N."""
        k = self._session.threshold
        return k if k is not None else resolve_threshold(self._threshold_spec, self.world_size)

    @threshold.setter
    def threshold(self, value: ThresholdSpec) -> None:
        if self._session.live:
            self._session.request_threshold(resolve_threshold(value, self.world_size))
            return
        check_threshold_spec(value)
        self._threshold_spec = value
        self._session.forget_threshold()

    @property
    def version(self) -> int:
        """Updates applied by the server: exact on the server's rank, as of the last answer elsewhere. With a
        sharded server, global rank 0 reports its own shard's counters (here and in the properties below)."""
        return self._session.version

    @property
    def synchronous_steps(self) -> float:
        """The server's progress in this fit in DDP's steps (gradients applied over N), as of this rank's last
        answer: per-step LR schedules follow it while work is pulled (:mod:`lightning_hybrid.pacing`)."""
        return self._session.synchronous_steps

    @property
    def staleness(self) -> StalenessStats:
        """Staleness of applied gradients: all workers' on the server's rank (0), this worker's own elsewhere."""
        return self._session.staleness

    @property
    def worker_staleness(self) -> StalenessStats:
        """This worker's own gradients' staleness, as the server's answers told it (after fit, on the server's
        rank, the server's statistics of all workers)."""
        return self._session.worker_staleness

    @property
    def update_sizes(self) -> Counter:
        """How many updates held each number of gradients (global rank 0 only; empty elsewhere)."""
        return self._session.update_sizes

    @property
    def rejected(self) -> Counter:
        """Gradients rejected for NaN/Inf, per worker: all workers' on rank 0, this worker's own elsewhere."""
        return self._session.rejected

    @property
    def dropped(self) -> Counter:
        """Gradients dropped as staler than ``max_staleness``, per worker: all workers' on rank 0, this worker's
        own elsewhere."""
        return self._session.dropped

    @property
    def progress(self) -> dict[str, Any]:
        """The server's counters (version, threshold, staleness, rejected, update sizes, flushed updates):
        live on global rank 0 while fitting and kept after; other ranks know their version and K only."""
        state = self._session.progress_state() or {"version": self.version, "threshold": self.threshold}
        return {**state, "work": self._work_state} if self._work_state is not None else state

    @property
    def steps(self) -> int:
        """Optimizer steps of this rank since the last :meth:`reset_worker_counters`."""
        return self._session.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._session.steps = value

    @property
    def wait_seconds(self) -> float:
        """Time of those steps spent waiting for the server's answers."""
        return self._session.wait_seconds

    @wait_seconds.setter
    def wait_seconds(self, value: float) -> None:
        self._session.wait_seconds = value

    def reset_worker_counters(self) -> None:
        """Count this worker's steps and waiting time anew (the threshold callback does at every epoch)."""
        self.steps, self.wait_seconds = 0, 0.0

    @property
    def server(self) -> Optional[ParameterServer]:
        """The parameter server while ``fit`` runs: on global rank 0; with ``shard_server`` every rank's own shard."""
        return self._session.server

    # ------------------------------------------------------------------ set-up
    @property
    @override
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    @override
    def num_nodes(self, num_nodes: int) -> None:
        """The Trainer's ``num_nodes``, except under torchrun, where the nodes of this rendezvous round count: with
        ``--nnodes MIN:MAX`` they change when a node leaves or joins, and a script written for one count goes on."""
        formed = nodes_in_this_round()
        if formed is not None and formed != num_nodes:
            rank_zero_warn(
                f"hybrid_sgd: torchrun formed {formed} node(s) in this round and Trainer(num_nodes={num_nodes}) asked"
                f" for {num_nodes}: training on {formed} (torchrun's --nnodes decides membership)"
            )
            num_nodes = formed
        self._num_nodes = num_nodes

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._start_method == "popen":  # children run their parent's one Hydra job, also under --multirun
            assert self.cluster_environment is not None
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def setup_distributed(self) -> None:
        """As DDP's, except under torchrun with its shared store: there each restart round forms the default group
        under a prefix of its own (see :mod:`lightning_hybrid.elastic`), so that ``--max-restarts`` works."""
        store = restart_round_store(self.num_nodes * self.num_processes, self._timeout or default_pg_timeout)
        if store is None:
            super().setup_distributed()
            return
        with lockstep.default_group_on(store):
            super().setup_distributed()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        lockstep.destroy_process_groups_at_exit()
        trainer = self.lightning_module.trainer
        fitting = trainer.state.fn == TrainerFn.FITTING
        self._fit_recovery = self._recovery_folder(trainer) if fitting else None
        if self._fit_recovery is not None:
            lockstep.resume_from(trainer, self._newer_recovery_checkpoint)
        if self._channels is None:
            self._channels = Channels.between(
                self.global_rank, self.world_size, self._shard_server, self._timeout, self._pipeline_pushes
            )

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            checks.check_trainer(trainer, self._layer_sync is not None, getattr(self.precision_plugin, "scaler", None))
        super().setup(trainer)
        if fitting:
            self._start_session(trainer)

    @override
    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        try:
            super().setup_optimizers(trainer)
        except RuntimeError as err:  # Lightning's advice (manual optimization) is refused here: say what works
            if "multiple optimizers" not in str(err):
                raise
            raise MisconfigurationException(
                "hybrid_sgd steps one optimizer on the parameter server and supports automatic optimization only: "
                "return a single optimizer from `configure_optimizers` (one optimizer's param groups may each have "
                f"their own settings), or {checks.DDP_FIX}."
            ) from err

    @override
    def configure_ddp(self) -> None:
        """No DDP wrapper: check that every rank built the same model, then start from rank 0's weights."""
        checks.check_initialized(self.model)
        checks.check_dense_gradients(self.model)
        mine = checks.model_signature(list(self.model.parameters()), self.root_device)
        checks.check_same_model_everywhere(self.all_gather(mine))
        shared = self._options_every_rank_shares()
        signature = checks.options_signature(shared, self.root_device)
        checks.check_same_options_everywhere(list(shared), self.all_gather(signature))
        lockstep.sync_module_states(self.model)

    def _options_every_rank_shares(self) -> dict[str, Any]:
        """The options that shape the protocol between ranks (and the work they pull): each rank builds its side
        from its own, so ranks that disagree would hang or fail mid-run instead of at setup."""
        return {
            "threshold": self._threshold_spec,
            "pull_work": self._pull_work,
            "shard_server": self._shard_server,
            "shard_weights": self._shard_weights,
            "pipeline_pushes": self._pipeline_pushes,
            "overlap_answers": self._overlap_answers,
            "answer_dtype": self._answer_dtype,
            "push_dtype": self._push_dtype,
        }

    def _start_session(self, trainer: "pl.Trainer") -> None:
        """Each fit starts a new server at version 0 (a checkpoint restores it), as Lightning builds new
        optimizers for each fit."""
        self._session, self._sampler, self._work_state, self._batches = WorkerSession(), None, None, None
        self.resumed = None
        self._restore = []
        optimizer = checks.check_one_optimizer(self.optimizers)
        checks.check_update_rules(
            self._group_scaling, self._max_staleness, optimizer, trainer.accumulate_grad_batches, self.world_size
        )
        threshold = self._threshold_for_this_world()
        self._session_id = self.broadcast(next(FITS_STARTED))  # rank 0's: a fresh child process counts from 1
        recovery = self._fit_recovery
        pulling = (threshold < self.world_size or recovery is not None) if self._pull_work is None else self._pull_work
        # recovery resumes an epoch where it stopped: static shards too are numbered batches then
        self._batches = "pulled" if pulling else "static" if recovery is not None else None
        if recovery is not None:
            checks.check_recovery_fit(trainer.accumulate_grad_batches)
        if self._batches is not None:
            checks.check_pulled_work(trainer, pulling)
            self._restore.append(pace_step_schedulers(trainer, lambda: self._session.synchronous_steps))
            # a loader Lightning loaded before the session (e.g. for estimated_stepping_batches in
            # configure_optimizers) has no pulled batches: the fit loads it again
            trainer.fit_loop._combined_loader = None
        if self._shard_server:
            checks.check_shardable(optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        checks.check_shard_weights(self._shard_weights, self._shard_server, self.world_size)
        clipping, restore_clipping = lockstep.take_gradient_clipping(trainer)
        if restore_clipping is not None:
            self._restore.append(restore_clipping)
        self._recovery = None
        if recovery is not None and (self._shard_server or self.is_global_zero):  # every rank that serves writes
            shard = Shard(self.global_rank, self.world_size) if self._shard_server else None
            self._recovery = RecoveryWriter(recovery, self._recovery_every, self.checkpoint_io, shard)
        assert self._channels is not None
        self._session.start(
            rank=self.global_rank,
            world_size=self.world_size,
            device=self.root_device,
            channels=self._channels,
            optimizer=optimizer,
            buffers=list(self.lightning_module.buffers()),
            clipping=clipping,
            options=SessionOptions(
                threshold=threshold,
                group_scaling=self._group_scaling,
                max_staleness=self._max_staleness,
                staleness_scaling=self._staleness_scaling,
                nonfinite=self._nonfinite,
                overlap_push=self._overlap_push,
                shard_server=self._shard_server,
                shard_weights=self._shard_weights,
                peer_timeout=self._peer_timeout,
                pipeline_pushes=self._pipeline_pushes,
                overlap_answers=self._overlap_answers,
                answer_dtype=self._answer_dtype,
                push_dtype=self._push_dtype,
            ),
            on_recovery_point=self._write_part if self._recovery is not None and not self.is_global_zero else None,
        )
        self._restore += lockstep.replace_lockstep_checks(trainer, self._note_sigterm, self._note_time_up)

    def _threshold_for_this_world(self) -> int:
        """K for this fit's N. After torchrun restarted the run with fewer nodes (``--nnodes MIN:MAX``), a count
        above the new N is clipped to it, with a warning (``"sync"``, ``"async"`` and ``"p%"`` resolve anew)."""
        spec = self._threshold_spec
        if isinstance(spec, int) and not isinstance(spec, bool) and spec > self.world_size and restart_round() > 0:
            rank_zero_warn(
                f"hybrid_sgd: threshold={spec} is more than the {self.world_size} workers torchrun restarted this run "
                f"with: K = {self.world_size} (all of them) for this round"
            )
            return self.world_size
        return resolve_threshold(spec, self.world_size)

    def _note_sigterm(self, signum: int) -> None:
        """Lightning's SIGTERM notifier minus its broadcast: forward the signal to the processes this rank
        launched and send it with the next message. Lightning's own checks are told only when the server
        relays it (see :meth:`_act_on_stop`), so that every rank stops at the same drain."""
        log.info("[rank %d] received SIGTERM (%d)", self.global_rank, signum)
        if not self._session.local_stop & Flag.SIGTERM and self.launcher is not None:
            self.launcher.kill(signum)
        self._session.local_stop |= Flag.SIGTERM

    def _note_time_up(self) -> None:
        self._session.local_stop |= Flag.STOP

    # ------------------------------------------------------------------ recovery
    def _recovery_folder(self, trainer: "pl.Trainer") -> Optional[RecoveryDir]:
        """Where recovery checkpoints live for this fit: ``recovery_dir``, or a folder under ``default_root_dir``
        when torchrun may restart the workers."""
        if self._recovery_dir is not None:
            return RecoveryDir(self._recovery_dir)
        if not restarts_allowed():
            return None
        return RecoveryDir(os.path.join(trainer.default_root_dir, "hybrid_sgd_recovery"))

    def _newer_recovery_checkpoint(self, ckpt_path: Optional[_PATH]) -> Optional[_PATH]:
        """The newest recovery checkpoint where it is newer than the user's ``ckpt_path`` (rank 0 decides)."""
        chosen = ckpt_path
        if self.is_global_zero and self._fit_recovery is not None:
            self._fit_recovery.join_newest_parts(self.checkpoint_io)
            newest = self._fit_recovery.newest()
            if newest is not None and (
                ckpt_path is None
                or not os.path.isfile(ckpt_path)
                or os.path.getmtime(newest) > os.path.getmtime(ckpt_path)
            ):
                chosen = str(newest)
        return self.broadcast(chosen)

    def _write_recovery(self, why: str, wait: bool, every_shard_alive: bool = True) -> None:
        """The server's rank alone, with no collective: its Lightning checkpoint with the server's state (see
        :func:`lightning_hybrid.recovery.recovery_checkpoint`). Sharded: global rank 0's part of a recovery point,
        whose other parts the shards write when shard 0's request reaches them (see :meth:`_write_part`); at a
        failure only while ``every_shard_alive`` (a relayed SIGTERM: every rank stopped at the same drain; a point
        missing a dead rank's part would never be used anyway)."""
        server, recovery = self._session.server, self._recovery
        if server is None or recovery is None or not self.is_global_zero:
            return
        if why == "failure" and self._shard_server and not every_shard_alive:
            log.warning(
                "hybrid_sgd: no recovery checkpoint at this failure: with shard_server=True a lost rank's slice of "
                "the model died with it, so the next round resumes from the last complete recovery point"
            )
            return
        trainer = self.lightning_module.trainer
        self._snapshot = snapshot = server.snapshot(recovery_point=self._shard_server)
        try:
            checkpoint = lockstep.dump_checkpoint(trainer)
        finally:
            self._snapshot = None
        checkpoint = recovery_checkpoint(
            checkpoint,
            snapshot,
            self.lightning_module,
            self.optimizers[0],
            trainer.current_epoch,
            self._resumed_done,
            self._sampler.claimed() if self._sampler is not None else None,
            why,
            sharded=self._shard_server,
            shard_weights=self._shard_weights,
            stripe_elements=self._session.stripe_elements,
        )
        recovery.write(checkpoint, snapshot.progress["version"], why, wait)

    def _write_part(self, snapshot: ServerSnapshot) -> None:
        """A shard other than shard 0, at a recovery point: its part, written in a thread (the shard waits only
        for the copy)."""
        assert self._recovery is not None
        self._recovery.write({PART_KEY: shard_part(snapshot)}, snapshot.progress["version"], "periodic", wait=False)

    # ------------------------------------------------------------------ pulled work and numbered batches
    @override
    def process_dataloader(self, dataloader: object) -> object:
        """While fitting with pulled work (or recovery), the training DataLoader gets a :class:`PulledBatchSampler`
        (or a :class:`StaticBatchSampler`)."""
        trainer = self.lightning_module.trainer
        if not (self._batches is not None and self._session.live and trainer.state.stage == RunningStage.TRAINING):
            return dataloader
        pull = self._batches == "pulled"
        try:
            numbered = epoch_dataloader(
                checks.check_pulled_dataloader(dataloader, pull),
                pull=pull,
                rank=self.global_rank,
                num_workers=self.world_size,
                store=dist.distributed_c10d._get_default_store(),
                namespace=f"hybrid_sgd/fit{self._session_id}",
            )
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self._sampler = numbered.batch_sampler
        resume, self._resume_work = self._resume_work, None
        self._resumed_done = {}
        if resume is not None and resume["epoch"] == trainer.current_epoch:
            self._resumed_done = {resume["epoch"]: resume["done"], **resume.get("later_epochs", {})}
            self._sampler.resume(resume["epoch"], self._resumed_done)
        return numbered

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        sampler, server = self._sampler, self._session.server
        if sampler is None:
            return
        sampler.trained += 1
        if self._recovery is not None and server is not None and sampler.trained == 1:
            server.forget_absorbed(below=work_id(sampler.epoch, 0))  # earlier epochs ended on every rank

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

    # ------------------------------------------------------------------ the step
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union["pl.LightningModule", torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        if not self._session.live:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        checks.check_parameters_unchanged(optimizer, self._session.param_groups)
        trainer = self.lightning_module.trainer
        # final: no step of this rank follows in this epoch, so the push also drains and no gradient stays
        # pending while ranks enter epoch-end collectives
        final = lockstep.epoch_ends_after_this_step(trainer)
        if not final and trainer.max_steps >= 0 and trainer.global_step + 1 >= trainer.max_steps:
            self._session.local_stop |= Flag.STOP  # with pulled work other ranks are at other steps: all stop here
            final = True
        work = self._sampler.current_work if self._fit_recovery is not None and self._sampler is not None else None
        with self._session.step(final, trainer.global_step, work) as exchange:

            def push(loss: Any) -> bool:
                applied = exchange(loss)
                self._act_on_stop(sigterm=applied)  # a dropped gradient's batch runs again before any SIGTERM stop
                return applied

            result = self.precision_plugin.optimizer_step(
                _PushingOptimizer(optimizer, push), model=model or self.lightning_module, closure=closure, **kwargs
            )
        if self._recovery is not None and self.is_global_zero and self._recovery.due():
            self._write_recovery("periodic", wait=False)
        return result

    def drain(self) -> None:
        """Apply pending gradients and give every rank the latest parameters and rank 0's buffers."""
        if self._session.live:
            self._session.drain(self.lightning_module.trainer.global_step)
            self._act_on_stop()

    def _act_on_stop(self, sigterm: bool = True) -> None:
        """A relayed stop ends the run on every rank; after a drain that brought a relayed SIGTERM every rank
        stops here, as Lightning's DDP does (once: drains during the exception's handling, e.g. an
        OnExceptionCheckpoint, must not raise again)."""
        trainer = self.lightning_module.trainer
        if self._session.stop_requested:
            trainer.should_stop = True
        if sigterm and self._session.sigterm_relayed and lockstep.tell_lightning_of_sigterm(trainer):
            raise SIGTERMException()

    # ------------------------------------------------------------------ collectives on the default group
    # A rank blocked in the server waiting for K gradients cannot join a collective, so while fitting every
    # collective is preceded by a drain (a no-op when nothing was pushed since the last one), except the
    # per-step `sync_dist` reduction, which stays local instead of chaining workers together every step.
    def _drain_before_collective(self) -> None:
        if self._session.live and not self._session.drained:
            self.drain()

    @override
    def reduce(
        self, tensor: Tensor, group: Optional[Any] = None, reduce_op: Optional[Union[ReduceOp, str]] = "mean"
    ) -> Tensor:
        if (
            self._session.live
            and isinstance(tensor, Tensor)
            and lockstep.inside_training_batch(self.lightning_module.trainer)
        ):
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
        """As DDP's. Without ``sync_grads`` through ``torch.distributed.all_gather`` itself: Lightning 2.6 always
        takes ``torch.distributed.nn``'s autograd version, deprecated in torch 2.13 (a warning on every call)."""
        self._drain_before_collective()
        if sync_grads or not dist.is_initialized():
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, tensor, group=group)
        return torch.stack(gathered)

    # ------------------------------------------------------------------ validation and checkpoints
    @override
    def on_validation_start(self) -> None:
        self.drain()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._snapshot is not None:  # a recovery checkpoint: this rank alone, the master weights come after
            return super().lightning_module_state_dict()
        self.drain()
        self._work_state = self._gather_work_state()
        self._session.gather_shard_progress()
        return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The server's optimizer state, in the unsharded format. With a sharded server this is collective (every
        rank calls it when Lightning dumps a checkpoint) and only global rank 0 gets the state."""
        if self._snapshot is not None:
            return with_hyperparameters(self._snapshot.optimizer_state, optimizer.param_groups)
        state = self._session.optimizer_state(optimizer.param_groups)
        return super().optimizer_state(optimizer) if state is None else state

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        if self.is_global_zero:
            checkpoint[CHECKPOINT_KEY] = {**self.progress, **(self._session.checkpoint_progress() or {})}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        progress = checkpoint.get(CHECKPOINT_KEY)
        if progress is not None and progress.get("num_workers", self.world_size) != self.world_size:
            # written by another number of workers (e.g. torchrun restarted with fewer nodes): its K is not this
            # run's; the strategy's threshold, resolved for this N, holds (a ThresholdScheduler moves it as before)
            rank_zero_warn(
                f"hybrid_sgd: the checkpoint was written by {progress['num_workers']} workers and this run has "
                f"{self.world_size}: K = {self.threshold} (threshold={self._threshold_spec!r} for {self.world_size})"
            )
            progress = {**progress, "threshold": self.threshold}
        if progress is not None:
            self._resume_work = progress.get("work")
            if "recovery" in progress:
                work = progress["work"]
                done = {work["epoch"]: work["done"], **work["later_epochs"]}
                self.resumed = {
                    **progress["recovery"],
                    "version": progress["version"],
                    "epoch": work["epoch"],
                    "done": done,
                }
                self._log_recovery(progress)
        self._session.load(checkpoint["optimizer_states"], progress, self.world_size)
        if self._session.server is not None:
            for optimizer in self.optimizers:
                optimizer.state.clear()  # the server's copy is the one that steps

    def _log_recovery(self, progress: dict[str, Any]) -> None:
        recovery, work = progress["recovery"], progress["work"]
        again = ""
        if recovery["taken"] is not None:
            again = f"; {recovery['taken'] - recovery['absorbed']} batches taken but not absorbed go back into it"
        written = "at a failure" if recovery["why"] == "failure" else "periodically"
        rank_zero_info(  # Lightning's own logger, which prints INFO (as its "Restoring states from ...")
            f"hybrid_sgd: resumed from the recovery checkpoint {self.lightning_module.trainer.ckpt_path} (written "
            f"{written} in restart round {recovery['round']}): epoch {work['epoch']} with {len(work['done'])} of its "
            f"batches already trained, version {progress['version']}{again}"
        )

    # ------------------------------------------------------------------ the end
    @override
    def on_train_end(self) -> None:
        trainer = self.lightning_module.trainer
        self._session.end(global_step=trainer.global_step)
        if self._session.stop_requested:
            trainer.should_stop = True
        if self._fit_recovery is not None:  # the run they would resume has ended
            if self._recovery is not None:
                self._recovery.join()
            if self._shard_server:
                self.barrier()  # every shard has written its last part
            if self.is_global_zero:
                self._fit_recovery.clear()

    @override
    def on_exception(self, exception: BaseException) -> None:
        if isinstance(exception, HybridSGDError):  # said first: Lightning's launcher may SIGKILL this process soon
            log.error("[rank %d] %s", self.global_rank, exception)
        sigterm = isinstance(exception, SIGTERMException)  # every rank stopped at the same drain: all alive
        if self._recovery is not None:  # before anything that could wait on a dead rank
            try:
                self._write_recovery("failure", wait=True, every_shard_alive=sigterm)
            except Exception:
                log.exception("hybrid_sgd: could not write the recovery checkpoint at the failure")
        super().on_exception(exception)
        self._session.end(error=None if sigterm else exception)
        if self._recovery is not None:
            self._recovery.join()  # a shard's part of a recovery point shard 0 asked for before the end
        if isinstance(exception, HybridSGDError):
            self._stop_local_children()

    def _stop_local_children(self, grace: float = 3.0) -> None:
        """A hung worker must not outlive the run: the processes this rank launched get ``grace`` seconds
        to exit after the abort, then SIGKILL (Lightning's own observer only acts on children that exit)."""
        deadline = time.monotonic() + grace
        for process in lockstep.launched_children(self._launcher):
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("hybrid_sgd: killing worker process %d, which did not stop after the abort", process.pid)
                process.kill()

    @override
    def teardown(self) -> None:
        if self._recovery is not None:
            self._recovery.join()
            self._recovery = None
        self._session.end(clean=False)
        for restore in reversed(self._restore):
            restore()
        self._restore = []
        super().teardown()

    def __repr__(self) -> str:
        """Names the namespace this class serves and the class of the other: a Trainer given the other namespace's
        strategy rejects it with an error that prints this."""
        (other,) = (namespace for namespace in STRATEGY_FOR if namespace != PYTORCH)
        return f"<{STRATEGY_FOR[PYTORCH]} for {PYTORCH}; a {other} Trainer takes {STRATEGY_FOR[other]}>"

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """``hybrid_sgd`` and its named variants, as Lightning registers ``ddp_spawn`` and friends."""
        for name, description, options in REGISTERED_VARIANTS:
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=description, **options)


# name, description, HybridSGDStrategy arguments: the names `Trainer(strategy=...)` accepts (README's table)
REGISTERED_VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("hybrid_sgd", "Hybrid synchronous/asynchronous parameter-server SGD (K-of-N gradients per update)", {}),
    ("hybrid_sgd_async", "hybrid_sgd with K = 1: fully asynchronous, with pulled work", {"threshold": "async"}),
    ("hybrid_sgd_sync", "hybrid_sgd with K = N: synchronous, exactly DDP's updates", {"threshold": "sync"}),
    ("hybrid_sgd_sharded", "hybrid_sgd with the server sharded over every rank", {"shard_server": True}),
]
