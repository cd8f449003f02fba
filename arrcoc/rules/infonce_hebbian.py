"""InfoNCE-style contrastive Hebbian rule for a linear (bilinear-score) map.

The layer maps inputs q_j to y_j = W q_j and scores pairs s_ij = k_i . y_j / T against paired
keys k_i (``ctx.target``); the other pairs in the batch are the negatives. With p_ij the softmax
of s_i. over j, the update is

    dW = 1/(T B) sum_ij (delta_ij - p_ij) k_i q_j^T

Hebbian between a query and its own key, anti-Hebbian towards the keys it is confused with, weighted
by how confused it is. For this single layer it is exactly the gradient of the InfoNCE loss, yet
every term is a product of activities the synapse sees (a three-factor rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import RuleConfig, RuleContext, register_rule
from .distributed import gather_shards
from .hebbian import Activity, HebbianRule, paired_target


@dataclass
class InfoNCEHebbianConfig(RuleConfig):
    temperature: float = 0.1
    symmetric: bool = True  # also contrast each key against the batch's queries (CLIP-style)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@register_rule
class InfoNCEHebbian(HebbianRule):
    name = "infonce-hebbian"
    Config = InfoNCEHebbianConfig
    single_layer = True

    def layer_update(self, layer: int, activity: Activity, ctx: RuleContext) -> tuple[Tensor, Tensor]:
        # the negatives are the whole batch's, also when it is sharded over processes; this shard's
        # queries j are the columns `mine`, and the update is their mean
        keys, mine = gather_shards(paired_target(self.name, ctx, activity.u))
        outputs, _ = gather_shards(activity.u)
        t, n = self.config.temperature, activity.x.shape[0]
        scores = keys @ outputs.T / t  # (keys i, queries j)
        identity = torch.eye(scores.shape[0], device=scores.device, dtype=scores.dtype)
        modulation = identity - torch.softmax(scores, dim=1)
        if self.config.symmetric:
            modulation = 0.5 * (modulation + identity - torch.softmax(scores, dim=0))
        post = modulation.T[mine] @ keys / (t * n)  # (queries j, out): the key-side factor reaching y_j
        return post.T @ activity.x, post.sum(0)
