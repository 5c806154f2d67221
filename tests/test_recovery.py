"""Recovery from a lost worker: torchrun restarts the group and the run goes on from the recovery checkpoint."""

import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from subprocess import PIPE

import pytest
import torch
import torch.distributed as dist
from conftest import SCENARIOS, clean_env, free_port, results
from lightning_fabric.plugins import TorchCheckpointIO
from test_server import grad, make_server
from torch.utils.data import DistributedSampler

from lightning_hybrid import HybridSGDStrategy
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.recovery import PART_KEY, RecoveryDir, Shard, recovery_checkpoint, shard_part
from lightning_hybrid.server import ServerSnapshot
from lightning_hybrid.shards import ShardPlan
from lightning_hybrid.work import PulledBatchSampler, StaticBatchSampler, done_by_epoch, work_id

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


def test_recovery_every_must_be_a_positive_number_of_seconds() -> None:
    for every in (0, -1, True, "60"):
        with pytest.raises(ValueError, match="recovery_every must be a positive number of seconds"):
            HybridSGDStrategy(recovery_every=every)


@pytest.mark.parametrize("shard_weights, stripes", [(None, None), ((1.0, 3.0, 0.5), None), ((1.0, 3.0, 0.5), 4)])
def test_a_recovery_point_joins_the_shards_parts_exactly(tmp_path, shard_weights, stripes) -> None:
    # a model's master weights and Adam state, split into 3 shards as a sharded server holds them (a piece may cut a
    # tensor; striped, as overlap_answers holds them: stripes of 4 elements dealt in turn), written as the shards
    # write their parts; the joined checkpoint holds them whole, and each shard's own counters and step counts
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2))
    optimizer = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.5}])
    model(torch.randn(4, 5)).sum().backward()
    optimizer.step()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    full_state = optimizer.state_dict()
    plan = ShardPlan(FlatLayout.of(params), 3, shard_weights, stripes)
    names = {id(p): name for name, p in model.named_parameters()}
    folder, io = RecoveryDir(tmp_path / "r"), TorchCheckpointIO()
    for shard in (2, 0, 1):
        snapshot = ServerSnapshot(
            master=[piece.clone() for piece in plan.piece_tensors(shard, params)],
            optimizer_state=plan.shard_state(shard, full_state),
            progress={"version": 7, "threshold": 1, "shard": shard},
            absorbed=frozenset({work_id(0, 3)}),
        )
        part = {PART_KEY: shard_part(snapshot)}
        if shard == 0:
            stale = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
            lightning = {"state_dict": {"buffer": torch.ones(1), **stale}, "epoch": 0}
            part = recovery_checkpoint(
                lightning,
                snapshot,
                model,
                optimizer,
                0,
                {},
                5,
                "periodic",
                sharded=True,
                shard_weights=shard_weights,
                stripe_elements=stripes,
            )
        folder.save(part, io, version=7, shard=Shard(shard, 3))
        folder.join_newest_parts(io)
        assert (folder.newest() is None) == (shard != 1), "joined when the last part is written, not before"
    joined = torch.load(folder.newest(), weights_only=False)
    assert list((tmp_path / "r").glob("part-*")) == [], "the parts go once joined"
    assert all(torch.equal(joined["state_dict"][names[id(p)]], p) for p in params)
    assert torch.equal(joined["state_dict"]["buffer"], torch.ones(1)), "the rest of rank 0's Lightning checkpoint"
    (state,) = joined["optimizer_states"]
    for index, entry in full_state["state"].items():
        assert all(torch.equal(state["state"][index][k], v) for k, v in entry.items())
    assert [g["lr"] for g in state["param_groups"]] == [0.001, 0.5]
    hybrid = joined["hybrid_sgd"]
    assert [s["shard"] for s in hybrid["shards"]] == [0, 1, 2] and hybrid["version"] == 7
    assert hybrid["work"]["done"] == [3] and "shard_set" not in hybrid and PART_KEY not in joined


def test_an_incomplete_recovery_point_is_never_joined(tmp_path) -> None:
    folder, io = RecoveryDir(tmp_path / "r", keep=1), TorchCheckpointIO()
    folder.save({"whole": 1}, io, version=3)
    for shard in (1, 2):  # rank 0's part of version 9 never came (rank 0 died): the checkpoint of version 3 stays
        folder.save({PART_KEY: {}}, io, version=9, shard=Shard(shard, 3))
    folder.join_newest_parts(io)
    assert torch.load(folder.newest(), weights_only=False) == {"whole": 1}
    # a part killed while being written is a hidden partial: the set is not complete
    folder.save({PART_KEY: {}}, io, version=9, shard=Shard(0, 3))
    (tmp_path / "r" / "part-r0-n3-v9-2.ckpt").rename(tmp_path / "r" / ".part-r0-n3-v9-2.ckpt.partial")
    folder.join_newest_parts(io)
    assert torch.load(folder.newest(), weights_only=False) == {"whole": 1}
    folder.clear()
    assert list((tmp_path / "r").iterdir()) == []


