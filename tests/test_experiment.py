"""The experiment script end to end, tiny: two methods, one seed, a 4 s budget each."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env

pytestmark = pytest.mark.multiprocess
EXPERIMENT = Path(__file__).resolve().parents[1] / "benchmarks" / "experiment.py"


def test_experiment_prints_a_table_and_writes_a_plot(tmp_path) -> None:
    command = [
        sys.executable,
        str(EXPERIMENT),
        "--workers",
        "2",
        "--budget",
        "4",
        "--seeds",
        "1",
        "--target",
        "0.5",
        "--methods",
        "sync (K=N)",
        "async (K=1)",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("sync (K=N)", "async (K=1)"))]
    assert len(rows) == 4  # per seed and the summary, for each method
    png = tmp_path / "experiment-digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "experiment-digits.json").read_text())
    for method in ("sync (K=N)", "async (K=1)"):
        (run,) = saved[method]
        assert run["curve"] and run["curve"][-1]["seconds"] <= 4 + 3, "the budget bounds the run"
        assert run["val_acc"] > 0.5
