"""Property tests of the parameter server: any arrival order, threshold change, drain and leave keeps
its invariants (hypothesis drives the workers' protocol as a state machine).

* versions only rise, and every answer carries the version the worker then holds;
* every gradient is applied exactly once or counted as rejected, and each worker is answered once;
* staleness is never negative and equals the version gap at application;
* a completed drain leaves nothing pending, and once every worker has drained or left, nobody waits.
"""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lightning_hybrid.server import ParameterServer, Release

WORKERS = 4


class ServerProtocol(RuleBasedStateMachine):
    @initialize(threshold=st.integers(1, WORKERS))
    def start(self, threshold: int) -> None:
        self.server = ParameterServer(
            [torch.zeros(3)], lambda p: torch.optim.SGD(p, lr=0.1), num_workers=WORKERS, threshold=threshold
        )
        self.version = {w: 0 for w in range(WORKERS)}  # the parameters each worker holds
        self.waiting: dict[int, str] = {}  # worker -> "push" | "drain" | "push+drain"
        self.active = set(range(WORKERS))
        self.pushed = self.rejected = self.answers = self.asked = 0
        self.last_version = 0

    def idle(self) -> list[int]:
        return sorted(self.active - set(self.waiting))

    def deliver(self, releases: list[Release]) -> None:
        for release in releases:
            assert release.version >= self.last_version, "versions only rise"
            self.last_version = release.version
            assert release.version == self.server.version or not release.workers
            for worker, staleness in release.staleness.items():
                assert staleness >= 0
            if release.drained:
                assert not self.server.pending_workers, "a completed drain leaves nothing pending"
            for worker in release.workers:
                assert worker in self.waiting, f"worker {worker} answered without waiting"
                del self.waiting[worker]
                self.version[worker] = release.version
                self.answers += 1

    @precondition(lambda self: self.idle())
    @rule(data=st.data(), finite=st.booleans(), drain=st.booleans())
    def push(self, data: st.DataObject, finite: bool, drain: bool) -> None:
        worker = data.draw(st.sampled_from(self.idle()))
        gradient = torch.ones(3) if finite else torch.tensor([1.0, float("nan"), 1.0])
        self.waiting[worker] = "push+drain" if drain else "push"
        self.asked += 1
        self.pushed += 1
        self.rejected += not finite
        self.deliver(self.server.push(worker, [gradient], self.version[worker], drain=drain))

    @precondition(lambda self: self.idle())
    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(self.idle()))
        self.waiting[worker] = "drain"
        self.asked += 1
        self.deliver(self.server.drain(worker))

    @precondition(lambda self: len(self.idle()) > 1)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(self.idle()))
        self.active.discard(worker)
        self.deliver(self.server.leave(worker))

    @rule(threshold=st.integers(1, WORKERS))
    def set_threshold(self, threshold: int) -> None:
        self.deliver(self.server.set_threshold(threshold))

    @invariant()
    def accounting_holds(self) -> None:
        if not hasattr(self, "server"):
            return
        applied = sum(size * count for size, count in self.server.update_sizes.items())
        pending = len(self.server.pending_workers)
        assert applied + pending + sum(self.server.rejected.values()) == self.pushed, "each gradient exactly once"
        assert sum(self.server.rejected.values()) == self.rejected
        assert self.server.stats.total == applied
        assert min(self.server.stats.counts, default=0) >= 0
        assert self.answers + len(self.waiting) == self.asked, "each message answered at most once"

    def teardown(self) -> None:
        if not hasattr(self, "server"):
            return
        # every active worker drains once (one already draining counts; a flushed push makes its worker idle)
        drained = {worker for worker, message in self.waiting.items() if "drain" in message}
        while candidates := [w for w in self.idle() if w not in drained]:
            drained.add(candidates[0])
            self.waiting[candidates[0]] = "drain"
            self.asked += 1
            self.deliver(self.server.drain(candidates[0]))
        assert not self.waiting, f"workers left waiting: {self.waiting}"
        assert not self.server.pending_workers
        self.accounting_holds()


ServerProtocol.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_server_protocol = ServerProtocol.TestCase
