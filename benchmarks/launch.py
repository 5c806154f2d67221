"""Running one benchmark configuration as a real multi-process Lightning job and reading its results."""

from __future__ import annotations

import json
import subprocess
import sys
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


def write_result(out: str, rank: int, result: dict[str, Any]) -> None:
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
