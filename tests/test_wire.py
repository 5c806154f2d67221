"""Bad messages on the wire, over real gloo between two processes: a message of the wrong kind, sender,
length, dtype or version, or a second push before the answer, is refused with an error that names it, and the run stops
(the sender too is told why); nothing is unpickled, every message is tensors of known sizes."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from multiprocessing.synchronize import Event
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from lightning_hybrid.endpoint import ServerEndpoint
from lightning_hybrid.errors import ProtocolError
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.links import RemoteServerLink
from lightning_hybrid.server import ParameterServer
from lightning_hybrid.wire import ANSWER_TAG, REQUEST_TAG, AbortCode, Flag, Header, Kind

pytestmark = pytest.mark.multiprocess
NUMEL = 10


def send_bad_message(case: str, group: dist.ProcessGroup) -> list[dist.Work]:
    """Send the message; its payload's sends are returned unfinished, as the real link queues them."""
    layout = FlatLayout.of([torch.zeros(NUMEL)])
    push = (Header(Kind.PUSH, 1, numel=NUMEL, code=layout.signature), [torch.ones(NUMEL)])
    messages = {
        "kind": [(Header(99, 1), [])],
        "sender": [(Header(Kind.DRAIN, 2), [])],
        "length": [(Header(Kind.PUSH, 1, numel=NUMEL + 1, code=layout.signature), [])],
        # a well-formed push, for parameters the server never had
        "version": [(Header(Kind.PUSH, 1, version=7, numel=NUMEL, code=layout.signature), [torch.ones(NUMEL)])],
        "dtype": [
            (
                Header(
                    Kind.PUSH, 1, numel=NUMEL, code=FlatLayout.of([torch.zeros(NUMEL, dtype=torch.float64)]).signature
                ),
                [torch.ones(NUMEL, dtype=torch.float64)],
            )
        ],
        # a second push before the answer to the first (K = 2: the first waits for rank 0, which never pushes)
        "twice": [push, push],
    }[case]
    works = []
    for header, payload in messages:
        dist.send(header.to_tensor(), dst=0, group=group, tag=REQUEST_TAG)
        works += [
            dist.isend(tensor, dst=0, group=group, tag=REQUEST_TAG) for tensor in payload
        ]  # after a refused header: never read
    return works


def rank_main(rank: int, port: int, case: str, sender_done: Event, results: mp.Queue) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        group = dist.new_group([0, 1], backend="gloo")
        if rank == 0:
            threshold = 2 if case == "twice" else 1
            server = ParameterServer([torch.zeros(NUMEL)], lambda p: torch.optim.SGD(p, lr=0.1), 2, threshold)
            endpoint = ServerEndpoint(server, {1: group}, FlatLayout.of([]), lambda out: None, peer_timeout=30)
            endpoint.start()
            endpoint.close(timeout=30)
            results.put(("server", str(endpoint._failure), server.version))
            sender_done.wait(60)  # the abort notice leaves from a daemon thread: stay until it has arrived
        else:
            queued = send_bad_message(case, group)
            notice = torch.empty(Header.SIZE, dtype=torch.int64)
            dist.recv(notice, src=0, group=group, tag=ANSWER_TAG)
            results.put(("sender", Header.from_tensor(notice)))
            del queued  # the payload's sends lived until the notice was read
    except BaseException:  # report, so that the test fails with the child's traceback instead of hanging
        results.put(("error", traceback.format_exc()))
    finally:
        if rank == 1:
            sender_done.set()


def run_two_ranks(target: Callable[..., None], *args: Any) -> dict[str, tuple]:
    """``target(rank, port, *args, results)`` on ranks 0 and 1, each a process; their reports by name (each
    puts one ``(name, *values)``; a child's traceback fails the test instead of leaving it hanging)."""
    context = mp.get_context("spawn")
    results, port = context.Queue(), free_port()
    processes = [context.Process(target=target, args=(r, port, *args, results)) for r in (0, 1)]
    for process in processes:
        process.start()
    reports = {}
    for _ in processes:
        report = results.get(timeout=60)
        assert report[0] != "error", report[1]
        reports[report[0]] = report[1:]
    for process in processes:
        process.join(30)
    return reports


@pytest.mark.parametrize(
    "case, message",
    [
        ("kind", "rank 1 sent a message of unknown kind 99"),
        ("sender", "a message on rank 1's channel claims to come from rank 2"),
        ("length", "rank 1 announced a gradient of 11 elements"),
        ("dtype", "every rank must build the same model, with the same parameter dtypes"),
        ("version", "worker 1 pushed a gradient for version 7, but the server is at version 0"),
        # refused before its payload is read: the pending first gradient's buffer holds the update's sum
        ("twice", "worker 1 sent a gradient while it still waits for its answer"),
    ],
)
def test_bad_message_is_refused_by_name_and_its_sender_is_told(case: str, message: str) -> None:
    reports = run_two_ranks(rank_main, case, mp.get_context("spawn").Event())
    failure, version = reports["server"]
    assert "broke the parameter-server protocol" in failure and message in failure
    assert version == 0, "nothing of the bad message reached the master weights"
    (notice,) = reports["sender"]
    assert notice.kind == Kind.ABORT and notice.code == AbortCode.PROTOCOL and notice.detail == 1


def answers_main(rank: int, port: int, results: mp.Queue) -> None:
    """Rank 0 answers rank 1's two pipelined pushes out of order (version 5, then 3); rank 1 collects them."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        group = dist.new_group([0, 1], backend="gloo")
        layout = FlatLayout.of([torch.zeros(NUMEL)])
        if rank == 0:
            gradient = layout.allocate("cpu")
            for _ in range(2):
                dist.recv(torch.empty(Header.SIZE, dtype=torch.int64), src=1, group=group, tag=REQUEST_TAG)
                for chunk in layout.chunk_views(gradient):
                    dist.recv(chunk, src=1, group=group, tag=REQUEST_TAG)
            for version in (5, 3):
                header = Header(Kind.REPLY, 0, version, numel=NUMEL, code=layout.signature)
                for tensor in [header.to_tensor(), torch.full((NUMEL,), float(version))]:
                    dist.send(tensor, dst=1, group=group, tag=ANSWER_TAG)
            results.put(("server", None))
        else:
            link = RemoteServerLink(1, group, layout, FlatLayout.of([]), peer_timeout=30, server_rank=0)
            for _ in range(2):
                link.post_push(layout.allocate("cpu"), 0, Flag.NONE)
            link.finish_sends()
            first = link.collect()
            try:
                link.collect()
                second = "accepted"
            except ProtocolError as err:
                second = str(err)
            results.put(("worker", first.version, first.params[0].tolist(), second))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def test_an_answer_whose_version_goes_back_is_refused_by_the_worker() -> None:
    """Answers to one worker leave in the order the server made them; were two swapped (the pipelined soak once
    saw it), the worker would push a version the server forgot: it stops at once with the reason instead."""
    version, params, second = run_two_ranks(answers_main)["worker"]
    assert version == 5 and params == [5.0] * NUMEL
    assert "got an answer of version 3 from rank 0 after one of version 5" in second
