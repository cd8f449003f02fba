"""Optimizers and the step-size schedule, one table and one schedule for every training loop here.

Learning rules fill ``.grad`` (:mod:`arrcoc.rules`); an optimizer from :data:`OPTIMIZERS` applies it, with the
step size on :func:`warmup_cosine`.
"""

from __future__ import annotations

import math

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def optimizer_class(name: object) -> type[torch.optim.Optimizer]:
    """The optimizer called ``name`` in :data:`OPTIMIZERS`, or a clear error naming the known ones."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: float = 0,
                  decay: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that warms the step size up linearly over ``warmup_steps``, then decays it to zero on a
    cosine by ``total_steps`` (``decay="cosine"``) or keeps it (``decay="constant"``)."""
    if decay not in ("cosine", "constant"):
        raise ValueError(f"decay must be 'cosine' or 'constant', got {decay!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
