"""The sharded server (``shard_server=True``): every rank serves a slice of the model.

The plan and the optimizer-state conversion in one process; then real multi-process runs: K = N equals DDP,
async shards agree on every update, checkpoints restore each shard exactly, bad combinations are refused.
"""

import collections
import random

import pytest
import torch
from conftest import launch, results
from lightning_fabric.utilities.exceptions import MisconfigurationException
from test_checkpoint import assert_same_optimizer_state
from test_config_errors import fit
from test_faults import run_failing

from lightning_hybrid import HybridSGDStrategy
from lightning_hybrid.app.models import MLPClassifier
from lightning_hybrid.errors import ProtocolError
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.server import FollowerServer, ParameterServer, clone_optimizer
from lightning_hybrid.shards import ShardPlan


def model_params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(5, 3), torch.randn(5), torch.randn(2, 5, dtype=torch.float64), torch.randn(7)]


@pytest.mark.parametrize("shards, weights", [(1, None), (2, None), (3, None), (7, None), (3, (1.0, 2.0, 0.5))])
def test_shards_cover_every_element_once_as_views_of_the_flat_buffers(shards: int, weights) -> None:
    params = model_params()
    layout = FlatLayout.of(params)
    plan = ShardPlan(layout, shards, weights)
    flat = layout.allocate()
    layout.pack(params, flat)
    seen = [torch.zeros(n, dtype=torch.int64) for n in layout.sizes]
    for shard in range(shards):
        views = plan.views(shard, flat)
        pieces = plan.piece_tensors(shard, params)
        # the shard's buffers are its pieces, concatenated per dtype, and alias the model's flat buffers
        assert [v.numel() for v in views] == list(plan.layouts[shard].sizes)
        storages = {b.untyped_storage().data_ptr() for b in flat}
        assert all(view.untyped_storage().data_ptr() in storages for view in views)
        packed = plan.layouts[shard].allocate()
        plan.layouts[shard].pack(pieces, packed)
        assert all(torch.equal(a, b) for a, b in zip(packed, views))
        for bucket, start, end in plan.stripes[shard]:
            seen[bucket][start:end] += 1
    assert all(bool((count == 1).all()) for count in seen)
    shares = [sum(end - start for _, start, end in stripes) for stripes in plan.stripes]
    expected = [layout.numel * w / sum(weights or [1] * shards) for w in weights or [1] * shards]
    assert all(abs(share - e) <= len(layout.sizes) for share, e in zip(shares, expected)), (shares, expected)


@pytest.mark.parametrize("shards, weights", [(2, None), (3, None), (3, (1.0, 2.0, 0.5))])
def test_striped_shards_cover_every_element_once_and_their_wire_chunks_are_views_of_the_flat_buffers(
    shards: int, weights
) -> None:
    params = model_params()  # 15 + 5 float32 elements, then 10 float64, then 7 float32
    layout = FlatLayout.of(params)
    plan = ShardPlan(layout, shards, weights, stripe_elements=4)
    flat = layout.allocate()
    layout.pack(params, flat)
    seen = [torch.zeros(n, dtype=torch.int64) for n in layout.sizes]
    for shard in range(shards):
        wire = plan.wire_views(shard, flat)
        packed = plan.layouts[shard].allocate()
        plan.layouts[shard].pack(plan.piece_tensors(shard, params), packed)
        # chunk i of a message to the shard, cut from its own buffers, is view i of the worker's, last stripe first
        chunks = plan.layouts[shard].chunk_views(packed)
        assert len(chunks) == len(wire) == len(plan.stripes[shard])
        assert all(torch.equal(chunk, view) for chunk, view in zip(chunks, wire))
        for bucket, start, end in plan.stripes[shard]:
            assert end - start <= 4
            seen[bucket][start:end] += 1
    assert all(bool((count == 1).all()) for count in seen)
    # stripes are dealt in proportion to the weights: each shard within one stripe of its share of all stripes
    counts = [len(stripes) for stripes in plan.stripes]
    share = [sum(counts) * w / sum(weights or [1] * shards) for w in weights or [1] * shards]
    assert all(abs(c - e) <= 1 for c, e in zip(counts, share)), (counts, share)
    with pytest.raises(ValueError, match="wire_views"):
        plan.views(0, flat)


