"""lightning-hybrid: hybrid synchronous/asynchronous parameter-server SGD for PyTorch Lightning.

``import lightning_hybrid`` registers the strategy, so ``Trainer(strategy="hybrid_sgd")`` works, with
``pytorch_lightning`` and, when it is installed, with the unified ``lightning`` package (whose strategy class is
``lightning_hybrid.lightning.HybridSGDStrategy``).
"""

import importlib.util

from pytorch_lightning.strategies import StrategyRegistry

from lightning_hybrid.callbacks import ThresholdScheduler
from lightning_hybrid.errors import HybridSGDError, NonFiniteGradientError, PeerLostError, ProtocolError
from lightning_hybrid.server import GradientClipping, ParameterServer, Release
from lightning_hybrid.staleness import StalenessStats
from lightning_hybrid.strategy import HybridSGDStrategy
from lightning_hybrid.thresholds import (
    AdaSyncSchedule,
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LinearSchedule,
    StepSchedule,
    SwitchSchedule,
    make_schedule,
    resolve_threshold,
)

HybridSGDStrategy.register_strategies(StrategyRegistry)
if importlib.util.find_spec("lightning") is not None:
    import lightning_hybrid.lightning  # noqa: F401  (registers the strategy for `import lightning as L`)

__version__ = "0.1.0"
__all__ = [
    "AdaSyncSchedule",
    "ConstantSchedule",
    "CosineSchedule",
    "ExponentialSchedule",
    "GradientClipping",
    "HybridSGDError",
    "HybridSGDStrategy",
    "NonFiniteGradientError",
    "ParameterServer",
    "PeerLostError",
    "ProtocolError",
    "Release",
    "LinearSchedule",
    "StalenessStats",
    "StepSchedule",
    "SwitchSchedule",
    "ThresholdScheduler",
    "make_schedule",
    "resolve_threshold",
]
