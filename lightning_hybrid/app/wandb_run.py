"""The app's and the demo's W&B logger: Lightning's ``WandbLogger``, offline unless asked otherwise."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import WandbLogger


def wandb_logger(*, offline: bool, **options: Any) -> WandbLogger:
    """A ``WandbLogger`` (``offline=False`` uploads). Lightning 2.6 passes ``anonymous=None`` to ``wandb.init``,
    which W&B 0.2x warns about on every run ("The anonymous setting has no effect"); the key is left out instead,
    so that W&B's own default holds. Passing ``anonymous=True`` still reaches W&B."""
    logger = WandbLogger(offline=offline, **options)
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)
    return logger
