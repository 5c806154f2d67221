"""Data modules: scikit-learn's digits (ships with the package, works offline), and MNIST and
CIFAR-10 read from files a user already has (nothing is downloaded)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class _TensorDataModule(pl.LightningDataModule):
    """Train/validation tensors in memory; subclasses load them in :meth:`load`."""

    shape: tuple[int, ...] = ()
    num_classes = 10

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size, self.seed = batch_size, seed

    def load(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        (x, y), (vx, vy) = self.load()
        self.train_set, self.val_set = TensorDataset(x, y), TensorDataset(vx, vy)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.val_set.tensors[0]), batch_size=256)


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's 8x8 digits (1,797 images), standardised, split with a fixed seed."""

    shape = (64,)

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self.num_features = 64

    def load(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32) / 16.0
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        y = torch.tensor(labels, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        cut = int(len(x) * (1 - self.val_fraction))
        return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), raw or gzip'd: magic 0x00 0x00 0x08 ndim, big-endian sizes, uint8 data."""
    with _open(path) as handle:
        header = handle.read(4)
        if len(header) != 4 or header[:3] != b"\x00\x00\x08":
            raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {header.hex()})")
        ndim = header[3]
        shape = tuple(int.from_bytes(handle.read(4), "big") for _ in range(ndim))
        data = np.frombuffer(handle.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} bytes, its header promises {shape}")
    return data.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {root}: point data.root at your MNIST folder")


class MNISTDataModule(_TensorDataModule):
    """MNIST from the four standard IDX files (raw or .gz) in ``root``; normalised, 1x28x28."""

    shape = (1, 28, 28)

    def __init__(self, root: str, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        self.root = Path(root)

    def load(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        def split(images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.from_numpy(read_idx(_find(self.root, images)).copy()).float().div(255.0)
            x = (x - 0.1307) / 0.3081
            return x.unsqueeze(1), torch.from_numpy(read_idx(_find(self.root, labels)).astype(np.int64))

        return split("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), split(
            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
        )


class CIFAR10DataModule(_TensorDataModule):
    """CIFAR-10 from the python version's pickle batches (``data_batch_1..5``, ``test_batch``) in
    ``root``; normalised per channel, 3x32x32. The batches are the user's own trusted files."""

    shape = (3, 32, 32)

    def __init__(self, root: str, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        self.root = Path(root)

    def _batch(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.root / name
        if not path.exists():
            raise FileNotFoundError(
                f"CIFAR-10 batch {name} not found in {self.root}: point data.root at cifar-10-batches-py"
            )
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"])

    def load(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        parts = [self._batch(f"data_batch_{i}") for i in range(1, 6)]
        train_x = np.concatenate([p[0] for p in parts])
        train_y = np.concatenate([p[1] for p in parts])
        test_x, test_y = self._batch("test_batch")
        mean = train_x.mean(axis=(0, 2, 3), keepdims=True) / 255.0
        std = train_x.std(axis=(0, 2, 3), keepdims=True) / 255.0

        def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.from_numpy(((x / 255.0 - mean) / std).astype(np.float32)), torch.from_numpy(y.astype(np.int64))

        return tensors(train_x, train_y), tensors(test_x, test_y)