@pytest.mark.parametrize("stripe_elements", [None, 4])
def test_optimizer_state_round_trips_through_shards_with_each_shards_step_count(stripe_elements) -> None:
    params = [torch.nn.Parameter(p.float()) for p in model_params()]
    reference = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], lr=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    reference.step()
    full = reference.state_dict()
    plan = ShardPlan(FlatLayout.of(params), 3, stripe_elements=stripe_elements)
    shard_states = []
    for shard in range(3):
        pieces = [torch.nn.Parameter(t.clone()) for t in plan.piece_tensors(shard, params)]
        optimizer = clone_optimizer(reference, pieces, plan.group_sizes(shard, reference))
        optimizer.load_state_dict(plan.shard_state(shard, full))
        if shard == 1:  # an asynchronous shard that stepped once more than the others
            for piece in pieces:
                piece.grad = torch.ones_like(piece)
            optimizer.step()
        shard_states.append(optimizer.state_dict())
    merged, scalars = plan.merge_states(shard_states, reference.param_groups)
    assert [g["params"] for g in merged["param_groups"]] == [g["params"] for g in full["param_groups"]]
    assert [g["lr"] for g in merged["param_groups"]] == [0.01, 0.1]
    for index in full["state"]:  # shards 0 and 2 hold exactly the reference's state; shard 1 stepped on
        unchanged = [torch.equal(merged["state"][index][k], full["state"][index][k]) for k in ("exp_avg", "exp_avg_sq")]
        assert unchanged == [index not in {p[0] for p in plan.pieces[1]}] * 2
    # the joined state slices back into each shard's own, step counts included
    for shard in range(3):
        restored = plan.shard_state(shard, merged, scalars[shard])
        for piece, state in shard_states[shard]["state"].items():
            for key, value in state.items():
                assert torch.equal(restored["state"][piece][key], value), (shard, piece, key)
    assert float(scalars[1][0]["step"]) == 2.0 and float(scalars[0][0]["step"]) == 1.0


def test_refusals_name_the_fix() -> None:
    class AdafactorModel(MLPClassifier):  # its second moment of a matrix is factored by rows and columns
        def configure_optimizers(self):
            return torch.optim.Adafactor(self.parameters())

    with pytest.raises(MisconfigurationException, match="element-wise optimizers only; Adafactor"):
        fit(AdafactorModel(), strategy=HybridSGDStrategy(shard_server=True))
    with pytest.raises(MisconfigurationException, match="gradient_clip_algorithm='value'"):
        fit(MLPClassifier(), strategy=HybridSGDStrategy(shard_server=True), gradient_clip_val=1.0)


def test_bad_shard_weights_are_refused_naming_the_fix() -> None:
    with pytest.raises(ValueError, match="set shard_server=True, or remove it"):
        HybridSGDStrategy(shard_weights=[1, 1])
    for bad in ([1, 0], [1, float("nan")], [1, "fast"], "1,1"):
        with pytest.raises(ValueError, match="shard_weights must be"):
            HybridSGDStrategy(shard_server=True, shard_weights=bad)
    with pytest.raises(ValueError, match="gives 2 shares for 1 ranks: give one per rank"):
        fit(MLPClassifier(), strategy=HybridSGDStrategy(shard_server=True, shard_weights=[1, 3]))
    with pytest.raises(
        ValueError, match="shard 1 of 3 would hold no parameter element with shard_weights=.* raise its weight"
    ):
        ShardPlan(FlatLayout.of([torch.zeros(10)]), 3, [2, 1e-3, 1])


def test_one_shard_trains_like_the_single_server() -> None:
    trainer = fit(MLPClassifier(), strategy=HybridSGDStrategy(shard_server=True))
    assert trainer.strategy.version == 3


