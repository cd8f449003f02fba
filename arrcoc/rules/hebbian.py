"""Shared machinery of the Hebbian rules: each Linear layer learns from its own input and output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import LearningRule, RuleConfig, RuleContext, linear_layers
from .linear_calls import LinearCalls, flat


@dataclass
class Activity:
    """What a synapse can see: its layer's input x (N, in), pre-activation u (N, out), and the
    sub-network's output (N, features) (the post-synaptic activity of a single-layer sub-network)."""

    x: Tensor
    u: Tensor
    output: Tensor


class HebbianRule(LearningRule):
    """Runs the sub-network once and gives every owned Linear a local update from its activity.

    Subclasses implement :meth:`layer_update`, returning the Hebbian (ascent) change of the weight
    and optionally of the bias, averaged over samples; the base turns it into a descent-sign .grad.
    Layers of a stack learn together in one pass, each from the activity below it.
    """

    single_layer: ClassVar[bool] = False  # rules whose post-synaptic target is the sub-network's output

    def __init__(self, subnet, config: RuleConfig | None = None):
        super().__init__(subnet, config)
        self.layers = linear_layers(self.subnet, self.name)
        if self.single_layer and len(self.layers) != 1:
            raise TypeError(
                f"rule {self.name!r} trains exactly one nn.Linear (optionally followed by an activation), "
                f"but the sub-network has {len(self.layers)}; for deep networks use an energy-based rule"
            )

    def layer_update(self, layer: int, activity: Activity, ctx: RuleContext) -> tuple[Tensor, Tensor | None]:
        """Return (dW, db), the Hebbian change of layer ``layer`` (db None: bias not learned)."""
        raise NotImplementedError

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        with torch.no_grad(), LinearCalls(self.layers) as calls:
            output = flat(self.subnet(ctx.inputs))
        updates: dict[nn.Parameter, Tensor] = {}
        for call in calls.calls:
            layer = self.layers[call.layer]
            activity = Activity(flat(call.inputs), flat(call.output), output)
            d_weight, d_bias = self.layer_update(call.layer, activity, ctx)
            pairs = [(layer.weight, d_weight)]
            if d_bias is not None and layer.bias is not None:
                pairs.append((layer.bias, d_bias))
            for param, delta in pairs:
                if param.requires_grad:
                    updates[param] = updates.get(param, 0) - delta  # ascent on Hebb = descent sign
        return updates


def paired_target(rule: str, ctx: RuleContext, output: Tensor) -> Tensor:
    """The target of a single-layer contrastive rule, flattened like the output."""
    if ctx.target is None:
        raise ValueError(f"rule {rule!r} needs ctx.target (the positive-phase activity)")
    target = flat(ctx.target).to(output.dtype)
    if target.shape != output.shape:
        raise ValueError(
            f"rule {rule!r}: target has shape {tuple(ctx.target.shape)}, expected one row per sample "
            f"with {output.shape[-1]} features (output shape {tuple(output.shape)})"
        )
    return target
