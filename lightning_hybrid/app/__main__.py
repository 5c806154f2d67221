"""``python -m lightning_hybrid.app [overrides]``: the training app, as ``lightning-hybrid-train``."""

from lightning_hybrid.app import main

main()
