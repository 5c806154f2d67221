"""A worker's side of the parameter-server protocol: the links over which it pushes gradients and drains, and
receives the server's answers. The worker rank that shares the server's process talks to it in memory
(:class:`LocalServerLink`); every other rank uses :class:`RemoteServerLink`; with a sharded server a worker talks
to every shard at once through a :class:`ShardedServerLink`. All answer ``push``/``drain``/``leave`` alike, so the
worker session drives any of them the same way.
"""

from __future__ import annotations

import collections
import dataclasses
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_hybrid.endpoint import ServerEndpoint
from lightning_hybrid.errors import PeerLostError, ProtocolError
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.server import all_finite
from lightning_hybrid.shards import ShardPlan
from lightning_hybrid.wire import (
    ANSWER_TAG,
    BUFFERS_TAG,
    CHUNK_TAGS,
    NO_WORK,
    REQUEST_TAG,
    SERVER_RANK,
    Flag,
    Header,
    Kind,
    Reply,
    Trailer,
    WireFormat,
    abort_error,
    timeout_error,
)


class LocalServerLink:
    """The server rank's own worker (of rank ``endpoint.rank``): calls the server in memory, no copy through the
    network."""

    def __init__(self, endpoint: ServerEndpoint) -> None:
        self._endpoint = endpoint
        # a pipelined worker's next gradient is packed while the server still holds its last one: each push is
        # handed over in a buffer of its own, in turn
        layout, device = endpoint.server.layout, endpoint.server.device
        self._handover = [layout.allocate(device) for _ in range(2)] if endpoint.server.early_pushes else []
        self._pushes = 0

    def push(
        self,
        gradient: list[Tensor],
        version: int,
        flags: Flag,
        threshold: Optional[int] = None,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> Reply:
        return self._endpoint.push_local(gradient, version, flags, threshold, work, unused)

    def post_push(
        self,
        gradient: list[Tensor],
        version: int,
        flags: Flag,
        threshold: Optional[int] = None,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> None:
        """A pipelined worker's push: :meth:`collect` takes its answer, after the next push."""
        handover = self._handover[self._pushes % 2]
        self._pushes += 1
        for mine, tensor in zip(handover, gradient):
            mine.copy_(tensor)
        self._endpoint.post_local(handover, version, flags, threshold, work, unused)

    def collect(self) -> Reply:
        return self._endpoint.await_local()

    def finish_sends(self) -> None:
        """Nothing travels."""

    def drain(self, flags: Flag = Flag.NONE, threshold: Optional[int] = None) -> Reply:
        return self._endpoint.drain_local(flags, threshold)

    def leave(self, flags: Flag = Flag.NONE) -> None:
        self._endpoint.leave_local(flags)


@dataclasses.dataclass
class _PostedAnswer:
    """The receives of one answer's header and parameters, posted before it comes, in ``format``."""

    header: Tensor
    params: list[Tensor]
    works: list[dist.Work]
    format: WireFormat


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
        answers: Optional[dist.ProcessGroup] = None,
        answer_dtype: Optional[torch.dtype] = None,
        push_dtype: Optional[torch.dtype] = None,
        chunk_answers: Optional[tuple[list[Tensor], dist.ProcessGroup]] = None,
    ) -> None:
        """Parameters are received into ``receive_into`` (host buffers of ``layout``; the CPU model's own flat
        parameters make the reply the model without a copy), else into buffers of the link's own; a pipelined
        worker's answers, and answers in ``answer_dtype`` (see :class:`WireFormat`), come into buffers of the
        link's and are copied there (see :meth:`post_push`). Gradients leave in ``push_dtype``, through chunks of
        the link's. ``answers``: the group the answers come on, where it is not ``group`` (a pipelined worker's,
        ``Channels.answers_in``). ``chunk_answers`` (``overlap_answers``): where each chunk of an answer to a
        streamed push lands (views of the worker's parameters) and the group it comes on (see
        :mod:`lightning_hybrid.chunkwise`)."""
        self._rank = rank
        self._chunk_answers = chunk_answers
        self._chunk_works: Optional[list[dist.Work]] = None  # posted by post_chunk_answers, for the coming push
        self._chunked_push = False  # the push last sent is answered in chunks
        self._server = server_rank
        self._group = group
        self._answers = answers or group
        self._layout = layout
        self._timeout = timedelta(seconds=peer_timeout)
        self._receive_into = receive_into
        self._answer_format = WireFormat.of(layout, answer_dtype)
        self._exact_format = WireFormat.of(layout)
        in_place = receive_into is not None and self._answer_format == self._exact_format
        self._params = receive_into if in_place else self._answer_format.allocate(pin_memory)
        self._drain_params: Optional[list[Tensor]] = None  # see _drain_target
        self._push_format = WireFormat.of(layout, push_dtype)
        # a narrowed gradient is copied chunk by chunk into these as it leaves (its sends complete before the next)
        narrowed = self._push_format != self._exact_format
        self._push_chunks = layout.chunk_views(self._push_format.allocate(pin_memory)) if narrowed else None
        self._chunks_sent = 0
        self._drains = False  # whether the request last sent drains
        self._buffers = buffer_layout.allocate("cpu", pin_memory=pin_memory)
        self._staging = layout.allocate("cpu", pin_memory=pin_memory) if pin_memory else []
        self._header = torch.empty(Header.SIZE, dtype=torch.int64)
        self._pin_memory = pin_memory
        # a pipelined worker's answers, received as soon as the server sends them, into two buffers in turn
        self._answer_buffers: list[tuple[Tensor, list[Tensor]]] = []
        self._expected: collections.deque[_PostedAnswer] = collections.deque()
        self._sending: list[tuple[Tensor, dist.Work]] = []
        self._broken = False  # after an abort, a timeout or a lost connection: send nothing more
        self._last_version = -1  # of the server's answers, which never go back

    def push(
        self,
        gradient: list[Tensor],
        version: int,
        flags: Flag,
        threshold: Optional[int] = None,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> Reply:
        """Send a whole gradient (flat buffers of the layout) and wait for the answer."""
        self.send_push(gradient, version, flags, threshold, work, unused)
        return self.await_reply()

    def post_push(
        self,
        gradient: list[Tensor],
        version: int,
        flags: Flag,
        threshold: Optional[int] = None,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> None:
        """A pipelined worker's push: queue the gradient and post the receive of its answer, which then comes in
        as soon as the server sends it (into a buffer of the link's, the model being busy with the next step);
        :meth:`collect` takes it, after the next push."""
        self.send_push(gradient, version, flags, threshold, work, unused)
        if not self._answer_buffers:
            self._answer_buffers = [
                (torch.empty(Header.SIZE, dtype=torch.int64), self._answer_format.allocate(self._pin_memory))
                for _ in range(2)
            ]
        header, params = self._answer_buffers[0]
        self._answer_buffers.reverse()
        self._expected.append(self._post_answer(header, params, bool(flags & Flag.DRAIN)))

    def send_push(
        self,
        gradient: list[Tensor],
        version: int,
        flags: Flag,
        threshold: Optional[int] = None,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> None:
        """Queue a whole gradient, and a trailer if some tensors got no gradient (``unused``, indices of the
        layout's tensors); :meth:`await_reply` waits for the answer."""
        if gradient and gradient[0].device.type != "cpu" and self._push_chunks is None:
            for staged, tensor in zip(self._staging, gradient):
                staged.copy_(tensor)
            gradient = self._staging
        self.start_push(version, flags | (Flag.VERDICT if unused else Flag.NONE), threshold, work)
        for chunk in self._layout.chunk_views(gradient):
            self.send_chunk(chunk)
        if unused:
            self.send_trailer(Trailer(bool(flags & Flag.NONFINITE), unused))

    def start_push(
        self, version: int, flags: Flag, threshold: Optional[int] = None, work: Optional[int] = None
    ) -> None:
        """Begin a gradient message; its chunks follow with :meth:`send_chunk`, in the layout's wire order."""
        self._drains = bool(flags & Flag.DRAIN)
        self._chunked_push = self._chunk_works is not None
        header = Header(
            Kind.PUSH,
            self._rank,
            version,
            int(flags),
            threshold or 0,
            self._layout.numel,
            detail=NO_WORK if work is None else work,
            code=self._push_format.signature,
        )
        self._chunks_sent = 0
        self._post(header.to_tensor())

    def post_chunk_answers(self) -> None:
        """Post the receives of the coming answer's chunks, before the push they answer leaves: the shard sends
        each as soon as it is stepped. Posted once per push (a step that pushed nothing leaves them posted)."""
        assert self._chunk_answers is not None
        if self._chunk_works is not None:
            return
        views, group = self._chunk_answers
        self._chunk_works = [
            dist.irecv(view, src=self._server, group=group, tag=CHUNK_TAGS + chunk) for chunk, view in enumerate(views)
        ]

    def send_chunk(self, chunk: Tensor) -> None:
        """Queue the gradient's next chunk; it travels while the caller goes on (e.g. while backward still runs)."""
        if self._push_chunks is not None:
            narrowed = self._push_chunks[self._chunks_sent]
            narrowed.copy_(chunk)
            chunk = narrowed
        self._chunks_sent += 1
        self._post(chunk)

    def send_trailer(self, trailer: Trailer) -> None:
        """After the chunks of a push flagged ``Flag.VERDICT``."""
        self._post(trailer.to_tensor(len(self._layout.slots)))

    def await_reply(self) -> Reply:
        """Wait until the queued message is out, then for the server's answer."""
        self._complete_sends()
        return self._receive(self._post_answer(self._header, self._params, self._drains))

    def collect(self) -> Reply:
        """A pipelined worker's answer to its push before the last (see :meth:`post_push`), copied into
        ``receive_into``."""
        reply = self._receive(self._expected.popleft())
        if self._receive_into is None:  # the caller copies them out (to a GPU), before the buffers' next use
            return reply
        for mine, received in zip(self._receive_into, reply.params):
            mine.copy_(received)
        return dataclasses.replace(reply, params=self._receive_into)

    def finish_sends(self) -> None:
        """Wait until the queued messages are out, so that their buffers may be written again."""
        self._complete_sends()

    def abandon(self) -> None:
        """A message was cut off half-way (the worker failed mid-backward): send nothing more; the server
        learns of it when this process's connection closes."""
        self._broken = True

    def drain(self, flags: Flag = Flag.NONE, threshold: Optional[int] = None) -> Reply:
        self.post_drain(flags, threshold)
        return self.await_reply()

    def post_drain(self, flags: Flag = Flag.NONE, threshold: Optional[int] = None) -> None:
        self._drains, self._chunked_push = True, False
        self._post(Header(Kind.DRAIN, self._rank, flags=int(flags), threshold=threshold or 0).to_tensor())

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

    def _post_answer(self, header: Tensor, params: list[Tensor], drains: bool) -> _PostedAnswer:
        """Post the receives of the next answer's header and parameters at once: gloo moves a message only once
        its receive is posted, so one after the other would wait a round trip more. ``drains``: it answers a
        drain, at the parameters' own precision (see :meth:`_drain_target`)."""
        if drains:
            params = self._drain_target(params)
        if self._chunked_push:  # the parameters come as chunks (see _receive)
            params = []
        works = [dist.irecv(t, src=self._server, group=self._answers, tag=ANSWER_TAG) for t in [header, *params]]
        return _PostedAnswer(header, params, works, self._exact_format if drains else self._answer_format)

    def _drain_target(self, params: list[Tensor]) -> list[Tensor]:
        """Where an answer to a drain lands: ``params``, but buffers at full precision where answers come in
        ``answer_dtype`` (allocated at the first drain)."""
        if self._answer_format == self._exact_format:
            return params
        if self._drain_params is None:
            self._drain_params = self._exact_format.allocate(self._pin_memory)
        return self._drain_params

    def _wait(self, work: dist.Work) -> None:
        """Sends wait as long as receives: over a cut link a send never completes (found by the partition test)."""
        try:
            work.wait(self._timeout)
        except RuntimeError as err:
            self._broken = True
            if "Timed out" in str(err):
                raise timeout_error(self._timeout.total_seconds()) from err
            raise self._server_lost(err) from err

    def _server_lost(self, err: RuntimeError) -> PeerLostError:
        return PeerLostError(
            f"hybrid_sgd: rank {self._rank} lost the parameter server (rank {self._server}): its process died or "
            f"its connection closed ({err}). Check rank {self._server}'s log, then resume from the last checkpoint."
        )

    def _receive(self, posted: _PostedAnswer) -> Reply:
        """The server's next answer, whose receives are ``posted``."""
        self._wait(posted.works[0])
        header = Header.from_tensor(posted.header)
        if header.kind == Kind.ABORT:
            self._broken = True
            raise abort_error(header.code, header.detail)
        if header.kind != Kind.REPLY or header.numel != self._layout.numel:
            self._broken = True
            raise ProtocolError(
                f"hybrid_sgd: rank {self._rank} got a message of kind {header.kind} with {header.numel} elements "
                f"from the server, expected a reply of {self._layout.numel}"
            )
        if header.code != posted.format.signature:
            self._broken = True
            raise ProtocolError(
                f"hybrid_sgd: rank {self._rank} expected the parameters from rank {self._server} as "
                f"{_dtype_names(posted.format)} (signature {posted.format.signature}), the server sent another format "
                f"(signature {header.code}): give every rank the same `answer_dtype`"
            )
        if header.version < self._last_version:
            self._broken = True
            raise ProtocolError(
                f"hybrid_sgd: rank {self._rank} got an answer of version {header.version} from rank {self._server} "
                f"after one of version {self._last_version}: the server's answers came out of order (a bug in "
                "hybrid_sgd: please report it with every rank's log)"
            )
        self._last_version = header.version
        for work in posted.works[1:]:
            self._wait(work)
        flags = Flag(header.flags)
        if self._chunked_push:
            posted = self._receive_chunks(posted, flags)
        buffers = None
        if flags & Flag.BUFFERS:
            for tensor in self._buffers:
                self._wait(dist.irecv(tensor, src=self._server, group=self._answers, tag=BUFFERS_TAG))
            buffers = self._buffers
        return Reply(
            version=header.version,
            threshold=header.threshold,
            flags=flags,
            params=posted.params,
            buffers=buffers,
            staleness=header.detail if header.detail >= 0 else None,
            applied=header.applied,
        )

    def _receive_chunks(self, posted: _PostedAnswer, flags: Flag) -> _PostedAnswer:
        """An answer whose chunks were posted (:meth:`post_chunk_answers`): every chunk comes, and unless the
        header says they are the answer (``Flag.CHUNKED``) the whole slice follows it."""
        assert self._chunk_works is not None
        for work in self._chunk_works:
            self._wait(work)
        self._chunk_works, self._chunked_push = None, False
        if flags & Flag.CHUNKED:
            return posted
        for tensor in self._params:
            self._wait(dist.irecv(tensor, src=self._server, group=self._answers, tag=ANSWER_TAG))
        return dataclasses.replace(posted, params=self._params)


def _dtype_names(answer: WireFormat) -> str:
    return "/".join(str(dtype).removeprefix("torch.") for dtype in answer.dtypes)


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
        param_slices: Optional[list[list[Tensor]]] = None,
        local_gradient: Optional[list[Tensor]] = None,
    ) -> None:
        """``links[s]`` reaches shard ``s`` (a :class:`LocalServerLink` for this rank's own); ``gradient`` and
        ``params`` are the worker's flat buffers; ``param_slices[s]`` (``plan.views(s, params)``) are where
        ``links[s]`` receives its answers. A striped plan's slices are no views (``plan.wire_views``): answers are
        copied into place, and this rank's own shard gets its gradient in ``local_gradient`` (packed by a
        :class:`StripedGradientStream`)."""
        self._rank = rank
        self._links = links
        # Rank r sends to and reads from shards r+1, r+2, ... (mod N) in turn: were every worker to read shard 1's
        # answer first, shard 1's link would carry N-1 answers while the others' idled, and so on down the line.
        remote = [(s, link) for s, link in enumerate(links) if isinstance(link, RemoteServerLink)]
        self._remote = sorted(remote, key=lambda item: (item[0] - rank) % len(links))
        self.remote_shards = [shard for shard, _ in self._remote]  # in the order this rank sends to them
        self._gradient = gradient
        self._plan = plan
        self._gradient_slices = [] if plan.striped else [plan.views(s, gradient) for s in range(plan.shards)]
        self._params = params
        self._param_slices = param_slices or []
        self._local_gradient = local_gradient
        self.versions = [0] * plan.shards

    def push(
        self,
        gradient: list[Tensor],
        version: int,
        flags: Flag,
        threshold: Optional[int] = None,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> Reply:
        """Push ``gradient`` (the worker's flat gradient buffers); ``version`` is ignored: every shard gets shard 0's.
        ``unused``: the model's tensors that got no gradient (each shard hears of its pieces of them)."""
        flags = self._post_remote(gradient, flags, threshold, work, unused)
        return self.push_local(flags, threshold, work, unused)

    def post_push(
        self,
        gradient: list[Tensor],
        version: int,
        flags: Flag,
        threshold: Optional[int] = None,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> None:
        """A pipelined worker's push to every shard: :meth:`collect` takes the answers, after the next push."""
        flags = self._post_remote(gradient, flags, threshold, work, unused, pipelined=True)
        local = self._links[self._rank]
        assert isinstance(local, LocalServerLink)
        local.post_push(*self._own_slice(flags, threshold, work, unused))

    def _post_remote(
        self,
        gradient: list[Tensor],
        flags: Flag,
        threshold: Optional[int],
        work: Optional[int],
        unused: frozenset[int],
        pipelined: bool = False,
    ) -> Flag:
        """Queue every remote shard's slice (``pipelined``: and post the receive of its answer); returns ``flags``
        with the whole gradient's NaN/Inf verdict."""
        assert gradient is self._gradient, "a sharded push sends the gradient buffers the link was built with"
        if not all(all_finite(g) for g in gradient):
            flags |= Flag.NONFINITE
        for shard in self.remote_shards:
            link = self.remote_link(shard)
            send = link.post_push if pipelined else link.send_push
            pieces = self._plan.piece_indices(shard, unused)
            send(self._gradient_slices[shard], self.versions[0], flags, threshold, work, pieces)
        return flags

    def collect(self) -> Reply:
        """Every shard's answer to the push before the last, merged (see :meth:`_merge`)."""
        return self._merge(self._links[self._rank].collect(), pipelined=True)

    def finish_sends(self) -> None:
        for _, link in self._remote:
            link.finish_sends()

    def post_to(
        self,
        shard: int,
        flags: Flag,
        threshold: Optional[int] = None,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> None:
        """Queue the gradient's slice for remote shard ``shard``; :meth:`push_local` completes the push."""
        pieces = self._plan.piece_indices(shard, unused)
        self.remote_link(shard).send_push(
            self._gradient_slices[shard], self.versions[0], flags, threshold, work, pieces
        )

    def send_trailer(self, shard: int, nonfinite: bool, unused: frozenset[int]) -> None:
        """The trailer of a slice streamed to ``shard`` (flagged ``Flag.VERDICT``), ``unused`` the model's tensors."""
        self.remote_link(shard).send_trailer(Trailer(nonfinite, self._plan.piece_indices(shard, unused)))

    def remote_link(self, shard: int) -> RemoteServerLink:
        link = self._links[shard]
        assert isinstance(link, RemoteServerLink)
        return link

    def push_local(
        self,
        flags: Flag,
        threshold: Optional[int] = None,
        work: Optional[int] = None,
        unused: frozenset[int] = frozenset(),
    ) -> Reply:
        """This rank's own shard's slice, in memory, after every remote shard's is queued; then every answer."""
        return self._merge(self._links[self._rank].push(*self._own_slice(flags, threshold, work, unused)))

    def _own_slice(
        self, flags: Flag, threshold: Optional[int], work: Optional[int], unused: frozenset[int]
    ) -> tuple[list[Tensor], int, Flag, Optional[int], Optional[int], frozenset[int]]:
        """The arguments of a push of this rank's own slice to its own shard (in memory)."""
        pieces = self._plan.piece_indices(self._rank, unused)
        gradient = self._local_gradient if self._plan.striped else self._gradient_slices[self._rank]
        assert gradient is not None
        return gradient, self.versions[0], flags, threshold, work, pieces

    def abandon(self) -> None:
        """A streamed gradient was cut off half-way: see :meth:`RemoteServerLink.abandon`."""
        for _, link in self._remote:
            link.abandon()

    def drain(self, flags: Flag = Flag.NONE, threshold: Optional[int] = None) -> Reply:
        for _, link in self._remote:
            link.post_drain(flags, threshold)
        return self._merge(self._links[self._rank].drain(flags, threshold))

    def leave(self, flags: Flag = Flag.NONE) -> None:
        for link in self._links:
            link.leave(flags)

    def leave_remote_shards(self, flags: Flag) -> None:
        """Leave every shard but this rank's own (which failed and aborted: see ``WorkerSession.end``)."""
        for _, link in self._remote:
            link.leave(flags)

    def _merge(self, local: Reply, pipelined: bool = False) -> Reply:
        """One reply from every shard's: their versions, the union of their flags, shard 0's buffers (rank 0's
        module buffers), the largest staleness and the most gradients applied. ``pipelined``: the sends are not
        waited for (see ``collect``)."""
        replies = {
            self._rank: local,
            **{shard: link.collect() if pipelined else link.await_reply() for shard, link in self._remote},
        }
        for shard, reply in replies.items():
            if reply.flags & Flag.CHUNKED:  # every chunk landed in place
                continue
            if self._plan.striped:
                received = self._plan.layouts[shard].chunk_views(reply.params)
                for mine, chunk in zip(self._plan.wire_views(shard, self._params), received):
                    mine.copy_(chunk)
            elif reply.params is not self._param_slices[shard]:  # received into staging buffers (a GPU model)
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
            applied=max(reply.applied for reply in replies.values()),
        )


ServerLink = LocalServerLink | RemoteServerLink
AnyServerLink = ServerLink | ShardedServerLink
