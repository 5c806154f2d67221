"""The parameter server in one process: scripted arrival orders, threshold changes, drains and leaves."""

from __future__ import annotations

import pytest
import torch

from lightning_hybrid.errors import ProtocolError
from lightning_hybrid.server import GradientClipping, ParameterServer, clone_optimizer


def make_server(workers: int = 3, threshold: int = 2, lr: float = 1.0, **kwargs) -> ParameterServer:
    params = [torch.zeros(2, 2), torch.zeros(3)]
    return ParameterServer(
        params, lambda master: torch.optim.SGD(master, lr=lr), num_workers=workers, threshold=threshold, **kwargs
    )


def grad(value: float) -> list[torch.Tensor]:
    return [torch.full((7,), float(value))]


def master(server: ParameterServer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in server.parameters])


def test_updates_wait_for_k_gradients_and_average_them() -> None:
    server = make_server(workers=3, threshold=2)
    assert server.push(0, grad(1), version=0) == []
    (release,) = server.push(2, grad(3), version=0)
    assert release.workers == (0, 2)
    assert release.version == server.version == 1
    assert release.staleness == {0: 0, 2: 0}
    # SGD with lr=1 on the mean gradient (1 + 3) / 2 = 2
    assert torch.equal(master(server), torch.full((7,), -2.0))
    assert torch.equal(release.params[0], master(server))
    assert server.update_sizes == {2: 1}


def test_first_gradient_of_an_update_holds_the_sum_and_snapshots_are_reused() -> None:
    # the server keeps no gradient buffer of its own: an update's first gradient (idle until its worker is
    # answered) accumulates the others and is handed to the optimizer as the mean
    server = make_server(workers=3, threshold=2)
    first, second = grad(1), grad(3)
    server.push(0, first, version=0)
    (release,) = server.push(1, second, version=0)
    assert torch.equal(first[0], torch.full((7,), 2.0)) and torch.equal(second[0], torch.full((7,), 3.0))
    assert all(p.grad is None for p in server.parameters)
    # a delivered snapshot is recycled: the next release copies the master into the same buffers
    server.recycle(release.params)
    server.push(2, grad(1), version=1)
    (later,) = server.push(0, grad(1), version=1)
    assert later.params[0] is release.params[0]
    assert torch.equal(later.params[0], master(server)) and torch.equal(master(server), torch.full((7,), -3.0))


def test_an_answer_to_one_remote_worker_travels_in_its_own_idle_gradient_buffer() -> None:
    # a remote worker's receive buffer is idle once its gradient is applied, and it pushes into it again only
    # after reading its answer: the server writes that answer there instead of into a snapshot of its own
    server = make_server(workers=3, threshold=1)
    server.connect(answers_in_place={1, 2})
    gradient = grad(2)
    (alone,) = server.push(1, gradient, version=0)
    assert alone.in_place and alone.params[0] is gradient[0]
    assert torch.equal(gradient[0], master(server)) and torch.equal(master(server), torch.full((7,), -2.0))
    (local,) = server.push(0, grad(1), version=1)  # the local worker (not in answers_in_place): a snapshot
    assert not local.in_place and torch.equal(local.params[0], master(server))
    server.set_threshold(2)
    server.push(1, grad(1), version=2)
    (together,) = server.push(2, grad(1), version=2)  # one snapshot for both
    assert together.workers == (1, 2) and not together.in_place


def test_staleness_is_version_gap_at_application() -> None:
    server = make_server(workers=3, threshold=1)
    server.push(0, grad(1), version=0)  # v -> 1, staleness 0
    server.push(1, grad(1), version=1)  # v -> 2, staleness 0
    (release,) = server.push(2, grad(1), version=0)  # computed on v0, applied at v2
    assert release.staleness == {2: 2}
    assert server.version == 3
    assert server.stats.counts == {0: 2, 2: 1}
    assert server.stats.per_worker[2] == {2: 1}
    assert server.stats.mean == pytest.approx(2 / 3)
    assert server.stats.max == 2
    assert server.stats.quantile(0.5) == 0 and server.stats.quantile(1.0) == 2


