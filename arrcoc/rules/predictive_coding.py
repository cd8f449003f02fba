"""Predictive coding (Whittington & Bogacz 2017; Millidge et al. 2020): inference on value nodes
of the prediction-error energy, then the local weight update ``-eps_l * df_l/dtheta``.

Variants:

* ``strict``: the output is nudged by the cost with feedback strength ``beta``; ``steps``
  inference steps descend the full energy from the feedforward pass (predictions follow the
  values). Approaches backprop as beta -> 0 and the inference converges.
* ``fixed-prediction``: predictions stay at their feedforward values and the output error is
  the loss gradient; inference iterates ``eps_l <- eps_l - step_size (eps_l - J_{l+1}^T eps_{l+1})``
  with each layer's local Jacobian. At convergence the errors are backprop's deltas, so the update
  equals backprop (exactly after ``depth - 1`` steps with ``step_size = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import RuleContext, register_rule
from .distributed import max_over_shards
from .energy_rule import EnergyRule, RelaxationConfig
from .layered_energy import LayeredEnergy, PredictionErrorEnergy

VARIANTS = ("strict", "fixed-prediction")


@dataclass
class PredictiveCodingConfig(RelaxationConfig):
    """beta: feedback strength of the output error in the strict variant (per sample)."""

    variant: str = "strict"
    steps: int = 100
    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}")
        if self.beta == 0:
            raise ValueError("beta (feedback strength) must be non-zero")


@register_rule
class PredictiveCoding(EnergyRule):
    name = "pc"
    Config = PredictiveCodingConfig

    def build_energy(self) -> LayeredEnergy:
        return PredictionErrorEnergy(self.subnet, self.name)

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        x = ctx.inputs.detach()
        if self.config.variant == "fixed-prediction":
            return self.fixed_prediction_update(x, ctx)
        feedforward = self.energy.init_states(x)  # the free equilibrium of this energy
        values = self.nudged_phase(x, feedforward, self.config.beta, ctx)
        grads = self.energy_gradients(values, x)
        scale = self.config.beta * x.shape[0]
        return {p: g / scale for p, g in zip(self.owned_parameters(), grads)}

    def fixed_prediction_update(self, x: Tensor, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        cfg, layers, batch = self.config, self.energy.layers, x.shape[0]
        with torch.enable_grad():
            inputs, predictions, h = [], [], x
            for i, layer in enumerate(layers):  # one local graph per layer, cut at its input
                h = h.detach().requires_grad_(i > 0)
                inputs.append(h)
                h = layer(h)
                predictions.append(h)
            # per-sample output error (loss gradient times B); value nodes start at the predictions
            errors = [torch.zeros_like(p) for p in predictions[:-1]]
            errors.append(-batch * self.output_error(predictions[-1].detach(), ctx))
            for _ in range(cfg.steps):
                feedback = [
                    torch.autograd.grad(predictions[i + 1], inputs[i + 1], errors[i + 1], retain_graph=True)[0]
                    for i in range(len(errors) - 1)
                ]
                forces = [e - f for e, f in zip(errors, feedback)]
                if not forces or max_over_shards(max(f.abs().max() for f in forces).double()).item() < cfg.tol:
                    break
                errors[:-1] = [e - cfg.step_size * f for e, f in zip(errors, forces)]
            updates: dict[nn.Parameter, Tensor] = {}
            for layer, prediction, error in zip(layers, predictions, errors):
                params = layer.parameters()
                grads = torch.autograd.grad(prediction, params, -error / batch, retain_graph=True)
                updates.update(zip(params, grads))
        return updates
