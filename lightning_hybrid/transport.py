"""Tensor messages between workers and the parameter server over torch.distributed point-to-point.

Every remote worker talks to the server rank over its own two-member gloo group, so its traffic
never collides with Lightning's collectives on the default group nor with other workers'. A
message is a fixed int64 header and, for some kinds, flat payload buffers whose sizes both sides
know from the model (a gradient travels in the layout's chunks, see ``FlatLayout.chunks``; its header
carries the layout's signature): nothing is ever pickled. GPU tensors are staged through (pinned)
host memory, since gloo moves host memory.

The worker rank that shares the server's process talks to it in memory (:class:`LocalServerLink`);
every other rank uses :class:`RemoteServerLink`. Both answer ``push``/``drain``/``leave`` alike.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_hybrid.errors import PeerLostError, ProtocolError
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.server import FollowerServer, ParameterServer, Release, all_finite
from lightning_hybrid.shards import ShardPlan

log = logging.getLogger(__name__)

SERVER_RANK = 0  # the server's rank when it is not sharded
# A pair of ranks shares one channel in both directions when the server is sharded (each serves the other):
# requests (worker -> server) and answers (server -> worker) carry different tags, so that a rank's receiver
# thread and its own worker never take each other's messages.
REQUEST_TAG, ANSWER_TAG = 1, 2
# Shard 0 of a sharded server tells the other shards which gradients each of its updates applied: one int64
# message [version, count, worker, ..., -1 padding] of num_workers + 2 values; version END_OF_DECISIONS ends.
DECISION_TAG = 3
END_OF_DECISIONS = -1


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
    NONFINITE = 64  # on PUSH: the worker's whole gradient holds NaN/Inf (a shard sees part of it): reject it
    DROPPED = 128  # on REPLY: the pushed gradient was staler than max_staleness: compute the batch again


STOP_FLAGS = Flag.SIGTERM | Flag.STOP


class AbortCode(enum.IntEnum):
    WORKER_LOST = 1
    PROTOCOL = 2
    SERVER_FAILED = 3


@dataclass(frozen=True)
class Header:
    """The fixed part of every message, sent as 8 int64 values."""

    kind: int
    rank: int = 0
    version: int = 0
    flags: int = 0
    threshold: int = 0  # PUSH: requested K (0: none); REPLY: the server's K
    numel: int = 0  # payload elements, a check against the layout
    detail: int = 0  # REPLY: staleness of the worker's gradient (-1: none); ABORT: the lost rank
    code: int = 0  # ABORT: AbortCode; PUSH: the gradient layout's signature (FlatLayout.signature)

    SIZE = 8

    def to_tensor(self) -> Tensor:
        return torch.tensor(
            [self.kind, self.rank, self.version, self.flags, self.threshold, self.numel, self.detail, self.code],
            dtype=torch.int64,
        )

    @classmethod
    def from_tensor(cls, tensor: Tensor) -> Header:
        return cls(*(int(v) for v in tensor.tolist()))


@dataclass(frozen=True)
class Reply:
    """What a worker learns from the server's answer."""

    version: int
    threshold: int
    flags: Flag
    params: list[Tensor]
    buffers: Optional[list[Tensor]] = None
    staleness: Optional[int] = None


def _abort_message(code: int, rank: int, why: str = "") -> str:
    if code == AbortCode.WORKER_LOST:
        return (
            f"hybrid_sgd: worker rank {rank} was lost (its process died or its connection closed){why}; "
            f"the run stops on every rank. Check rank {rank}'s log, then resume from the last checkpoint "
            "with `trainer.fit(model, ckpt_path=...)`."
        )
    if code == AbortCode.PROTOCOL:
        return f"hybrid_sgd: worker rank {rank} broke the parameter-server protocol{why}; the run stops on every rank."
    return f"hybrid_sgd: the parameter server failed{why}; the run stops on every rank."