def test_static_batches_split_an_epoch_and_skip_what_a_resume_holds() -> None:
    # rank r takes every N-th batch of those left; resumed with another N (a node left), the rest is split anew
    def taken(ranks: int, done: dict) -> list[list[int]]:
        store, batches = dist.HashStore(), []
        for rank in range(ranks):
            sampler = StaticBatchSampler(
                DistributedSampler(range(100), num_replicas=1, rank=0, shuffle=True, seed=3),
                10,
                drop_last=False,
                rank=rank,
                num_workers=ranks,
                store=store,
                namespace="static",
            )
            sampler.resume(0, done)
            batches.append(list(sampler))
            assert batches[-1] == [sampler.indices(b) for b in sampler.yielded]
        assert sampler.claimed() == sum(len(b) for b in batches), "every take counted in the store"
        return batches

    whole = taken(3, {})
    assert [len(b) for b in whole] == [4, 3, 3]
    assert sorted(i for rank in whole for batch in rank for i in batch) == list(range(100))
    rest = taken(2, {0: [0, 1, 2, 5]})
    samples = [i for rank in rest for batch in rank for i in batch]
    order = list(DistributedSampler(range(100), num_replicas=1, rank=0, shuffle=True, seed=3))
    held = [i for b in (0, 1, 2, 5) for i in order[b * 10 : (b + 1) * 10]]
    assert sorted(samples + held) == list(range(100)) and len(samples) == 60


def trained(out, round_: str) -> dict[int, list[int]]:
    """Samples each epoch's batches held, as the ranks of ``round_`` (``"R-of-W"``: restart count R, W ranks) logged
    them when they started each batch (an epoch the round trained nothing of: none)."""
    seen: defaultdict[int, list[int]] = defaultdict(list)
    for rank in range(int(round_.split("-of-")[1])):
        path = out / f"trained-round{round_}-rank{rank}.txt"
        for line in path.read_text().splitlines() if path.exists() else []:
            epoch, _, *samples = line.split()
            seen[int(epoch)].extend(int(v) for v in samples)
    return seen


def run_torchrun(out, *args: str, **env: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    command += ["--max-restarts", "1", str(SCENARIOS), "recover", "--out", str(out), "--devices", "3", *args]
    process = subprocess.run(command, env=clean_env(**env), capture_output=True, text=True, timeout=240)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "lost, step, threshold, why, unshared_store, layout",
    [
        (1, 4, "async", "failure", "0", []),
        (1, 4, "async", "failure", "1", []),
        (1, 4, "sync", "failure", "0", []),
        (0, 30, "async", "periodic", "0", []),
        (1, 6, "sync", "failure", "0", ["--static"]),
        (2, 20, "async", "periodic", "0", ["--sharded"]),
    ],
    ids=["worker-async", "worker-async-own-rendezvous", "worker-sync", "server-async", "static-sync", "sharded-async"],
)
def test_a_sigkilled_rank_costs_its_batches_not_the_run(
    tmp_path, lost, step, threshold, why, unshared_store, layout
) -> None:
    # rank `lost` SIGKILLs itself at its step `step` in round 0; torchrun restarts the three ranks once. A lost
    # worker: the server's rank writes the recovery checkpoint at the failure. The server's own rank (with the
    # strategy's default folder under torchrun): the last periodic one is all there is (every 10 ms: rank 0 trains
    # its 30 steps in under 0.1 s here). The plain torchrun command shares the agent's store with the workers (each
    # restart round forms its groups under a prefix of its own); TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is torch's
    # opt-out, where torch's own env:// rendezvous is used.
    # Static shards (numbered batches, each rank every third): a resumed epoch skips what the record holds. Sharded
    # (a shard lost): nothing can be written at the failure, the last complete recovery point is all there is.
    args = ["--threshold", threshold, "--epochs", "2", "--die-in-first-round", f"{lost}:{step}", *layout]
    args += ["--default-folder", "--recovery-every", "0.01"] if why == "periodic" else ["--recovery-every", "1"]
    run_torchrun(tmp_path, *args, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=unshared_store)
    ranks = results(tmp_path, 3)
    assert [r["restart_round"] for r in ranks] == [1, 1, 1] and all(r["epochs"] == 2 for r in ranks)
    assert ranks[0]["recovery_files"] == [], "a fit that ends cleanly removes its recovery checkpoints"
    resumed, twice = resumed_with_nothing_lost(tmp_path, why, before="0-of-3", after="1-of-3")
    if threshold == "async":  # K = 1: every batch of both epochs went into the master once (a padded one twice)
        assert ranks[0]["version"] == 2 * 90 + twice // 16
    assert ranks[0]["version"] == ranks[1]["version"] == ranks[2]["version"] > resumed["version"]
    if "--static" in layout:
        # sync with static batches: every update's group of batches is fixed, so the run redoes the interrupted
        # update and ends where an uninterrupted one does, up to the order in which the server summed each update's
        # gradients (arrival order: floating-point sums differ in their last bits)
        undisturbed = tmp_path / "undisturbed"
        undisturbed.mkdir()
        run_torchrun(undisturbed, "--threshold", threshold, "--epochs", "2", *layout)
        (expected, *_) = results(undisturbed, 3)
        assert expected["version"] == ranks[0]["version"] == 2 * 30
        for name, value in expected["weights"].items():
            torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=1e-4, atol=1e-5)


