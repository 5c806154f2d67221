"""Answers chunk by chunk (``HybridSGDStrategy(overlap_answers=True)``): a striped shard steps each of its wire
chunks as soon as every worker's gradient of that chunk is in, and sends the chunk to every worker at once, while
later chunks are still coming. Answered after the shard's last chunk, a sharded server at K = N kept 0.76-0.90x of
DDP's samples/s on the emulated cluster; chunk by chunk it keeps up (README, *Measured on an emulated cluster*).

The step of a chunk is speculative: what only the whole update settles comes after its first chunks went out.
The group of gradients (shard 0 decides it; a worker that leaves or a lowered K shrinks it), a NaN/Inf verdict
(each worker's trailer), the tensors that no gradient of the group used, the staleness weights. So chunks are
stepped only while K = N and every worker is active, leaving alone the tensors the last update left unused (frozen
ones stay frozen), each with a copy of its parameters and optimizer state; the server checks, when it applies the
update, that it is the update the chunks assumed (:meth:`ChunkStepper.settle`), and otherwise puts every stepped
chunk back and steps the update as it would without this option. A rejected or dropped gradient puts them back at
once (:meth:`ChunkStepper.withdraw`).

On the wire every push is answered by each shard with exactly one message per chunk of the shard's layout, chunk
``c`` on tag ``CHUNK_TAGS + c``, then the usual header. The chunks travel over the group on which the shard's rank
pushes its own gradients to the worker's rank: in the same direction, they queue behind that rank's pushes, where
over a group of their own they shared its link with them as one more TCP stream and every chunk came late
(measured at 10M parameters and 250 Mbit/s: 0.73-0.78x DDP there, 0.91x here). The header is flagged
``Flag.CHUNKED`` when the chunks are the answer; when some went out before they were put back, it comes without the
flag and the whole slice follows it, as an ordinary answer does.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Collection, Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_hybrid.group_scaling import apply_scales
from lightning_hybrid.wire import CHUNK_TAGS

if TYPE_CHECKING:
    from lightning_hybrid.server import ParameterServer


class ChunkStepper:
    """Steps one striped shard's chunks as their gradients complete, on a thread of its own (see the module)."""

    def __init__(
        self,
        server: ParameterServer,
        local_rank: int,
        local_views: list[Tensor],
        chunk_channels: dict[int, dist.ProcessGroup],
        peer_timeout: float,
    ) -> None:
        """``local_views``: where the local worker's parameters hold each chunk (its answers are written there);
        ``chunk_channels[worker]``: the group over which this rank pushes to ``worker``'s shard, which carries the
        chunks to that worker."""
        layout = server.layout
        self._server = server
        self.chunks = len(layout.chunks)
        self._pieces = [[p for p, c in enumerate(layout.chunk_of) if c == chunk] for chunk in range(self.chunks)]
        self._workers = frozenset(range(server.num_workers))
        # every worker's gradient lands here: a remote one's receive buffer, the local one's packed copy
        self.buffers = {worker: layout.allocate(server.device) for worker in self._workers}
        self._gradient_chunks = {worker: layout.chunk_views(buffer) for worker, buffer in self.buffers.items()}
        total = layout.allocate(server.device)
        self._total_chunks = layout.chunk_views(total)
        self._total_pieces = layout.views(total)
        self._master_chunks = layout.chunk_views(server.master)
        self._local_rank = local_rank
        self._local_views = local_views
        self._channels = chunk_channels
        self._timeout = timedelta(seconds=peer_timeout)
        self._lock = threading.Condition()
        self._arrived: list[set[int]] = [set() for _ in range(self.chunks)]
        self._busy = 0  # chunks queued or being stepped
        self._backups: dict[int, tuple[list[Tensor], list[Optional[dict[str, Any]]]]] = {}  # stepped, not settled
        self._sent: dict[int, set[int]] = {worker: set() for worker in self._workers}  # per worker's current push
        self._stale: set[int] = set()  # workers that got chunks which were put back since
        self._void = False  # the coming update is not the one chunks assumed: step no more of it
        self._expected_unused: frozenset[int] = frozenset()  # pieces the last update left unused: frozen ones
        self._scales: Optional[list[Any]] = None  # the coming update's group scales, taken at its first chunk
        self._sends: list[dist.Work] = []
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self.failure: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="hybrid-sgd-chunks", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ arrivals (receiver threads, local worker)
    def arrived(self, worker: int, chunk: int) -> None:
        """``worker``'s gradient of ``chunk`` is in its buffer: step the chunk if it was the last one missing."""
        with self._lock:
            self._arrived[chunk].add(worker)
            if self._arrived[chunk] == self._workers and not self._void and self._server.steps_whole_groups:
                self._busy += 1
                self._ready.put(chunk)

    # ------------------------------------------------------------------ the server's side (under its lock)
    def settle(self, group: Collection[int], unused: frozenset[int], unweighted: bool) -> bool:
        """The server applies the update of ``group`` (``unused``: tensors no gradient of it used; ``unweighted``:
        every staleness weight is 1): whether the stepped chunks are exactly that update. If not, they are put
        back and the server steps it whole. Either way the next update starts from nothing stepped, and assumes
        this one's unused tensors."""
        with self.idle():
            exact = (
                not self._void
                and set(group) == self._workers
                and len(self._backups) == self.chunks
                and unused == self._expected_unused
                and unweighted
            )
            if not exact:
                self._put_back()
            for arrived in self._arrived:
                arrived.difference_update(group)
            self._backups.clear()
            self._void, self._scales, self._expected_unused = False, None, unused
            return exact

    def withdraw(self, worker: int) -> None:
        """``worker``'s pending gradient was rejected or dropped: the coming update is not the one stepped chunks
        assumed (they hold that gradient), so they are put back and no more are stepped before it is applied."""
        with self.idle():
            self._put_back()
            self._void = True
            for arrived in self._arrived:
                arrived.discard(worker)

    def before_update(self, master: list[Tensor], state: dict[str, Any]) -> None:
        """Copies of the master pieces (``master``) and of the optimizer's ``state_dict`` (``state``, numbered by
        piece) as they were before the chunks stepped so far: a snapshot at the server's version. Within
        :meth:`idle`, around the copying."""
        for chunk, (values, states) in self._backups.items():
            for piece, value, before in zip(self._pieces[chunk], values, states):
                master[piece].copy_(value.view_as(master[piece]))
                if before is None:
                    state["state"].pop(piece, None)
                else:
                    state["state"][piece] = _copy_state(before)

    def answer(self, worker: int) -> tuple[list[int], bool]:
        """The chunks still to send to ``worker`` for its push, and whether some it got were put back since (then
        the whole slice follows the header); the next push starts afresh."""
        with self._lock:
            sent, stale = self._sent[worker], worker in self._stale
            self._sent[worker] = set()
            self._stale.discard(worker)
        return [chunk for chunk in range(self.chunks) if chunk not in sent], stale

    def send_chunks(
        self, worker: int, chunks: Sequence[int], params: Sequence[Tensor]
    ) -> list[tuple[Tensor, dist.Work]]:
        """Post ``chunks`` of ``params`` (buffers of the shard's layout) to remote ``worker``."""
        if not chunks:
            return []
        views = self._server.layout.chunk_views(params)
        group = self._channels[worker]
        return [(views[c], dist.isend(views[c], dst=worker, group=group, tag=CHUNK_TAGS + c)) for c in chunks]

    def write_local(self, chunks: Sequence[int], params: Sequence[Tensor]) -> None:
        """Write ``chunks`` of ``params`` into the local worker's parameters."""
        if not chunks:
            return
        views = self._server.layout.chunk_views(params)
        for chunk in chunks:
            self._local_views[chunk].copy_(views[chunk])

    def close(self) -> None:
        self._ready.put(None)

    # ------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """Hold the stepper's lock once no chunk is queued or being stepped (all of an update's chunks are queued
        before the server applies it: each worker's trailer comes after its chunks)."""
        with self._lock:
            while self._busy and self.failure is None:
                self._lock.wait(self._timeout.total_seconds())
            if self.failure is not None:
                raise self.failure
            yield

    def _put_back(self) -> None:
        """Restore every stepped chunk's parameters and optimizer state; whoever got one must get the whole
        slice."""
        if not self._backups:
            return
        optimizer, params = self._server.optimizer, self._server.parameters
        with torch.no_grad():
            for chunk, (values, states) in self._backups.items():
                for piece, value, before in zip(self._pieces[chunk], values, states):
                    params[piece].copy_(value)
                    if before is None:
                        optimizer.state.pop(params[piece], None)
                    else:
                        optimizer.state[params[piece]] = before
        self._stale.update(worker for worker, sent in self._sent.items() if sent & self._backups.keys())
        self._backups.clear()

    def _run(self) -> None:
        while (chunk := self._ready.get()) is not None:
            try:
                self._step(chunk)
            except BaseException as err:  # the server hears of it where it waits (_idle) and aborts the run
                self.failure = err
            finally:
                with self._lock:
                    self._busy -= 1
                    self._lock.notify_all()

    def _step(self, chunk: int) -> None:
        """One chunk of the coming update: the mean of every worker's gradient of it, then the optimizer's step on
        its pieces alone (the others, and those the last update left unused, have no ``.grad``, which torch's
        optimizers skip), then out to every worker."""
        server, optimizer = self._server, self._server.optimizer
        with self._lock:
            if self._void or chunk in self._backups:
                return
            first = not self._backups
        if first:
            for work in self._sends:  # the last update's chunks: their buffers are the master's
                work.wait(self._timeout)
            self._sends = []
            self._scales = server.update_scales(len(self._workers))
        params = [server.parameters[piece] for piece in self._pieces[chunk]]
        backup = (
            [p.detach().clone() for p in params],
            [_copy_state(optimizer.state[p]) if p in optimizer.state else None for p in params],
        )
        total = self._total_chunks[chunk]
        inputs = [self._gradient_chunks[worker][chunk] for worker in sorted(self._workers)]
        total.copy_(inputs[0])
        for gradient in inputs[1:]:
            total.add_(gradient)
        total.div_(len(inputs))
        for piece, param in zip(self._pieces[chunk], params):
            param.grad = None if piece in self._expected_unused else self._total_pieces[piece]
        if server.gradient_clipping is not None:  # by value (a sharded server refuses clipping by norm)
            server.gradient_clipping.apply(params)
        assert self._scales is not None
        restore = apply_scales(optimizer.param_groups, self._scales)
        optimizer.step()
        restore()
        for param in params:
            param.grad = None
        master = self._master_chunks[chunk]
        with self._lock:
            self._backups[chunk] = backup
            for worker, group in self._channels.items():
                self._sends.append(dist.isend(master, dst=worker, group=group, tag=CHUNK_TAGS + chunk))
                self._sent[worker].add(chunk)
            self._local_views[chunk].copy_(master)
            self._sent[self._local_rank].add(chunk)


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value.clone() if isinstance(value, Tensor) else value for key, value in state.items()}
