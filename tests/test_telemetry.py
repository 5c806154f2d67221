"""ThresholdScheduler raises K epoch by epoch; the offline W&B run holds the series and histograms,
read back with wandb's own reader (`wandb leet inspect --json`)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import launch

pytestmark = pytest.mark.multiprocess


def wandb_history(run_dir: Path) -> list[dict]:
    wandb = Path(sys.executable).with_name("wandb")
    records = subprocess.run(
        [str(wandb), "leet", "inspect", "--json", str(run_dir)], check=True, capture_output=True, text=True
    ).stdout
    rows = [json.loads(line) for line in records.splitlines() if line.strip()]
    return [row["history"]["item"] for row in rows if row["type"] == "history"]


def test_threshold_rises_and_wandb_holds_the_telemetry(tmp_path) -> None:
    launch("telemetry", tmp_path, "--devices 3 --epochs 3 --batches 10 --slow-rank 2 --delay 0.02")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = wandb_history(run_dir)
    epochs = [row for row in history if "hybrid/threshold" in row]
    # linear schedule from 1 (async) to N = 3 over 2 epochs: K = 1, 2, 3
    assert [row["hybrid/threshold"] for row in epochs] == [1, 2, 3]
    assert [row["epoch"] for row in epochs] == [0, 1, 2]
    versions = [row["hybrid/version"] for row in epochs]
    assert versions == sorted(versions) and versions[0] > 0
    for row in epochs:
        assert row["hybrid/staleness_max"] >= row["hybrid/staleness_p95"] >= row["hybrid/staleness_p50"] >= 0
        assert 1 <= row["hybrid/gradients_per_update"] <= 3 and row["hybrid/rejected"] == 0
        for rank in range(3):
            assert row[f"hybrid/worker{rank}/steps"] >= 1
            assert 0 <= row[f"hybrid/worker{rank}/wait_fraction"] <= 1
            assert row[f"hybrid/worker{rank}/samples_per_s"] > 0
    assert epochs[0]["hybrid/staleness_max"] > 0, "asynchronous epoch with a slow worker: stale gradients"
    # K = 1 of 3: an update moves a third of a sync step (group_scaling="step"), less when stale (weighed by
    # 1 / (1 + staleness in sync updates)); K = 3: most updates move a full one
    assert 0 < epochs[0]["hybrid/step_scale"] <= 1 / 3
    # (the epoch's mean is a difference of running totals over the epoch's updates: 1 may come out as 1 + 2e-16)
    assert epochs[0]["hybrid/step_scale"] < epochs[2]["hybrid/step_scale"] <= 1 + 1e-9
    assert all(row["hybrid/momentum"] == pytest.approx(0.9) and row["hybrid/dropped"] == 0 for row in epochs)
    histograms = [row for row in history if row.get("hybrid/staleness._type") == "histogram"]
    assert len(histograms) == 3
    assert sum(histograms[0]["hybrid/staleness.values"]) == epochs[0]["hybrid/version"]  # K = 1: one per update
    # any logger works: the CSVLogger got the same series
    (metrics,) = (tmp_path / "lightning_logs").glob("version_*/metrics.csv")
    with metrics.open() as handle:
        thresholds = [float(r["hybrid/threshold"]) for r in csv.DictReader(handle) if r.get("hybrid/threshold")]
    assert thresholds == [1.0, 2.0, 3.0]


def test_dashboard_builds_offline_with_the_logged_metrics() -> None:
    from lightning_hybrid.app.dashboard import build_workspace

    workspace = build_workspace("an-entity", "a-project")
    titles = [panel.title for section in workspace.sections for panel in section.panels]
    assert {"hybrid/threshold", "hybrid/staleness_mean", "hybrid/step_scale", "hybrid/dropped", "wait_fraction"} <= set(
        titles
    )
    result = subprocess.run(
        [sys.executable, "-m", "lightning_hybrid.app.dashboard", "--entity", "e", "--project", "p"],
        capture_output=True,
        text=True,
        env={"WANDB_MODE": "offline", "PATH": ""},
        check=True,
    )
    assert "built workspace 'hybrid_sgd telemetry' with 14 panels for e/p; not saved" in result.stdout