def test_staleness_scaling_weighs_stale_gradients_down() -> None:
    server = make_server(workers=2, threshold=1, staleness_scaling=True)
    server.push(0, grad(1), version=0)  # fresh: weight 1, master -1
    server.push(0, grad(1), version=1)  # fresh: master -2
    (release,) = server.push(1, grad(3), version=0)  # staleness 2: weight 1/3, master -3
    assert release.staleness == {1: 2}
    assert torch.allclose(master(server), torch.full((7,), -3.0))


def test_staleness_is_weighed_by_how_far_the_model_moved_in_sync_updates() -> None:
    # group_scaling="step", N = 4: an update of k gradients moves k/4 of a sync update, so a gradient 2 updates of
    # one gradient stale has missed half a sync update: weight 1 / (1 + 2/4), where counting updates gives 1/3
    server = make_server(workers=4, threshold=1, staleness_scaling=True, group_scaling="step")
    server.push(0, grad(4), version=0)  # master -1 (4 * 1/4)
    server.push(0, grad(4), version=1)  # master -2
    (release,) = server.push(1, grad(6), version=0)  # 6 * 1/4 * 2/3 = 1: master -3
    assert release.staleness == {1: 2}
    assert torch.allclose(master(server), torch.full((7,), -3.0))
    # K = 2: one update of two gradients moves as far as two updates of one; the gradient weighs the same
    server.set_threshold(2)
    server.push(0, grad(0), version=3)
    server.push(2, grad(0), version=3)  # version 4: moved another half sync update
    server.push(3, grad(9), version=0)  # 4 updates stale, 3 * 1/4 + 2/4 sync updates moved: weight 4/9
    (release,) = server.push(1, grad(3), version=3)  # 1 update stale, half a sync update moved: weight 2/3
    assert release.staleness == {3: 4, 1: 1}
    # (9 * 4/9 + 3 * 2/3) / 2 gradients * 2/4 of a sync step = 1.5
    assert torch.allclose(master(server), torch.full((7,), -4.5))
    # the movement is kept only for versions a worker holds: memory does not grow with the updates
    for _ in range(100):
        for worker in range(4):
            server.push(worker, grad(0), version=server.version)
    assert len(server._moved_at) <= 4


def test_k_equal_n_is_synchronous_sgd() -> None:
    server = make_server(workers=3, threshold=3, lr=0.5)
    for step in range(4):
        for worker in (2, 0):
            assert server.push(worker, grad(worker + step), version=step) == []
        (release,) = server.push(1, grad(1 + step), version=step)
        assert release.workers == (0, 1, 2) and release.version == step + 1
    expected = -0.5 * sum((0 + 1 + 2) / 3 + s for s in range(4))
    assert torch.allclose(master(server), torch.full((7,), expected))
    assert server.stats.counts == {0: 12}


def test_lowering_threshold_applies_pending_at_once_and_raising_waits() -> None:
    server = make_server(workers=4, threshold=4)
    server.push(0, grad(1), version=0)
    server.push(1, grad(1), version=0)
    (release,) = server.set_threshold(2)
    assert release.workers == (0, 1) and server.version == 1
    assert server.set_threshold(3) == []
    server.push(0, grad(1), version=1)
    assert server.push(3, grad(1), version=0) == []
    (release,) = server.push(2, grad(1), version=0)
    assert release.workers == (0, 2, 3)
    assert release.staleness == {0: 0, 2: 1, 3: 1}


def test_drain_is_a_barrier_that_flushes_partial_updates() -> None:
    server = make_server(workers=3, threshold=3)
    assert server.push(0, grad(3), version=0) == []
    assert server.drain(1) == []
    # worker 2 drains too: everyone waits, so the pending gradient of worker 0 is applied alone ...
    (partial,) = server.drain(2)
    assert partial.workers == (0,) and not partial.drained and server.version == 1
    assert server.flushed_updates == 1
    assert torch.equal(master(server), torch.full((7,), -3.0))
    # ... and worker 0 continues; its drain completes the barrier for all three
    (done,) = server.drain(0)
    assert done.drained and done.workers == (0, 1, 2) and done.version == 1


def test_push_with_drain_waits_for_the_barrier() -> None:
    server = make_server(workers=2, threshold=1)
    assert server.push(0, grad(1), version=0, drain=True) == []  # applied, but 0 waits for the barrier
    assert server.version == 1
    (done,) = server.push(1, grad(1), version=0, drain=True)  # applied; now everyone drains
    assert done.drained and done.workers == (0, 1)
    assert server.version == 2