class _Waiter:
    """One worker's wait for its answer, in the server's process."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._reply: Optional[Reply] = None
        self._error: Optional[BaseException] = None

    def set(self, reply: Optional[Reply] = None, error: Optional[BaseException] = None) -> None:
        self._reply, self._error = reply, error
        self._event.set()

    def wait(self, timeout: float) -> Reply:
        if not self._event.wait(timeout):
            raise PeerLostError(_timeout_message(timeout))
        self._event.clear()
        if self._error is not None:
            raise self._error
        assert self._reply is not None
        return self._reply


def _timeout_message(timeout: float) -> str:
    return (
        f"hybrid_sgd: no answer from the parameter server within {timeout:g} s. A worker is hung, lost or "
        "slower than that; if stragglers are legitimately this slow, raise "
        "`HybridSGDStrategy(peer_timeout=...)`."
    )


class ServerEndpoint:
    """Runs the parameter server on its rank: one receiver thread per remote worker."""

    def __init__(
        self,
        server: ParameterServer,
        channels: dict[int, dist.ProcessGroup],
        buffer_layout: FlatLayout,
        read_buffers: Callable[[list[Tensor]], None],
        peer_timeout: float,
        local_params: Optional[list[Tensor]] = None,
        rank: int = SERVER_RANK,
        followers: Sequence[int] = (),
        coordinator: Optional[int] = None,
    ) -> None:
        """``read_buffers`` fills flat buffers with the server rank's module buffers (sent at every drain).
        ``local_params`` (flat buffers of the server's layout: the local worker's model, see ``FlatLayout.bind``)
        receive the local worker's answers, so that every release is delivered when ``_dispatch`` returns.
        ``rank``: this server's (and its local worker's) rank. Sharded: shard 0 tells its ``followers`` the group
        of every update; a :class:`FollowerServer` hears them from its ``coordinator``."""
        if (coordinator is not None) != isinstance(server, FollowerServer):
            raise ValueError("a FollowerServer needs a coordinator rank, and only a FollowerServer takes one")
        self.server = server
        self.rank = rank
        self._followers = list(followers)
        self._coordinator = coordinator
        if self._followers:
            server.on_decision = self._tell_followers
        server.answers_in_place = frozenset(channels)  # each remote worker has a receive buffer of its own
        self._local_params = local_params
        self._channels = channels
        self._buffer_layout = buffer_layout
        self._read_buffers = read_buffers
        self._peer_timeout = peer_timeout
        self._local = _Waiter()
        self._send_locks = {rank: threading.Lock() for rank in channels}
        self._threads: list[threading.Thread] = []
        self._failure: Optional[BaseException] = None
        self._sending: queue.SimpleQueue = queue.SimpleQueue()  # posted answers: (works, snapshot to recycle)
        self._sender = threading.Thread(target=self._complete_sends, name="hybrid-sgd-sends", daemon=True)

    def start(self) -> None:
        self._sender.start()
        targets = [(self._serve, rank, f"hybrid-sgd-server-{rank}") for rank in self._channels]
        if self._coordinator is not None:
            targets.append((self._follow, self._coordinator, "hybrid-sgd-decisions"))
        for target, rank, name in targets:
            thread = threading.Thread(target=target, args=(rank,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, timeout: float = 10.0) -> None:
        """Wait for the receiver threads, which end when their worker leaves or is lost (a follower's decision
        thread when shard 0, whose workers have all left, ends the decisions)."""
        for thread in self._threads:
            thread.join(timeout)
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._followers and self._failure is None:
            self._tell_followers(END_OF_DECISIONS, ())
        self._sending.put(None)
        self._sender.join(timeout)

    # ------------------------------------------------------------------ local worker (same process)
    def link(self, rank: int) -> LocalServerLink:
        return LocalServerLink(self, rank)

    def _local_call(self, event: Callable[[], list[Release]]) -> Reply:
        if self._failure is not None:
            raise self._failure
        self._dispatch(event())
        return self._local.wait(self._peer_timeout)

    def abort(self, code: AbortCode, rank: int, why: str = "") -> None:
        """Tell every remote worker and the local one that the run cannot go on.

        Only the first abort counts. The notices are sent from a daemon thread: a worker that stopped
        reading must not block the caller, and the server serves nobody after an abort."""
        if self._failure is not None:
            return
        error_type = ProtocolError if code == AbortCode.PROTOCOL else PeerLostError
        self._failure = error_type(_abort_message(code, rank, why))
        self._local.set(error=self._failure)
        header = Header(Kind.ABORT, self.rank, self.server.version, detail=rank, code=int(code)).to_tensor()
        # a lost worker cannot be told; one that broke the protocol hears why, like everybody else
        notify = [worker for worker in self._channels if worker != rank or code == AbortCode.PROTOCOL]
        threading.Thread(target=self._notify_abort, args=(notify, header), name="hybrid-sgd-abort", daemon=True).start()

    def _notify_abort(self, workers: list[int], header: Tensor) -> None:
        for worker in workers:
            try:
                with self._send_locks[worker]:
                    dist.send(header, dst=worker, group=self._channels[worker], tag=ANSWER_TAG)
            except RuntimeError:
                log.debug("could not tell rank %d about the abort", worker, exc_info=True)

    # ------------------------------------------------------------------ remote workers
    @contextlib.contextmanager
    def _aborting_on_failure(self, rank: int) -> Iterator[None]:
        """A receiver thread's failure ends the run on every rank, with the reason, instead of leaving peers
        waiting for answers that will never come."""
        try:
            yield
        except ProtocolError as err:
            log.error("%s", err)
            self.abort(AbortCode.PROTOCOL, rank, f": {err}")
        except (RuntimeError, OSError) as err:
            if self._failure is None:
                log.error("hybrid_sgd: lost worker rank %d: %s", rank, err)
                self.abort(AbortCode.WORKER_LOST, rank)
        except BaseException as err:  # the server itself failed: nobody may wait forever
            log.exception("hybrid_sgd: the parameter server failed while serving rank %d", rank)
            self.abort(AbortCode.SERVER_FAILED, rank, f": {type(err).__name__}: {err}")

    def _serve(self, rank: int) -> None:
        group = self._channels[rank]
        gradient = self.server.layout.allocate("cpu", pin_memory=_pin(self.server.device))
        chunks = self.server.layout.chunk_views(gradient)
        header_buffer = torch.empty(Header.SIZE, dtype=torch.int64)
        with self._aborting_on_failure(rank):
            while True:  # after an abort too: a worker blocked in a send must get through to read the ABORT
                dist.recv(header_buffer, src=rank, group=group, tag=REQUEST_TAG)
                header = Header.from_tensor(header_buffer)
                if header.rank != rank:
                    raise ProtocolError(f"a message on rank {rank}'s channel claims to come from rank {header.rank}")
                if header.kind == Kind.PUSH:
                    if rank in self.server.pending_workers:  # its buffer may hold the pending sum: read nothing
                        raise ProtocolError(f"worker {rank} sent a gradient while it still waits for its answer")
                    layout = self.server.layout
                    if header.numel != layout.numel or header.code != layout.signature:
                        raise ProtocolError(
                            f"rank {rank} announced a gradient of {header.numel} elements (layout signature "
                            f"{header.code}), the model has {layout.numel} (signature {layout.signature}): every "
                            "rank must build the same model, with the same parameter dtypes"
                        )
                    for chunk in chunks:
                        dist.recv(chunk, src=rank, group=group, tag=REQUEST_TAG)
                self._handle(rank, header, gradient)
                if header.kind == Kind.LEAVE:
                    return

    def _follow(self, coordinator: int) -> None:
        """A follower shard applies shard 0's decisions as they come (see :class:`FollowerServer`)."""
        assert isinstance(self.server, FollowerServer)
        message = torch.empty(self.server.num_workers + 2, dtype=torch.int64)
        with self._aborting_on_failure(coordinator):
            while True:
                dist.recv(message, src=coordinator, group=self._channels[coordinator], tag=DECISION_TAG)
                version, count, *workers = message.tolist()
                if version == END_OF_DECISIONS:
                    return
                if self._failure is None:
                    self._dispatch(self.server.decide(version, workers[:count]))

    def _tell_followers(self, version: int, group: Sequence[int]) -> None:
        """Post shard 0's decision (or the end of them) to every follower; the sender thread completes it."""
        message = torch.full((self.server.num_workers + 2,), -1, dtype=torch.int64)
        message[:2] = torch.tensor([version, len(group)])
        message[2 : 2 + len(group)] = torch.tensor(group, dtype=torch.int64)
        works = [
            (rank, message, dist.isend(message, dst=rank, group=self._channels[rank], tag=DECISION_TAG))
            for rank in self._followers
        ]
        self._sending.put((works, []))

    def _handle(self, rank: int, header: Header, gradient: list[Tensor]) -> None:
        if header.kind not in (Kind.PUSH, Kind.DRAIN, Kind.LEAVE):
            raise ProtocolError(f"rank {rank} sent a message of unknown kind {header.kind}")
        if self._failure is not None:
            return
        self.apply_requests(header.flags, header.threshold)
        if header.kind == Kind.PUSH:
            drain, nonfinite = bool(header.flags & Flag.DRAIN), bool(header.flags & Flag.NONFINITE)
            releases = self.server.push(rank, gradient, header.version, drain=drain, nonfinite=nonfinite)
        elif header.kind == Kind.DRAIN:
            releases = self.server.drain(rank)
        else:
            releases = self.server.leave(rank)
            if header.flags & Flag.FAILED:
                self.abort(AbortCode.WORKER_LOST, rank, ": it raised an exception (see its log)")
                return
        self._dispatch(releases)

    def apply_requests(self, flags: int, threshold: int) -> None:
        """Stop signals and a threshold change that a worker's message carries."""
        if flags & STOP_FLAGS:
            self.server.request_stop(int(flags & STOP_FLAGS))
        if threshold:
            try:
                releases = self.server.set_threshold(threshold)
            except ValueError as err:
                raise ProtocolError(f"a worker requested an impossible threshold: {err}") from err
            self._dispatch(releases)

    def _dispatch(self, releases: list[Release]) -> None:
        if self._failure is not None:
            return
        for release in releases:
            buffers = None
            if release.drained and self._buffer_layout.numel:
                buffers = self._buffer_layout.allocate()
                self._read_buffers(buffers)
            local = self.rank in release.workers
            if local:
                params = release.params
                if self._local_params is not None:
                    for mine, snapshot in zip(self._local_params, params):
                        mine.copy_(snapshot)
                    params = self._local_params
                self._local.set(self._reply(release, self.rank, params, buffers))
            remote = [worker for worker in release.workers if worker != self.rank]
            # the snapshot is free once every send completed, unless the local reply is the snapshot itself
            recycle = release.params if (self._local_params is not None or not local) and not release.in_place else []
            if remote:
                works = self._send_replies(remote, release, [p.cpu() for p in release.params], buffers)
                self._sending.put((works, recycle))
            else:
                self.server.recycle(recycle)

    def _reply(self, release: Release, worker: int, params: list[Tensor], buffers: Optional[list[Tensor]]) -> Reply:
        return Reply(
            version=release.version,
            threshold=self.server.threshold,
            flags=self._reply_flags(release, worker, buffers),
            params=params,
            buffers=buffers,
            staleness=release.staleness.get(worker),
        )

    def _reply_flags(self, release: Release, worker: int, buffers: Optional[list[Tensor]]) -> Flag:
        flags = Flag(self.server.stop_flags)
        if buffers is not None:
            flags |= Flag.BUFFERS
        if worker in release.rejected:
            flags |= Flag.REJECTED
        if worker in release.dropped:
            flags |= Flag.DROPPED
        return flags

    def _send_replies(
        self, workers: list[int], release: Release, params: list[Tensor], buffers: Optional[list[Tensor]]
    ) -> list[tuple[int, Tensor, dist.Work]]:
        """Post the answers to several workers at once, each over its own gloo pair; :meth:`_complete_sends`
        waits for them. Each worker's send lock is held while its reply is posted, so messages to one worker
        never interleave; the locks are taken in rank order, so two dispatching threads cannot deadlock."""
        works = []
        with contextlib.ExitStack() as held:
            for worker in sorted(workers):
                held.enter_context(self._send_locks[worker])
            for worker in workers:
                header = Header(
                    Kind.REPLY,
                    self.rank,
                    release.version,
                    flags=int(self._reply_flags(release, worker, buffers)),
                    threshold=self.server.threshold,
                    numel=self.server.layout.numel,
                    detail=release.staleness.get(worker, -1),
                )
                group = self._channels[worker]
                for tensor in [header.to_tensor(), *params, *(buffers or [])]:
                    works.append((worker, tensor, dist.isend(tensor, dst=worker, group=group, tag=ANSWER_TAG)))
        return works  # the tensors stay referenced until their sends complete

    def _complete_sends(self) -> None:
        """Wait for the answers' sends off the dispatching threads. A gloo send completes only once its receiver
        reads it, and a rank's own worker thread dispatches too: two ranks that serve each other (a sharded
        server) would deadlock if each waited for its answers to go out before reading the other's."""
        while (item := self._sending.get()) is not None:
            works, recycle = item
            try:
                for worker, _, work in works:
                    work.wait(timedelta(seconds=self._peer_timeout))
            except RuntimeError as err:
                if self._failure is None:
                    log.error("hybrid_sgd: could not answer worker rank %d: %s", worker, err)
                    self.abort(AbortCode.WORKER_LOST, worker)
                continue
            self.server.recycle(recycle)


