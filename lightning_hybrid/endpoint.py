"""The parameter server's runtime on its rank: it runs a :class:`ParameterServer` for the workers. A receiver
thread per remote worker reads its messages into the server, answers are posted to their workers at once and
completed by a sender thread, a failure anywhere aborts the run on every rank with the reason, and shard 0 of a
sharded server tells the other shards its decisions. The worker that shares the server's process is served in
memory (``push_local``, ``drain_local``, ``leave_local``), without a copy through the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_hybrid.chunkwise import ChunkStepper
from lightning_hybrid.errors import HybridSGDError, ProtocolError
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.server import FollowerServer, ParameterServer, Release
from lightning_hybrid.wire import (
    ANSWER_TAG,
    BUFFERS_TAG,
    CUT_TAG,
    DECISION_TAG,
    END_OF_DECISIONS,
    REQUEST_TAG,
    SERVER_RANK,
    STOP_FLAGS,
    AbortCode,
    Decision,
    Flag,
    Header,
    Kind,
    Reply,
    Trailer,
    WireFormat,
    abort_error,
    timeout_error,
    work_of,
)

log = logging.getLogger(__name__)


class _Waiter:
    """One worker's answers, in the server's process, in the order they come (a pipelined worker has two
    pushes out at a time)."""

    def __init__(self) -> None:
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        self._error: Optional[BaseException] = None

    def set(self, reply: Optional[Reply] = None, error: Optional[BaseException] = None) -> None:
        if error is not None:
            self._error = error
        self._answers.put(reply)

    def wait(self, timeout: float) -> Reply:
        try:
            reply = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise timeout_error(timeout) from None
        if self._error is not None:
            raise self._error
        assert reply is not None
        return reply


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
        decisions: Optional[dict[int, dist.ProcessGroup]] = None,
        answers: Optional[dict[int, dist.ProcessGroup]] = None,
        answer_dtype: Optional[torch.dtype] = None,
        push_dtype: Optional[torch.dtype] = None,
        chunk_stepper: Optional[ChunkStepper] = None,
    ) -> None:
        """``read_buffers`` fills flat buffers with the server rank's module buffers (sent at every drain).
        ``local_params`` (flat buffers of the server's layout: the local worker's model, see ``FlatLayout.bind``)
        receive the local worker's answers, so that every release is delivered when ``_dispatch`` returns.
        ``rank``: this server's (and its local worker's) rank. Sharded: ``decisions`` are the channels of shard 0's
        decisions (``Channels.decisions``): on shard 0 one per follower, which it tells the group of every update;
        on a :class:`FollowerServer` the one it hears them from, under shard 0's rank. ``answers``: the channels
        the answers travel on, where they are not ``channels`` (pipelined workers, ``Channels.answers_out``).
        ``answer_dtype``: remote workers get the parameters in it, but answers to drains (see :class:`WireFormat`);
        ``push_dtype``: the one their gradients come in, received into buffers of it and widened into the server's.
        A server that takes early pushes (``ParameterServer(early_pushes=True)``) gets two receive buffers per
        remote worker, and its local worker's answers are snapshots: its model is busy with the next step.
        ``chunk_stepper`` (``overlap_answers``): gradients come into its buffers, and it answers pushes chunk by
        chunk (:mod:`lightning_hybrid.chunkwise`)."""
        decisions = decisions or {}
        follower = isinstance(server, FollowerServer)
        if follower and len(decisions) != 1:
            raise ValueError("a FollowerServer hears shard 0's decisions: give it that one channel in `decisions`")
        self.server = server
        self.rank = rank
        self._followers = {} if follower else decisions
        self._coordinator = next(iter(decisions.items())) if follower else None
        server.connect(
            answers_in_place=channels,  # each remote worker has a receive buffer of its own
            on_decision=self._tell_followers if self._followers else None,
            chunk_stepper=chunk_stepper,
        )
        self.chunk_stepper = chunk_stepper
        self._expects_chunks: set[int] = set()  # workers whose push waits for its answer's chunks
        self._pipelined = server.early_pushes
        self._local_params = None if self._pipelined else local_params
        # Two answers can be due to a pipelined worker at once, made by two threads: each server event and the
        # delivery of its releases happen under this lock, so that a worker's answers leave in the order the
        # server made them (found by the pipelined soak: a worker that read them swapped pushed a forgotten version)
        self._in_order: contextlib.AbstractContextManager = (
            threading.RLock() if self._pipelined else contextlib.nullcontext()
        )
        self._channels = channels
        self._answer_channels = answers or channels
        self._buffer_layout = buffer_layout
        self._answer_format = WireFormat.of(server.layout, answer_dtype)
        self._exact_format = WireFormat.of(server.layout)
        self._push_format = WireFormat.of(server.layout, push_dtype)
        self._read_buffers = read_buffers
        self._peer_timeout = peer_timeout
        self._local = _Waiter()
        self._send_locks = {rank: threading.Lock() for rank in channels}
        self._threads: list[threading.Thread] = []
        self._notifiers: list[threading.Thread] = []  # abort notices in flight
        self._failure: Optional[BaseException] = None
        self._sending: queue.SimpleQueue = queue.SimpleQueue()  # posted sends: (works, snapshot to recycle)
        self._sender = threading.Thread(target=self._complete_sends, name="hybrid-sgd-sends", daemon=True)

    def start(self) -> None:
        _RUNNING.add(self)
        self._sender.start()
        targets = [(self._serve, (rank,), f"hybrid-sgd-server-{rank}") for rank in self._channels]
        if self._coordinator is not None:
            targets.append((self._follow, self._coordinator, "hybrid-sgd-decisions"))
        for target, args, name in targets:
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, timeout: float = 10.0) -> None:
        """Wait up to ``timeout`` in all for the receiver threads, which end when their worker leaves or is lost
        (a follower's decision thread when shard 0, whose workers have all left, ends the decisions), and for the
        last sends. After a failure (a short ``timeout``: the strategy stops local children 3 s after an abort)
        threads may still wait on peers that stop too: :meth:`end_blocked_threads` ends them at exit."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._followers and self._failure is None:
            self._tell_followers(END_OF_DECISIONS, ())
        self._sending.put(None)
        if self.chunk_stepper is not None:
            self.chunk_stepper.close()
        self._sender.join(max(0.0, deadline - time.monotonic()))
        if not self._alive_threads():
            _RUNNING.discard(self)

    def _alive_threads(self) -> list[threading.Thread]:
        return [thread for thread in (*self._threads, self._sender, *self._notifiers) if thread.is_alive()]

    def end_blocked_threads(self, timeout: float) -> None:
        """At exit: end this server's threads still blocked in a receive or a send (after a failure: a peer that
        will not send its LEAVE, a worker that no longer reads). A thread still blocked in gloo when the
        interpreter exits aborts the process ("terminate called without an active exception", exit code 134).
        gloo cannot cancel an operation, but a wait that times out closes its pair, failing every operation on it
        on both ends: what this process's exit would do a moment later, done first."""
        blocked = self._alive_threads()
        if not blocked:
            return
        if self._failure is None:  # the threads end quietly: nobody is told of a lost peer
            self._failure = HybridSGDError("hybrid_sgd: the process exits")
        self._cut_channels()
        self._sending.put(None)
        for thread in blocked:
            thread.join(timeout)

    def _cut_channels(self) -> None:
        channels = {id(group): (group, peer) for peer, group in self._channels.items()}
        channels.update({id(group): (group, peer) for peer, group in self._answer_channels.items()})
        channels.update({id(group): (group, peer) for peer, group in self._followers.items()})
        if self._coordinator is not None:
            peer, group = self._coordinator
            channels[id(group)] = (group, peer)
        for group, peer in channels.values():
            try:
                dist.irecv(torch.empty(1), src=peer, group=group, tag=CUT_TAG).wait(timedelta(milliseconds=1))
            except (RuntimeError, ValueError):  # the timeout that closes it, or a group already torn down
                pass

    # ------------------------------------------------------------------ local worker (same process)
    def push_local(
        self,
        gradient: list[Tensor],
        version: int,
        flags: Flag,
        threshold: Optional[int] = None,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> Reply:
        """The local worker's push of ``gradient`` (flat buffers of the server's layout, read in memory; the server
        may write into them until it answers) computed at ``version`` from ``work``, with the tensors it did not use
        (see ``ParameterServer.push``); returns the server's answer."""
        self.post_local(gradient, version, flags, threshold, work, unused)
        return self.await_local()

    def post_local(
        self,
        gradient: list[Tensor],
        version: int,
        flags: Flag,
        threshold: Optional[int] = None,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> None:
        """:meth:`push_local` without the wait: :meth:`await_local` takes the answer."""
        if self._failure is not None:
            raise self._failure
        if self.chunk_stepper is not None:
            self._expects_chunks.add(self.rank)
        drain, nonfinite = bool(flags & Flag.DRAIN), bool(flags & Flag.NONFINITE)
        self._local_event(
            flags,
            threshold,
            lambda: self.server.push(
                self.rank, gradient, version, drain=drain, nonfinite=nonfinite, work=work, unused=unused
            ),
        )

    def await_local(self) -> Reply:
        """The local worker's next answer, in the order of its pushes and drains."""
        return self._local.wait(self._peer_timeout)

    def drain_local(self, flags: Flag = Flag.NONE, threshold: Optional[int] = None) -> Reply:
        """The local worker drains; returns the answer once every active worker has drained."""
        if self._failure is not None:
            raise self._failure
        self._local_event(flags, threshold, lambda: self.server.drain(self.rank))
        return self.await_local()

    def leave_local(self, flags: Flag = Flag.NONE) -> None:
        """The local worker sends nothing more."""
        self._local_event(flags, 0, lambda: self.server.leave(self.rank))

    def _local_event(self, flags: Flag, threshold: Optional[int], event: Callable[[], list[Release]]) -> None:
        """The requests a local message carries, then the message itself, its answers delivered in order."""
        with self._in_order:
            self.apply_requests(flags, threshold)
            self._dispatch(event())

    def abort(self, code: AbortCode, rank: int, why: str = "") -> None:
        """Tell every remote worker and the local one that the run cannot go on.

        Only the first abort counts. The notices are sent from a daemon thread: a worker that stopped
        reading must not block the caller, and the server serves nobody after an abort."""
        if self._failure is not None:
            return
        self._failure = abort_error(code, rank, why)
        self._local.set(error=self._failure)
        header = Header(Kind.ABORT, self.rank, self.server.version, detail=rank, code=int(code)).to_tensor()
        # a lost worker cannot be told; one that broke the protocol hears why, like everybody else
        notify = [worker for worker in self._channels if worker != rank or code == AbortCode.PROTOCOL]
        notifier = threading.Thread(
            target=self._notify_abort, args=(notify, header), name="hybrid-sgd-abort", daemon=True
        )
        self._notifiers.append(notifier)
        notifier.start()

    def _notify_abort(self, workers: list[int], header: Tensor) -> None:
        for worker in workers:
            try:
                with self._send_locks[worker]:
                    dist.send(header, dst=worker, group=self._answer_channels[worker], tag=ANSWER_TAG)
            except (RuntimeError, ValueError):  # its connection is gone, or (torn down) its group
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
        # a pipelined worker pushes again while its last gradient is pending: that one's buffer is not free
        buffers = (
            [self.chunk_stepper.buffers[rank]]
            if self.chunk_stepper is not None
            else [
                self.server.layout.allocate("cpu", pin_memory=_pin(self.server.device))
                for _ in range(2 if self._pipelined else 1)
            ]
        )
        layout = self.server.layout
        chunk_lists = [layout.chunk_views(buffer) for buffer in buffers]
        # a narrowed gradient (push_dtype) comes into chunks of its own format, widened into the buffer's at once
        wire_chunks = (
            layout.chunk_views(self._push_format.allocate()) if self._push_format != self._exact_format else None
        )
        pushes = 0
        header_buffer = torch.empty(Header.SIZE, dtype=torch.int64)
        trailer_buffer = Trailer().to_tensor(len(layout.slots))
        with self._aborting_on_failure(rank):
            while True:  # after an abort too: a worker blocked in a send must get through to read the ABORT
                dist.recv(header_buffer, src=rank, group=group, tag=REQUEST_TAG)
                header = Header.from_tensor(header_buffer)
                if header.rank != rank:
                    raise ProtocolError(f"a message on rank {rank}'s channel claims to come from rank {header.rank}")
                gradient, chunks = buffers[pushes % len(buffers)], chunk_lists[pushes % len(buffers)]
                trailer = Trailer()
                if header.kind == Kind.PUSH:
                    pushes += 1
                    if rank in self.server.pending_workers and not self._pipelined:  # its buffer may hold the sum
                        raise ProtocolError(f"worker {rank} sent a gradient while it still waits for its answer")
                    expected = self._push_format.signature
                    if header.numel != layout.numel or header.code != expected:
                        raise ProtocolError(
                            f"rank {rank} announced a gradient of {header.numel} elements (format signature "
                            f"{header.code}), the server expects {layout.numel} (signature {expected}): every "
                            "rank must build the same model, with the same parameter dtypes, and get the same "
                            "`push_dtype`"
                        )
                    # every chunk's receive at once: gloo moves a message's bytes only once its receive is posted,
                    # so one chunk after another each waited a round trip (through the link's queue) to start
                    received = wire_chunks or chunks
                    works = [dist.irecv(chunk, src=rank, group=group, tag=REQUEST_TAG) for chunk in received]
                    # the trailer's too: posted after the chunks had come, it waited behind whatever the worker's
                    # rank had sent this one since (with overlap_answers, its shard's answers)
                    verdict = (
                        dist.irecv(trailer_buffer, src=rank, group=group, tag=REQUEST_TAG)
                        if header.flags & Flag.VERDICT
                        else None
                    )
                    if self.chunk_stepper is not None:
                        self._expects_chunks.add(rank)
                    for index, work in enumerate(works):
                        work.wait()
                        if self.chunk_stepper is not None:
                            self.chunk_stepper.arrived(rank, index)
                    if wire_chunks:
                        for chunk, narrow in zip(chunks, wire_chunks):
                            chunk.copy_(narrow)
                    if verdict is not None:
                        verdict.wait()
                        trailer = Trailer.from_tensor(trailer_buffer)
                        if trailer.nonfinite:
                            header = dataclasses.replace(header, flags=header.flags | Flag.NONFINITE)
                self._handle(rank, header, gradient, trailer.unused)
                if header.kind == Kind.LEAVE:
                    return

    def _follow(self, coordinator: int, channel: dist.ProcessGroup) -> None:
        """A follower shard applies shard 0's decisions as they come (see :class:`FollowerServer`)."""
        assert isinstance(self.server, FollowerServer)
        message = torch.empty(Decision.size(self.server.num_workers), dtype=torch.int64)
        with self._aborting_on_failure(coordinator):
            while True:
                dist.recv(message, src=coordinator, group=channel, tag=DECISION_TAG)
                decision = Decision.from_tensor(message)
                if decision.version == END_OF_DECISIONS:
                    return
                if self._failure is None:
                    with self._in_order:
                        self._dispatch(self.server.decide(decision.version, decision.workers))

    def _tell_followers(self, version: int, group: Sequence[int]) -> None:
        """Post shard 0's decision (or the end of them) to every follower; the sender thread completes it."""
        message = Decision(version, group).to_tensor(self.server.num_workers)
        works = [
            (rank, message, dist.isend(message, dst=rank, group=channel, tag=DECISION_TAG))
            for rank, channel in self._followers.items()
        ]
        self._sending.put((works, []))

    def _handle(self, rank: int, header: Header, gradient: list[Tensor], unused: frozenset[int]) -> None:
        if header.kind not in (Kind.PUSH, Kind.DRAIN, Kind.LEAVE):
            raise ProtocolError(f"rank {rank} sent a message of unknown kind {header.kind}")
        if self._failure is not None:
            return
        with self._in_order:
            self.apply_requests(header.flags, header.threshold)
            if header.kind == Kind.PUSH:
                drain, nonfinite = bool(header.flags & Flag.DRAIN), bool(header.flags & Flag.NONFINITE)
                releases = self.server.push(
                    rank,
                    gradient,
                    header.version,
                    drain=drain,
                    nonfinite=nonfinite,
                    work=work_of(header),
                    unused=unused,
                )
            elif header.kind == Kind.DRAIN:
                releases = self.server.drain(rank)
            else:
                releases = self.server.leave(rank)
                if header.flags & Flag.FAILED:
                    self.abort(AbortCode.NONFINITE if header.flags & Flag.NONFINITE else AbortCode.WORKER_FAILED, rank)
                    return
            self._dispatch(releases)

    def apply_requests(self, flags: int, threshold: Optional[int]) -> None:
        """Stop signals and a threshold change that a worker's message carries."""
        if flags & STOP_FLAGS:
            self.server.request_stop(int(flags & STOP_FLAGS))
        if threshold:
            with self._in_order:
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
            if local and self._answers_in_chunks(self.rank):
                assert self.chunk_stepper is not None
                missing, stale = self.chunk_stepper.answer(self.rank)
                self.chunk_stepper.write_local(range(self.chunk_stepper.chunks) if stale else missing, release.params)
                reply = self._reply(release, self.rank, [], buffers)
                self._local.set(dataclasses.replace(reply, flags=reply.flags | Flag.CHUNKED))
            elif local:
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
                answer = self._exact_format if release.answers_drain else self._answer_format
                works = self._send_replies(remote, release, answer, buffers)
                self._sending.put((works, recycle))
            else:
                self.server.recycle(recycle)

    def _answers_in_chunks(self, worker: int) -> bool:
        """Whether ``worker``'s answer is its push's chunks (``overlap_answers``), not a whole one (a drain's)."""
        if worker not in self._expects_chunks:
            return False
        self._expects_chunks.discard(worker)
        return True

    def _reply(self, release: Release, worker: int, params: list[Tensor], buffers: Optional[list[Tensor]]) -> Reply:
        return Reply(
            version=release.version,
            threshold=self.server.threshold,
            flags=self._reply_flags(release, worker, buffers),
            params=params,
            buffers=buffers,
            staleness=release.staleness.get(worker),
            applied=release.applied,
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
        self, workers: list[int], release: Release, answer: WireFormat, buffers: Optional[list[Tensor]]
    ) -> list[tuple[int, Tensor, dist.Work]]:
        """Post the answers to several workers at once, each over its own gloo pair; :meth:`_complete_sends`
        waits for them. Each worker's send lock is held while its reply is posted, so messages to one worker
        never interleave; the locks are taken in rank order, so two dispatching threads cannot deadlock."""
        works = []
        params = answer.encode(release.params)
        with contextlib.ExitStack() as held:
            for worker in sorted(workers):
                held.enter_context(self._send_locks[worker])
            for worker in workers:
                flags, payload = self._reply_flags(release, worker, buffers), params
                if self._answers_in_chunks(worker):
                    assert self.chunk_stepper is not None
                    missing, stale = self.chunk_stepper.answer(worker)
                    works += [(worker, *sent) for sent in self.chunk_stepper.send_chunks(worker, missing, params)]
                    if not stale:
                        flags, payload = flags | Flag.CHUNKED, []
                header = Header(
                    Kind.REPLY,
                    self.rank,
                    release.version,
                    flags=int(flags),
                    threshold=self.server.threshold,
                    numel=self.server.layout.numel,
                    detail=release.staleness.get(worker, -1),
                    code=answer.signature,
                    applied=release.applied,
                )
                group = self._answer_channels[worker]
                tagged = [(t, ANSWER_TAG) for t in [header.to_tensor(), *payload]]
                tagged += [(t, BUFFERS_TAG) for t in buffers or []]
                for tensor, tag in tagged:
                    works.append((worker, tensor, dist.isend(tensor, dst=worker, group=group, tag=tag)))
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


_RUNNING: set[ServerEndpoint] = set()  # started, with a thread that may still be alive


def release_blocked_threads(timeout: float = 2.0) -> None:
    """At exit, before the process groups go: end the threads of every server still running (see
    :meth:`ServerEndpoint.end_blocked_threads`)."""
    for endpoint in list(_RUNNING):
        endpoint.end_blocked_threads(timeout)
    _RUNNING.clear()


def _pin(device: torch.device) -> bool:
    return device.type == "cuda"
