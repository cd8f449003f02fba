"""Feedback alignment (Lillicrap et al. 2016) and sign-symmetric feedback (Liao et al. 2016).

The error travels backward through each owned Linear by a fixed matrix B instead of W^T (no weight
transport); each weight's update is still the local product error x input. The forward weights come
to align with B, so the random feedback carries useful credit. Options:
  feedback="random": fixed random B, drawn once (init and scale configurable, seeded).
  feedback="usf":    B = sign(W) * mean|W| (uniform sign-concordant feedback).
  feedback="frsf":   B = |R| * sign(W), R fixed random (fixed random-magnitude sign-concordant).
Everything between Linears (activations, norms) is differentiated locally as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LearningRule, RuleConfig, RuleContext, linear_layers, register_rule
from .linear_calls import LinearCalls

FEEDBACK = ("random", "usf", "frsf")
INITS = ("kaiming-uniform", "gaussian", "orthogonal")


@dataclass
class FeedbackConfig(RuleConfig):
    """Shared by FA and DFA: how the fixed random feedback matrices are drawn."""

    init: str = "kaiming-uniform"
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in INITS:
            raise ValueError(f"feedback init must be one of {INITS}, got {self.init!r}")
        if self.scale <= 0:
            raise ValueError(f"feedback scale must be > 0, got {self.scale}")


def random_feedback(shape: tuple[int, int], config: FeedbackConfig, generator: torch.Generator) -> Tensor:
    """A fixed matrix of ``shape`` (out, in), scaled like a forward weight of that fan-in."""
    fan_in = shape[1]
    if config.init == "kaiming-uniform":  # nn.Linear's own init range
        bound = 1.0 / math.sqrt(fan_in)
        b = torch.rand(shape, generator=generator) * 2 * bound - bound
    elif config.init == "gaussian":
        b = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    else:
        b = nn.init.orthogonal_(torch.empty(shape), generator=generator)
        b *= math.sqrt(max(shape) / fan_in)  # entries of a semi-orthogonal matrix are ~1/sqrt(max dim)
    return b * config.scale


@dataclass
class FAConfig(FeedbackConfig):
    feedback: str = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feedback not in FEEDBACK:
            raise ValueError(f"fa feedback must be one of {FEEDBACK}, got {self.feedback!r}")


class _FeedbackLinear(torch.autograd.Function):
    """y = x W^T + b forward; backward sends grad_y B (not grad_y W) to the input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, feedback = ctx.saved_tensors
        g, xs = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_bias = g.sum(0) if ctx.has_bias else None
        return grad_out @ feedback.to(grad_out.dtype), g.T @ xs, grad_bias, None


@register_rule
class FeedbackAlignment(LearningRule):
    name = "fa"
    Config = FAConfig

    def __init__(self, subnet, config: FAConfig | None = None):
        super().__init__(subnet, config)
        self.layers = linear_layers(self.subnet, self.name)
        generator = torch.Generator().manual_seed(self.config.seed)
        for i, layer in enumerate(self.layers):
            b = random_feedback(tuple(layer.weight.shape), self.config, generator)
            if self.config.feedback == "frsf":
                b = b.abs()  # only magnitudes are random; signs follow W at every step
            self.register_buffer(f"feedback_{i}", b.to(layer.weight.device))

    def feedback(self, i: int) -> Tensor:
        """The matrix that replaces W_i^T in the backward pass, as used right now."""
        weight, fixed = self.layers[i].weight.detach(), getattr(self, f"feedback_{i}")
        if self.config.feedback == "usf":
            return torch.sign(weight) * weight.abs().mean()
        if self.config.feedback == "frsf":
            return torch.sign(weight) * fixed
        return fixed

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        params = self.owned_parameters()

        def feedback_linear(i: int, x: Tensor) -> Tensor:
            layer = self.layers[i]
            return _FeedbackLinear.apply(x, layer.weight, layer.bias, self.feedback(i))

        with torch.enable_grad(), LinearCalls(self.layers, replace=feedback_linear):
            output = self.subnet(ctx.inputs.detach())
        grads = torch.autograd.grad(output, params, self.output_error(output, ctx), allow_unused=True)
        return {p: g for p, g in zip(params, grads) if g is not None}
