"""Pulled work: fast workers take more batches, every sample is used exactly once per epoch."""

import pytest
import torch
from conftest import launch, results

pytestmark = pytest.mark.multiprocess


def indices(out, phase: str, ranks: int) -> list[dict[int, list[int]]]:
    return [torch.load(out / f"indices-{phase}-rank{r}.pt") for r in range(ranks)]


def test_every_sample_once_per_epoch_and_fast_workers_take_more(tmp_path) -> None:
    # 3 workers, hybrid K = 2, rank 2 slowed by 30 ms per step; the user's DataLoader has a worker process
    # and a custom collate function; configure_optimizers reads estimated_stepping_batches, which loads the train
    # loader before the strategy pulls work (the fit must load it again, pulled)
    launch("pulled", tmp_path, "--devices 3 --threshold 2 --epochs 2 --slow-rank 2 --delay 0.03 --estimated-steps")
    seen = indices(tmp_path, "full", 3)
    for epoch in (0, 1):
        taken = [s[epoch] for s in seen]
        everything = [i for rank in taken for i in rank]
        assert sorted(everything) == list(range(1437)), f"epoch {epoch}: duplicates or gaps"
        assert len(taken[2]) < min(len(taken[0]), len(taken[1])), [len(t) for t in taken]
        assert all(len(t) >= 16 for t in taken), "every rank trains at least one batch per epoch"


def test_a_second_trainer_in_the_same_processes_starts_fresh_counters(tmp_path) -> None:
    launch("pulled", tmp_path, "--devices 2 --threshold 1 --epochs 1 --phase twice")
    everything = [i for rank in indices(tmp_path, "twice", 2) for i in rank[0]]
    assert sorted(everything) == list(range(1437))


@pytest.mark.parametrize("sharded", [False, True], ids=["one server", "sharded"])
def test_a_per_step_lr_schedule_follows_the_servers_progress_not_each_ranks_steps(tmp_path, sharded) -> None:
    # 3 workers at K = 2, rank 2 slowed: ranks 0 and 1 take more steps than DDP's estimate, which sizes a OneCycleLR
    # exactly. Stepped per own step, the fast ranks' schedules would raise "Tried to step ... times" before the end
    # and each shard would step its slice at its own rank's lr; paced, every rank steps once per N gradients applied
    shard = "--shard-server" if sharded else ""
    run = launch(
        "pulled", tmp_path, "--devices 3 --threshold 2 --epochs 2 --slow-rank 2 --delay 0.03 --one-cycle", shard
    )
    assert "before `optimizer.step()`" not in run.stderr  # torch's warning: the server stepped the optimizer's copy
    ranks = results(tmp_path / "full", 3)
    total = ranks[0]["schedule_totals"][0]
    assert total == 60  # 2 epochs of 30 batches per rank (1437 samples over 3 ranks, batches of 16)
    assert max(r["global_step"] for r in ranks) > total, "no rank outran DDP's estimate: nothing was paced"
    steps = [r["schedule_steps"][0] for r in ranks]
    applied = [r["synchronous_steps"] for r in ranks]
    assert all(total - 3 <= s <= a <= total for s, a in zip(steps, applied)), (steps, applied)


def test_preempted_mid_epoch_resumes_from_the_cursor(tmp_path) -> None:
    # rank 1 is preempted (SIGTERM) at its step 5; OnExceptionCheckpoint saves; a new run resumes the epoch (with
    # a per-step LR schedule, paced by the server's progress: it goes on from the checkpoint's count)
    common = "--devices 2 --threshold 1 --epochs 1 --slow-rank 1 --delay 0.03 --one-cycle"
    launch("pulled", tmp_path, common, "--phase preempt --sigterm-step 5")
    checkpoint = torch.load(tmp_path / "preempted.ckpt", weights_only=False)
    work = checkpoint["hybrid_sgd"]["work"]
    assert work["epoch"] == 0 and 0 < len(work["done"]) < 90
    launch("pulled", tmp_path, common, "--phase resume")
    before = [i for rank in indices(tmp_path, "preempt", 2) for i in rank[0]]
    after = [i for rank in indices(tmp_path, "resume", 2) for i in rank.get(0, [])]
    # batches of 16 samples, the last (batch 89) of 13: the fast rank may have trained it before the preemption
    assert len(before) == sum(min(16, 1437 - 16 * batch) for batch in work["done"])
    assert sorted(before + after) == list(range(1437)), "no sample repeated or skipped across the resume"
    resumed = results(tmp_path / "resume", 2)
    assert all(r["schedule_totals"] == [45] for r in resumed)  # 719 samples per rank in batches of 16
    assert all(45 - 2 <= r["schedule_steps"][0] <= 45 for r in resumed), [r["schedule_steps"] for r in resumed]


def test_lightning_loops_with_unequal_epochs(tmp_path) -> None:
    # max_steps = 100 with 90 batches per epoch shared by 2 ranks: the run ends in epoch 1, when the fast
    # rank reaches 100 steps; the progress bar runs and ModelCheckpoint saves at the end of epoch 0
    launch(
        "pulled",
        tmp_path,
        "--devices 2 --threshold 1 --epochs 10 --slow-rank 1 --delay 0.02 --phase loops --max-steps 100",
    )
    fast, slow = results(tmp_path / "loops", 2)
    assert fast["global_step"] == 100 and slow["global_step"] < 100
    assert fast["epoch"] == slow["epoch"] and fast["version"] == slow["version"] == 100 + slow["global_step"]
    assert all(torch.equal(fast["weights"][k], slow["weights"][k]) for k in fast["weights"])
    assert "epoch=0" in " ".join(p.name for p in (tmp_path / "ckpts").glob("*.ckpt"))
    seen = indices(tmp_path, "loops", 2)
    epoch0 = [i for rank in seen for i in rank[0]]
    assert sorted(epoch0) == list(range(1437))


@pytest.mark.parametrize("sharded", [False, True])
def test_a_gradient_staler_than_the_bound_is_computed_again_and_every_sample_still_trains_once(
    tmp_path, sharded: bool
) -> None:
    # K = 1, rank 2 slowed by 30 ms a step while two fast ranks move the version on: its gradients are staler
    # than 2 updates, dropped (sharded: by shard 0's decision, on every shard), and its batch is computed again
    # on the latest weights
    common = "--devices 3 --threshold 1 --epochs 1 --slow-rank 2 --delay 0.03 --max-staleness 2"
    launch("pulled", tmp_path, common, "--shard-server" if sharded else "")
    seen = indices(tmp_path, "full", 3)
    assert sorted(i for rank in seen for i in rank[0]) == list(range(1437)), "every sample applied once"
    server, *_ = results(tmp_path / "full", 3)
    assert server["dropped"].get(2, 0) > 0, server["dropped"]
    applied = sum(len(rank[0]) for rank in seen) // 16 + (1437 % 16 > 0)
    assert server["version"] == applied, "every trained batch is one update at K = 1, no dropped gradient is"
    for rank in range(3):
        computed = int((tmp_path / f"computed-full-rank{rank}").read_text())
        trained = -(-len(seen[rank][0]) // 16)
        assert computed == trained + server["dropped"].get(rank, 0), (rank, computed, trained, server["dropped"])
