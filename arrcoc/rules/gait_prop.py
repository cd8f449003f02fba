"""GAIT-prop (Ahmad, van Gerven & Ambrogioni 2020): target propagation through exact layer
inverses with gradient-adjusted incremental targets.

A layer ``h_l = rho(a_l)``, ``a_l = W_l h_{l-1} + b_l`` passes a target down as

    t_{l-1} = h_{l-1} + W_l^+ (rho^{-1}(h_l + rho'(a_l)^2 * (t_l - h_l)) - a_l)

The ``rho'^2`` adjustment turns the inverse's division by ``rho'`` into backprop's
multiplication, so for small targets the update equals backprop when the weights are
(semi-)orthogonal (``W^+ = W^T``); ``orthogonal_penalty`` keeps them near that. Needs
invertible activations (identity, tanh, sigmoid, leaky-relu) and layers with out <= in, where
the pseudo-inverse is an exact right inverse. The inverses are computed from the current forward
weights, so the rule keeps no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import RuleContext, register_rule
from .target_propagation import TargetPropagationConfig, TargetRule


def invert_activation(activation: nn.Module, h: Tensor) -> Tensor:
    """rho^{-1}(h) for an invertible element-wise activation (an nn.Sequential of 0 or 1 modules)."""
    modules = list(activation)
    if not modules:
        return h
    rho = modules[0] if len(modules) == 1 else None
    eps = torch.finfo(h.dtype).eps
    if isinstance(rho, nn.Tanh):
        return torch.atanh(h.clamp(-1 + eps, 1 - eps))
    if isinstance(rho, nn.Sigmoid):
        return torch.logit(h, eps)
    if isinstance(rho, nn.LeakyReLU) and rho.negative_slope > 0:
        return torch.where(h >= 0, h, h / rho.negative_slope)
    raise TypeError(
        f"rule 'gait-prop' needs invertible activations (identity, Tanh, Sigmoid, LeakyReLU), got {activation}"
    )


@dataclass
class GaitPropConfig(TargetPropagationConfig):
    """orthogonal_penalty: lambda of ``lambda/4 ||W W^T - I||^2`` added to each update (W with
    out <= in), keeping ``W^+`` close to ``W^T``."""

    target_step: float = 0.01
    orthogonal_penalty: float = 0.0


@register_rule
class GaitProp(TargetRule):
    name = "gait-prop"
    Config = GaitPropConfig

    def __init__(self, subnet: nn.Module, config: GaitPropConfig | None = None):
        super().__init__(subnet, config)
        for layer in self.layers[1:]:
            out_features, in_features = layer.linear.weight.shape
            if out_features > in_features:
                raise TypeError(
                    f"rule 'gait-prop' needs layers with out <= in features to invert, got {layer.linear}"
                )
            invert_activation(layer.activation, layer.linear.weight.new_zeros(1))  # fail early

    def propagate_target(self, index: int, target: Tensor, below: Tensor, above: Tensor) -> Tensor:
        layer = self.layers[index]
        weight = layer.linear.weight.detach()
        pre_activation = layer.linear(below)
        with torch.enable_grad():  # rho'(a), element-wise, from the layer's own activation
            a = pre_activation.detach().requires_grad_(True)
            (slope,) = torch.autograd.grad(layer.activation(a).sum(), a)
        adjusted = invert_activation(layer.activation, above + slope.pow(2) * (target - above))
        return below + (adjusted - pre_activation) @ torch.linalg.pinv(weight).T

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        updates = super().compute_update(ctx)
        if self.config.orthogonal_penalty:
            for layer in self.layers:
                w = layer.linear.weight
                if w.requires_grad and w.shape[0] <= w.shape[1]:
                    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
                    penalty = (w.detach() @ w.detach().T - eye) @ w.detach()
                    updates[w] = updates[w] + self.config.orthogonal_penalty * penalty
        return updates
