"""Equilibrium propagation (Scellier & Bengio 2017): contrast dE/dtheta between a free and a
nudged equilibrium. With the default prediction-error energy it tends to backprop as beta -> 0."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import RuleContext, register_rule
from .energy_rule import EnergyRule, EnergyRuleConfig

NUDGES = ("one-sided", "symmetric", "random-sign")


@dataclass
class EquilibriumPropagationConfig(EnergyRuleConfig):
    """nudge: 'one-sided' (free vs +beta; error O(beta)), 'symmetric' (-beta vs +beta; error
    O(beta^2), Laborieux et al. 2021) or 'random-sign' (free vs a random +-beta each step, which
    cancels the O(beta) bias on average). persistent: start each free phase from the previous
    free equilibrium when the batch shape matches (pays off with the Hopfield energy and a
    repeated batch; the prediction-error energy starts at its equilibrium anyway)."""

    nudge: str = "symmetric"
    persistent: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nudge not in NUDGES:
            raise ValueError(f"unknown nudge {self.nudge!r}; expected one of {NUDGES}")


@register_rule
class EquilibriumPropagation(EnergyRule):
    name = "ep"
    Config = EquilibriumPropagationConfig

    def __init__(self, subnet: nn.Module, config: EquilibriumPropagationConfig | None = None):
        super().__init__(subnet, config)
        self._free_states: list[Tensor] | None = None
        self._pending_free: list[Tensor] | None = None

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        x = ctx.inputs.detach()
        free = self.free_phase(x, self._warm_start(x))
        self._pending_free = free if self.config.persistent else None
        beta, batch = self.config.beta, x.shape[0]
        if self.config.nudge == "symmetric":
            plus = self.nudged_phase(x, free, beta, ctx)
            minus = self.nudged_phase(x, free, -beta, ctx)
            return self.contrast(plus, minus, x, 2 * beta * batch)
        if self.config.nudge == "random-sign" and torch.rand(()) < 0.5:
            beta = -beta
        return self.contrast(self.nudged_phase(x, free, beta, ctx), free, x, beta * batch)

    def _warm_start(self, x: Tensor) -> list[Tensor] | None:
        stored = self._free_states
        if stored is None or stored[0].shape[0] != x.shape[0] or stored[0].device != x.device:
            return None
        return stored

    def advance_state(self) -> None:
        if self._pending_free is not None:
            self._free_states = self._pending_free
        self._pending_free = None
