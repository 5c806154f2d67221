"""A remote worker's gradient leaves while backward still runs, as DDP's bucketed all-reduce does.

Each parameter's post-accumulate-grad hook copies its gradient into the flat send buffer. With one server a
chunk (see :meth:`FlatLayout.chunks`: last parameters first, the order in which backward produces them) is sent
as soon as all its gradients are in and every chunk before it is out (:class:`GradientStream`). With a sharded
server each remote shard's slice leaves as soon as every gradient it holds a piece of is in: the slices are
contiguous, so the last shards' are ready first (:class:`ShardedGradientStream`). At the optimizer step the rest
follows: parameters without a gradient count as zeros, and a trailer names them (as an ordinary push's does: see
``ParameterServer.push``), so every streamed push ends with one.

Armed only for the backward that precedes an optimizer step (Lightning runs that closure inside
``optimizer.step``), so micro-batches of gradient accumulation send nothing.
"""

from __future__ import annotations

import abc
import functools
from collections import Counter
from collections.abc import Sequence
from typing import Optional

from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_hybrid.chunkwise import ChunkStepper
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.links import RemoteServerLink, ShardedServerLink
from lightning_hybrid.server import all_finite
from lightning_hybrid.shards import ShardPlan
from lightning_hybrid.wire import Flag, Reply, Trailer


class _Stream(abc.ABC):
    """Packs each parameter's gradient into the flat buffers as backward produces it; subclasses send."""

    def __init__(self, params: Sequence[Tensor], layout: FlatLayout, gradient: list[Tensor]) -> None:
        self._params = list(params)
        self._layout = layout
        self._gradient = gradient
        self._views = layout.views(gradient)
        # (version, flags, K request, work id) while armed
        self._message: Optional[tuple[int, Flag, Optional[int], Optional[int]]] = None
        self._packed: list[bool] = []
        self._zeros: set[int] = set()  # frozen when armed: packed as zeros then, before backward
        self._unused: set[int] = set()  # parameters without a gradient (frozen, or left out), found at finish
        self._handles: Optional[dict[int, RemovableHandle]] = {}  # None once closed
        self._hook_trainable()

    @property
    @abc.abstractmethod
    def incomplete(self) -> bool:
        """Part of a gradient message is out: unless finished, the link must be abandoned."""

    def arm(self, version: int, flags: Flag, threshold: Optional[int], work: Optional[int] = None) -> None:
        """The next backward's gradients form a push with this header."""
        self._message = (version, flags, threshold, work)
        self._packed = [False] * len(self._params)
        self._start()
        self._hook_trainable()  # a parameter unfrozen since (BaseFinetuning) streams from now on
        self._zeros = {index for index, param in enumerate(self._params) if not param.requires_grad}
        for index in self._zeros:  # frozen: no hook fires and no gradient comes (its .grad may still hold the last
            self._pack(index, None)  # step's until the closure zeroes it), so its zeros are ready now

    def disarm(self) -> None:
        self._message = None

    def finish(self) -> Reply:
        """At the optimizer step: pack what no hook delivered, send the rest, and wait for the answer. Which
        parameters are unused is decided here, as for an ordinary push: those whose ``.grad`` is ``None``."""
        for index, param in enumerate(self._params):
            if not self._packed[index] or (index in self._zeros and param.grad is not None):
                self._repack(index, param.grad)  # the second case: unfrozen inside the step
        self._unused = {index for index, param in enumerate(self._params) if param.grad is None}
        reply = self._finish()
        self._message = None
        return reply

    def close(self) -> None:
        for handle in (self._handles or {}).values():
            handle.remove()
        self._handles = None

    def _hook_trainable(self) -> None:
        """A post-accumulate-grad hook on every parameter that requires grad (a frozen one takes none)."""
        if self._handles is None:
            return
        for index, param in enumerate(self._params):
            if param.requires_grad and index not in self._handles:
                self._handles[index] = param.register_post_accumulate_grad_hook(functools.partial(self._ready, index))

    def _ready(self, index: int, param: Tensor) -> None:
        if self._message is None:
            return  # a micro-batch that only accumulates, or a backward outside training steps
        self._repack(index, param.grad)
        self._send_ready()

    def _repack(self, index: int, grad: Optional[Tensor]) -> None:
        if self._packed[index] and self._sent(index):
            raise RuntimeError(
                "hybrid_sgd: a parameter's gradient changed after it was sent to the server (a second backward in "
                "one optimizer step, or a parameter unfrozen inside it?); set HybridSGDStrategy(overlap_push=False) "
                "to push at the optimizer step."
            )
        self._pack(index, grad)

    def _pack(self, index: int, grad: Optional[Tensor]) -> None:
        if grad is None:
            self._views[index].zero_()
        else:
            self._views[index].copy_(grad)
        if not self._packed[index]:
            self._packed[index] = True
            self._count(index)

    @abc.abstractmethod
    def _start(self) -> None:
        """A new message: nothing packed, nothing sent."""

    @abc.abstractmethod
    def _count(self, index: int) -> None:
        """Tensor ``index`` is packed for the first time."""

    @abc.abstractmethod
    def _sent(self, index: int) -> bool:
        """Tensor ``index``'s gradient is already on its way."""

    @abc.abstractmethod
    def _send_ready(self) -> None:
        """Send what is complete."""

    @abc.abstractmethod
    def _finish(self) -> Reply:
        """Everything is packed: send the rest and wait for the answer."""

    def _verdict(self) -> tuple[Flag, Optional[int], Optional[int], frozenset[int]]:
        """A sharded push's flags (``Flag.NONFINITE`` for NaN/Inf anywhere in the whole gradient: every shard
        rejects it alike), K request, work id and unused tensors, once everything is packed."""
        assert self._message is not None
        _, flags, threshold, work = self._message
        if not all(all_finite(g) for g in self._gradient):
            flags |= Flag.NONFINITE
        return flags, threshold, work, frozenset(self._unused)


