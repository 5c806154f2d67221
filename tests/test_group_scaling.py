"""Updates sized to their group and the staleness bound, on the server in one process (no torch.distributed)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_hybrid.group_scaling import GroupScale, GroupScaling
from lightning_hybrid.server import GradientClipping, ParameterServer

WORKERS = 4


def make_server(make_optimizer, threshold: int = 1, **kwargs) -> ParameterServer:
    return ParameterServer([torch.zeros(3)], make_optimizer, num_workers=WORKERS, threshold=threshold, **kwargs)


def sgd(**options):
    return lambda params: torch.optim.SGD(params, **{"lr": 1.0, **options})


def master(server: ParameterServer) -> torch.Tensor:
    return server.parameters[0].detach().clone()


def ones(value: float = 1.0) -> list[torch.Tensor]:
    return [torch.full((3,), value)]


@pytest.mark.parametrize("rule, factor", [("step", 0.25), ("sqrt_step", 0.5), ("none", 1.0)])
def test_sgd_update_of_one_gradient_moves_its_share_of_a_sync_update(rule: str, factor: float) -> None:
    server = make_server(sgd(), group_scaling=rule)
    server.push(0, ones(), version=0)
    assert torch.allclose(master(server), torch.full((3,), -factor))
    assert server.step_scale_total == pytest.approx(factor)


@pytest.mark.parametrize("rule", ["step", "sqrt_step", "momentum"])
def test_a_full_group_is_exactly_the_plain_mean(rule: str) -> None:
    # K = N must stay DDP: bit for bit the same as no scaling, weight decay and momentum included
    results = []
    for name in (rule, "none"):
        server = make_server(sgd(momentum=0.9, weight_decay=0.1), threshold=WORKERS, group_scaling=name)
        for version in range(3):
            for worker in range(WORKERS):
                server.push(worker, ones(worker + 1.5), version=version)
        results.append(master(server))
    assert torch.equal(results[0], results[1])


def test_sgd_weight_decay_is_scaled_with_the_gradient_and_restored() -> None:
    server = make_server(sgd(weight_decay=0.5), group_scaling="step")
    server.parameters[0].data.fill_(2.0)
    server.push(0, ones(), version=0)
    # 2 - 1 * (0.25 * 1 + 0.25 * 0.5 * 2) = 1.5: the decay per sample is sync's too
    assert torch.allclose(master(server), torch.full((3,), 1.5))
    assert server.optimizer.param_groups[0]["weight_decay"] == 0.5 and server.optimizer.param_groups[0]["lr"] == 1.0


def test_sgd_momentum_buffer_holds_each_update_at_its_own_scale() -> None:
    # the factor sits on the gradient, so an earlier small update stays small in the momentum buffer
    server = make_server(sgd(momentum=0.5), group_scaling="step")
    server.push(0, ones(), version=0)  # k = 1: buffer 0.25
    server.set_threshold(WORKERS)
    for worker in range(WORKERS):
        server.push(worker, ones(), version=1)  # k = N: buffer 0.5 * 0.25 + 1 = 1.125
    assert torch.allclose(master(server), torch.full((3,), -(0.25 + 1.125)))


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_adaptive_optimizers_take_the_factor_on_the_learning_rate(optimizer) -> None:
    scaled = make_server(lambda p: optimizer(p, lr=0.1, weight_decay=0.01), group_scaling="step")
    reference = make_server(lambda p: optimizer(p, lr=0.025, weight_decay=0.01), group_scaling="none")
    for server in (scaled, reference):
        server.push(0, ones(3.0), version=0)
    assert torch.allclose(master(scaled), master(reference))
    assert scaled.optimizer.param_groups[0]["lr"] == 0.1, "the user's lr is restored after the step"


def test_momentum_rule_keeps_the_noise_scale_and_falls_back_to_the_gradient_at_zero() -> None:
    groups = [{"momentum": 0.9, "lr": 1.0, "weight_decay": 0.0}]
    scaling = GroupScaling("momentum", torch.optim.SGD([torch.zeros(1)], lr=1.0, momentum=0.9), num_workers=4)
    (two,) = scaling.scales(groups, 2)
    assert two.momentum == pytest.approx(0.8) and two.gradient == 1.0 and two.step == pytest.approx(0.5)
    (one,) = scaling.scales(groups, 1)
    assert one.momentum == pytest.approx(0.6)
    # N = 16 >= 1 / (1 - m): m_1 would be -0.6, so m_1 = 0 and the gradient carries (1/16) / 0.1
    wide = GroupScaling("momentum", torch.optim.SGD([torch.zeros(1)], lr=1.0, momentum=0.9), num_workers=16)
    (floor,) = wide.scales(groups, 1)
    assert floor.momentum == 0.0 and floor.gradient == pytest.approx(0.625)
    assert floor.gradient / (1 - floor.momentum) == pytest.approx((1 / 16) / (1 - 0.9)), "noise scale per sample"


def test_momentum_rule_starts_from_rank_0s_scheduled_momentum() -> None:
    scheduled = [{"lr": 1.0, "momentum": 0.95, "weight_decay": 0.0}]
    server = make_server(sgd(momentum=0.9), group_scaling="momentum", hyperparameters=lambda: scheduled)
    server.push(0, ones(), version=0)
    assert server.momentum_total == pytest.approx(1 - 4 * 0.05)
    assert server.optimizer.param_groups[0]["momentum"] == 0.95, "the base momentum is back after the step"


def test_clipping_takes_the_mean_before_the_factor() -> None:
    server = make_server(sgd(), threshold=2, group_scaling="step", gradient_clipping=GradientClipping(1.0))
    server.push(0, ones(10.0), version=0)
    server.push(1, ones(10.0), version=0)
    # the mean (norm 10 * sqrt(3)) is clipped to norm 1, then moved 2/4 of a sync step
    assert torch.linalg.vector_norm(master(server)).item() == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize(
    "rule, make_optimizer, match",
    [
        ("fast", sgd(), "unknown group_scaling 'fast'"),
        ("momentum", lambda p: torch.optim.Adam(p), "bias correction.*group_scaling='step'"),
        ("momentum", sgd(), "momentum=0.*group_scaling='step'"),
    ],
)
def test_rules_an_optimizer_cannot_take_are_refused_with_the_fix(rule, make_optimizer, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_server(make_optimizer, group_scaling=rule)


def test_an_optimizer_without_a_learning_rate_is_refused() -> None:
    class NoLearningRate(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"decay": 0.5})

        def step(self, closure=None):
            return None

    with pytest.raises(ValueError, match="no 'lr'.*group_scaling='none'"):
        make_server(NoLearningRate, group_scaling="step")


# ---------------------------------------------------------------------------- staleness bound
def test_a_gradient_staler_than_the_bound_is_dropped_and_its_worker_answered_with_the_latest() -> None:
    server = make_server(sgd(), group_scaling="none", max_staleness=1)
    for version in range(2):
        server.push(0, ones(), version=version)
    assert server.version == 2
    (release,) = server.push(1, ones(100.0), version=0)  # staleness 2 > 1
    assert release.workers == (1,) and release.dropped == (1,) and release.version == 2
    assert torch.equal(release.params[0], master(server)) and torch.equal(master(server), torch.full((3,), -2.0))
    assert server.dropped == {1: 1} and sum(server.stats.counts.values()) == 2, (
        "a dropped gradient is not an applied one"
    )
    (applied,) = server.push(1, ones(), version=1)  # staleness 1: applied
    assert applied.dropped == () and server.version == 3
    assert server.progress_state()["dropped"] == {1: 1}


def test_a_dropped_drain_is_not_a_drain_until_the_batch_comes_again() -> None:
    server = make_server(sgd(), threshold=2, group_scaling="none", max_staleness=1)
    server.set_threshold(1)
    for version in range(3):
        server.push(0, ones(), version=version)
    (dropped,) = server.push(1, ones(), version=0, drain=True)
    assert dropped.dropped == (1,) and not dropped.drained
    assert server.drain(0) == [] and server.drain(2) == [] and server.drain(3) == [], "worker 1 still owes its drain"
    releases = server.push(1, ones(), version=3, drain=True)
    assert releases[-1].drained and set(releases[-1].workers) == {0, 1, 2, 3}


@pytest.mark.parametrize("bound", [0, -1, 1.5, True])
def test_a_bound_below_one_or_not_an_int_is_refused(bound) -> None:
    with pytest.raises(ValueError, match="max_staleness"):
        make_server(sgd(), max_staleness=bound)


def test_new_counters_survive_the_progress_state() -> None:
    server = make_server(sgd(momentum=0.9), group_scaling="momentum", max_staleness=1)
    for version in range(2):
        server.push(0, ones(), version=version)
    server.push(2, ones(), version=0)
    restored = make_server(sgd(momentum=0.9), group_scaling="momentum", max_staleness=1)
    restored.load_progress_state(server.progress_state())
    assert restored.progress_state() == server.progress_state()
    assert restored.dropped == {2: 1} and math.isclose(restored.momentum_total, 1.2)


def test_auto_scales_sgds_momentum_and_every_other_optimizers_learning_rate() -> None:
    groups = [{"lr": 1.0, "momentum": 0.9, "weight_decay": 0.0}]
    sgd_auto = GroupScaling("auto", torch.optim.SGD([torch.zeros(1)], lr=1.0, momentum=0.9), num_workers=4)
    assert sgd_auto.scales(groups, 2) == GroupScaling(
        "momentum", torch.optim.SGD([torch.zeros(1)], lr=1.0, momentum=0.9), 4
    ).scales(groups, 2)
    # plain SGD: the momentum rule falls to m_k = 0 with the whole factor on the gradient, which is the step rule
    plain = [{"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}]
    without = GroupScaling("auto", torch.optim.SGD([torch.zeros(1)], lr=1.0), num_workers=4).scales(plain, 1)
    assert without == [GroupScale(gradient=0.25, weight_decay=0.25, momentum=0.0, step=0.25)]
    adam = GroupScaling("auto", torch.optim.Adam([torch.zeros(1)]), num_workers=4)
    assert adam.scales([{"lr": 1.0}], 2) == [GroupScale(lr=0.5, step=0.5)]
