"""Contrastive Hebbian learning (Movellan 1991) over a multi-layer energy: a free phase and a
clamped phase whose output is *held* at a target, then the contrast of dE/dtheta.

The clamp target is ``y_free - beta * dC/dy`` per sample, so ``beta = 1`` with the ``mse`` loss
clamps the output to the target itself (classic CHL), and small beta gives the small-clamp limit
(Millidge et al. 2023). Unlike EP's soft nudge, the hidden layers pull the clamped output's
input towards the clamp, which rescales the output error (a Schur-complement preconditioning):
CHL follows a descent direction but, on the prediction-error energy, not exactly backprop.

(Not to be confused with ``contrastive-hebbian``, a single-layer rule.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .base import RuleContext, register_rule
from .energy_rule import EnergyRule, EnergyRuleConfig
from .layered_energy import OutputClamped


@dataclass
class ContrastiveHebbianConfig(EnergyRuleConfig):
    beta: float = 1.0


@register_rule
class ContrastiveHebbianLearning(EnergyRule):
    name = "chl"
    Config = ContrastiveHebbianConfig

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        x = ctx.inputs.detach()
        free = self.free_phase(x)
        clamped = self.clamped_phase(x, free, ctx)
        return self.contrast(clamped, free, x, self.config.beta * x.shape[0])

    def clamped_phase(self, x: Tensor, free: list[Tensor], ctx: RuleContext) -> list[Tensor]:
        output = self.energy.output(free)
        batch_error = self.output_error(output, ctx) * output.shape[0]  # per-sample dC/dy
        clamp = output - self.config.beta * batch_error
        # the hidden layers relax around the clamp; forces on them are O(beta), like a nudge's
        if len(free) == 1:  # a single layer has no hidden states to relax
            return [clamp]
        model = OutputClamped(self.energy, clamp)
        hidden = self.relax_phase("clamped", x, free[:-1], model=model, tol_scale=abs(self.config.beta))
        return [*hidden, clamp]