@pytest.mark.parametrize("seed", range(6))
def test_a_follower_shard_applies_shard_0s_groups_whatever_the_arrival_order(seed: int) -> None:
    # Two shards of 4 workers serve the same (float64) parameters, so their masters must agree. Messages reach
    # each shard in its own random interleaving (FIFO per worker, as over a gloo pair), shard 0's decisions reach
    # the follower in random order, K moves at random, workers drain and leave; a worker pushes again only once
    # both shards answered it, as ShardedServerLink does. With a staleness bound shard 0 also decides which
    # gradients are dropped; a dropped push (and its drain) is sent again, as the strategy computes its batch again.
    # Pushes carry shard 0's version to every shard, as ShardedServerLink sends them.
    rng = random.Random(seed)
    torch.manual_seed(seed)
    start = [torch.randn(6, dtype=torch.float64)]
    # group_scaling="step": staleness weighed by how far updates of every size (flushed ones too) moved the model
    kwargs = dict(num_workers=4, threshold=2, group_scaling="step", staleness_scaling=True)
    kwargs.update(max_staleness=(1, None)[seed % 2])
    make_optimizer = lambda master: torch.optim.Adam(master, lr=0.1)  # noqa: E731
    servers = (ParameterServer(start, make_optimizer, **kwargs), FollowerServer(start, make_optimizer, **kwargs))
    inboxes = [{w: collections.deque() for w in range(4)} for _ in servers]
    decisions: list[tuple[int, tuple[int, ...]]] = []
    answered_by = {w: set() for w in range(4)}
    dropped_by = {w: set() for w in range(4)}
    last_push: dict[int, tuple] = {}
    versions = {w: [0, 0] for w in range(4)}
    active, waiting, in_a_drain, pushes = set(range(4)), set(), set(), 0

    servers[0].connect(on_decision=lambda version, group: decisions.append((version, group)))

    def deliver(shard: int, releases: list) -> None:
        for release in releases:
            for worker in release.workers:
                versions[worker][shard] = release.version
                answered_by[worker].add(shard)
                if worker in release.dropped:
                    dropped_by[worker].add(shard)
                if answered_by[worker] == {0, 1}:
                    answered_by[worker].clear()
                    dropped, dropped_by[worker] = dropped_by[worker], set()
                    assert dropped in (set(), {0, 1}), "both shards drop the same gradients"
                    waiting.discard(worker)
                    in_a_drain.discard(worker)
                    if dropped:
                        send(worker, last_push[worker])

    def send(worker: int, message: tuple) -> None:
        if message[0] != "leave":  # which needs no answer
            waiting.add(worker)
        if message[0] == "drain" or message[-1] is True:  # a drain, or a push that also drains
            in_a_drain.add(worker)
        if message[0] == "push":
            last_push[worker] = message
        for shard, inbox in enumerate(inboxes):
            inbox[worker].append(message if message[0] != "push" else (*message[:2], versions[worker][0], message[3]))

    def step(allow_new_messages: bool) -> None:
        nonlocal pushes
        idle = sorted(active - waiting)
        queued = [(shard, w) for shard, inbox in enumerate(inboxes) for w, q in inbox.items() if q]
        weights = {  # a rare leave, so that several workers stay for most of the run
            "push": 30 * bool(idle and allow_new_messages),
            "deliver": 40 * bool(queued),
            "decide": 20 * bool(decisions),
            "k": 5 * bool(allow_new_messages),
            "leave": 1 * bool(idle and allow_new_messages),
        }
        (action,) = rng.choices(list(weights), list(weights.values()))
        if action == "push":
            worker = rng.choice(idle)
            gradient = torch.randn(6, dtype=torch.float64)
            send(worker, ("push", gradient, 0, rng.random() < 0.15))
            pushes += 1
        elif action == "deliver":
            shard, worker = rng.choice(queued)
            kind, *rest = inboxes[shard][worker].popleft()
            server = servers[shard]
            if kind == "push":
                gradient, version, drain = rest
                deliver(shard, server.push(worker, [gradient.clone()], version, drain=drain))
            elif kind == "drain":
                deliver(shard, server.drain(worker))
            else:
                deliver(shard, server.leave(worker))
        elif action == "decide":
            version, group = decisions.pop(rng.randrange(len(decisions)))
            deliver(1, servers[1].decide(version, group))
        elif action == "k":
            deliver(0, servers[0].set_threshold(rng.randint(1, 4)))
        elif action == "leave" and len(active) > 1:
            worker = rng.choice(idle)
            send(worker, ("leave",))
            active.discard(worker)

    for _ in range(400):
        step(allow_new_messages=True)
    to_drain = active - in_a_drain  # the end of fit: every worker drains (once), after its answer
    while to_drain or any(q for inbox in inboxes for q in inbox.values()) or decisions:
        for worker in sorted(to_drain - waiting):
            send(worker, ("drain",))
            to_drain.discard(worker)
        step(allow_new_messages=False)
    assert not waiting, "every worker was answered by both shards"
    coordinator, follower = servers
    assert follower.version == coordinator.version and coordinator.version > 20
    assert follower.update_sizes == coordinator.update_sizes and len(coordinator.update_sizes) > 1
    assert sum(size * n for size, n in coordinator.update_sizes.items()) == pushes
    assert follower.stats.state_dict() == coordinator.stats.state_dict()
    assert follower.dropped == coordinator.dropped
    if kwargs["max_staleness"] is not None:
        assert sum(coordinator.dropped.values()) > 0, "the bound was tried"
    # the same gradients, weights and steps; only the order of additions in a sum may differ
    torch.testing.assert_close(follower.parameters[0], coordinator.parameters[0], rtol=1e-12, atol=1e-12)


