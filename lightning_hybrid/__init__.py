"""lightning-hybrid: hybrid synchronous/asynchronous parameter-server SGD for PyTorch Lightning.

``import lightning_hybrid`` registers the strategy, so ``Trainer(strategy="hybrid_sgd")`` works.
"""

from pytorch_lightning.strategies import StrategyRegistry

from lightning_hybrid.errors import HybridSGDError, PeerLostError, ProtocolError
from lightning_hybrid.server import GradientClipping, ParameterServer, Release
from lightning_hybrid.staleness import StalenessStats
from lightning_hybrid.strategy import HybridSGDStrategy
from lightning_hybrid.thresholds import resolve_threshold

HybridSGDStrategy.register_strategies(StrategyRegistry)

__version__ = "0.1.0"
__all__ = [
    "GradientClipping",
    "HybridSGDError",
    "HybridSGDStrategy",
    "ParameterServer",
    "PeerLostError",
    "ProtocolError",
    "Release",
    "StalenessStats",
    "resolve_threshold",
]
