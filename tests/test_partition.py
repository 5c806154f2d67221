"""A network partition between two nodes: hosts of the test's own in network namespaces joined by a veth
pair, one torchrun node in each. The link is cut mid-run: both sides stop within a bounded time with a
clear error, nothing hangs, and the last checkpoint is intact and resumes once the link is back.

Needs root and iproute2 (CI runs as root); skipped where namespaces cannot be made."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SCENARIOS, benchmark, clean_env, results

pytestmark = pytest.mark.multiprocess
PEER_TIMEOUT = 10
PG_TIMEOUT = 20


netns_cluster = benchmark("netns_cluster")


@pytest.fixture
def two_hosts():
    """Two nodes of an emulated cluster (``benchmarks/netns_cluster.py``) on unthrottled 10 Gbit/s links."""
    try:
        with netns_cluster.EmulatedCluster(2, 10_000.0) as cluster:
            yield cluster
    except netns_cluster.ClusterUnavailable as err:
        pytest.skip(f"no emulated cluster here (needs root, iproute2 and tc): {err}")


def start_nodes(cluster, out: Path, *args: str) -> list[subprocess.Popen]:
    port = "29611"
    processes = []
    for node in cluster.nodes:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        command += ["--node-rank", str(node.index), "--nproc-per-node", "1", "--master-addr", cluster.nodes[0].address]
        command += ["--master-port", port, str(SCENARIOS), "nodes", "--out", str(out), "--num-nodes", "2"]
        command += ["--devices", "1", "--threshold", "sync", "--peer-timeout", str(PEER_TIMEOUT)]
        # a cut during one of Lightning's own collectives (checkpoint, epoch end) waits the process groups' timeout
        command += ["--pg-timeout", str(PG_TIMEOUT), *args]
        env = clean_env(GLOO_SOCKET_IFNAME=node.device, TP_SOCKET_IFNAME=node.device)
        processes.append(
            cluster.popen(
                node.index,
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    return processes


def test_cut_link_stops_both_nodes_and_the_last_checkpoint_resumes(tmp_path, two_hosts) -> None:
    # 10 steps per epoch, rank 1 sleeps 20 ms per step, a checkpoint every 5 steps, more epochs than will run
    run = ["--batches", "10", "--slow-rank", "1", "--delay", "0.02"]
    nodes = start_nodes(two_hosts, tmp_path, *run, "--epochs", "1000", "--checkpoint-every", "5")
    checkpoints = tmp_path / "ckpts"
    deadline = time.monotonic() + 120
    while len(list(checkpoints.glob("*.ckpt"))) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in nodes), "no checkpoints before the cut"
        time.sleep(0.2)
    cut_at = time.monotonic()
    two_hosts.set_link(0, up=False)
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=PEER_TIMEOUT + 90)[0])
        except subprocess.TimeoutExpired:
            for other in nodes:  # the agent and its worker: the whole session, or the pipe never closes
                os.killpg(other.pid, signal.SIGKILL)
            tails = [other.communicate()[0][-3000:] for other in nodes]
            pytest.fail("a node hung after the link was cut:\n" + "\n-----\n".join(tails))
    stopped_after = time.monotonic() - cut_at
    assert all(node.returncode != 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert stopped_after < PG_TIMEOUT + 60, f"took {stopped_after:.0f} s"
    text = "\n".join(outputs)
    clear = (f"within {PEER_TIMEOUT} s", "was lost", "lost the parameter server", "Timed out")
    assert any(words in text for words in clear), text[-4000:]

    last = max(checkpoints.glob("*.ckpt"), key=lambda path: torch.load(path, weights_only=False)["global_step"])
    saved = torch.load(last, weights_only=False)  # intact: it loads, with the strategy's state in it
    assert saved["global_step"] >= 5 and "hybrid_sgd" in saved
    two_hosts.set_link(0, up=True)
    resumed = tmp_path / "resumed"
    epochs = str(saved["epoch"] + 2)
    nodes = start_nodes(two_hosts, resumed, *run, "--epochs", epochs, "--resume-from", str(last))
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    node_a, node_b = results(resumed, 2)
    assert node_a["global_step"] > saved["global_step"]
    for name, value in node_a["weights"].items():
        assert torch.equal(value, node_b["weights"][name])
