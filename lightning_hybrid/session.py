"""``WorkerSession``: one ``fit``'s worker, from its flat buffers and topology to its last answer.

The strategy hands it everything as arguments (rank, channels, optimizer, options), raises its local stop flags
(SIGTERM, time up) and asks it to push, drain and leave; it never reads the strategy or the trainer. It wires the
topology (the server on global rank 0, or a shard on every rank; a local link, a remote one or a sharded one), keeps
what this worker learnt from the server's answers (version, K, staleness, rejected and dropped gradients) and the
stop signals travelling both ways, and keeps its final counters after it ends, so that the strategy's properties
still answer once ``fit`` returns.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_hybrid.chunkwise import ChunkStepper
from lightning_hybrid.endpoint import ServerEndpoint
from lightning_hybrid.errors import NONFINITE_FIX, HybridSGDError, NonFiniteGradientError
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.links import AnyServerLink, LocalServerLink, RemoteServerLink, ServerLink, ShardedServerLink
from lightning_hybrid.overlap import GradientStream, ShardedGradientStream, StripedGradientStream
from lightning_hybrid.server import (
    FollowerServer,
    GradientClipping,
    ParameterServer,
    ServerSnapshot,
    clone_optimizer,
    gradients_applied,
    optimizer_parameters,
    steps_exactly,
)
from lightning_hybrid.shards import ShardPlan, stripe_elements_for
from lightning_hybrid.staleness import StalenessStats
from lightning_hybrid.wire import SERVER_RANK, STOP_FLAGS, AbortCode, Flag, Reply

log = logging.getLogger(__name__)

# Fits started in this process, by any strategy instance of either Lightning namespace: rank 0's count names each
# fit's keys in the store that lives as long as the process group (workers may be fresh processes, e.g. per sweep job).
FITS_STARTED = itertools.count(1)


@dataclass(frozen=True)
class Channels:
    """This rank's gloo groups to the other ranks: ``as_server[worker]`` where it serves that worker,
    ``as_worker[server]`` where it pushes to that server (or shard).

    One group per (server, worker) pair in that order: a sharded server's ranks r and s each serve the other, and
    r's push to s travels while s's push to r does, then both answers at once. On one group gloo carries the two
    directions one after the other (measured between two network namespaces on a 250 Mbit/s link: 2.1 MB each way
    at once took 104-140 ms on one group, 69 ms on two, as one way alone), so each direction has a group of its own.

    ``decisions[rank]``: sharded only, where shard 0 tells follower ``rank`` each update's group (on shard 0: one
    per follower; on a follower: its one, under key 0). A group of their own: on the answer channel a decision
    (a few bytes) waited behind every answer byte posted before it, and every shard waits for the decision before
    it steps (measured on the emulated cluster, a 3x slower link into the follower: 0.32 s after shard 0 decided).

    ``answers_out[worker]`` (where this rank serves) and ``answers_in[server]`` (where it pushes): pipelined workers
    only, whose next gradient goes out while the last answer comes in; on the push's own group the two would take
    turns, as above.
    """

    as_server: dict[int, dist.ProcessGroup]
    as_worker: dict[int, dist.ProcessGroup]
    decisions: dict[int, dist.ProcessGroup]
    answers_out: dict[int, dist.ProcessGroup]
    answers_in: dict[int, dist.ProcessGroup]

    @classmethod
    def between(
        cls, rank: int, world_size: int, sharded: bool, timeout: Optional[timedelta], pipelined: bool = False
    ) -> Channels:
        """Every rank's channels; ``new_group`` is collective, so every rank makes every group, in the same order.
        One server: one group per worker; sharded: one per ordered pair of ranks, and one per follower for the
        decisions; ``pipelined``: one more per (server, worker) pair for the answers."""
        channels = cls({}, {}, {}, {}, {})
        for server in range(world_size) if sharded else [SERVER_RANK]:
            for worker in (w for w in range(world_size) if w != server):
                group = dist.new_group([server, worker], backend="gloo", timeout=timeout)
                answers = dist.new_group([server, worker], backend="gloo", timeout=timeout) if pipelined else None
                if rank == server:
                    channels.as_server[worker] = group
                    if answers is not None:
                        channels.answers_out[worker] = answers
                elif rank == worker:
                    channels.as_worker[server] = group
                    if answers is not None:
                        channels.answers_in[server] = answers
        for follower in range(1, world_size) if sharded else ():
            group = dist.new_group([0, follower], backend="gloo", timeout=timeout)
            if rank in (0, follower):
                channels.decisions[follower if rank == 0 else 0] = group
        return channels


@dataclass(frozen=True)
class SessionOptions:
    """The strategy's options that shape one fit (checked by :mod:`lightning_hybrid.checks` before)."""

    threshold: int
    group_scaling: str
    max_staleness: Optional[int]
    staleness_scaling: bool
    nonfinite: str
    overlap_push: bool
    shard_server: bool
    shard_weights: Optional[tuple[float, ...]]
    peer_timeout: float
    pipeline_pushes: bool = False
    overlap_answers: bool = False
    answer_dtype: Optional[torch.dtype] = None
    push_dtype: Optional[torch.dtype] = None


