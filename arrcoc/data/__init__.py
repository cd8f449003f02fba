"""Real data that ships inside installed packages (no downloads)."""

from .digits import DigitSplit, load_mnist_5k, load_sklearn_digits

__all__ = ["DigitSplit", "load_mnist_5k", "load_sklearn_digits"]
