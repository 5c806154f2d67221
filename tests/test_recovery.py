"""Recovery from a lost worker: torchrun restarts the group and the run goes on from the recovery checkpoint."""

import signal
import socket
import subprocess
import sys
import time
from subprocess import PIPE

import pytest
import torch
import torch.distributed as dist
from conftest import SCENARIOS, clean_env, free_port, results
from lightning_fabric.plugins import TorchCheckpointIO
from test_server import grad, make_server
from torch.utils.data import DistributedSampler

from lightning_hybrid import HybridSGDStrategy
from lightning_hybrid.recovery import RecoveryDir
from lightning_hybrid.work import PulledBatchSampler, done_by_epoch, work_id

DIGITS_TRAIN = 1437  # samples in IndexedDigits' training split: 90 batches of 16 (the last of 13)


def test_the_ledger_holds_applied_and_rejected_gradients_not_pending_or_dropped() -> None:
    server = make_server(workers=3, threshold=2, max_staleness=1)
    server.push(0, grad(1), version=0, work=work_id(0, 7))
    assert server.snapshot().absorbed == frozenset(), "a pending gradient is not in the master yet"
    server.push(1, grad(1), version=0, work=work_id(0, 3))  # update 1: batches 7 and 3
    server.push(2, grad(float("nan")), version=1, work=work_id(0, 5))  # rejected: its data was used
    server.push(0, grad(1), version=1, work=work_id(0, 8))
    server.push(1, grad(1), version=1, work=work_id(1, 0))  # update 2: batch 8 and epoch 1's batch 0
    (dropped,) = server.push(2, grad(1), version=0, work=work_id(1, 1))  # 2 updates stale: dropped, pushed again
    assert dropped.dropped == (2,)
    snapshot = server.snapshot()
    assert (snapshot.progress["version"], done_by_epoch(snapshot.absorbed)) == (2, {0: [3, 5, 7, 8], 1: [0]})
    assert all(torch.equal(a, b) for a, b in zip(snapshot.master, server.parameters))
    server.forget_absorbed(below=work_id(1, 0))
    assert done_by_epoch(server.snapshot().absorbed) == {1: [0]}