def _on_host(value: Any) -> Any:
    return value.cpu() if isinstance(value, Tensor) else value


def with_hyperparameters(state: dict[str, Any], param_groups: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A server optimizer's ``state_dict`` with the user's current hyperparameters (e.g. a scheduled ``lr``), which
    the server copies before each step but a checkpoint must hold as the user's optimizer has them."""
    for saved, local in zip(state["param_groups"], param_groups):
        saved.update({k: v for k, v in local.items() if k != "params"})
    return state


def gather_to_zero(obj: Any) -> Optional[list[Any]]:
    """Every rank's ``obj`` on global rank 0 (``None`` elsewhere); collective on the default group."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    gathered: Optional[list[Any]] = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


class WorkerSession:
    """One fit's worker: idle until :meth:`start`, live until :meth:`end`, then its final counters."""

    def __init__(self) -> None:
        self._endpoint: Optional[ServerEndpoint] = None  # this rank's server (rank 0's, or every rank's shard)
        self._link: Optional[AnyServerLink] = None
        self._plan: Optional[ShardPlan] = None  # with shard_server
        self._stream: Optional[GradientStream | ShardedGradientStream | StripedGradientStream] = None
        self._options: Optional[SessionOptions] = None
        self._optimizer: Optional[Optimizer] = None  # the user's: hyperparameters come from it, its state goes back
        self._rank, self._world_size = 0, 1
        self._params: list[Tensor] = []
        self._param_groups: list[list[Tensor]] = []  # the optimizer's when fit started (``_params`` by group)
        self._buffers: list[Tensor] = []
        self._layout = FlatLayout.of([])
        self._buffer_layout = FlatLayout.of([])
        self._gradient: list[Tensor] = []
        self._flat_params: list[Tensor] = []  # the model's parameters live in these (FlatLayout.bind)
        self._version = 0
        self._applied = 0  # gradients the server had applied in all, as its latest answer said
        self._applied_at_start = 0  # ... when this fit started (a checkpoint's count when it resumed)
        self._threshold: Optional[int] = None
        self._threshold_request: Optional[int] = None  # a K this rank asked for, sent with its next message
        self.local_stop = Flag.NONE  # stop signals raised on this rank, sent with every message
        self._server_stop = Flag.NONE  # stop signals the server relayed: every rank acts on them alike
        self.drained = True  # nothing pushed since the last drain: every rank holds the latest model
        self._outstanding: Optional[int] = None  # pipelined: the global step of the push still to be answered
        self._staleness = StalenessStats()
        self._rejected: Counter = Counter()
        self._dropped: Counter = Counter()
        self._dropped_in_a_row = 0
        self._update_sizes: Counter = Counter()
        self._final_progress: Optional[dict[str, Any]] = None
        self._shard_progress: Optional[list[dict[str, Any]]] = None  # every shard's counters, for a checkpoint
        self._shard_scalars: Optional[list[dict[int, dict[str, Any]]]] = None  # shards' step counts, likewise
        self.steps = 0  # optimizer steps of this rank since the last reset of the worker counters
        self.wait_seconds = 0.0  # time of those spent waiting for the server's answers

    # ------------------------------------------------------------------ topology
    def start(
        self,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        channels: Channels,
        optimizer: Optimizer,
        buffers: list[Tensor],
        clipping: Optional[GradientClipping],
        options: SessionOptions,
        on_recovery_point: Optional[Callable[[ServerSnapshot], None]] = None,
    ) -> None:
        """Bind the model's parameters to flat buffers and connect to the server (starting this rank's own).
        ``on_recovery_point``: a follower shard's handler of its snapshots at recovery points (see
        :class:`FollowerServer`)."""
        self._rank, self._world_size, self._options, self._optimizer = rank, world_size, options, optimizer
        self._params = optimizer_parameters(optimizer)
        self._param_groups = [list(group["params"]) for group in optimizer.param_groups]
        self._buffers = buffers
        self._layout = FlatLayout.of(self._params)
        self._buffer_layout = FlatLayout.of(buffers)
        self._gradient = self._layout.allocate(device)
        self._flat_params = self._layout.allocate(device)
        self._layout.bind(self._params, self._flat_params, keep="params")
        self._threshold = options.threshold
        # overlap_answers: each shard holds stripes of the model, and steps and answers them one by one
        striped = options.shard_server and options.overlap_answers and device.type == "cpu"
        if striped and len(self._layout.dtypes) > 1:
            raise HybridSGDError(
                "hybrid_sgd: overlap_answers stripes the model over the shards and needs every parameter in one dtype, "
                f"this model has {[str(d) for d in self._layout.dtypes]}: cast it to one, or set overlap_answers=False"
            )
        plan = (
            ShardPlan(
                self._layout,
                world_size,
                options.shard_weights,
                stripe_elements=stripe_elements_for(self._layout, world_size) if striped else None,
            )
            if options.shard_server
            else None
        )

        def start_server(
            params: list[Tensor],
            buffer_layout: FlatLayout,
            local_params: Optional[list[Tensor]],
            group_sizes: Optional[list[int]] = None,
            shards: int = 1,
        ) -> ServerEndpoint:
            """This rank's server over ``params`` (the whole model, or this rank's shard of it); of a sharded
            server, shard 0 decides every update's group, the others follow; striped, a chunk stepper steps and
            answers each stripe as its gradients complete."""
            follower = shards > 1 and rank != 0
            server = (FollowerServer if follower else ParameterServer)(
                params,
                lambda master: clone_optimizer(optimizer, master, group_sizes),
                num_workers=world_size,
                threshold=options.threshold,
                gradient_clipping=clipping,
                hyperparameters=lambda: optimizer.param_groups,
                device=device,
                staleness_scaling=options.staleness_scaling,
                group_scaling=options.group_scaling,
                max_staleness=options.max_staleness,
                early_pushes=options.pipeline_pushes,
                layout=plan.layouts[rank] if striped and plan is not None else None,
            )
            if isinstance(server, FollowerServer):
                server.on_recovery_point = on_recovery_point
            stepper = (
                ChunkStepper(
                    server, rank, plan.wire_views(rank, self._flat_params), channels.as_worker, options.peer_timeout
                )
                if striped and plan is not None
                else None
            )
            endpoint = ServerEndpoint(
                server,
                channels.as_server,
                buffer_layout,
                read_buffers=lambda out: buffer_layout.pack(self._buffers, out),
                peer_timeout=options.peer_timeout,
                local_params=local_params,
                rank=rank,
                decisions=channels.decisions if shards > 1 else {},
                answers=channels.answers_out or None,
                answer_dtype=options.answer_dtype,
                push_dtype=options.push_dtype,
                chunk_stepper=stepper,
            )
            endpoint.start()
            return endpoint

        def remote_link(
            server_rank: int, layout: FlatLayout, buffer_layout: FlatLayout, params: Optional[list[Tensor]]
        ) -> RemoteServerLink:
            """A link to the server on ``server_rank``; a CPU model's flat ``params`` receive the answers directly
            (striped: each answer chunk lands in its place in the model, over the group the shard pushes on)."""
            return RemoteServerLink(
                rank,
                channels.as_worker[server_rank],
                layout,
                buffer_layout,
                options.peer_timeout,
                receive_into=params if device.type == "cpu" else None,
                pin_memory=device.type == "cuda",
                server_rank=server_rank,
                answers=channels.answers_in.get(server_rank),
                answer_dtype=options.answer_dtype,
                push_dtype=options.push_dtype,
                chunk_answers=(plan.wire_views(server_rank, self._flat_params), channels.as_server[server_rank])
                if striped and plan is not None
                else None,
            )

        if plan is not None:  # every rank serves its shard of the model and talks to every shard
            no_buffers = FlatLayout.of([])  # rank 0's module buffers travel with shard 0's answers only
            param_slices = None if striped else [plan.views(shard, self._flat_params) for shard in range(plan.shards)]
            self._endpoint = start_server(
                plan.piece_tensors(rank, self._params),
                self._buffer_layout if rank == 0 else no_buffers,
                None if param_slices is None else param_slices[rank],
                plan.group_sizes(rank, optimizer),
                shards=plan.shards,
            )
            links: list[ServerLink] = [
                LocalServerLink(self._endpoint)
                if shard == rank
                else remote_link(
                    shard,
                    plan.layouts[shard],
                    self._buffer_layout if shard == 0 else no_buffers,
                    None if param_slices is None else param_slices[shard],
                )
                for shard in range(plan.shards)
            ]
            stepper = self._endpoint.chunk_stepper
            self._link = ShardedServerLink(
                rank,
                links,
                plan,
                self._gradient,
                self._flat_params,
                param_slices,
                local_gradient=None if stepper is None else stepper.buffers[rank],
            )
            self._plan = plan
            if stepper is not None:
                self._stream = StripedGradientStream(
                    self._params, self._layout, self._gradient, self._link, plan, rank, stepper
                )
            elif options.overlap_push and device.type == "cpu":
                self._stream = ShardedGradientStream(self._params, self._layout, self._gradient, self._link, plan)
        elif rank == SERVER_RANK:
            self._endpoint = start_server(self._params, self._buffer_layout, self._flat_params)
            self._link = LocalServerLink(self._endpoint)
        else:
            link = self._link = remote_link(SERVER_RANK, self._layout, self._buffer_layout, self._flat_params)
            if options.overlap_push and device.type == "cpu":
                self._stream = GradientStream(self._params, self._layout, self._gradient, link)

    @property
    def stripe_elements(self) -> Optional[int]:
        """The stripe size of a striped sharded server (``overlap_answers``), else ``None``."""
        return None if self._plan is None else self._plan.stripe_elements

    @property
    def live(self) -> bool:
        """Connected to the server: between :meth:`start` and :meth:`end`."""
        return self._link is not None

    @property
    def server(self) -> Optional[ParameterServer]:
        """This rank's server (or shard) while live, else ``None``."""
        return self._endpoint.server if self._endpoint is not None else None

    # ------------------------------------------------------------------ what this rank knows
    @property
    def threshold(self) -> Optional[int]:
        """K: the server's on its rank, the last answer's elsewhere; ``None`` before any fit or request."""
        return self._endpoint.server.threshold if self._endpoint is not None else self._threshold

    def forget_threshold(self) -> None:
        """Not live: the last fit's K no longer answers for the strategy, whose threshold was set anew."""
        self._threshold = None

    def request_threshold(self, k: int) -> None:
        """A new K: the server's rank applies it at once; a worker (and every rank of a sharded server, whose shard
        0 decides) sends it with its next message."""
        self._threshold = k
        if self._endpoint is not None:
            self._endpoint.apply_requests(Flag.NONE, k)
        if self._link is not None and (self._endpoint is None or self._plan is not None):
            self._threshold_request = k

    @property
    def version(self) -> int:
        return self._endpoint.server.version if self._endpoint is not None else self._version

    @property
    def synchronous_steps(self) -> float:
        """The server's progress this fit in DDP's steps: gradients applied (as of this rank's latest answer)
        over N, which is DDP's steps whatever K and however many batches each rank took."""
        return (self._applied - self._applied_at_start) / self._world_size

    @property
    def staleness(self) -> StalenessStats:
        """All workers' on the server's rank, this worker's own elsewhere."""
        return self._endpoint.server.stats if self._endpoint is not None else self._staleness

    @property
    def worker_staleness(self) -> StalenessStats:
        """This worker's own gradients' staleness, as its answers told it (the server's stats once ended on its
        rank)."""
        return self._staleness

    @property
    def update_sizes(self) -> Counter:
        return self._endpoint.server.update_sizes if self._endpoint is not None else self._update_sizes

    @property
    def rejected(self) -> Counter:
        return self._endpoint.server.rejected if self._endpoint is not None else self._rejected

    @property
    def param_groups(self) -> list[list[Tensor]]:
        """The parameters this fit serves, by param group: the optimizer's when fit started."""
        return self._param_groups

    @property
    def dropped(self) -> Counter:
        return self._endpoint.server.dropped if self._endpoint is not None else self._dropped

    def progress_state(self) -> Optional[dict[str, Any]]:
        """The server's counters: live on its rank, kept after the fit; ``None`` where this rank never served."""
        return self._endpoint.server.progress_state() if self._endpoint is not None else self._final_progress

    @property
    def stop_requested(self) -> bool:
        """The server relayed a stop (``max_time`` spent or ``max_steps`` reached on some rank)."""
        return bool(self._server_stop & Flag.STOP)

    @property
    def sigterm_relayed(self) -> bool:
        return bool(self._server_stop & Flag.SIGTERM)

    # ------------------------------------------------------------------ the step
    @contextlib.contextmanager
    def step(self, final: bool, global_step: int, work: Optional[int] = None) -> Iterator[Callable[[Any], bool]]:
        """One optimizer step; yields the push that the step's closure result goes to (see :meth:`_exchange`).

        ``final``: no step of this rank follows in this epoch (or ``max_steps`` ends the run), so the push also
        drains. Decided before the closure runs backward, so that the gradient can stream out during backward (a
        stop signal raised during backward then travels with the next message). ``work``: the id of the step's
        batch, which the server records once it holds the gradient (``ParameterServer.absorbed``)."""
        threshold = self._take_threshold_request()
        if self._stream is not None:
            self._stream.arm(self._version, self.local_stop | (Flag.DRAIN if final else Flag.NONE), threshold, work)
        try:
            yield lambda loss: self._exchange(loss, final, threshold, global_step, work)
        except BaseException:
            if self._stream is not None and self._stream.incomplete:
                assert isinstance(self._link, (RemoteServerLink, ShardedServerLink))
                self._link.abandon()
            raise
        finally:
            if self._stream is not None:
                self._stream.disarm()

    def _exchange(
        self, loss: Any, final: bool, threshold: Optional[int], global_step: int, work: Optional[int]
    ) -> bool:
        """Push this worker's gradient, wait for the server's answer and load the new parameters. False: the
        server dropped the gradient as too stale, and the batch must be computed again."""
        assert self._link is not None
        started = time.perf_counter()
        answered_step = global_step  # the step whose push the reply answers (pipelined: an earlier one)
        if loss is None:  # training_step returned None: Lightning skips the step, so no gradient
            if final:
                self._collect_outstanding(self._link)
                reply = self._link.drain(self.local_stop, threshold)
            else:
                reply, self._threshold_request = None, self._threshold_request or threshold
        elif self._stream is not None:
            self.drained = False
            reply = self._stream.finish()
        else:
            self._layout.pack([p.grad for p in self._params], self._gradient)
            unused = frozenset(i for i, p in enumerate(self._params) if p.grad is None)  # frozen, or left out
            self.drained = False
            flags = self.local_stop | (Flag.DRAIN if final else Flag.NONE)
            if self._options is not None and self._options.pipeline_pushes:
                reply, answered_step = self._push_pipelined(flags, threshold, work, global_step, unused)
            else:
                reply = self._link.push(self._gradient, self._version, flags, threshold, work, unused)
        if reply is not None and reply.flags & Flag.DROPPED:
            self._absorb(reply, global_step)
            self.wait_seconds += time.perf_counter() - started
            return False
        if reply is not None:
            self._absorb(reply, answered_step)
            if self._server_stop and not final:
                self._collect_outstanding(self._link)
                self._absorb(self._link.drain(self.local_stop), global_step)
            if final or self._server_stop:
                self.drained = True
        self.wait_seconds += time.perf_counter() - started
        self.steps += 1
        return True

    def _push_pipelined(
        self, flags: Flag, threshold: Optional[int], work: Optional[int], global_step: int, unused: frozenset[int]
    ) -> tuple[Optional[Reply], int]:
        """Push the packed gradient and collect the answer to the push before, which comes in while this one goes
        out: the next step runs on parameters without this worker's last update (``pipeline_pushes``). A draining
        push is answered before the step ends. Returns the answer (``None``: nothing was outstanding) and the
        global step of the push it answers."""
        assert self._link is not None
        self._link.post_push(self._gradient, self._version, flags, threshold, work, unused)
        pushed_at, self._outstanding = self._outstanding, global_step
        previous = self._link.collect() if pushed_at is not None else None
        self._link.finish_sends()  # the gradient's buffers are packed again at the next step
        if not flags & Flag.DRAIN:
            return previous, global_step if pushed_at is None else pushed_at
        if previous is not None:
            self._absorb(previous, pushed_at)
        self._outstanding = None
        return self._link.collect(), global_step

    def _collect_outstanding(self, link: AnyServerLink) -> None:
        """Pipelined: take the answer to the last push before a drain (which waits for every answer)."""
        if self._outstanding is not None:
            pushed_at, self._outstanding = self._outstanding, None
            self._absorb(link.collect(), pushed_at)

    def drain(self, global_step: int) -> None:
        """Apply pending gradients and take the latest parameters and rank 0's buffers."""
        assert self._link is not None
        self._collect_outstanding(self._link)
        self._absorb(self._link.drain(self.local_stop, self._take_threshold_request()), global_step)
        self.drained = True

    def _take_threshold_request(self) -> Optional[int]:
        request, self._threshold_request = self._threshold_request, None
        return request

    def _absorb(self, reply: Reply, global_step: int) -> None:
        if reply.params is not self._flat_params:
            for mine, received in zip(self._flat_params, reply.params):
                mine.copy_(received)
        self._layout.bind(self._params, self._flat_params, keep="buffers")
        if reply.buffers is not None:
            self._buffer_layout.unpack(reply.buffers, self._buffers)
        self._version = reply.version
        self._applied = max(self._applied, reply.applied)  # a sharded worker's shards answer in any order
        self._threshold = reply.threshold
        if reply.staleness is not None:
            self._staleness.record(self._rank, reply.staleness)
        if reply.flags & Flag.REJECTED:
            self._reject(global_step)
        self._count_drop(bool(reply.flags & Flag.DROPPED))
        self._server_stop |= reply.flags & STOP_FLAGS

    def _reject(self, global_step: int) -> None:
        assert self._options is not None
        self._rejected[self._rank] += 1
        if self._options.nonfinite == "stop":
            raise NonFiniteGradientError(
                f"hybrid_sgd: rank {self._rank}'s gradient at step {global_step} held NaN or Inf; the server "
                f"rejected it (the master weights are untouched) and nonfinite='stop' ends the run. {NONFINITE_FIX}"
            )
        log.warning(
            "hybrid_sgd: rank %d's gradient held NaN or Inf and was rejected; the master weights are untouched "
            "(%d rejected on this rank so far)",
            self._rank,
            self._rejected[self._rank],
        )

    def _count_drop(self, dropped: bool) -> None:
        if not dropped:
            self._dropped_in_a_row = 0
            return
        assert self._options is not None
        self._dropped[self._rank] += 1
        self._dropped_in_a_row += 1
        if self._dropped_in_a_row == 3:
            log.warning(
                "hybrid_sgd: rank %d's last 3 gradients were staler than max_staleness=%d and dropped; it computes "
                "its batch again each time, and trains only when the others wait (e.g. at the epoch's end). Raise "
                "max_staleness above this worker's usual staleness (about its slowdown times N - 1 at K = 1).",
                self._rank,
                self._options.max_staleness,
            )

    # ------------------------------------------------------------------ checkpoints
    def gather_shard_progress(self) -> None:
        """Sharded: every shard's counters to global rank 0, for the next checkpoint (collective)."""
        if self._plan is not None and self._endpoint is not None:
            self._shard_progress = gather_to_zero(self._endpoint.server.progress_state())

    def checkpoint_progress(self) -> Optional[dict[str, Any]]:
        """What a checkpoint adds to the server's counters: each shard's own version, counters and step counts."""
        if self._shard_progress is None:
            return None
        return {"shards": self._shard_progress, "shard_scalars": self._shard_scalars}

    def optimizer_state(self, param_groups: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """The server's optimizer state in the unsharded format, with the user's current hyperparameters; ``None``
        where this rank serves nothing. Sharded, this is collective and only global rank 0 gets it (``{}``
        elsewhere)."""
        if self._endpoint is None:
            return None
        return self._state_of(self._endpoint.server, param_groups)

    def _state_of(self, server: ParameterServer, param_groups: Sequence[dict[str, Any]]) -> dict[str, Any]:
        state = server.optimizer.state_dict()
        if self._plan is not None:
            # on the host: pieces gathered from other GPUs would arrive on their devices and not concatenate
            state["state"] = {i: {k: _on_host(v) for k, v in entry.items()} for i, entry in state["state"].items()}
            shard_states = gather_to_zero(state)
            if shard_states is None:
                return {}
            state, self._shard_scalars = self._plan.merge_states(shard_states, param_groups)
        return with_hyperparameters(state, param_groups)

    def load(self, optimizer_states: list[dict[str, Any]], progress: Optional[dict[str, Any]], world_size: int) -> None:
        """Restore version and K from a checkpoint (also outside fit, e.g. ``validate(ckpt_path=...)``) and, where
        this rank serves, the server's optimizer state and counters.

        Sharded: a checkpoint of as many shards restores each shard's own counters; any other (unsharded, DDP,
        another world size) gives every shard the whole server's."""
        if progress is not None:
            self._version, self._threshold = int(progress["version"]), int(progress["threshold"])
            self._applied = self._applied_at_start = gradients_applied(progress.get("update_sizes", {}))
        if self._endpoint is None:
            return
        server, optimizer_state = self._endpoint.server, optimizer_states[0]
        if self._plan is None:
            server.optimizer.load_state_dict(optimizer_state)
            if progress is not None:
                server.load_progress_state(progress)
            return
        shards = (progress or {}).get("shards")
        same = shards is not None and len(shards) == world_size
        assert progress is not None or not same
        scalars = progress["shard_scalars"][self._rank] if same and progress is not None else None
        server.optimizer.load_state_dict(self._plan.shard_state(self._rank, optimizer_state, scalars))
        if progress is not None:
            server.load_progress_state(shards[self._rank] if same else progress)
            assert isinstance(self._link, ShardedServerLink)
            self._link.versions = [s["version"] for s in shards] if same else [self._version] * world_size

    # ------------------------------------------------------------------ the end
    def end(self, error: Optional[BaseException] = None, clean: bool = True, global_step: int = -1) -> None:
        """Final drain (when ``clean``), then this worker leaves; the server's rank keeps its final counters, and
        the user's optimizer (global rank 0's, with a sharded server) takes the server optimizer's final state.

        After an ``error`` the other ranks are told at once (rather than waiting for ``peer_timeout``)."""
        link, self._link = self._link, None
        if self._stream is not None:
            self._stream.close()  # the gradient hooks leave the model with the session
            self._stream = None
        if link is None:
            return
        assert self._options is not None and self._optimizer is not None
        try:
            nonfinite = isinstance(error, NonFiniteGradientError)
            failed = Flag.FAILED | (Flag.NONFINITE if nonfinite else Flag.NONE)
            if error is not None and self._endpoint is not None:
                why = f": rank {self._rank} raised {type(error).__name__}"
                self._endpoint.abort(AbortCode.NONFINITE if nonfinite else AbortCode.SERVER_FAILED, self._rank, why)
                if isinstance(link, ShardedServerLink):  # the other shards hear why, rather than a lost connection
                    link.leave_remote_shards(failed)
            elif error is not None:
                link.leave(failed)
            else:
                if clean:
                    self._collect_outstanding(link)
                    self._absorb(link.drain(self.local_stop), global_step)
                link.leave(self.local_stop)
        except HybridSGDError:
            if error is None and clean:
                raise
            log.debug("hybrid_sgd: could not leave cleanly", exc_info=True)
        if self._endpoint is None:
            return
        server = self._endpoint.server
        try:
            self._endpoint.close(timeout=self._options.peer_timeout if error is None else 1.0)
            if self._plan is None or error is None:  # gathering shards is collective: not after an error
                if self._plan is not None:  # kept for a checkpoint saved after fit
                    self._shard_progress = gather_to_zero(server.progress_state())
                state = self._state_of(server, self._optimizer.param_groups)
                if state and steps_exactly(self._optimizer, self._param_groups):
                    self._optimizer.load_state_dict(state)
                elif state and error is None:  # changed after the last step (a step after a change refuses it)
                    log.warning(
                        "hybrid_sgd: the optimizer's param groups changed after the last step, so it keeps its own "
                        "state, not the server's: a checkpoint saved now would not hold what the server learned"
                    )
        finally:  # the server's final counters stay readable, whatever failed above
            self._endpoint = None
            self._version, self._threshold = server.version, server.threshold
            self._staleness = server.stats
            self._update_sizes = server.update_sizes
            self._rejected = server.rejected
            self._dropped = server.dropped
            self._final_progress = server.progress_state()