def test_a_follower_refuses_a_decision_it_already_took() -> None:
    follower = FollowerServer([torch.zeros(3)], lambda p: torch.optim.SGD(p, lr=1.0), num_workers=2, threshold=1)
    follower.push(0, [torch.ones(3)], version=0)
    (release,) = follower.decide(1, [0])
    assert release.workers == (0,) and follower.version == 1
    with pytest.raises(ProtocolError, match="decisions are unique, non-empty and come after the current version"):
        follower.decide(1, [1])


@pytest.mark.multiprocess
def test_sharded_sync_matches_ddp_with_three_uneven_shards(tmp_path) -> None:
    # shares 1 : 2 : 0.5 of the model (shard_weights); SGD momentum, StepLR, clipping by value, accumulation of 2,
    # BatchNorm: 3 epochs x 8 batches -> 12 updates; the first layer frozen (but in the optimizer: no weight decay).
    # Slices stream to their shards during backward (overlap_push): only the backward before each step sends.
    launch(
        "ddp_equivalence",
        tmp_path,
        "--devices 3 --epochs 3 --batches 8 --batch-norm --shard-server --weight-decay 0.01 --overlap-push"
        " --shard-weights 1,2,0.5 --frozen-first-layer",
    )
    ranks = results(tmp_path, 3)
    for rank in ranks:
        difference = max(
            (rank["ddp"][k].double() - rank["hybrid_sgd"][k].double()).abs().max().item() for k in rank["ddp"]
        )
        assert difference <= 1e-4
        assert rank["version"] == 12  # every rank serves a shard: each applied 12 updates of 3 gradients
        assert rank["update_sizes"] == {3: 12}
    for other in ranks[1:]:
        assert all(torch.equal(other["hybrid_sgd"][k], ranks[0]["hybrid_sgd"][k]) for k in other["hybrid_sgd"])


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "streaming", ["", "--overlap-push", "--overlap-push --overlap-answers"], ids=["at-the-step", "streamed", "striped"]
)
def test_async_shards_reject_the_same_nan_gradient_and_never_wait(tmp_path, streaming: str) -> None:
    # K = 1; rank 2 sleeps 0.3 s per step (0.1 s left fast ranks under 2x on a loaded CI machine: 35 against 20);
    # rank 1's gradient at its step 2 holds NaN (in one shard's slice only).
    # Streamed (overlap_push): the clean slices leave during backward, before the NaN is known; the verdict after
    # them makes every shard reject the gradient alike. Striped (overlap_answers): at K = 1 no stripe is stepped
    # ahead, every answer comes stripe by stripe from the update's snapshot.
    args = "--devices 3 --threshold 1 --epochs 2 --slow-rank 2 --delay 0.3 --nan-rank 1 --nan-step 2 --shard-server"
    launch("straggler", tmp_path, args, streaming)
    ranks = results(tmp_path, 3)
    steps = sum(r["global_step"] for r in ranks)
    for rank in ranks:  # each rank reports its own shard: all applied the same gradients, one update each
        assert rank["rejected"] == {1: 1}
        assert rank["version"] == steps - 1 and rank["update_sizes"] == {1: steps - 1}
        assert rank["staleness"]["counts"].keys() - {0}
    for other in ranks[1:]:
        assert all(torch.equal(other["weights"][k], ranks[0]["weights"][k]) for k in other["weights"])
    # the fast ranks do not wait for the slow rank, although it serves a third of every update: they pull most
    # of the batches (in lockstep each would train a third)
    fast, slow = ranks[0]["global_step"], ranks[2]["global_step"]
    assert fast >= 2 * slow, (fast, slow)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "optimizer, threshold, striped", [("sgd", "sync", False), ("adam", "1", False), ("adam", "sync", True)]
)
def test_sharded_checkpoint_restores_every_shard(tmp_path, optimizer: str, threshold: str, striped: bool) -> None:
    # striped: overlap_answers, whose shards hold stripes (a tensor's pieces alternate between shards)
    common = f"--devices 3 --batches 6 --threshold {threshold} --optimizer {optimizer} --lr 0.01 --shard-server"
    common += " --overlap-answers" if striped else ""
    launch("resume", tmp_path, "--phase first --epochs 1", common)
    launch("resume", tmp_path, "--phase restore --epochs 1", common)
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    restored = torch.load(tmp_path / "restored.ckpt", weights_only=False)
    progress = saved["hybrid_sgd"]
    assert len(progress["shards"]) == 3 and progress == restored["hybrid_sgd"]
    # the optimizer state is in the unsharded format: one entry per whole parameter, shaped like it
    state = saved["optimizer_states"][0]["state"]
    weights = [v for k, v in saved["state_dict"].items() if "running" not in k and "num_batches" not in k]
    assert len(state) == len(weights)
    assert all(v.shape == w.shape for s, w in zip(state.values(), weights) for v in s.values() if v.dim() > 0)
    assert_same_optimizer_state(restored["optimizer_states"][0], saved["optimizer_states"][0])
    for name, value in saved["state_dict"].items():
        assert torch.equal(restored["state_dict"][name], value), name
    versions = [s["version"] for s in progress["shards"]]
    assert versions == [6, 6, 6] if threshold == "sync" else len(set(versions)) == 1 and versions[0] >= 6


