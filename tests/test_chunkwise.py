"""overlap_answers' chunk stepper (lightning_hybrid.chunkwise), driven in one process: whatever it steps ahead
of the server must end as the server's own update would, and where the update is not the one it assumed (a
NaN/Inf gradient, a tensor left unused unlike the last update, a lowered K) it must put its chunks back."""

from __future__ import annotations

import pytest
import torch
from conftest import launch, results
from test_config_errors import fit

from lightning_hybrid import HybridSGDStrategy
from lightning_hybrid.app.models import MLPClassifier
from lightning_hybrid.chunkwise import ChunkStepper
from lightning_hybrid.errors import HybridSGDError
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.server import ParameterServer
from lightning_hybrid.shards import ShardPlan

WORKERS = 3
SHAPES = [torch.Size([7, 5]), torch.Size([5]), torch.Size([3, 7]), torch.Size([3])]  # 64 elements


def servers(seed: int = 0) -> tuple[ParameterServer, ParameterServer, ChunkStepper]:
    """A striped server with a chunk stepper (stripes of 10 elements: 7 chunks, some cutting tensors) and a plain
    server, from the same parameters and Adam."""
    torch.manual_seed(seed)
    tensors = [torch.randn(shape) for shape in SHAPES]
    plan = ShardPlan(FlatLayout.of(tensors), 1, stripe_elements=10)
    pieces = plan.piece_tensors(0, tensors)  # stripe by stripe, some tensors cut in two

    def make(layout=None) -> ParameterServer:
        return ParameterServer(
            [p.clone() for p in pieces],
            lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.1),
            num_workers=WORKERS,
            threshold=WORKERS,
            layout=layout,
        )

    striped = make(plan.layouts[0])
    local = plan.layouts[0].allocate()
    stepper = ChunkStepper(striped, 0, plan.layouts[0].chunk_views(local), {}, peer_timeout=10)
    striped.connect(chunk_stepper=stepper)
    assert stepper.chunks == 7
    return striped, make(), stepper


def push(
    striped: ParameterServer,
    plain: ParameterServer,
    stepper: ChunkStepper,
    worker: int,
    gradient: list[torch.Tensor],
    unused: frozenset[int] = frozenset(),
) -> None:
    """One worker's push to both servers; the striped one gets its chunks first, in a scrambled order."""
    arrive(stepper, worker, gradient)
    striped.push(worker, stepper.buffers[worker], striped.version, unused=unused)
    plain.push(worker, [g.clone() for g in gradient], plain.version, unused=unused)


def arrive(stepper: ChunkStepper, worker: int, gradient: list[torch.Tensor]) -> None:
    """A worker's chunks come, before its push's verdict."""
    for mine, given in zip(stepper.buffers[worker], gradient):
        mine.copy_(given)
    for chunk in torch.randperm(stepper.chunks).tolist():
        stepper.arrived(worker, chunk)


def assert_same_master(striped: ParameterServer, plain: ParameterServer) -> None:
    assert striped.version == plain.version
    for a, b in zip(striped.parameters, plain.parameters):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def gradient(layout: FlatLayout) -> list[torch.Tensor]:
    return [torch.randn(n) for n in layout.sizes]


def test_chunks_stepped_ahead_make_exactly_the_servers_update() -> None:
    striped, plain, stepper = servers()
    before = [p.detach().clone() for p in plain.parameters]
    for _ in range(4):
        for worker in range(WORKERS):
            push(striped, plain, stepper, worker, gradient(striped.layout))
        assert_same_master(striped, plain)
    assert striped.updates_stepped_ahead == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, plain.parameters))
    assert stepper.answer(0) == ([], False)  # the local worker got every chunk, none was put back


def test_a_nan_gradient_puts_every_stepped_chunk_back() -> None:
    striped, plain, stepper = servers(1)
    push(striped, plain, stepper, 0, gradient(striped.layout))
    push(striped, plain, stepper, 2, gradient(striped.layout))
    bad = gradient(striped.layout)
    bad[0][-1] = float("nan")  # the last chunk: every other chunk was stepped with this gradient before
    push(striped, plain, stepper, 1, bad)
    assert striped.rejected[1] == plain.rejected[1] == 1 and striped.version == 0
    assert_same_master(striped, plain)
    missing, stale = stepper.answer(0)
    assert stale and len(missing) < stepper.chunks  # the local worker's chunks are stale: the whole slice follows
    push(striped, plain, stepper, 1, gradient(striped.layout))  # computed again
    assert_same_master(striped, plain)
    assert striped.updates_stepped_ahead == 0  # that update was summed and stepped whole
    for worker in range(WORKERS):
        push(striped, plain, stepper, worker, gradient(striped.layout))
    assert_same_master(striped, plain)
    assert striped.updates_stepped_ahead == 1


def test_a_tensor_no_gradient_used_is_left_alone_as_the_server_leaves_it() -> None:
    # the stepper assumes the last update's unused tensors (a frozen layer stays frozen): the first update with
    # tensor 1 unused is put back, the next two are stepped ahead; one that uses it again is put back
    striped, plain, stepper = servers(2)
    put_back = []
    for unused in [{1}, {1}, {1}, set()]:
        for worker in range(WORKERS):
            push(striped, plain, stepper, worker, gradient(striped.layout), unused=frozenset(unused))
        assert_same_master(striped, plain)
        put_back.append(stepper.answer(0)[1])  # the local worker's answer: its chunks were put back, or not
    assert put_back == [True, False, False, True]
    assert striped.updates_stepped_ahead == 2