def test_recovery_files_are_whole_or_ignored_and_the_newest_few_are_kept(tmp_path) -> None:
    folder, io = RecoveryDir(tmp_path / "r", keep=2), TorchCheckpointIO()
    assert folder.newest() is None
    paths = [folder.save({"step": step}, io, version=step) for step in range(3)]
    assert folder.checkpoints() == paths[1:] and folder.newest() == paths[2]
    assert torch.load(folder.newest(), weights_only=False) == {"step": 2}
    # a writer killed mid-file leaves a hidden partial file: never listed, removed by the next write
    (tmp_path / "r" / f".{paths[2].name}-x.partial").write_bytes(b"PK")
    assert folder.newest() == paths[2]
    # a file cut short after its rename (e.g. a full disk) is passed over
    truncated = tmp_path / "r" / "recovery-99999999999999999999-v9.ckpt"
    truncated.write_bytes(paths[2].read_bytes()[:100])
    assert folder.newest() == paths[2]
    folder.clear()
    assert list((tmp_path / "r").iterdir()) == []


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(recovery_dir="r", shard_server=True), "one parameter server"),
        (dict(recovery_dir="r", pull_work=False), "needs pulled work"),
        (dict(recovery_every=0), "recovery_every must be a positive"),
    ],
)
def test_recovery_options_that_cannot_work_are_refused(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        HybridSGDStrategy(**options)


def trained(out, round_: int, ranks: int) -> dict[int, list[int]]:
    """Samples each epoch's batches held, as the ranks of ``round_`` logged them when they started each batch."""
    seen: dict[int, list[int]] = {}
    for rank in range(ranks):
        path = out / f"trained-round{round_}-rank{rank}.txt"
        for line in path.read_text().splitlines() if path.exists() else []:
            epoch, _, *samples = line.split()
            seen.setdefault(int(epoch), []).extend(int(v) for v in samples)
    return seen


def run_torchrun(out, *args: str, **env: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    command += ["--max-restarts", "1", str(SCENARIOS), "recover", "--out", str(out), "--devices", "3", *args]
    process = subprocess.run(command, env=clean_env(**env), capture_output=True, text=True, timeout=240)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "lost, step, threshold, why, unshared_store",
    [
        (1, 4, "async", "failure", "0"),
        (1, 4, "async", "failure", "1"),
        (1, 4, "sync", "failure", "0"),
        (0, 30, "async", "periodic", "0"),
    ],
    ids=["worker-async", "worker-async-own-rendezvous", "worker-sync", "server-async"],
)
def test_a_sigkilled_rank_costs_its_batches_not_the_run(tmp_path, lost, step, threshold, why, unshared_store) -> None:
    # rank `lost` SIGKILLs itself at its step `step` in round 0; torchrun restarts the three ranks once. A lost
    # worker: the server's rank writes the recovery checkpoint at the failure. The server's own rank (with the
    # strategy's default folder under torchrun): the last periodic one is all there is (every 10 ms: rank 0 trains
    # its 30 steps in under 0.1 s here). The plain torchrun command shares the agent's store with the workers (each
    # restart round forms its groups under a prefix of its own); TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is torch's
    # opt-out, where torch's own env:// rendezvous is used.
    args = ["--threshold", threshold, "--epochs", "2", "--die-in-first-round", f"{lost}:{step}"]
    args += ["--default-folder", "--recovery-every", "0.01"] if lost == 0 else ["--recovery-every", "1"]
    run_torchrun(tmp_path, *args, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=unshared_store)
    ranks = results(tmp_path, 3)
    assert [r["restart_round"] for r in ranks] == [1, 1, 1] and all(r["epochs"] == 2 for r in ranks)
    assert ranks[0]["recovery_files"] == [], "a fit that ends cleanly removes its recovery checkpoints"
    resumed, twice = resumed_with_nothing_lost(tmp_path, why, ranks_before=3, ranks_after=3)
    if threshold == "async":  # K = 1: every batch of both epochs went into the master once (a padded one twice)
        assert ranks[0]["version"] == 2 * 90 + twice // 16
    assert ranks[0]["version"] == ranks[1]["version"] == ranks[2]["version"] > resumed["version"]


def resumed_with_nothing_lost(out, why: str, ranks_before: int, ranks_after: int) -> tuple[dict, int]:
    """Checks round 1 against round 0's record (2 epochs of IndexedDigits' batches of 16); returns what the record
    held and how many samples were trained twice."""
    epoch = torch.load(out / "rank0.pt", weights_only=False)["resumed"]["epoch"]
    resumed = torch.load(out / f"resumed-epoch{epoch}.pt", weights_only=False)
    assert (resumed["why"], resumed["round"]) == (why, 0)
    before, after = trained(out, 0, ranks_before), trained(out, 1, ranks_after)
    held = resumed["samples"]
    assert 0 < len(held) < DIGITS_TRAIN and set(held) <= set(before[epoch]), "held: trained in round 0"
    # every sample of the resumed epoch trained once after the resume or held by the checkpoint (when fewer batches
    # than ranks were left, ranks without one retrain one held batch each); later epochs wholly in round 1
    assert set(held) | set(after[epoch]) == set(range(DIGITS_TRAIN)), "no sample lost"
    twice = len(held) + len(after[epoch]) - DIGITS_TRAIN
    padded = len(held) > DIGITS_TRAIN - ranks_after * 16 and twice <= (ranks_after - 1) * 16
    assert twice == 0 or padded, f"{twice} samples trained twice"
    for later in range(epoch + 1, 2):
        assert sorted(after[later]) == list(range(DIGITS_TRAIN))
    redone = len(set(before[epoch]) - set(held))
    if why == "failure":  # only batches in flight when the record was written: at most one per rank (the lost
        assert redone <= ranks_before * 16, redone  # rank's too: it had started its batch)
    return resumed, twice


def wait_for_listener(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on port {port} after {seconds} s"
        time.sleep(0.1)


@pytest.mark.multiprocess
def test_a_node_that_leaves_lets_the_others_finish_without_it(tmp_path) -> None:
    # two torchrun nodes of one process each on 127.0.0.1 (`--nnodes 1:2`, c10d rendezvous); node 1 dies whole at
    # its step 4 (its worker SIGKILLs its agent, then itself). Node 0's agent restarts its worker in a round of one
    # node: the script's Trainer(num_nodes=2) trains on 1 (with a warning) and resumes the recovery checkpoint.
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1"]
    command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "leave"]
    command += ["--rdzv-conf", "last_call_timeout=10"]  # how long a round waits for more nodes (torch: 30 s)
    command += ["--max-restarts", "1", str(SCENARIOS), "recover", "--out", str(tmp_path), "--devices", "1"]
    command += ["--num-nodes", "2", "--epochs", "2", "--die-in-first-round", "1:4", "--node-dies"]
    nodes = [subprocess.Popen(command, env=clean_env(), stdout=PIPE, stderr=PIPE, text=True)]
    wait_for_listener(port)  # node 0's agent hosts the rendezvous (the node that must stay), and has the lower pid
    nodes.append(subprocess.Popen(command, env=clean_env(), stdout=PIPE, stderr=PIPE, text=True))
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert nodes[0].returncode == 0, outputs[0][0][-3000:] + outputs[0][1][-5000:]
    assert nodes[1].returncode == -signal.SIGKILL
    assert (tmp_path / "trained-round0-rank1.txt").exists(), "round 0 had both nodes"
    (rank,) = results(tmp_path, 1)
    assert (rank["restart_round"], rank["world_size"], rank["epochs"]) == (1, 1, 2)
    assert "torchrun formed 1 node(s) in this round and Trainer(num_nodes=2) asked for 2" in outputs[0][1]
    resumed, twice = resumed_with_nothing_lost(tmp_path, "failure", ranks_before=2, ranks_after=1)
    assert rank["version"] == 2 * 90 + twice // 16 > resumed["version"]  # K = 1: each batch once


def test_a_resumed_epoch_with_fewer_batches_left_than_ranks_gives_every_rank_one() -> None:
    # Lightning runs an epoch's end only on ranks that trained in it: 1 batch left of 10 for 3 ranks would leave two
    # ranks out of the epoch-end collectives (found by the test above: a hang, then gloo's "Connection closed")
    store = dist.HashStore()
    taken = []
    for rank in range(3):
        sampler = PulledBatchSampler(
            DistributedSampler(range(100), num_replicas=1, rank=0, shuffle=False),
            10,
            drop_last=False,
            rank=rank,
            num_workers=3,
            store=store,
            namespace="resume",
        )
        sampler.resume(0, {0: [b for b in range(10) if b != 4]})
        taken.append([batch[0] // 10 for batch in sampler])
    assert taken == [[4], [0], [1]], "the batch left first, then batches trained before, one per rank"
