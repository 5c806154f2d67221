"""The Hydra training app: typed configs, and multirun sweeps whose jobs each launch their own workers."""

import csv
import json
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import clean_env

import lightning_hybrid

pytestmark = pytest.mark.multiprocess
TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"


def run_app(*overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(TRAIN), *overrides], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        pytest.fail(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_group(job: Path) -> str:
    wandb = Path(sys.executable).with_name("wandb")
    (run_dir,) = (job / "wandb").glob("offline-run-*")
    records = subprocess.run([str(wandb), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True)
    (run,) = [json.loads(line)["run"] for line in records.stdout.splitlines() if '"type":"run"' in line]
    return run["run_group"]


def test_multirun_sweep_runs_each_job_once_with_its_own_workers(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    run_app("-m", "strategy=sync,async,ddp", "seed=1", "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    results = [json.loads((job / "result.json").read_text()) for job in jobs]
    for job in jobs:
        assert (job / "app_rank1.log").exists(), "rank 1 ran this job, in this job's folder"
        assert not list(job.rglob("multirun.yaml")), "a child re-ran the sweep"
        assert run_group(job) == "sweep", "each job is a W&B run of its own, grouped by sweep"
    assert len({run_group(job) for job in jobs}) == 1
    assert results[1]["version"] > results[0]["version"], "async: an update per gradient"
    assert sum(results[1]["steps_per_rank"]) == 45, "async pulls work: each of the epoch's 45 batches once"
    # K = N with default settings is synchronous SGD: the same result as Lightning's DDP
    assert results[0]["val_loss"] == pytest.approx(results[2]["val_loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.threshhold=1", "Key 'threshhold' not in 'StrategyConfig'"),
        ("trainer.devices=two", "Value 'two' of type 'str' could not be converted to Integer"),
        ("strategy=hybird", "Could not find 'strategy/hybird'"),
    ],
)
def test_a_wrong_key_or_type_is_refused_naming_it(tmp_path, override, message) -> None:
    result = run_app(override, cwd=tmp_path, check=False)
    assert result.returncode != 0 and message in result.stderr + result.stdout


def test_the_scheduled_hybrid_runs_on_a_sharded_server(tmp_path) -> None:
    # the default strategy (K moved from N/2 towards N by the cosine schedule) with every rank serving a shard
    run_app(
        "strategy.shard_server=true", "logger=csv", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    (metrics,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with metrics.open() as handle:
        epochs = [row for row in csv.DictReader(handle) if row.get("hybrid/threshold")]
    # the cosine from 50% to sync spans the run's 3 epochs: K = 1, 1.5 (rounds to 2), 2 of 2
    assert [float(row["hybrid/threshold"]) for row in epochs] == [1.0, 2.0, 2.0]
    assert float(epochs[-1]["hybrid/gradients_per_update"]) > 1.0, "the last epoch's updates held several gradients"
    result = json.loads((tmp_path / "result.json").read_text())
    assert sum(result["steps_per_rank"]) == 135 and result["val_acc"] > 0.8


def test_console_script_is_installed(tmp_path) -> None:
    script = Path(sys.executable).with_name("lightning-hybrid-train")
    result = subprocess.run([str(script), "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "scheduled: true" in result.stdout and "name: cosine" in result.stdout


def test_delays_from_config_slow_the_chosen_rank(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    run_app(
        "-m",
        "strategy=async",
        "logger=csv",
        "trainer.max_epochs=2",
        "delays.ranks=[1]",
        "delays.slowdown=1,6",
        "delays.communication.kind=uniform",
        "delays.communication.scale=0.002",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    plain, slowed = (json.loads((sweep / job / "result.json").read_text())["steps_per_rank"] for job in ("0", "1"))
    assert sum(plain) == sum(slowed) == 90, "pulled work: 45 batches per epoch, each used once"
    assert slowed[1] < plain[1], (plain, slowed)
    # an unscheduled hybrid strategy logs the scheduled one's telemetry too (K stays 1)
    (metrics,) = (sweep / "1").glob("lightning_logs/version_*/metrics.csv")
    with metrics.open() as handle:
        epochs = [row for row in csv.DictReader(handle) if row.get("hybrid/threshold")]
    assert [float(row["hybrid/threshold"]) for row in epochs] == [1.0, 1.0]
    assert float(epochs[-1]["hybrid/staleness_mean"]) > 0.0, "async with a slowed rank: stale gradients"


def test_mnist_files_and_the_cnn_through_the_app(tmp_path) -> None:
    import numpy as np
    from test_data import write_idx

    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 16)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), compress=True)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, compress=True)
    run_app(
        "data=mnist",
        f"data.root={tmp_path}",
        "data.batch_size=8",
        "model=cnn",
        "strategy=async",
        "logger=csv",
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert sum(result["steps_per_rank"]) == 8 and result["version"] == 8  # 64 images / batch 8, K = 1
    failed = run_app("data=mnist", cwd=tmp_path, check=False)
    assert failed.returncode != 0 and "set data.root=/path/to/them" in failed.stderr + failed.stdout


def test_the_demo_prints_no_warning_of_this_package(tmp_path) -> None:
    # every module of lightning_hybrid turns its warnings into errors (in every rank: the children inherit the
    # environment); the two that the project used to cause through Lightning and W&B are gone
    modules = [name for _, name, _ in pkgutil.walk_packages(lightning_hybrid.__path__, "lightning_hybrid.")]
    env = clean_env(PYTHONWARNINGS=",".join(f"error:::{name}" for name in ["lightning_hybrid", *modules]))
    demo = Path(__file__).parents[1] / "examples" / "demo.py"
    command = [sys.executable, str(demo), "--workers", "2", "--epochs", "1", "--save-dir", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    console = result.stdout + result.stderr
    assert "validation" in console and "sync_dist=True" not in console and "anonymous" not in console, console


def run_cli(cwd: Path, *args: str) -> list[dict[str, str]]:
    """examples/cli.py fit with ARGS (2 worker processes); the rows of its CSV log that hold K."""
    cli = Path(__file__).parents[1] / "examples" / "cli.py"
    command = [sys.executable, str(cli), "fit", *args]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    (metrics,) = cwd.glob("cli_runs/lightning_logs/version_*/metrics.csv")
    with metrics.open() as handle:
        return [row for row in csv.DictReader(handle) if row.get("hybrid/threshold")]


def test_lightning_cli_takes_the_strategy_and_the_scheduler_from_yaml_and_from_flags(tmp_path) -> None:
    # the YAML (examples/cli.yaml): HybridSGDStrategy by class path with threshold=50%, ThresholdScheduler by name;
    # a linear ramp from async to sync over the run's 3 epochs, 2 workers: K = 1, 1.5 (rounds to 2), 2
    (tmp_path / "yaml").mkdir()
    rows = run_cli(tmp_path / "yaml", "--config", str(Path(__file__).parents[1] / "examples" / "cli.yaml"))
    assert [float(row["hybrid/threshold"]) for row in rows] == [1.0, 2.0, 2.0]
    # from flags: the strategy by its registered name, the callback appended, over 2 epochs: K = 1, then 2
    (tmp_path / "flags").mkdir()
    flags = ["--trainer.strategy=hybrid_sgd", "--trainer.devices=2", "--trainer.max_epochs=2"]
    flags += ["--trainer.accelerator=cpu", "--trainer.logger=CSVLogger", "--trainer.logger.save_dir=cli_runs"]
    flags += ["--trainer.callbacks+=lightning_hybrid.ThresholdScheduler", "--trainer.callbacks.schedule=linear"]
    rows = run_cli(tmp_path / "flags", *flags)
    assert [float(row["hybrid/threshold"]) for row in rows] == [1.0, 2.0]


def test_a_ddp_job_names_the_hybrid_options_it_ignores() -> None:
    # a sweep's DDP baseline may carry the hybrid jobs' keys: it runs, and says which it ignores
    from hydra import compose, initialize_config_dir

    from lightning_hybrid.app.train import CONFIG_PATH, build_strategy

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        plain = compose(config_name="train", overrides=["strategy=ddp"])
        carrying = compose(config_name="train", overrides=["strategy=ddp", "strategy.shard_server=true"])
    with pytest.warns(UserWarning, match=r"strategy=ddp ignores the hybrid_sgd options strategy.shard_server=True$"):
        build_strategy(carrying)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_strategy(plain)
