"""A sub-network that does not learn: its parameters keep ``.grad`` None (for ablations)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import LearningRule, RuleContext, register_rule


@register_rule
class Frozen(LearningRule):
    name = "frozen"

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        return {}
