"""Loaders for the users' own MNIST (IDX, raw or gzip'd) and CIFAR-10 (pickle batches) files, tested on
small files written here in those real formats."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from lightning_hybrid.app.data import CIFAR10DataModule, DigitsDataModule, MNISTDataModule, read_idx


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_from_idx_files(tmp_path, compress) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for split, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)
    data = MNISTDataModule(str(tmp_path), batch_size=4)
    data.setup("fit")
    x, y = data.train_set.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [i % 10 for i in range(12)]
    assert len(data.val_set) == 5
    assert torch.allclose(
        x[3, 0] * 0.3081 + 0.1307,
        torch.from_numpy(read_idx(next(tmp_path.glob("train-images*")))[3] / 255.0).float(),
        atol=1e-5,
    )


def test_bad_idx_and_missing_files_are_named(tmp_path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0c\x03junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(FileNotFoundError, match="point data.root at your MNIST folder"):
        MNISTDataModule(str(tmp_path / "nowhere")).setup("fit")


def test_cifar10_from_pickle_batches(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        with open(tmp_path / name, "wb") as handle:
            pickle.dump(batch, handle)
    data = CIFAR10DataModule(str(tmp_path))
    data.setup("fit")
    x, y = data.train_set.tensors
    assert x.shape == (20, 3, 32, 32) and y.tolist() == [0, 1, 2, 3] * 5
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4, "normalised per channel"
    assert data.val_set.tensors[0].shape == (3, 3, 32, 32)


def test_digits_ship_with_the_package() -> None:
    data = DigitsDataModule(seed=1)
    data.setup("fit")
    assert len(data.train_set) == 1437 and len(data.val_set) == 360
