"""Diagnostics usable with every rule: how well its update aligns with the true gradient."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import LearningRule, RuleContext
from .feedback_alignment import FeedbackAlignment


def _angle(a: Tensor, b: Tensor) -> float:
    cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
    return math.degrees(math.acos(max(-1.0, min(1.0, cos.item()))))


def true_gradient(rule: LearningRule, ctx: RuleContext) -> dict[str, Tensor]:
    """Exact gradient of the context's loss w.r.t. the rule's parameters (autograd, same batch)."""
    names = {p: n for n, p in rule.subnet.named_parameters()}
    params = rule.owned_parameters()
    with torch.enable_grad():
        output = rule.subnet(ctx.inputs.detach())
        grads = torch.autograd.grad(output, params, rule.output_error(output, ctx), allow_unused=True)
    return {names[p]: g for p, g in zip(params, grads) if g is not None}


def update_angles(rule: LearningRule, ctx: RuleContext) -> dict[str, float]:
    """Angle in degrees between the rule's update and the true gradient, per parameter and 'all'.

    Neither .grad nor the rule's state is touched. 0 deg: the rule follows the gradient exactly;
    < 90 deg: its update still descends the loss.
    """
    names = {p: n for n, p in rule.subnet.named_parameters()}
    update = {names[p]: u for p, u in rule.compute_update(ctx).items()}
    exact = true_gradient(rule, ctx)
    shared = [n for n in exact if n in update]
    angles = {n: _angle(update[n], exact[n]) for n in shared}
    if shared:
        angles["all"] = _angle(torch.cat([update[n].flatten() for n in shared]),
                               torch.cat([exact[n].flatten() for n in shared]))
    return angles


@dataclass
class FeedbackWeightAlignment:
    layer: int
    angle: float  # degrees between B and W (as matrices of the same shape)
    norm_ratio: float  # ||B|| / ||W||


def feedback_weight_alignment(rule: FeedbackAlignment) -> list[FeedbackWeightAlignment]:
    """For FA: how far each forward weight W has turned towards its fixed feedback B."""
    return [
        FeedbackWeightAlignment(
            i, _angle(rule.feedback(i), layer.weight.detach()),
            (rule.feedback(i).norm() / layer.weight.detach().norm()).item(),
        )
        for i, layer in enumerate(rule.layers)
    ]
