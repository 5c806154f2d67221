"""Both Lightning namespaces, both installed: ``pytorch_lightning`` and the unified ``lightning`` package."""

import importlib
import math
import pkgutil
import re
import subprocess
import sys
import types
from pathlib import Path

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import torch
from conftest import clean_env, launch, results

import lightning_hybrid
import lightning_hybrid.lightning
from lightning_hybrid.strategy import REGISTERED_VARIANTS

# The modules loaded a second time for the unified package (see lightning_hybrid/lightning_api.py); every other
# module must exist once, so that e.g. `except lightning_hybrid.HybridSGDError` catches what either copy raises.
LIGHTNING_FACING = {"checks", "launcher", "lightning_api", "lockstep", "strategy"}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_each_registry_holds_every_variant_with_its_namespaces_class() -> None:
    for registry, strategy in (
        (pl.strategies.StrategyRegistry, pl.strategies.DDPStrategy),
        (L.strategies.StrategyRegistry, L.strategies.DDPStrategy),
    ):
        for name, _, options in REGISTERED_VARIANTS:
            assert issubclass(registry[name]["strategy"], strategy)
            assert registry[name]["init_params"] == options
    assert pl.strategies.StrategyRegistry["hybrid_sgd"]["strategy"] is lightning_hybrid.HybridSGDStrategy
    assert L.strategies.StrategyRegistry["hybrid_sgd"]["strategy"] is lightning_hybrid.lightning.HybridSGDStrategy


def test_only_the_lightning_facing_modules_are_copied_and_the_copies_hold_nothing_of_pytorch_lightning() -> None:
    copies = {name.rpartition(".")[2] for name in sys.modules if name.startswith("lightning_hybrid.lightning.")}
    assert copies == LIGHTNING_FACING == set(lightning_hybrid.lightning.COPIED)
    walked = [name for _, name, _ in pkgutil.walk_packages(lightning_hybrid.__path__, "lightning_hybrid.")]
    assert "lightning_hybrid.lightning" in walked and not any(
        n.startswith("lightning_hybrid.lightning.") for n in walked
    )
    with pytest.raises(ModuleNotFoundError):  # nothing else of the parent under the copy's name
        importlib.import_module("lightning_hybrid.lightning.server")
    for name in LIGHTNING_FACING:
        copy = sys.modules[f"lightning_hybrid.lightning.{name}"]
        for symbol, value in vars(copy).items():
            origin = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", "")
            assert not str(origin).startswith(("pytorch_lightning", "lightning_fabric")), (name, symbol, origin)
    assert lightning_hybrid.lightning.ThresholdScheduler is lightning_hybrid.ThresholdScheduler


@pytest.mark.parametrize(
    "trainer, strategy, right_import",
    [
        (L.Trainer, lightning_hybrid.HybridSGDStrategy, "lightning_hybrid.lightning.HybridSGDStrategy"),
        (pl.Trainer, lightning_hybrid.lightning.HybridSGDStrategy, "lightning_hybrid.HybridSGDStrategy"),
    ],
)
def test_a_strategy_of_the_other_namespace_is_refused_naming_the_right_import(trainer, strategy, right_import) -> None:
    with pytest.raises(ValueError, match=f"Trainer takes {right_import}"):
        trainer(strategy=strategy(), logger=False)


@pytest.mark.parametrize("package", [pl, L], ids=["pytorch_lightning", "lightning"])
def test_one_threshold_scheduler_serves_either_trainer_and_its_time_budget(package) -> None:
    scheduler = lightning_hybrid.ThresholdScheduler("linear")
    assert isinstance(scheduler, pl.Callback) and isinstance(scheduler, L.Callback)
    trainer = package.Trainer(
        strategy="hybrid_sgd",
        accelerator="cpu",
        devices=1,
        max_time={"minutes": 1},
        callbacks=[scheduler],
        logger=False,
    )
    scheduler.setup(trainer, package.LightningModule(), "fit")
    assert scheduler.progress == "time"  # it found this namespace's Timer: the schedule spans the budget


@pytest.mark.multiprocess
def test_both_namespaces_fit_validate_checkpoint_and_resume_alike(tmp_path) -> None:
    """K = N on static shards is deterministic: the unified package's copy trains exactly as the original."""
    runs = {}
    for namespace in ("pytorch_lightning", "lightning"):
        launch("namespace", tmp_path / namespace, "--namespace", namespace, "--epochs 2 --batches 6")
        runs[namespace] = results(tmp_path / namespace, 2)
    for namespace, ranks in runs.items():
        module = "lightning_hybrid.lightning.strategy" if namespace == "lightning" else "lightning_hybrid.strategy"
        for rank in ranks:
            assert rank["strategies"] == (module, module)
            assert rank["version"] == 12 and rank["resumed_version"] == 18  # the resumed fit went on from 12
            assert rank["val_loss"] == ranks[0]["val_loss"]
    for original, unified in zip(runs["pytorch_lightning"], runs["lightning"]):
        for key in ("fitted", "resumed_weights"):
            assert all(torch.equal(original[key][k], unified[key][k]) for k in original[key])
        assert original["val_loss"] == unified["val_loss"]
    metrics = (tmp_path / "lightning" / "csv" / "version_0" / "metrics.csv").read_text()
    for key in ("hybrid/threshold", "hybrid/version", "hybrid/staleness_mean", "hybrid/worker1/samples_per_s"):
        assert key in metrics.splitlines()[0]


@pytest.mark.multiprocess
def test_the_unified_example_ramps_k_from_async_to_sync(tmp_path) -> None:
    """examples/unified.py as a user runs it: `L.Trainer(strategy="hybrid_sgd")`, ThresholdScheduler by name."""
    command = [sys.executable, str(EXAMPLES / "unified.py"), "--workers", "2", "--epochs", "3"]
    run = subprocess.run(command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = re.search(
        r"lightning\.pytorch \+ (\S+)\.HybridSGDStrategy: K (\d) of 2, (\d+) updates.*val_acc ([\d.]+)", run.stdout
    )
    assert summary, run.stdout[-2000:]
    module, last_k, updates, accuracy = summary.groups()
    assert module == "lightning_hybrid.lightning.strategy" and last_k == "2"
    ramp = lightning_hybrid.make_schedule("linear", length=2)  # a named ramp spans the run: max_epochs - 1
    assert int(updates) == sum(math.ceil(45 / ramp(epoch, 2)) for epoch in range(3))  # 45 batches an epoch
    assert float(accuracy) > 0.8