def test_a_threshold_lowered_mid_update_puts_the_chunks_back() -> None:
    striped, plain, stepper = servers(3)
    gradients = [gradient(striped.layout) for _ in range(WORKERS)]
    for worker, given in enumerate(gradients):  # every chunk stepped ahead with all three gradients
        arrive(stepper, worker, given)
    for worker in (0, 1):
        striped.push(worker, stepper.buffers[worker], 0)
        plain.push(worker, [g.clone() for g in gradients[worker]], 0)
    striped.set_threshold(2)  # applies the two pending gradients alone
    plain.set_threshold(2)
    assert striped.version == plain.version == 1
    assert_same_master(striped, plain)
    assert striped.updates_stepped_ahead == 0
    assert stepper.answer(0)[1]  # the local worker got chunks that were put back


def test_a_snapshot_mid_update_holds_the_version_before_it() -> None:
    striped, plain, stepper = servers(4)
    for worker in range(WORKERS):
        push(striped, plain, stepper, worker, gradient(striped.layout))
    for worker in range(WORKERS):  # every chunk of the next update stepped ahead, before the last push's verdict
        for mine, given in zip(stepper.buffers[worker], gradient(striped.layout)):
            mine.copy_(given)
        for chunk in range(stepper.chunks):
            stepper.arrived(worker, chunk)
    expected = plain.snapshot()
    taken = striped.snapshot()
    for a, b in zip(taken.master, expected.master):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for piece, state in expected.optimizer_state["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(taken.optimizer_state["state"][piece][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_answers_chunk_by_chunk_train_exactly_as_ddp(tmp_path, optimizer: str) -> None:
    # 3 ranks, shares 1 : 2 : 0.5, K = N: every update is stepped ahead, chunk by chunk, on every shard. Adam; SGD
    # with momentum, a StepLR, clipping by value (per chunk), accumulation of 2, BatchNorm, weight decay and the first
    # layer frozen in epoch 0 (the stepper assumes the last update's unused tensors: on a shard holding pieces of
    # the layer the first update of each epoch is put back and stepped whole, as it is not what was assumed)
    args = "--devices 3 --epochs 2 --batches 8 --shard-server --overlap-push --overlap-answers --shard-weights 1,2,0.5"
    if optimizer == "sgd":
        args += " --batch-norm --weight-decay 0.01 --frozen-epochs 0"
    launch("ddp_equivalence", tmp_path, args, f"--optimizer {optimizer}")
    ranks = results(tmp_path, 3)
    for rank in ranks:
        difference = max(
            (rank["ddp"][k].double() - rank["hybrid_sgd"][k].double()).abs().max().item() for k in rank["ddp"]
        )
        moved = max((rank["ddp"][k].double() - rank["initial"][k].double()).abs().max().item() for k in rank["ddp"])
        assert difference <= 1e-4 < moved
        assert rank["update_sizes"] == {3: rank["version"]}
        put_back = 2 if optimizer == "sgd" else 0
        assert rank["version"] - put_back <= rank["updates_stepped_ahead"] <= rank["version"]
    if optimizer == "sgd":
        assert any(rank["updates_stepped_ahead"] < rank["version"] for rank in ranks)  # the frozen set's changes
        first_layer = next(k for k in ranks[0]["ddp"] if k.startswith("net.1."))  # trained in epoch 1 only
        assert (ranks[0]["hybrid_sgd"][first_layer] - ranks[0]["initial"][first_layer]).abs().max() > 1e-3


@pytest.mark.multiprocess
def test_a_nan_gradient_at_k_n_puts_the_stepped_chunks_back_on_every_shard(tmp_path) -> None:
    # K = N; rank 1's gradient at its step 2 holds NaN: every shard had stepped chunks with it before the verdict
    args = "--devices 3 --threshold sync --epochs 2 --slow-rank 2 --delay 0.05 --nan-rank 1 --nan-step 2"
    launch("straggler", tmp_path, args, "--shard-server --overlap-push --overlap-answers")
    ranks = results(tmp_path, 3)
    for rank in ranks:
        assert rank["rejected"] == {1: 1}
        assert all(torch.isfinite(w).all() for w in rank["weights"].values())
        assert 0 < rank["progress"]["updates_stepped_ahead"] < rank["version"]
    for other in ranks[1:]:
        assert all(torch.equal(other["weights"][k], ranks[0]["weights"][k]) for k in other["weights"])


def test_one_rank_trains_with_answers_chunk_by_chunk_and_mixed_dtypes_are_refused() -> None:
    strategy = HybridSGDStrategy(threshold="sync", shard_server=True, overlap_push=True, overlap_answers=True)
    fit(MLPClassifier(optimizer="adam"), strategy)
    assert strategy.version == 3 and strategy.progress["updates_stepped_ahead"] == 3
    mixed = MLPClassifier()
    mixed.net[-1].double()
    strategy = HybridSGDStrategy(threshold="sync", shard_server=True, overlap_push=True, overlap_answers=True)
    with pytest.raises(HybridSGDError, match="needs every parameter in one dtype"):
        fit(mixed, strategy)
