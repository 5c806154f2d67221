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
import uuid
from pathlib import Path

import pytest
import torch
from conftest import SCENARIOS, clean_env, results

pytestmark = pytest.mark.multiprocess
PEER_TIMEOUT = 10
PG_TIMEOUT = 20


def ip(*words: str) -> None:
    subprocess.run(["ip", *words], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Namespaces ``a`` (10.77.0.1) and ``b`` (10.77.0.2) joined by veth; yields (names, cut, mend)."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"lh-a-{tag}", f"lh-b-{tag}"
    try:
        ip("netns", "add", a)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot make a network namespace here (needs root and iproute2): {err}")
    try:
        ip("netns", "add", b)
        ip("link", "add", f"va-{tag}", "type", "veth", "peer", "name", f"vb-{tag}")
        for space, device, address in ((a, f"va-{tag}", "10.77.0.1/24"), (b, f"vb-{tag}", "10.77.0.2/24")):
            ip("link", "set", device, "netns", space)
            ip("-n", space, "addr", "add", address, "dev", device)
            ip("-n", space, "link", "set", device, "up")
            ip("-n", space, "link", "set", "lo", "up")

        def set_link(state: str) -> None:
            ip("-n", a, "link", "set", f"va-{tag}", state)

        yield {"a": (a, f"va-{tag}"), "b": (b, f"vb-{tag}")}, lambda: set_link("down"), lambda: set_link("up")
    finally:
        for space in (a, b):
            pids = subprocess.run(["ip", "netns", "pids", space], capture_output=True, text=True).stdout.split()
            for pid in pids:  # whatever a failed run left behind
                os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", space], capture_output=True)


def start_nodes(hosts: dict, out: Path, *args: str) -> list[subprocess.Popen]:
    port = "29611"
    processes = []
    for node, name in enumerate(("a", "b")):
        space, device = hosts[name]
        command = ["ip", "netns", "exec", space, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        command += ["--node-rank", str(node), "--nproc-per-node", "1", "--master-addr", "10.77.0.1"]
        command += ["--master-port", port, str(SCENARIOS), "nodes", "--out", str(out), "--num-nodes", "2"]
        command += ["--devices", "1", "--threshold", "sync", "--peer-timeout", str(PEER_TIMEOUT)]
        # a cut during one of Lightning's own collectives (checkpoint, epoch end) waits the process groups' timeout
        command += ["--pg-timeout", str(PG_TIMEOUT), *args]
        env = clean_env(GLOO_SOCKET_IFNAME=device, TP_SOCKET_IFNAME=device)
        processes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        )
    return processes


def test_cut_link_stops_both_nodes_and_the_last_checkpoint_resumes(tmp_path, two_hosts) -> None:
    hosts, cut, mend = two_hosts
    # 10 steps per epoch, rank 1 sleeps 20 ms per step, a checkpoint every 5 steps, more epochs than will run
    run = ["--batches", "10", "--slow-rank", "1", "--delay", "0.02"]
    nodes = start_nodes(hosts, tmp_path, *run, "--epochs", "1000", "--checkpoint-every", "5")
    checkpoints = tmp_path / "ckpts"
    deadline = time.monotonic() + 120
    while len(list(checkpoints.glob("*.ckpt"))) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in nodes), "no checkpoints before the cut"
        time.sleep(0.2)
    cut_at = time.monotonic()
    cut()
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
    mend()
    resumed = tmp_path / "resumed"
    epochs = str(saved["epoch"] + 2)
    nodes = start_nodes(hosts, resumed, *run, "--epochs", epochs, "--resume-from", str(last))
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    node_a, node_b = results(resumed, 2)
    assert node_a["global_step"] > saved["global_step"]
    for name, value in node_a["weights"].items():
        assert torch.equal(value, node_b["weights"][name])