def test_leave_caps_threshold_at_active_workers() -> None:
    server = make_server(workers=3, threshold=3)
    server.push(0, grad(1), version=0)
    server.push(1, grad(1), version=0)
    (release,) = server.leave(2)
    assert release.workers == (0, 1) and server.version == 1
    assert server.active_workers == {0, 1}
    with pytest.raises(ProtocolError, match="has left"):
        server.push(2, grad(1), version=1)


def test_non_finite_gradient_is_rejected_and_master_untouched() -> None:
    server = make_server(workers=2, threshold=2)
    before = master(server).clone()
    (release,) = server.push(1, [torch.tensor([1.0, float("nan"), 0, 0, 0, 0, float("inf")])], version=0)
    assert release.rejected == (1,) and release.workers == (1,) and release.version == 0
    assert torch.equal(master(server), before)
    assert server.rejected == {1: 1} and server.version == 0
    server.push(0, grad(1), version=0)
    (release,) = server.push(1, grad(1), version=0)
    assert release.workers == (0, 1) and torch.isfinite(master(server)).all()


@pytest.mark.parametrize(
    "values, finite",
    [
        ([3e38, 3e38, 0, 0, 0, 0, 0], True),  # finite, though the sum overflows: accepted
        ([float("inf"), float("-inf"), 0, 0, 0, 0, 0], False),  # the sum is NaN
        ([0, 0, 0, 0, 0, 0, float("-inf")], False),
    ],
)
def test_finiteness_is_judged_element_wise(values: list[float], finite: bool) -> None:
    server = make_server(workers=1, threshold=1, lr=0.0)
    (release,) = server.push(0, [torch.tensor(values)], version=0)
    assert release.rejected == (() if finite else (0,))


def test_rejection_in_a_drain_is_reported_when_the_drain_completes() -> None:
    server = make_server(workers=2, threshold=1)
    nan = [torch.full((7,), float("nan"))]
    assert server.push(1, nan, version=0, drain=True) == []
    (done,) = server.drain(0)
    assert done.drained and done.rejected == (1,) and server.rejected == {1: 1}


def test_protocol_errors_name_the_problem() -> None:
    server = make_server(workers=2, threshold=2)
    with pytest.raises(ProtocolError, match="version 5"):
        server.push(0, grad(1), version=5)
    with pytest.raises(ProtocolError, match="unknown worker 7"):
        server.push(7, grad(1), version=0)
    with pytest.raises(ProtocolError, match="same model"):
        server.push(0, [torch.zeros(6)], version=0)
    with pytest.raises(ProtocolError, match="same model"):
        server.push(0, [torch.zeros(7, dtype=torch.float64)], version=0)
    server.push(0, grad(1), version=0)
    with pytest.raises(ProtocolError, match="still waits"):
        server.push(0, grad(1), version=0)
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        server.set_threshold(3)


def test_an_early_push_is_held_until_its_workers_pending_gradient_is_applied() -> None:
    # early_pushes (a pipelined worker): worker 0 pushes its next gradient before its answer; it waits, held,
    # and joins the pending set the moment the update that answers worker 0 is applied
    server = make_server(workers=2, threshold=2, early_pushes=True)
    first, second = grad(1), grad(5)
    assert server.push(0, first, version=0) == []
    assert server.push(0, second, version=0) == []  # held: the pending sum lives in `first`, not touched
    assert server.pending_workers == {0} and torch.equal(second[0], torch.full((7,), 5.0))
    (release,) = server.push(1, grad(3), version=0)
    assert release.workers == (0, 1) and release.staleness == {0: 0, 1: 0}
    assert torch.equal(master(server), torch.full((7,), -2.0))  # the mean of 1 and 3: the held one waits
    assert server.pending_workers == {0}  # the held push arrived, computed on version 0
    (later,) = server.push(1, grad(1), version=1)
    assert later.staleness == {0: 1, 1: 0} and server.version == 2
    assert torch.equal(master(server), torch.full((7,), -5.0))  # minus the mean of 5 and 1


