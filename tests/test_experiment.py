"""The experiment script end to end, tiny: two methods, a two-rate grid, one seed, a 3 s budget each."""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env

pytestmark = pytest.mark.multiprocess
EXPERIMENT = Path(__file__).resolve().parents[1] / "benchmarks" / "experiment.py"
METHODS = ("sync (K=N)", "async (K=1)")
ROWS = ("sync (K=N)", "async (K=1) [default]")


def experiment(out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(EXPERIMENT), "--workers", "2", "--budget", "3", "--seeds", "1", "--target", "0.5"]
    command += ["--lr", "0.02", "0.1", "--methods", *METHODS, "--out", str(out)]
    return subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=300)


def test_experiment_reports_both_protocols_and_reuses_finished_runs(tmp_path) -> None:
    result = experiment(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "experiment-digits.json").read_text())
    # a method whose gradients can be stale gets a row per update rule: here the strategy's defaults
    assert {(entry["method"], entry["lr"]) for entry in saved} == {(m, lr) for m in ROWS for lr in (0.02, 0.1)}
    for entry in saved:
        (run,) = entry["runs"]
        assert run["curve"] and run["curve"][-1]["seconds"] <= 3 + 3, "the budget bounds the run"
    loss = {(e["method"], e["lr"]): statistics.mean(r["val_loss"] for r in e["runs"]) for e in saved}
    sync_best = min((0.02, 0.1), key=lambda lr: loss["sync (K=N)", lr])
    async_best = min((0.02, 0.1), key=lambda lr: loss["async (K=1) [default]", lr])
    assert f"shared lr {sync_best:g} (sync's best)" in result.stdout
    assert "each method's best lr" in result.stdout
    best_table = result.stdout.split("each method's best lr")[1]
    assert any(line.startswith(ROWS[1]) and f" {async_best:g} " in line for line in best_table.splitlines())
    rows = [line for line in result.stdout.splitlines() if line.startswith(METHODS)]
    assert len(rows) == 8  # two protocols x two methods x (one seed + the summary)
    png = tmp_path / "experiment-digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = experiment(tmp_path)  # same settings, same folder: every run is reused, so the tables are identical
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == result.stdout


def test_every_method_and_rule_composes_with_the_apps_config(tmp_path) -> None:
    # what each row hands the Hydra app must be valid config: composed here, without training (a schedule's removed
    # `length` key once failed every schedule row of the experiment, and no run-through test had a schedule)
    from hydra import compose, initialize_config_dir

    from lightning_hybrid.app.train import CONFIG_PATH

    sys.path.insert(0, str(EXPERIMENT.parent))
    import experiment

    args = argparse.Namespace(
        max_staleness=8,
        workers=4,
        budget=25,
        data="digits",
        optimizer="sgd",
        model="mlp",
        slowed=1,
        slowdown=3.0,
        delay="fixed",
        compute=0.02,
        probe_every=1.0,
        root=None,
    )
    rows = [experiment.SYNC, "ddp"] + [f"{m} [{r}]" for m in experiment.STALE for r in experiment.RULES]
    with initialize_config_dir(config_dir=str(Path(CONFIG_PATH).resolve()), version_base="1.3"):
        for row in rows:
            overrides = [o for o in experiment.overrides_for(row, 0.1, 1, args, tmp_path) if not o.startswith("hydra.")]
            config = compose(config_name="train", overrides=overrides)
            assert config.model.lr == 0.1, row