class GradientStream(_Stream):
    """Sends one worker's gradient to one server chunk by chunk, in wire order, while backward runs."""

    def __init__(self, params: Sequence[Tensor], layout: FlatLayout, gradient: list[Tensor], link: RemoteServerLink):
        super().__init__(params, layout, gradient)
        self._link = link
        self._chunks = layout.chunk_views(gradient)
        self._tensors_per_chunk = Counter(layout.chunk_of)
        self._missing: list[int] = []
        self._next = 0

    @property
    def incomplete(self) -> bool:
        return 0 < self._next < len(self._chunks)

    def _start(self) -> None:
        self._missing = [self._tensors_per_chunk[chunk] for chunk in range(len(self._chunks))]
        self._next = 0

    def _count(self, index: int) -> None:
        self._missing[self._layout.chunk_of[index]] -= 1

    def _sent(self, index: int) -> bool:
        return self._layout.chunk_of[index] < self._next

    def _send_ready(self) -> None:
        assert self._message is not None
        while self._next < len(self._chunks) and self._missing[self._next] == 0:
            if self._next == 0:
                version, flags, threshold, work = self._message
                self._link.start_push(version, flags | Flag.VERDICT, threshold, work)
            self._link.send_chunk(self._chunks[self._next])
            self._next += 1

    def _finish(self) -> Reply:
        self._send_ready()
        self._link.send_trailer(Trailer(unused=frozenset(self._unused)))  # NaN/Inf: the server sees the whole
        return self._link.await_reply()


class ShardedGradientStream(_Stream):
    """Sends each remote shard its slice as soon as backward has produced every gradient the slice cuts, then, at
    the step, a verdict on the whole gradient (NaN/Inf anywhere: every shard rejects it alike, see
    :class:`ShardedServerLink`); this rank's own shard gets its slice in memory at the step."""

    def __init__(
        self,
        params: Sequence[Tensor],
        layout: FlatLayout,
        gradient: list[Tensor],
        link: ShardedServerLink,
        plan: ShardPlan,
    ) -> None:
        super().__init__(params, layout, gradient)
        self._link = link
        self._shards_of: list[list[int]] = [[] for _ in self._params]
        for shard, pieces in enumerate(plan.pieces):
            for index, _, _ in pieces:
                self._shards_of[index].append(shard)
        self._tensors_per_shard = [len(pieces) for pieces in plan.pieces]
        self._missing: list[int] = []
        self._streamed: list[int] = []  # remote shards whose slice is out, in the order sent

    @property
    def incomplete(self) -> bool:
        return self._message is not None and bool(self._streamed)

    def _start(self) -> None:
        self._missing = list(self._tensors_per_shard)
        self._streamed = []

    def _count(self, index: int) -> None:
        for shard in self._shards_of[index]:
            self._missing[shard] -= 1

    def _sent(self, index: int) -> bool:
        return any(shard in self._streamed for shard in self._shards_of[index])

    def _send_ready(self) -> None:
        assert self._message is not None
        _, flags, threshold, work = self._message
        for shard in self._link.remote_shards:
            if self._missing[shard] == 0 and shard not in self._streamed:
                self._link.post_to(shard, flags | Flag.VERDICT, threshold, work)
                self._streamed.append(shard)

    def _finish(self) -> Reply:
        flags, threshold, work, unused = self._verdict()
        for shard in self._streamed:
            self._link.send_trailer(shard, bool(flags & Flag.NONFINITE), unused)
        for shard in self._link.remote_shards:
            if shard not in self._streamed:
                self._link.post_to(shard, flags, threshold, work, unused)
        return self._link.push_local(flags, threshold, work, unused)


