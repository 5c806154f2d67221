"""The message format between workers and the parameter server, defined once for both sides (the server's
:mod:`lightning_hybrid.endpoint` and the workers' :mod:`lightning_hybrid.links`). A message is a fixed int64
header and, for some kinds, flat payload buffers whose sizes both sides know from the model (a gradient travels in
the layout's chunks, see ``FlatLayout.chunks``; its header carries the layout's signature): nothing is ever
pickled. Every remote worker talks to a server rank over its own two-member gloo group, so its traffic never
collides with Lightning's collectives on the default group nor with other workers'; GPU tensors are staged through
(pinned) host memory, since gloo moves host memory.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lightning_hybrid.errors import NONFINITE_FIX, HybridSGDError, NonFiniteGradientError, PeerLostError, ProtocolError
from lightning_hybrid.flat import FlatLayout, buffers_signature

SERVER_RANK = 0  # the server's rank when it is not sharded
# A pair of ranks shares one channel in both directions when the server is sharded (each serves the other):
# requests (worker -> server) and answers (server -> worker) carry different tags, so that a rank's receiver
# thread and its own worker never take each other's messages.
REQUEST_TAG, ANSWER_TAG = 1, 2
# An answer's module buffers (Flag.BUFFERS) come on a tag of their own: a pipelined worker posts the receives of
# its next answer's header and parameters before the last answer's buffers are in.
BUFFERS_TAG = 4
# Shard 0 of a sharded server tells the other shards which gradients each of its updates applied (a Decision);
# version END_OF_DECISIONS ends.
DECISION_TAG = 3
END_OF_DECISIONS = -1
# Nothing is ever sent on it: a receive on it that times out closes its channel (ServerEndpoint.end_blocked_threads)
CUT_TAG = 5
# With overlap_answers, chunk c of a shard's answer travels on tag CHUNK_TAGS + c (see lightning_hybrid.chunkwise)
CHUNK_TAGS = 1 << 16


class Kind(enum.IntEnum):
    PUSH = 1  # worker -> server: a gradient (payload), maybe with Flag.DRAIN
    DRAIN = 2  # worker -> server: wait until every active worker drains
    LEAVE = 3  # worker -> server: no more messages from this worker
    REPLY = 11  # server -> worker: parameters (payload), maybe buffers (Flag.BUFFERS)
    ABORT = 12  # server -> worker: the run cannot go on (Header.detail names the lost rank)


class Flag(enum.IntFlag):
    NONE = 0
    SIGTERM = 1  # a rank received SIGTERM: every rank stops
    STOP = 2  # a rank's budget ran out (max_time, or max_steps with pulled work): every rank stops
    DRAIN = 4  # on PUSH: drain right after this gradient
    BUFFERS = 8  # on REPLY: module buffers (rank 0's) follow the parameters
    REJECTED = 16  # on REPLY: the pushed gradient held NaN/Inf and was not applied
    FAILED = 32  # on LEAVE: the worker raised an exception; the run stops everywhere
    NONFINITE = 64  # on PUSH: the worker's whole gradient holds NaN/Inf (a shard sees part of it): reject it;
    # on LEAVE with FAILED: the worker stopped because of one (nonfinite="stop")
    DROPPED = 128  # on REPLY: the pushed gradient was staler than max_staleness: compute the batch again
    VERDICT = 256  # on PUSH: a Trailer follows the payload (a gradient streamed during backward leaves before the
    # rest of it exists; an ordinary push carries one when some tensor got no gradient)
    CHUNKED = 512  # on REPLY (overlap_answers): the parameters came chunk by chunk before it; no payload follows


STOP_FLAGS = Flag.SIGTERM | Flag.STOP


class AbortCode(enum.IntEnum):
    WORKER_LOST = 1
    PROTOCOL = 2
    SERVER_FAILED = 3
    WORKER_FAILED = 4  # a worker raised an exception (LEAVE with Flag.FAILED)
    NONFINITE = 5  # a worker stopped on a NaN/Inf gradient under nonfinite="stop" (LEAVE with FAILED | NONFINITE)


@dataclass(frozen=True)
class Header:
    """The fixed part of every message, sent as 9 int64 values."""

    kind: int
    rank: int = 0
    version: int = 0
    flags: int = 0
    threshold: int = 0  # PUSH: requested K (0: none); REPLY: the server's K
    numel: int = 0  # payload elements, a check against the layout
    detail: int = 0  # PUSH: the gradient's work id (-1: none); REPLY: its staleness (-1: none); ABORT: the lost rank
    code: int = 0  # ABORT: AbortCode; PUSH and REPLY: the payload's WireFormat.signature
    applied: int = 0  # REPLY: gradients the server has applied in all (paces per-step LR schedules: pacing.py)

    SIZE = 9

    def to_tensor(self) -> Tensor:
        return torch.tensor(
            [
                self.kind,
                self.rank,
                self.version,
                self.flags,
                self.threshold,
                self.numel,
                self.detail,
                self.code,
                self.applied,
            ],
            dtype=torch.int64,
        )

    @classmethod
    def from_tensor(cls, tensor: Tensor) -> Header:
        return cls(*(int(v) for v in tensor.tolist()))


NO_WORK = -1  # Header.detail of a PUSH whose gradient carries no work id


def work_of(header: Header) -> Optional[int]:
    """The work id a PUSH carries (see ``ParameterServer.push``)."""
    return header.detail if header.detail != NO_WORK else None


@dataclass(frozen=True)
class Trailer:
    """What a push flagged ``Flag.VERDICT`` says after its payload, known only once backward is over: whether the
    worker's whole gradient holds NaN/Inf (a shard sees a slice of it), and which of the receiver's tensors got no
    gradient (an unused parameter's zeros; see ``ParameterServer.push``). Sent as ``1 + tensors`` uint8 values."""

    nonfinite: bool = False
    unused: frozenset[int] = frozenset()

    def to_tensor(self, tensors: int) -> Tensor:
        message = torch.zeros(1 + tensors, dtype=torch.uint8)
        message[0] = int(self.nonfinite)
        message[[1 + index for index in self.unused]] = 1
        return message

    @classmethod
    def from_tensor(cls, tensor: Tensor) -> Trailer:
        return cls(bool(tensor[0]), frozenset((tensor[1:].nonzero().flatten()).tolist()))


@dataclass(frozen=True)
class Decision:
    """Shard 0's update to ``version`` applied the gradients of ``workers`` (version ``DROPPED`` of
    :mod:`lightning_hybrid.server`: it dropped the one worker's gradient; ``RECOVERY_POINT``: snapshot at the version
    listed). Sent as one int64 message
    ``[version, count, worker, ..., -1 padding]`` of :meth:`size` values."""

    version: int
    workers: Sequence[int] = ()

    @staticmethod
    def size(num_workers: int) -> int:
        return num_workers + 2

    def to_tensor(self, num_workers: int) -> Tensor:
        message = torch.full((self.size(num_workers),), -1, dtype=torch.int64)
        message[:2] = torch.tensor([self.version, len(self.workers)])
        message[2 : 2 + len(self.workers)] = torch.tensor(self.workers, dtype=torch.int64)
        return message

    @classmethod
    def from_tensor(cls, tensor: Tensor) -> Decision:
        version, count, *workers = tensor.tolist()
        return cls(version, workers[:count])


@dataclass(frozen=True)
class WireFormat:
    """How a layout's flat buffers travel: those of a floating dtype wider than ``narrow_to`` cast to it, the others
    as they are. Answers use the strategy's ``answer_dtype`` (in bfloat16 an answer is half the bytes, and a worker
    computes its next gradient on weights rounded as bf16 autocast rounds them), gradients its ``push_dtype``
    (rounded as DDP's ``bf16_compress_hook`` rounds them, but summed at full precision on the server); the master
    weights and the optimizer state keep theirs. Answers to drains always come at the parameters' own precision
    (``WireFormat.of(layout)``), so that validation, checkpoints and the end of fit see the master weights. A
    message announces its format's signature (``Header.code``); the receiver checks it against the format it
    expects."""

    sizes: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    signature: int

    @classmethod
    def of(cls, layout: FlatLayout, narrow_to: Optional[torch.dtype] = None) -> WireFormat:
        dtypes = tuple(
            narrow_to
            if narrow_to is not None and dtype.is_floating_point and dtype.itemsize > narrow_to.itemsize
            else dtype
            for dtype in layout.dtypes
        )
        return cls(layout.sizes, dtypes, buffers_signature(dtypes, layout.sizes))

    def allocate(self, pin_memory: bool = False) -> list[Tensor]:
        return [torch.empty(n, dtype=d, pin_memory=pin_memory) for n, d in zip(self.sizes, self.dtypes)]

    def encode(self, params: Sequence[Tensor]) -> list[Tensor]:
        """``params`` (flat buffers of the layout, on any device) as host buffers of this format: the buffers
        themselves where nothing changes."""
        return [p.to(device="cpu", dtype=dtype) for p, dtype in zip(params, self.dtypes)]


@dataclass(frozen=True)
class Reply:
    """What a worker learns from the server's answer."""

    version: int
    threshold: int
    flags: Flag
    params: list[Tensor]
    buffers: Optional[list[Tensor]] = None
    staleness: Optional[int] = None
    applied: int = 0  # gradients the server had applied in all when it answered


def abort_error(code: int, rank: int, why: str = "") -> HybridSGDError:
    """The error of an abort, alike on the server that aborts and on the workers that hear its ABORT."""
    if code == AbortCode.WORKER_LOST:
        return PeerLostError(
            f"hybrid_sgd: worker rank {rank} was lost (its process died or its connection closed){why}; "
            f"the run stops on every rank. Check rank {rank}'s log, then resume from the last checkpoint "
            "with `trainer.fit(model, ckpt_path=...)`."
        )
    if code == AbortCode.WORKER_FAILED:
        return PeerLostError(
            f"hybrid_sgd: worker rank {rank} stopped with an exception{why}; the run stops on every rank. Check rank "
            f"{rank}'s log for it."
        )
    if code == AbortCode.NONFINITE:
        return NonFiniteGradientError(
            f"hybrid_sgd: rank {rank}'s gradient held NaN or Inf and nonfinite='stop' ends the run on every rank (rank "
            f"{rank}'s log names the step). {NONFINITE_FIX}"
        )
    if code == AbortCode.PROTOCOL:
        return ProtocolError(
            f"hybrid_sgd: worker rank {rank} broke the parameter-server protocol{why}; the run stops on every rank."
        )
    return PeerLostError(f"hybrid_sgd: the parameter server failed{why}; the run stops on every rank.")


def timeout_error(timeout: float) -> PeerLostError:
    """No answer from the server within ``timeout`` seconds, in memory or over the network."""
    return PeerLostError(
        f"hybrid_sgd: no answer from the parameter server within {timeout:g} s. A worker is hung, lost or "
        "slower than that; if stragglers are legitimately this slow, raise "
        "`HybridSGDStrategy(peer_timeout=...)`."
    )
