"""Launching like DDP: two node launches on loopback, by torchrun and by Lightning's own environment."""

import subprocess
import sys

import pytest
import torch
from conftest import SCENARIOS, clean_env, free_port, results

pytestmark = pytest.mark.multiprocess


def run_nodes(commands_and_envs, timeout: float = 180) -> None:
    processes = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd, env in commands_and_envs
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]


def scenario_args(out) -> list[str]:
    return ["nodes", "--out", str(out), "--num-nodes", "2", "--devices", "1", "--threshold", "1", "--batches", "5"]


def check_two_nodes(out) -> None:
    node0, node1 = results(out, 2)
    assert (node0["world_size"], node0["node_rank"], node1["node_rank"]) == (2, 0, 1)
    # K = 1: one update per gradient, 2 workers x 5 batches x 2 epochs
    assert node0["update_sizes"] == {1: 20} and node0["version"] == node1["version"] == 20
    for name, value in node0["weights"].items():
        assert torch.equal(value, node1["weights"][name])


def test_torchrun_two_nodes_on_loopback(tmp_path) -> None:
    port = free_port()
    run_nodes(
        (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(SCENARIOS),
                *scenario_args(tmp_path),
            ],
            clean_env(),
        )
        for node in (0, 1)
    )
    check_two_nodes(tmp_path)


def test_lightning_environment_two_nodes_on_loopback(tmp_path) -> None:
    port = str(free_port())
    run_nodes(
        (
            [sys.executable, str(SCENARIOS), *scenario_args(tmp_path)],
            clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node)),
        )
        for node in (0, 1)
    )
    check_two_nodes(tmp_path)