class LocalServerLink:
    """The server rank's own worker: calls the server in memory, no copy through the network."""

    def __init__(self, endpoint: ServerEndpoint, rank: int) -> None:
        self._endpoint = endpoint
        self._rank = rank

    def push(self, gradient: list[Tensor], version: int, flags: Flag, threshold: int = 0) -> Reply:
        endpoint = self._endpoint
        endpoint.apply_requests(flags, threshold)
        drain, nonfinite = bool(flags & Flag.DRAIN), bool(flags & Flag.NONFINITE)
        return endpoint._local_call(
            lambda: endpoint.server.push(self._rank, gradient, version, drain=drain, nonfinite=nonfinite)
        )

    def drain(self, flags: Flag = Flag.NONE, threshold: int = 0) -> Reply:
        self._endpoint.apply_requests(flags, threshold)
        return self._endpoint._local_call(lambda: self._endpoint.server.drain(self._rank))

    def leave(self, flags: Flag = Flag.NONE) -> None:
        self._endpoint.apply_requests(flags, 0)
        self._endpoint._dispatch(self._endpoint.server.leave(self._rank))


class RemoteServerLink:
    """A worker's connection to the server rank over its own process group."""

    def __init__(
        self,
        rank: int,
        group: dist.ProcessGroup,
        layout: FlatLayout,
        buffer_layout: FlatLayout,
        peer_timeout: float,
        receive_into: Optional[list[Tensor]] = None,
        pin_memory: bool = False,
        server_rank: int = SERVER_RANK,
    ) -> None:
        """Parameters are received into ``receive_into`` (host buffers of ``layout``; the CPU model's own flat
        parameters make the reply the model without a copy), else into buffers of the link's own."""
        self._rank = rank
        self._server = server_rank
        self._group = group
        self._layout = layout
        self._buffer_layout = buffer_layout
        self._timeout = timedelta(seconds=peer_timeout)
        self._params = receive_into if receive_into is not None else layout.allocate("cpu", pin_memory=pin_memory)
        self._buffers = buffer_layout.allocate("cpu", pin_memory=pin_memory)
        self._staging = layout.allocate("cpu", pin_memory=pin_memory) if pin_memory else []
        self._header = torch.empty(Header.SIZE, dtype=torch.int64)
        self._sending: list[tuple[Tensor, dist.Work]] = []
        self._broken = False  # after an abort, a timeout or a lost connection: send nothing more

    def push(self, gradient: list[Tensor], version: int, flags: Flag, threshold: int = 0) -> Reply:
        """Send a whole gradient (flat buffers of the layout) and wait for the answer."""
        self.post_push(gradient, version, flags, threshold)
        return self.await_reply()

    def post_push(self, gradient: list[Tensor], version: int, flags: Flag, threshold: int = 0) -> None:
        """Queue a whole gradient; :meth:`await_reply` waits for the answer."""
        if gradient and gradient[0].device.type != "cpu":
            for staged, tensor in zip(self._staging, gradient):
                staged.copy_(tensor)
            gradient = self._staging
        self.start_push(version, flags, threshold)
        for chunk in self._layout.chunk_views(gradient):
            self.send_chunk(chunk)

    def start_push(self, version: int, flags: Flag, threshold: int = 0) -> None:
        """Begin a gradient message; its chunks follow with :meth:`send_chunk`, in the layout's wire order."""
        header = Header(
            Kind.PUSH, self._rank, version, int(flags), threshold, self._layout.numel, code=self._layout.signature
        )
        self._post(header.to_tensor())

    def send_chunk(self, chunk: Tensor) -> None:
        """Queue one chunk; it travels while the caller goes on (e.g. while backward still runs)."""
        self._post(chunk)

    def await_reply(self) -> Reply:
        """Wait until the queued message is out, then for the server's answer."""
        self._complete_sends()
        return self._receive()

    def abandon(self) -> None:
        """A message was cut off half-way (the worker failed mid-backward): send nothing more; the server
        learns of it when this process's connection closes."""
        self._broken = True

    def drain(self, flags: Flag = Flag.NONE, threshold: int = 0) -> Reply:
        self.post_drain(flags, threshold)
        return self.await_reply()

    def post_drain(self, flags: Flag = Flag.NONE, threshold: int = 0) -> None:
        self._post(Header(Kind.DRAIN, self._rank, flags=int(flags), threshold=threshold).to_tensor())

    def leave(self, flags: Flag = Flag.NONE) -> None:
        if not self._broken:
            self._post(Header(Kind.LEAVE, self._rank, flags=int(flags)).to_tensor())
            self._complete_sends()

    def _post(self, tensor: Tensor) -> None:
        if self._broken:
            raise PeerLostError(f"hybrid_sgd: rank {self._rank}'s connection to the parameter server is closed")
        try:
            self._sending.append((tensor, dist.isend(tensor, dst=self._server, group=self._group, tag=REQUEST_TAG)))
        except RuntimeError as err:
            self._broken = True
            raise self._server_lost(err) from err

    def _complete_sends(self) -> None:
        """Wait until every queued send is out (the tensors stay referenced until then)."""
        try:
            for _, work in self._sending:
                self._wait(work)
        finally:
            self._sending.clear()

    def _recv(self, tensor: Tensor) -> None:
        self._wait(dist.irecv(tensor, src=self._server, group=self._group, tag=ANSWER_TAG))

    def _wait(self, work: dist.Work) -> None:
        """Sends wait as long as receives: over a cut link a send never completes (found by the partition test)."""
        try:
            work.wait(self._timeout)
        except RuntimeError as err:
            self._broken = True
            if "Timed out" in str(err):
                raise PeerLostError(_timeout_message(self._timeout.total_seconds())) from err
            raise self._server_lost(err) from err

    def _server_lost(self, err: RuntimeError) -> PeerLostError:
        return PeerLostError(
            f"hybrid_sgd: rank {self._rank} lost the parameter server (rank {self._server}): its process died or "
            f"its connection closed ({err}). Check rank {self._server}'s log, then resume from the last checkpoint."
        )

    def _receive(self) -> Reply:
        self._recv(self._header)
        header = Header.from_tensor(self._header)
        if header.kind == Kind.ABORT:
            self._broken = True
            error_type = ProtocolError if header.code == AbortCode.PROTOCOL else PeerLostError
            raise error_type(_abort_message(header.code, header.detail))
        if header.kind != Kind.REPLY or header.numel != self._layout.numel:
            self._broken = True
            raise ProtocolError(
                f"hybrid_sgd: rank {self._rank} got a message of kind {header.kind} with {header.numel} elements "
                f"from the server, expected a reply of {self._layout.numel}"
            )
        for tensor in self._params:
            self._recv(tensor)
        flags = Flag(header.flags)
        buffers = None
        if flags & Flag.BUFFERS:
            for tensor in self._buffers:
                self._recv(tensor)
            buffers = self._buffers
        return Reply(
            version=header.version,
            threshold=header.threshold,
            flags=flags,
            params=self._params,
            buffers=buffers,
            staleness=header.detail if header.detail >= 0 else None,
        )


