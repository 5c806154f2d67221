"""hybrid_sgd from LightningCLI: every Trainer, strategy and callback argument on the command line or in YAML.

    python examples/cli.py fit --trainer.strategy=hybrid_sgd --trainer.devices=4
    python examples/cli.py fit --trainer.strategy=lightning_hybrid.HybridSGDStrategy \\
        --trainer.strategy.threshold=50% --trainer.devices=4
    python examples/cli.py fit --trainer.strategy=hybrid_sgd_async \\
        --trainer.callbacks+=lightning_hybrid.ThresholdScheduler --trainer.callbacks.schedule=linear
    python examples/cli.py fit --config examples/cli.yaml
    python examples/cli.py fit --help    # every argument, with its meaning

The model and data are the app's (an MLP on scikit-learn's digits): put your own LightningModule and
LightningDataModule in their place.
"""

from pytorch_lightning.cli import LightningCLI

import lightning_hybrid  # noqa: F401  registers strategy="hybrid_sgd" and its variants
from lightning_hybrid.app.data import DigitsDataModule
from lightning_hybrid.app.models import MLPClassifier


def main() -> None:
    LightningCLI(MLPClassifier, DigitsDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
