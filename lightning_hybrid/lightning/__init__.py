"""``HybridSGDStrategy`` for the unified ``lightning`` package (``import lightning as L``).

``import lightning_hybrid`` registers ``"hybrid_sgd"`` and its variants with both Lightning namespaces when both are
installed, so ``L.Trainer(strategy="hybrid_sgd")`` works as ``pl.Trainer(strategy="hybrid_sgd")`` does. A strategy
instance must come from its trainer's namespace: ``lightning_hybrid.HybridSGDStrategy`` for ``pytorch_lightning``,
``lightning_hybrid.lightning.HybridSGDStrategy`` (this package) for ``lightning``. ``ThresholdScheduler`` is one
class that serves both.

This package holds no code of its own: it loads the parent package's Lightning-facing modules (``strategy``,
``lockstep``, ``checks``, ``launcher``, ``lightning_api``) a second time under its own name, so that their relative
imports resolve here and ``lightning_api`` maps them to ``lightning.pytorch`` and ``lightning.fabric``; the way
Lightning makes its unified package from the sources of ``pytorch_lightning``.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent)]

try:
    from lightning.pytorch.strategies import StrategyRegistry
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(
        "lightning_hybrid.lightning serves the unified `lightning` package, which is not installed: "
        "pip install 'lightning-hybrid[lightning]' (or use pytorch_lightning with lightning_hybrid.HybridSGDStrategy)"
    ) from missing

from lightning_hybrid.callbacks import ThresholdScheduler  # noqa: E402

from .strategy import HybridSGDStrategy  # noqa: E402

HybridSGDStrategy.register_strategies(StrategyRegistry)

__all__ = ["HybridSGDStrategy", "ThresholdScheduler"]
