"""BCM rule (Bienenstock, Cooper & Munro 1982): Hebbian with a sliding modification threshold.

dW = y (y - theta) x^T, theta = running mean of y^2 per unit. Activity above the threshold
potentiates, below depresses; because theta grows faster than y, the unit settles on responding
strongly to one input pattern and weakly to the others: it becomes selective, without labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import RuleConfig, RuleContext, register_rule
from .distributed import batch_mean
from .hebbian import Activity, HebbianRule

ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "linear": lambda u: u}


@dataclass
class BCMConfig(RuleConfig):
    activation: str = "relu"
    threshold_momentum: float = 0.9  # theta <- m * theta + (1 - m) * mean(y^2)
    initial_threshold: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"hebbian-bcm activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}")


@register_rule
class BCM(HebbianRule):
    name = "hebbian-bcm"
    Config = BCMConfig

    def __init__(self, subnet, config: BCMConfig | None = None):
        super().__init__(subnet, config)
        for i, layer in enumerate(self.layers):
            theta = torch.full((layer.out_features,), self.config.initial_threshold, device=layer.weight.device)
            self.register_buffer(f"threshold_{i}", theta)
        self._pending: dict[int, Tensor] = {}

    def threshold(self, layer: int) -> Tensor:
        return getattr(self, f"threshold_{layer}")

    def layer_update(self, layer: int, activity: Activity, ctx: RuleContext) -> tuple[Tensor, Tensor]:
        x, y = activity.x, ACTIVATIONS[self.config.activation](activity.u)
        theta = self.threshold(layer)
        modulation = y * (y - theta)
        m = self.config.threshold_momentum
        self._pending[layer] = m * theta + (1 - m) * batch_mean(y.pow(2))  # over the whole (sharded) batch
        return modulation.T @ x / x.shape[0], modulation.mean(0)

    def advance_state(self) -> None:
        for layer, theta in self._pending.items():
            self.threshold(layer).copy_(theta)
        self._pending.clear()