def resumed_with_nothing_lost(out, why: str, before: str, after: str, epochs: int = 2) -> tuple[dict, int]:
    """Checks round ``after`` against round ``before``'s record (``"R-of-W"``; ``epochs`` epochs of IndexedDigits'
    batches of 16); returns what the record held and how many samples were trained twice."""
    epoch = torch.load(out / "rank0.pt", weights_only=False)["resumed"]["epoch"]
    resumed = torch.load(out / f"resumed-epoch{epoch}.pt", weights_only=False)
    assert (resumed["why"], resumed["round"]) == (why, 0)
    ranks_before, ranks_after = (int(label.split("-of-")[1]) for label in (before, after))
    before, after = trained(out, before), trained(out, after)
    held = resumed["samples"]
    # a point taken at an epoch's end holds all of it (seen in the server-async case, where the other ranks
    # finished epoch 0 before rank 0's fatal step: it also serves)
    assert 0 < len(held) <= DIGITS_TRAIN and set(held) <= set(before[epoch]), "held: trained in round 0"
    assert len(held) < DIGITS_TRAIN or not after[epoch], "a finished epoch is not trained again"
    # every sample of the resumed epoch trained once after the resume or held by the checkpoint (when fewer batches
    # than ranks were left, ranks without one retrain one held batch each); later epochs wholly in round 1
    assert set(held) | set(after[epoch]) == set(range(DIGITS_TRAIN)), "no sample lost"
    twice = len(held) + len(after[epoch]) - DIGITS_TRAIN
    padded = len(held) > DIGITS_TRAIN - ranks_after * 16 and twice <= (ranks_after - 1) * 16
    assert twice == 0 or padded, f"{twice} samples trained twice"
    for later in range(epoch + 1, epochs):
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
    assert (tmp_path / "trained-round0-of-2-rank1.txt").exists(), "round 0 had both nodes"
    (rank,) = results(tmp_path, 1)
    assert (rank["restart_round"], rank["world_size"], rank["epochs"]) == (1, 1, 2)
    assert "torchrun formed 1 node(s) in this round and Trainer(num_nodes=2) asked for 2" in outputs[0][1]
    resumed, twice = resumed_with_nothing_lost(tmp_path, "failure", before="0-of-2", after="1-of-1")
    assert rank["version"] == 2 * 90 + twice // 16 > resumed["version"]  # K = 1: each batch once


@pytest.mark.multiprocess
@pytest.mark.parametrize("per_node, layout", [(1, []), (2, ["--sharded"])], ids=["one-server", "sharded"])
def test_a_node_that_joins_makes_the_job_go_on_with_more(tmp_path, per_node, layout) -> None:
    # node 0 trains alone (`--nnodes 1:2`, every rank sleeping 0.5 s a step: on a loaded machine node 1's start has
    # taken longer than node 0's whole run at 20 ms, 270 batches; 20 ms once both train); node 1 starts once node
    # 0's rank 0 has trained 10 batches: node 0's agent sees a node waiting and SIGTERMs its workers, which stop at
    # one drain; the server's rank writes its record (sharded: every shard its part of one more recovery point, the
    # first one here) and a round of two nodes resumes from it, without counting a restart. With torchrun's shared
    # store the joining agent hangs in torch 2.13 (see README): TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is part of the
    # command.
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", str(per_node)]
    command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "join"]
    command += ["--rdzv-conf", "last_call_timeout=1", "--max-restarts", "1", str(SCENARIOS), "recover"]
    command += ["--out", str(tmp_path), "--devices", str(per_node), "--num-nodes", "2", "--epochs", "3"]
    command += ["--step-delay", "0.02", "--alone-step-delay", "0.5", *layout]
    env = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    nodes = [subprocess.Popen(command, env=env, stdout=PIPE, stderr=PIPE, text=True)]
    alone = tmp_path / f"trained-round0-of-{per_node}-rank0.txt"
    deadline = time.monotonic() + 120
    while not (alone.exists() and len(alone.read_text().splitlines()) >= 10):
        assert time.monotonic() < deadline and nodes[0].poll() is None, "node 0 never trained alone"
        time.sleep(0.2)
    nodes.append(subprocess.Popen(command, env=env, stdout=PIPE, stderr=PIPE, text=True))
    outputs = [node.communicate(timeout=240) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-3000:] + stderr[-5000:]
    ranks = results(tmp_path, 2 * per_node)
    assert [(r["restart_round"], r["world_size"], r["epochs"]) for r in ranks] == [(0, 2 * per_node, 3)] * len(ranks)
    before, after = f"0-of-{per_node}", f"0-of-{2 * per_node}"
    resumed, twice = resumed_with_nothing_lost(tmp_path, "failure", before, after, epochs=3)
    assert ranks[0]["version"] == 3 * 90 + twice // 16 > resumed["version"]  # K = 1: each batch once


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