@pytest.mark.multiprocess
def test_killed_rank_stops_every_rank_of_a_sharded_server(tmp_path) -> None:
    # rank 1 is a worker and a shard's server: SIGKILL at its step 5 stops every rank well before peer_timeout,
    # the survivors naming rank 1 (Lightning's launcher SIGKILLs the rest once a child failed: which survivor's
    # message gets out first varies)
    output = run_failing(
        "lost_worker", tmp_path, "--devices 3 --lost-rank 1 --peer-timeout 60 --shard-server", bound=30
    )
    assert "hybrid_sgd: lost worker rank 1" in output or "worker rank 1 was lost" in output


@pytest.mark.multiprocess
def test_sharded_hybrid_shards_apply_the_same_groups_while_k_moves(tmp_path) -> None:
    # K = 2 of 3 with a slow rank 2, then rank 0 moves K to 1 at its step 4: before the coordinator existed this
    # deadlocked (shards each took their own first K arrivals) and was refused
    launch(
        "straggler",
        tmp_path,
        "--devices 3 --threshold 2 --epochs 2 --batches 8 --slow-rank 2 --delay 0.05 --set-threshold 0:4:1 "
        "--shard-server",
    )
    ranks = results(tmp_path, 3)
    for rank in ranks[1:]:  # each rank reports its own shard: the same updates of the same gradients
        assert rank["version"] == ranks[0]["version"] and rank["update_sizes"] == ranks[0]["update_sizes"]
        assert rank["staleness"] == ranks[0]["staleness"]
        assert all(torch.equal(rank["weights"][k], ranks[0]["weights"][k]) for k in rank["weights"])
    sizes = ranks[0]["update_sizes"]
    assert sizes[2] >= 1 and sizes[1] >= 1, sizes  # K = 2 first, then K = 1
    assert sum(size * count for size, count in sizes.items()) == sum(r["global_step"] for r in ranks)
    assert ranks[0]["threshold"] == 1
