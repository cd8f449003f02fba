"""What the energy-based rules (EP, CHL, PC) share: relaxation settings, the nudging cost, and
the contrast of ``dE/dtheta`` between two equilibria.

Scale convention: ``beta`` is the nudge *per sample*. The rules' losses are batch means, so the
phases descend ``sum_b E_b + beta * B * C``, and contrasts are divided by ``beta * B``; the update
then tends to ``dC/dtheta`` (what ``loss.backward()`` gives) as ``beta -> 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import LearningRule, RuleConfig, RuleContext
from .layered_energy import ENERGIES
from .relaxation import Cost, Energy, Relaxation, RelaxationReport, relax


@dataclass
class RelaxationConfig(Relaxation, RuleConfig):
    """A rule's settings plus how it relaxes its states (:class:`~arrcoc.rules.relaxation.Relaxation`). The
    layered MLP energies are stiffer than the relevance field :class:`Relaxation`'s defaults are set for: more
    and smaller steps with heavy momentum, every step's energy watched, no step undone (an energy the rule relaxes
    that defines its own settings, the relevance field, gets those: ``arrcoc.relevance``)."""

    steps: int = 500
    step_size: float = 0.1
    momentum: float = 0.9
    tol: float = 1e-5
    backtracks: int = 0
    gradient_only: bool = False


@dataclass
class EnergyRuleConfig(RelaxationConfig):
    """energy: 'prediction-error' (free equilibrium = the feedforward pass) or 'hopfield'."""

    energy: str = "prediction-error"
    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.energy not in ENERGIES:
            raise ValueError(f"unknown energy {self.energy!r}; expected one of {sorted(ENERGIES)}")
        if self.beta == 0:
            raise ValueError("beta must be non-zero: the update is a finite difference over beta")


class EnergyRule(LearningRule):
    """Base of the energy-based rules: owns an energy over the sub-network and relaxes it."""

    Config = EnergyRuleConfig

    def __init__(self, subnet: nn.Module, config: RelaxationConfig | None = None):
        super().__init__(subnet, config)
        self.energy = self.build_energy()
        self.last_reports: dict[str, RelaxationReport] = {}  # per phase, for diagnostics

    def build_energy(self) -> Energy:
        # A module may define its own energy (e.g. a field over image patches); else it is an MLP.
        if hasattr(self.subnet, "as_energy"):
            return self.subnet.as_energy()
        return ENERGIES[self.config.energy](self.subnet, self.name)

    def relax_phase(
        self,
        phase: str,
        x: Tensor,
        start: list[Tensor] | None,
        beta: float = 0.0,
        target: Tensor | None = None,
        cost: Cost | None = None,
        model: Energy | None = None,
        tol_scale: float = 1.0,
    ) -> list[Tensor]:
        how = Relaxation(**{**self.config.settings(), "tol": self.config.tol * tol_scale})
        states, report = relax(self.energy if model is None else model, x, beta, target, how=how, cost=cost,
                               states=start)
        self.last_reports[phase] = report
        return states

    def free_phase(self, x: Tensor, start: list[Tensor] | None = None) -> list[Tensor]:
        return self.relax_phase("free", x, start)

    def nudged_phase(self, x: Tensor, free: list[Tensor], beta: float, ctx: RuleContext) -> list[Tensor]:
        cost, target = self.nudging_cost(ctx, self.energy.output(free))
        return self.relax_phase(f"nudged{beta:+g}", x, free, beta, target, cost, tol_scale=abs(beta))

    def nudging_cost(self, ctx: RuleContext, output: Tensor) -> tuple[Cost, Tensor]:
        """The cost a nudged phase adds, summed over the batch (see the module's scale convention).

        With an explicit ``ctx.output_error`` g (no loss to evaluate) the cost is linear, ``<g, y>``:
        the same first-order nudge.
        """
        batch = output.shape[0]
        if ctx.output_error is not None:
            return (lambda y, g: batch * (y * g).sum()), self.output_error(output, ctx)
        if ctx.target is None:
            raise ValueError(f"rule {self.name!r} needs a target or an output_error in its RuleContext")
        loss = self.loss_fn(ctx)
        return (lambda y, t: batch * loss(y, t)), ctx.target

    def energy_gradients(self, states: list[Tensor], x: Tensor) -> list[Tensor]:
        """dE/dtheta at fixed states: local, each weight only sees the states it connects."""
        params = self.owned_parameters()
        with torch.enable_grad():
            total = self.energy.energy(states, x).sum()
            grads = torch.autograd.grad(total, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def contrast(
        self, positive: list[Tensor], negative: list[Tensor], x: Tensor, scale: float
    ) -> dict[nn.Parameter, Tensor]:
        """``(dE/dtheta|positive - dE/dtheta|negative) / scale`` for every owned parameter."""
        pos, neg = self.energy_gradients(positive, x), self.energy_gradients(negative, x)
        return {p: (a - b) / scale for p, a, b in zip(self.owned_parameters(), pos, neg)}