def test_held_pushes_of_a_whole_group_all_arrive() -> None:
    # K = N = 3, every worker pipelined: the update that answers them lets all three held pushes arrive
    server = make_server(workers=3, threshold=3, early_pushes=True)
    for worker in (0, 1):
        server.push(worker, grad(1), version=0)
        server.push(worker, grad(2), version=0)
    (release,) = server.push(2, grad(1), version=0)
    assert release.workers == (0, 1, 2) and server.pending_workers == {0, 1}
    (second,) = server.push(2, grad(2), version=1)
    assert second.staleness == {0: 1, 1: 1, 2: 0} and torch.equal(master(server), torch.full((7,), -3.0))


def test_a_third_push_before_the_first_answer_is_a_protocol_error() -> None:
    server = make_server(workers=2, threshold=2, early_pushes=True)
    server.push(0, grad(1), version=0)
    server.push(0, grad(1), version=0)
    with pytest.raises(ProtocolError, match="third gradient"):
        server.push(0, grad(1), version=0)


def test_a_pipelined_workers_answer_before_its_last_stays_weighable() -> None:
    # a pipelined worker's push carries the version of the answer before its last: the server must still know
    # how far the model moved since then (staleness_scaling), however far it forgot older versions
    server = make_server(workers=1, threshold=1, staleness_scaling=True, early_pushes=True)
    server.push(0, grad(1), version=0)  # answered with version 1
    (second,) = server.push(0, grad(1), version=0)  # pushed before that answer came: version 0, staleness 1
    assert second.staleness == {0: 1}
    (third,) = server.push(0, grad(2), version=1)  # computed on the first answer, pushed before the second's
    assert third.staleness == {0: 1} and server.version == 3
    assert torch.allclose(master(server), torch.full((7,), -1.0 - 0.5 - 1.0))  # weights 1, 1/2, 1/2


def test_a_leaving_workers_held_push_is_not_absorbed() -> None:
    # its batch is not in the master: a recovery trains it again
    server = make_server(workers=2, threshold=2, early_pushes=True)
    server.push(0, grad(1), version=0, work=10)
    server.push(0, grad(1), version=0, work=11)
    assert server.leave(0) == []  # its pending gradient is applied (K is capped at 1 active worker), unanswered
    assert server.absorbed == {10} and server.version == 1 and server.pending_workers == set()


def test_clipping_applies_to_the_aggregated_gradient() -> None:
    server = make_server(workers=2, threshold=2, gradient_clipping=GradientClipping(1.0, "norm"))
    server.push(0, grad(4), version=0)
    server.push(1, grad(0), version=0)
    # mean gradient 2 per element, norm 2 * sqrt(7) -> clipped to norm 1
    assert master(server).norm().item() == pytest.approx(1.0, rel=1e-5)


def test_hyperparameters_follow_the_reference_optimizer() -> None:
    groups = [{"lr": 0.25}]
    server = make_server(workers=1, threshold=1, hyperparameters=lambda: groups)
    server.push(0, grad(1), version=0)
    assert torch.allclose(master(server), torch.full((7,), -0.25))
    assert server.optimizer.param_groups[0]["lr"] == 0.25


def test_progress_state_round_trip() -> None:
    server = make_server(workers=2, threshold=1)
    server.push(0, grad(1), version=0)
    server.push(1, grad(1), version=0)
    copy = make_server(workers=2, threshold=2)
    copy.load_progress_state(server.progress_state())
    assert copy.progress_state() == server.progress_state()
    assert copy.version == 2 and copy.threshold == 1


