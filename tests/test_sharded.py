"""The sharded server (``shard_server=True``): every rank serves a slice of the model.

The plan and the optimizer-state conversion in one process; then real multi-process runs: K = N equals DDP,
async shards agree on every update, checkpoints restore each shard exactly, bad combinations are refused.
"""

import statistics

import pytest
import torch
from conftest import launch, results
from lightning_fabric.utilities.exceptions import MisconfigurationException
from test_checkpoint import assert_same_optimizer_state
from test_config_errors import fit
from test_faults import run_failing

from lightning_hybrid import HybridSGDStrategy
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.models import MLPClassifier
from lightning_hybrid.server import clone_optimizer
from lightning_hybrid.shards import ShardPlan


def model_params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(5, 3), torch.randn(5), torch.randn(2, 5, dtype=torch.float64), torch.randn(7)]


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_shards_cover_every_element_once_as_views_of_the_flat_buffers(shards: int) -> None:
    params = model_params()
    layout = FlatLayout.of(params)
    plan = ShardPlan(layout, shards)
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
        for bucket, (start, end) in enumerate(plan.ranges[shard]):
            seen[bucket][start:end] += 1
    assert all(bool((count == 1).all()) for count in seen)


def test_optimizer_state_round_trips_through_shards_with_each_shards_step_count() -> None:
    params = [torch.nn.Parameter(p.float()) for p in model_params()]
    reference = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], lr=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    reference.step()
    full = reference.state_dict()
    plan = ShardPlan(FlatLayout.of(params), 3)
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
    with pytest.raises(ValueError, match="overlap_push .* choose one"):
        HybridSGDStrategy(shard_server=True, overlap_push=True)

    class LBFGSModel(MLPClassifier):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(MisconfigurationException, match="element-wise optimizers only; LBFGS"):
        fit(LBFGSModel(), strategy=HybridSGDStrategy(shard_server=True))
    with pytest.raises(MisconfigurationException, match="gradient_clip_algorithm='value'"):
        fit(MLPClassifier(), strategy=HybridSGDStrategy(shard_server=True), gradient_clip_val=1.0)


def test_one_shard_trains_like_the_single_server() -> None:
    trainer = fit(MLPClassifier(), strategy=HybridSGDStrategy(shard_server=True))
    assert trainer.strategy.version == 3


@pytest.mark.multiprocess
def test_sharded_sync_matches_ddp_with_three_uneven_shards(tmp_path) -> None:
    # SGD momentum, StepLR, clipping by value, accumulation of 2, BatchNorm: 3 epochs x 8 batches -> 12 updates
    launch("ddp_equivalence", tmp_path, "--devices 3 --epochs 3 --batches 8 --batch-norm --shard-server")
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
def test_async_shards_reject_the_same_nan_gradient_and_never_wait(tmp_path) -> None:
    # K = 1; rank 2 sleeps 0.1 s per step; rank 1's gradient at its step 2 holds NaN (in one shard's slice only)
    launch(
        "straggler",
        tmp_path,
        "--devices 3 --threshold 1 --epochs 2 --slow-rank 2 --delay 0.1 --nan-rank 1 --nan-step 2 --shard-server",
    )
    ranks = results(tmp_path, 3)
    steps = sum(r["global_step"] for r in ranks)
    for rank in ranks:  # each rank reports its own shard: all applied the same gradients, one update each
        assert rank["rejected"] == {1: 1}
        assert rank["version"] == steps - 1 and rank["update_sizes"] == {1: steps - 1}
        assert rank["staleness"]["counts"].keys() - {0}
    for other in ranks[1:]:
        assert all(torch.equal(other["weights"][k], ranks[0]["weights"][k]) for k in other["weights"])
    # the fast ranks' steps do not wait for the slow rank, although it serves a third of every update
    fast, slow = statistics.median(ranks[0]["durations"]), statistics.median(ranks[2]["durations"])
    assert slow >= 0.1 and fast < 0.25 * slow, (fast, slow)


@pytest.mark.multiprocess
@pytest.mark.parametrize("optimizer, threshold", [("sgd", "sync"), ("adam", "1")])
def test_sharded_checkpoint_restores_every_shard(tmp_path, optimizer: str, threshold: str) -> None:
    common = f"--devices 3 --batches 6 --threshold {threshold} --optimizer {optimizer} --lr 0.01 --shard-server"
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
        "lost_worker", tmp_path, "--devices 3 --slow-rank 1 --peer-timeout 60 --shard-server", bound=40
    )
    assert "hybrid_sgd: lost worker rank 1" in output or "worker rank 1 was lost" in output


@pytest.mark.multiprocess
def test_threshold_between_1_and_n_or_changed_is_refused_for_a_sharded_server(tmp_path) -> None:
    # independent shards may choose different groups of gradients and wait for each other forever (found by
    # the soak test with K changed at random: shards each waited for a worker blocked on another)
    output = run_failing("straggler", tmp_path / "between", "--devices 3 --threshold 2 --shard-server", bound=60)
    assert "supports K = 1 (async) and K = N = 3 (sync) only" in output
    # rank 0 tries to move K from 3 to 1 at its step 2
    output = run_failing(
        "straggler", tmp_path / "moved", "--devices 3 --threshold 3 --set-threshold 0:2:1 --shard-server", bound=60
    )
    assert "cannot change K from 3 to 1 while a sharded server runs" in output