class StripedGradientStream(_Stream):
    """With ``overlap_answers``: sends each remote shard its stripes (the wire chunks of its layout, see
    :class:`ShardPlan`) in wire order as backward produces them, and hands this rank's own shard each of its
    stripes as soon as it is packed (copied into the shard's ``stepper``'s buffer, and counted there): each shard
    steps a chunk once every worker's gradient of it is in. Before backward, the receives of every remote shard's
    answer chunks are posted (:meth:`RemoteServerLink.post_chunk_answers`); at the step a verdict follows every
    remote push, as with :class:`ShardedGradientStream`."""

    def __init__(
        self,
        params: Sequence[Tensor],
        layout: FlatLayout,
        gradient: list[Tensor],
        link: ShardedServerLink,
        plan: ShardPlan,
        rank: int,
        stepper: ChunkStepper,
    ) -> None:
        super().__init__(params, layout, gradient)
        self._link = link
        self._rank = rank
        self._wire = [plan.wire_views(shard, gradient) for shard in range(plan.shards)]
        self._local_chunks = plan.layouts[rank].chunk_views(stepper.buffers[rank])
        self._stepper = stepper
        self._chunks_of: list[list[tuple[int, int]]] = [[] for _ in self._params]  # (shard, chunk) per tensor
        self._sizes = [[0] * len(plan.layouts[shard].chunks) for shard in range(plan.shards)]
        for shard, pieces in enumerate(plan.pieces):
            chunk_of = plan.layouts[shard].chunk_of
            for piece, (index, _, _) in enumerate(pieces):
                self._chunks_of[index].append((shard, chunk_of[piece]))
                self._sizes[shard][chunk_of[piece]] += 1
        self._missing: list[list[int]] = []
        self._next: list[int] = []  # per remote shard: its next chunk to send
        self._handed: list[bool] = []  # per local chunk

    @property
    def incomplete(self) -> bool:
        return self._message is not None and any(self._next[shard] for shard in self._link.remote_shards)

    def _start(self) -> None:
        self._missing = [list(sizes) for sizes in self._sizes]
        self._next = [0] * len(self._sizes)
        self._handed = [False] * len(self._local_chunks)
        for shard in self._link.remote_shards:
            self._link.remote_link(shard).post_chunk_answers()

    def _count(self, index: int) -> None:
        for shard, chunk in self._chunks_of[index]:
            self._missing[shard][chunk] -= 1

    def _sent(self, index: int) -> bool:
        return any(
            self._handed[chunk] if shard == self._rank else chunk < self._next[shard]
            for shard, chunk in self._chunks_of[index]
        )

    def _send_ready(self) -> None:
        assert self._message is not None
        version, flags, threshold, work = self._message
        for shard in self._link.remote_shards:
            link, missing = self._link.remote_link(shard), self._missing[shard]
            while self._next[shard] < len(missing) and missing[self._next[shard]] == 0:
                if self._next[shard] == 0:
                    link.start_push(self._link.versions[0], flags | Flag.VERDICT, threshold, work)
                link.send_chunk(self._wire[shard][self._next[shard]])
                self._next[shard] += 1
        for chunk, missing in enumerate(self._missing[self._rank]):
            if missing == 0 and not self._handed[chunk]:
                self._local_chunks[chunk].copy_(self._wire[self._rank][chunk])
                self._handed[chunk] = True
                self._stepper.arrived(self._rank, chunk)

    def _finish(self) -> Reply:
        self._send_ready()  # everything is packed now
        flags, threshold, work, unused = self._verdict()
        for shard in self._link.remote_shards:
            self._link.send_trailer(shard, bool(flags & Flag.NONFINITE), unused)
        return self._link.push_local(flags, threshold, work, unused)
