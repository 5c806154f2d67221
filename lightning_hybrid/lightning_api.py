"""Every Lightning symbol the strategy's modules use, from the Lightning namespace this copy of them serves.

Lightning ships one code base under two names: ``pytorch_lightning`` with ``lightning_fabric``, and the unified
``lightning`` package (``lightning.pytorch``, ``lightning.fabric``), which Lightning's own build makes from the same
source by swapping the package names. Their classes are distinct, and a trainer accepts only a strategy built on its
own ``DDPStrategy``. So the Lightning-facing modules (``strategy``, ``lockstep``, ``checks``, ``launcher``) import
Lightning from here alone, and one another relatively: imported as ``lightning_hybrid.<module>`` they serve
``pytorch_lightning``; loaded a second time as ``lightning_hybrid.lightning.<module>`` (see that package) this module
maps them to ``lightning.pytorch``. Every other module of the package is free of Lightning's classes and exists once.
"""

from __future__ import annotations

from importlib import import_module

SERVES_UNIFIED_PACKAGE = __name__.startswith("lightning_hybrid.lightning.")
PYTORCH, FABRIC = (
    ("lightning.pytorch", "lightning.fabric") if SERVES_UNIFIED_PACKAGE else ("pytorch_lightning", "lightning_fabric")
)

# The strategy class each namespace's Trainer takes, by its public import (the rule README states).
STRATEGY_FOR = {
    "pytorch_lightning": "lightning_hybrid.HybridSGDStrategy",
    "lightning.pytorch": "lightning_hybrid.lightning.HybridSGDStrategy",
}


def _from(module: str, *names: str) -> tuple:
    imported = import_module(module)
    return tuple(getattr(imported, name) for name in names)


pl = import_module(PYTORCH)
# Modules whose private functions lockstep swaps for one fit, and restores.
lightning_ddp = import_module(f"{PYTORCH}.strategies.ddp")
lightning_launcher = import_module(f"{PYTORCH}.strategies.launchers.subprocess_script")

Callback, Timer = _from(f"{PYTORCH}.callbacks", "Callback", "Timer")
(DDPStrategy,) = _from(f"{PYTORCH}.strategies", "DDPStrategy")
(Precision,) = _from(f"{PYTORCH}.plugins.precision", "Precision")
RunningStage, TrainerFn = _from(f"{PYTORCH}.trainer.states", "RunningStage", "TrainerFn")
(SIGTERMException,) = _from(f"{PYTORCH}.utilities.exceptions", "SIGTERMException")
(is_overridden,) = _from(f"{PYTORCH}.utilities.model_helpers", "is_overridden")
rank_zero_info, rank_zero_warn = _from(f"{PYTORCH}.utilities.rank_zero", "rank_zero_info", "rank_zero_warn")
(_sync_module_states,) = _from(f"{PYTORCH}.overrides.distributed", "_sync_module_states")
(_SubprocessScriptLauncher,) = _from(f"{PYTORCH}.strategies.launchers", "_SubprocessScriptLauncher")

CheckpointIO, ClusterEnvironment = _from(f"{FABRIC}.plugins", "CheckpointIO", "ClusterEnvironment")
(default_pg_timeout,) = _from(f"{FABRIC}.plugins.collectives.torch_collective", "default_pg_timeout")
(_StrategyRegistry,) = _from(f"{FABRIC}.strategies", "_StrategyRegistry")
(MisconfigurationException,) = _from(f"{FABRIC}.utilities.exceptions", "MisconfigurationException")
(_destroy_dist_connection,) = _from(f"{FABRIC}.utilities.distributed", "_destroy_dist_connection")
_PATH, ReduceOp = _from(f"{FABRIC}.utilities.types", "_PATH", "ReduceOp")
