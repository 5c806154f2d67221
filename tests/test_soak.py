"""Soak: a minute each of training with heavy-tailed delays and K changed at random every 3 steps, with one
server, sharded (this found the deadlock of shards that chose their own groups), sharded with pipelined pushes
(held pushes while K moves) and striped with overlap_answers (stripes stepped ahead whenever K = N, put back when
K moves mid-update). Memory does not grow, no update is lost, the run ends cleanly. Marked ``soak``: not in the
default selection, run by ``make test`` (and CI) beside the rest."""

import statistics

import pytest
import torch
from conftest import launch, results

pytestmark = [pytest.mark.multiprocess, pytest.mark.soak]


@pytest.mark.parametrize(
    "sharded, variant, minutes",
    [(False, "", 1), (True, "", 1), (True, "--pipeline-pushes", 1), (True, "--overlap-answers", 1)],
    ids=["one", "sharded", "piped", "striped"],
)
def test_minutes_of_random_delays_and_threshold_changes(tmp_path, sharded: bool, variant: str, minutes: int) -> None:
    flags = f"--devices 3 --max-time 00:00:0{minutes}:00 {variant}" + " --shard-server" * sharded
    launch("soak", tmp_path, flags, timeout=400)  # exit 0: it ended cleanly
    ranks = results(tmp_path, 3)
    pushes = sum(rank["pushes"] for rank in ranks)
    # every push was applied exactly once (or rejected): nothing lost, nothing twice; sharded, on every shard
    for server in ranks if sharded else ranks[:1]:
        applied = sum(size * count for size, count in server["update_sizes"].items())
        assert applied + sum(server["rejected"].values()) == pushes
    server = ranks[0]
    assert len(server["update_sizes"]) > 1, "K really changed: updates of several sizes"
    if sharded:  # every shard applied the groups shard 0 chose
        assert all(rank["update_sizes"] == server["update_sizes"] for rank in ranks[1:])
        assert all(rank["version"] == server["version"] for rank in ranks[1:])
    assert server["epochs"] >= 10 * minutes
    # memory: the last epochs' resident memory is within 25 MiB of the run's second quarter, on every rank
    for rank in ranks:
        samples = rank["rss_mib"]
        settled = statistics.median(samples[len(samples) // 4 : len(samples) // 2])
        assert max(samples[-5:]) - settled < 25, (settled, samples[-5:])
    for name, value in server["weights"].items():  # every rank ends with the same, latest model
        assert all(torch.equal(value, rank["weights"][name]) for rank in ranks[1:])
