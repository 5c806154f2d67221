"""The Hydra training app on top of the library: its configs, data modules, models, simulated delays and W&B
dashboard. ``main`` is the console script ``lightning-hybrid-train``.

``main`` is imported on first use, so that the app's data modules and models (``lightning_hybrid.app.data``,
``.models``, ``.delays``) import without Hydra or W&B, as the GPU check's machines have neither."""

from typing import Any

__all__ = ["main"]


def __getattr__(name: str) -> Any:
    if name == "main":
        from lightning_hybrid.app.train import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
