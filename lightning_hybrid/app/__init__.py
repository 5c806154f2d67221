"""The Hydra training app on top of the library: its configs, data modules, models, simulated delays and W&B
dashboard. ``main`` is the console script ``lightning-hybrid-train``."""

from lightning_hybrid.app.train import main

__all__ = ["main"]
