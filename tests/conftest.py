"""Shared helpers: launch a scenario of ``tests/scenarios.py`` as a real multi-process run. They import without
pytest (a failed launch then raises AssertionError), so that ``python tests/test_gpu.py`` runs on a GPU machine
that has no pytest."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import torch

try:
    import pytest
except ImportError:  # a plain script (tests/test_gpu.py) on a machine without pytest
    pytest = None

from lightning_hybrid.launcher import environment_for_a_new_launch

SCENARIOS = Path(__file__).with_name("scenarios.py")
BENCHMARKS = SCENARIOS.parents[1] / "benchmarks"


def clean_env(**extra: str) -> dict[str, str]:
    env = environment_for_a_new_launch()
    env.update(WANDB_MODE="offline", PYTHONUNBUFFERED="1", **extra)
    return env


def launch(
    scenario: str, out: Path, *args: Any, timeout: float = 240, check: bool = True
) -> subprocess.CompletedProcess:
    """Run one scenario; its Lightning launcher starts the other ranks as processes of their own.
    ``args`` are the scenario's own command-line words (``python tests/scenarios.py SCENARIO --help``);
    a string of several words is split at spaces."""
    words = [word for arg in args for word in str(arg).split()]
    command = [sys.executable, str(SCENARIOS), scenario, "--out", str(out), *words]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        fail(f"{scenario} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def launch_nodes(scenario: str, out: Path, *args: Any, nodes: int = 2, timeout: float = 240) -> None:
    """Run one scenario as ``nodes`` torchrun "nodes" of one process each on 127.0.0.1 (``--num-nodes nodes
    --devices 1``): two ranks even where one GPU is all there is (Lightning refuses ``devices=2`` there)."""
    words = [word for arg in args for word in str(arg).split()]
    command = [str(SCENARIOS), scenario, "--out", str(out), "--num-nodes", str(nodes), "--devices", "1", *words]
    finished = benchmark("launch").run_loopback_nodes(nodes, command, clean_env(), timeout)
    if any(code != 0 for code, _ in finished):
        fail(
            f"{scenario} on {nodes} nodes failed ({[code for code, _ in finished]}):\n"
            + "\n".join(f"--- node {node}\n{output[-4000:]}" for node, (_, output) in enumerate(finished))
        )


def benchmark(name: str) -> types.ModuleType:
    """``benchmarks/NAME.py`` under its own name (benchmarks/ is no package; its scripts import one another so),
    e.g. the loopback node launcher or the emulated cluster that tests share with the benchmarks."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def fail(message: str) -> None:
    if pytest is not None:
        pytest.fail(message)
    raise AssertionError(message)


def max_difference(a: dict, b: dict, only: str = "") -> float:
    """The largest difference between two state dicts, over the entries whose names start with ``only``."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if k.startswith(only))


def results(out: Path, ranks: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
