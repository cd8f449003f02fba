"""Backprop confined to the owned sub-network: the baseline every local rule is compared with."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import LearningRule, RuleContext, register_rule


@register_rule
class Backprop(LearningRule):
    """Ordinary autograd, but the graph starts at the sub-network's (detached) input.

    Equals ``loss.backward()`` on that sub-network exactly; nothing outside it receives a gradient.
    """

    name = "backprop"

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        params = self.owned_parameters()
        with torch.enable_grad():
            output = self.subnet(ctx.inputs.detach())
            if ctx.output_error is not None:
                grads = torch.autograd.grad(output, params, grad_outputs=self.output_error(output, ctx))
            else:
                if ctx.target is None:
                    raise ValueError("rule 'backprop' needs a target or an output_error in its RuleContext")
                grads = torch.autograd.grad(self.loss_fn(ctx)(output, ctx.target), params)
        return dict(zip(params, grads))
