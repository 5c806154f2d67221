"""``HybridSGDStrategy`` for the unified ``lightning`` package (``import lightning as L``).

``import lightning_hybrid`` registers ``"hybrid_sgd"`` and its variants with both Lightning namespaces when both are
installed, so ``L.Trainer(strategy="hybrid_sgd")`` works as ``pl.Trainer(strategy="hybrid_sgd")`` does. A strategy
instance must come from its trainer's namespace: ``lightning_hybrid.HybridSGDStrategy`` for ``pytorch_lightning``,
``lightning_hybrid.lightning.HybridSGDStrategy`` (this package) for ``lightning``. ``ThresholdScheduler`` is one
class that serves both.

This package holds no code of its own: it loads the parent package's Lightning-facing modules (:data:`COPIED`) a
second time under its own name, so that their relative imports resolve here and ``lightning_api`` maps them to
``lightning.pytorch`` and ``lightning.fabric``; the way Lightning makes its unified package from the sources of
``pytorch_lightning``. Nothing else of the parent is reachable under this name.
"""

import importlib.util
import sys
from pathlib import Path

try:
    from lightning.pytorch.strategies import StrategyRegistry
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(
        "lightning_hybrid.lightning serves the unified `lightning` package, which is not installed: "
        "pip install 'lightning-hybrid[lightning]' (or use pytorch_lightning with lightning_hybrid.HybridSGDStrategy)"
    ) from missing

from lightning_hybrid.callbacks import ThresholdScheduler

# The parent's modules that import Lightning, in the order they import one another.
COPIED = ("lightning_api", "lockstep", "checks", "launcher", "strategy")
__path__: list[str] = []  # a package with no folder of its own: only the copies below live under its name

for _name in COPIED:
    _spec = importlib.util.spec_from_file_location(f"{__name__}.{_name}", Path(__file__).parents[1] / f"{_name}.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module
    _spec.loader.exec_module(_module)
    globals()[_name] = _module

HybridSGDStrategy = sys.modules[f"{__name__}.strategy"].HybridSGDStrategy
HybridSGDStrategy.register_strategies(StrategyRegistry)

__all__ = ["COPIED", "HybridSGDStrategy", "ThresholdScheduler"]
