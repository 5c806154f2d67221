"""``pipeline_pushes`` with real worker processes: a worker sends its next gradient while its last answer comes in,
so every gradient is one update staler, and nothing is lost: every gradient is applied once, drains still give
every rank the same model."""

import pytest
import torch
from conftest import launch, results
from test_asynchrony import assert_every_rank_evaluates_the_same_model

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("sharded", [False, True], ids=["one-server", "sharded"])
def test_pipelined_sync_applies_every_gradient_one_update_stale(tmp_path, sharded: bool) -> None:
    # K = N = 3, static shards: 2 epochs x 6 batches per rank -> 12 updates of 3 gradients. A gradient is computed
    # on the parameters before its worker's last answer: staleness 1, except the first of each epoch (every rank
    # drains at the epoch's end, and starts the next from the same, latest model)
    launch(
        "straggler",
        tmp_path,
        "--devices 3 --threshold sync --epochs 2 --batches 6 --pipeline-pushes" + " --shard-server" * sharded,
    )
    ranks = results(tmp_path, 3)
    for rank in ranks[: 3 if sharded else 1]:  # each shard reports its own server; one server: rank 0
        assert rank["version"] == 12 and rank["update_sizes"] == {3: 12}
        assert rank["staleness"]["counts"] == {0: 3 * 2, 1: 3 * 10}
        assert rank["staleness"]["per_worker"] == {worker: {0: 2, 1: 10} for worker in range(3)}
    assert [rank["global_step"] for rank in ranks] == [12, 12, 12]
    for other in ranks[1:]:
        assert all(torch.equal(other["weights"][k], ranks[0]["weights"][k]) for k in other["weights"])
    assert_every_rank_evaluates_the_same_model(ranks)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-server", "sharded"])
def test_pipelined_async_rejects_a_nan_gradient_and_applies_every_other(tmp_path, sharded: bool) -> None:
    # K = 1; rank 2 sleeps 0.1 s per step; rank 1's gradient at its step 2 holds NaN: its rejection reaches rank 1
    # one step later, with the answer it collects then
    launch(
        "straggler",
        tmp_path,
        "--devices 3 --threshold 1 --epochs 2 --slow-rank 2 --delay 0.1 --nan-rank 1 --nan-step 2 --pipeline-pushes"
        + " --shard-server" * sharded,
    )
    ranks = results(tmp_path, 3)
    steps = sum(r["global_step"] for r in ranks)
    for rank in ranks[: 3 if sharded else 1]:
        assert rank["rejected"] == {1: 1}
        assert rank["version"] == steps - 1 and rank["update_sizes"] == {1: steps - 1}
    assert all(torch.isfinite(w).all() for w in ranks[0]["weights"].values() if w.is_floating_point())
    assert ranks[0]["global_step"] >= 2 * ranks[2]["global_step"], [r["global_step"] for r in ranks]
    for other in ranks[1:]:
        assert all(torch.equal(other["weights"][k], ranks[0]["weights"][k]) for k in other["weights"])
    assert_every_rank_evaluates_the_same_model(ranks)
