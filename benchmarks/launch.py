"""Running one benchmark configuration as a real multi-process Lightning job and reading its results."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lightning_hybrid.launcher import environment_for_a_new_launch


def run_configuration(script: str, out: Path, workers: int, *args: str) -> list[dict[str, Any]]:
    """Run ``script --run --out OUT --workers N ARGS`` (its Lightning launcher starts the other ranks) and
    return what every rank wrote to ``OUT/rank{r}.json``."""
    out.mkdir(parents=True, exist_ok=True)
    env = environment_for_a_new_launch()
    command = [sys.executable, script, "--run", "--out", str(out), "--workers", str(workers), *args]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]


def run_loopback_nodes(nodes: int, command: list[str], env: dict[str, str], timeout: float) -> list[tuple[int, str]]:
    """Run ``command`` (a script and its arguments) as ``nodes`` torchrun "nodes" of one process each on 127.0.0.1,
    stopped after ``timeout`` seconds; returns each node's exit code and output. Also the tests' launcher
    (tests/conftest.py): two ranks where one GPU is all there is."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    # torchrun sets OMP_NUM_THREADS=1 only for several processes per node; without it Lightning gives each rank
    # all the cores (2 ranks on 2 cores: 3x slower DDP here, a spinning OpenMP thread per rank)
    env = {"OMP_NUM_THREADS": "1", **env}
    processes = [
        subprocess.Popen(
            [*torchrun, "--node-rank", str(node), *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(nodes)
    ]
    outputs, deadline = [], time.monotonic() + timeout
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                other.terminate()  # torchrun stops its worker, then itself
            try:
                output = process.communicate(timeout=60)[0]
            except subprocess.TimeoutExpired:
                process.kill()
                output = process.communicate()[0]
            outputs.append(f"{output}\n(stopped after {timeout:.0f} s)")
    return [(process.returncode, output) for process, output in zip(processes, outputs)]


def run_on_nodes(
    script: str, out: Path, nodes: int, *args: str, timeout: float, log: Path | None = None
) -> list[dict[str, Any] | None]:
    """Run ``script --configuration --out OUT --workers NODES --num-nodes NODES ARGS`` as ``nodes`` torchrun
    "nodes" of one process each on 127.0.0.1 (:func:`run_loopback_nodes`); their output is appended to ``log``.
    Returns what each rank wrote to ``OUT/rank{r}.json`` (None: nothing)."""
    out.mkdir(parents=True, exist_ok=True)
    # not --run: torchrun parses its script's options too and finds --run an ambiguous prefix of its --run-path
    command = [script, "--configuration", "--out", str(out), "--workers", str(nodes), "--num-nodes", str(nodes), *args]
    finished = run_loopback_nodes(nodes, command, environment_for_a_new_launch(), timeout)
    if log is not None:
        with log.open("a") as file:
            for node, (code, output) in enumerate(finished):
                file.write(f"=== {' '.join(args)}: node {node}, exit {code}\n{output}\n")
    paths = [out / f"rank{r}.json" for r in range(nodes)]
    return [json.loads(path.read_text()) if path.exists() else None for path in paths]


def write_result(out: str, rank: int, result: dict[str, Any]) -> None:
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
