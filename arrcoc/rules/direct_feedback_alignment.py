"""Direct feedback alignment (Nokland 2016): the output error reaches every hidden layer directly.

Hidden layer l receives e B_l (e: the output error, B_l: a fixed random (out, width_l) matrix) at
its output, instead of the error back-propagated through the layers above; layers are cut from one
another, so credit needs no backward chain and all layers can update in parallel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import LearningRule, RuleContext, linear_layers, register_rule
from .feedback_alignment import FeedbackConfig, random_feedback
from .linear_calls import LinearCalls, flat


@register_rule
class DirectFeedbackAlignment(LearningRule):
    name = "dfa"
    Config = FeedbackConfig

    def __init__(self, subnet, config: FeedbackConfig | None = None):
        super().__init__(subnet, config)
        self.layers = linear_layers(self.subnet, self.name)
        # The owned Linears form a chain in registration order; the last one gives the output.
        generator = torch.Generator().manual_seed(self.config.seed)
        out_width = self.layers[-1].out_features
        for i, layer in enumerate(self.layers[1:], start=1):
            b = random_feedback((layer.in_features, out_width), self.config, generator).T  # (out, width)
            self.register_buffer(f"feedback_{i}", b.to(layer.weight.device))

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        params = self.owned_parameters()

        def cut_linear(i: int, x: Tensor) -> Tensor:
            layer = self.layers[i]
            return nn.functional.linear(x.detach(), layer.weight, layer.bias)

        with torch.enable_grad(), LinearCalls(self.layers, replace=cut_linear) as recorder:
            output = self.subnet(ctx.inputs.detach())
        order = [c.layer for c in recorder.calls]
        if order != list(range(len(self.layers))):
            raise RuntimeError(
                f"rule 'dfa' needs its Linear layers called once each, in registration order; "
                f"the forward called them in order {order}"
            )
        error = self.output_error(output, ctx)
        # The input of each later layer is the output of the segment below it: inject e B there.
        hidden = [c.inputs for c in recorder.calls[1:]]
        injected = [
            (flat(error) @ getattr(self, f"feedback_{c.layer}").to(error.dtype)).reshape(c.inputs.shape)
            for c in recorder.calls[1:]
        ]
        kept = [(h, g) for h, g in zip(hidden, injected) if h.requires_grad]
        grads = torch.autograd.grad(
            [output, *(h for h, _ in kept)], params, [error, *(g for _, g in kept)], allow_unused=True
        )
        return {p: g for p, g in zip(params, grads) if g is not None}
