"""Contrastive Hebbian rule for one layer: positive-phase minus negative-phase co-activity.

dW = <y x^T>_positive - <y x^T>_negative, where the positive phase clamps the output to the target
and the negative phase lets it run free (y = f(W x)). Hebbian on the clamped phase, anti-Hebbian on
the free phase; for a linear unit it is the delta rule. (Deep networks: the energy-based ``chl``.)
"""

from __future__ import annotations

from torch import Tensor

from .base import RuleContext, register_rule
from .hebbian import Activity, HebbianRule, paired_target


@register_rule
class ContrastiveHebbian(HebbianRule):
    name = "contrastive-hebbian"
    single_layer = True

    def layer_update(self, layer: int, activity: Activity, ctx: RuleContext) -> tuple[Tensor, Tensor]:
        positive = paired_target(self.name, ctx, activity.output)
        difference = positive - activity.output  # same presynaptic x in both phases
        return difference.T @ activity.x / activity.x.shape[0], difference.mean(0)