class ShardedServerLink:
    """A worker's connection to a sharded server: rank ``s`` serves shard ``s`` (see :class:`ShardPlan`).

    A push sends each shard its slice of the flat gradient (remote shards first, without waiting, then the local
    one in memory) and the answers land straight in the slices of the model's flat parameters. The shards apply the
    same updates (shard 0 decides, see :class:`FollowerServer`), but a rejected or dropped gradient is answered at
    once with each shard's current slice, so a worker tracks the version of each shard; its reply reports the
    lowest. A push tells every shard shard 0's version, by which every shard measures the gradient's staleness
    alike (a follower that answered with an older version would see it staler). The worker checks its whole
    gradient for NaN/Inf before it leaves, so that every shard rejects the same gradients."""

    def __init__(
        self,
        rank: int,
        links: list[ServerLink],
        plan: ShardPlan,
        gradient: list[Tensor],
        params: list[Tensor],
        param_slices: list[list[Tensor]],
    ) -> None:
        """``links[s]`` reaches shard ``s`` (a :class:`LocalServerLink` for this rank's own); ``gradient`` and
        ``params`` are the worker's flat buffers; ``param_slices[s]`` (``plan.views(s, params)``) are where
        ``links[s]`` receives its answers."""
        self._rank = rank
        self._links = links
        self._remote = [(s, link) for s, link in enumerate(links) if isinstance(link, RemoteServerLink)]
        self._gradient = gradient
        self._gradient_slices = [plan.views(s, gradient) for s in range(plan.shards)]
        self._params = params
        self._param_slices = param_slices
        self.versions = [0] * plan.shards

    def push(self, gradient: list[Tensor], version: int, flags: Flag, threshold: int = 0) -> Reply:
        """Push ``gradient`` (the worker's flat gradient buffers); ``version`` is ignored: every shard gets shard 0's."""
        assert gradient is self._gradient, "a sharded push sends the gradient buffers the link was built with"
        if not all(all_finite(g) for g in gradient):
            flags |= Flag.NONFINITE
        for shard, link in self._remote:
            link.post_push(self._gradient_slices[shard], self.versions[0], flags, threshold)
        local = self._links[self._rank].push(self._gradient_slices[self._rank], self.versions[0], flags, threshold)
        return self._merge(local)

    def drain(self, flags: Flag = Flag.NONE, threshold: int = 0) -> Reply:
        for _, link in self._remote:
            link.post_drain(flags, threshold)
        return self._merge(self._links[self._rank].drain(flags, threshold))

    def leave(self, flags: Flag = Flag.NONE) -> None:
        for link in self._links:
            link.leave(flags)

    def _merge(self, local: Reply) -> Reply:
        """One reply from every shard's: their versions, the union of their flags, shard 0's buffers (rank 0's
        module buffers) and the largest staleness."""
        replies = {self._rank: local, **{shard: link.await_reply() for shard, link in self._remote}}
        for shard, reply in replies.items():
            if reply.params is not self._param_slices[shard]:  # received into staging buffers (a GPU model)
                for mine, received in zip(self._param_slices[shard], reply.params):
                    mine.copy_(received)
        self.versions = [replies[s].version for s in range(len(self._links))]
        flags = Flag.NONE
        for reply in replies.values():
            flags |= reply.flags
        staleness = [r.staleness for r in replies.values() if r.staleness is not None]
        return Reply(
            version=min(self.versions),
            threshold=replies[0].threshold,
            flags=flags,
            params=self._params,
            buffers=replies[0].buffers,
            staleness=max(staleness) if staleness else None,
        )


def _pin(device: torch.device) -> bool:
    return device.type == "cuda"


ServerLink = LocalServerLink | RemoteServerLink
AnyServerLink = ServerLink | ShardedServerLink
