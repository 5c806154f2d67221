"""Shared helpers: launch a scenario of ``tests/scenarios.py`` as a real multi-process run."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_hybrid.launcher import environment_for_a_new_launch

SCENARIOS = Path(__file__).with_name("scenarios.py")


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
        pytest.fail(f"{scenario} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def results(out: Path, ranks: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