def test_clone_optimizer_keeps_groups_and_hyperparameters() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}], lr=0.3, momentum=0.9)
    clone = clone_optimizer(optimizer, [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))])
    assert [g["lr"] for g in clone.param_groups] == [0.1, 0.2]
    assert all(g["momentum"] == 0.9 for g in clone.param_groups)
    with pytest.raises(ValueError, match="holds 2 parameters"):
        clone_optimizer(optimizer, [torch.nn.Parameter(torch.ones(2))])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),  # its defaults hold a base's argument
        lambda p: torch.optim.NAdam(p, lr=0.01, decoupled_weight_decay=True, weight_decay=0.1),
        lambda p: torch.optim.RAdam(p, lr=0.01),
        lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
        lambda p: torch.optim.Adagrad(p, lr=0.1),
        lambda p: torch.optim.Adadelta(p),
        lambda p: torch.optim.Adamax(p, lr=0.01),
        lambda p: torch.optim.Adafactor(p, lr=0.01),
    ],
    ids=[
        "sgd-nesterov",
        "adam-amsgrad",
        "adamw",
        "nadam-decoupled",
        "radam",
        "rmsprop",
        "adagrad",
        "adadelta",
        "adamax",
        "adafactor",
    ],
)
def test_a_cloned_optimizer_steps_as_the_original(make) -> None:
    original = [torch.nn.Parameter(torch.linspace(-1, 1, 6).reshape(2, 3))]
    optimizer = make(original)
    clone = clone_optimizer(optimizer, [torch.nn.Parameter(original[0].detach().clone())])
    assert type(clone) is type(optimizer)
    for step in range(3):
        for ours in (optimizer, clone):
            (param,) = ours.param_groups[0]["params"]
            param.grad = torch.full_like(param, 0.5 - step)
            ours.step()
    assert torch.equal(clone.param_groups[0]["params"][0], original[0])


def decaying_server(workers: int, **kwargs) -> ParameterServer:
    """Two tensors of ones under SGD with momentum and weight decay, K = N: any step moves a tensor."""
    params = [torch.ones(2, 2), torch.ones(3)]
    return ParameterServer(
        params,
        lambda master: torch.optim.SGD(master, lr=0.1, momentum=0.9, weight_decay=0.1),
        num_workers=workers,
        threshold=workers,
        **kwargs,
    )


@pytest.mark.parametrize("clipping", ["norm", "value"])
def test_a_frozen_parameter_gets_no_update_not_even_weight_decay(clipping: str) -> None:
    # as under DDP, where a frozen parameter has no grad and the optimizer skips it; clipping sees only the others.
    # The worker names it unused (its .grad is None), whether it was frozen when fit started or later
    server = decaying_server(1, gradient_clipping=GradientClipping(0.05, clipping))
    server.push(0, grad(1.0), version=0, unused=frozenset({0}))
    server.push(0, grad(1.0), version=1, unused=frozenset({0}))
    frozen, trained = server.parameters
    assert torch.equal(frozen.detach(), torch.ones(2, 2)) and frozen.grad is None
    assert (trained.detach() < 1).all()


def test_a_tensor_that_no_gradient_of_an_update_used_gets_no_step() -> None:
    # as DDP with find_unused_parameters=True: a parameter no rank used keeps grad None, so momentum and weight decay
    # leave it alone; one that some gradient of the update used gets the mean, the others' zeros included
    server = decaying_server(2)
    server.push(0, [torch.cat([torch.ones(4), torch.zeros(3)])], version=0, unused=frozenset({1}))
    server.push(1, [torch.cat([torch.ones(4), torch.zeros(3)])], version=0, unused=frozenset({1}))
    first, second = server.parameters
    assert torch.equal(second.detach(), torch.ones(3)), "no gradient used it: no weight decay, no momentum state"
    assert second not in server.optimizer.state and first in server.optimizer.state
    # one worker used it, one did not: the mean of (2, 0) is 1, plus weight decay 0.1 of the weight 1
    server.push(0, [torch.cat([torch.ones(4), torch.full((3,), 2.0)])], version=1)
    server.push(1, [torch.cat([torch.ones(4), torch.zeros(3)])], version=1, unused=frozenset({1}))
    assert torch.allclose(second.detach(), torch.full((3,), 1 - 0.1 * 1.1))


def test_server_is_thread_safe_under_concurrent_pushes() -> None:
    import threading

    server = make_server(workers=4, threshold=2)
    versions = {w: 0 for w in range(4)}
    answered = threading.Semaphore(0)
    lock = threading.Lock()
    events = {w: threading.Event() for w in range(4)}

    def deliver(releases) -> None:
        for release in releases:
            for w in release.workers:
                with lock:
                    versions[w] = release.version
                events[w].set()

    def worker(w: int) -> None:
        for _ in range(50):
            events[w].clear()
            deliver(server.push(w, grad(1), versions[w], drain=False))
            events[w].wait(5)
        events[w].clear()
        deliver(server.drain(w))
        events[w].wait(5)
        answered.release()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(server.update_sizes.values()) == server.version
    assert sum(k * n for k, n in server.update_sizes.items()) == 200
    assert server.stats.total == 200
    assert not server.pending_workers
