"""Oja's rule and its multi-unit forms: Hebbian learning of principal components, label-free.

single unit / "subspace":  dW = y^T (x - y W)            (Oja 1982; Oja's subspace rule)
"sanger":                  dW = y^T x - tril(y^T y) W     (generalized Hebbian algorithm, Sanger 1989):
                           unit k learns the k-th principal component, not just the subspace.
"soft-wta":                r = softmax(u / T), dW_k = r_k (x - u_k W_k)   (soft winner-take-all
                           Oja rule, "SoftHebb", Moraitis et al. 2022): units compete and become
                           prototypes of input clusters instead of principal directions.
"rank-wta":                the same with r = +1 for the most active unit, -strength for the
                           rank-th (Krotov & Hopfield 2019): the runner-up is pushed away, so
                           units spread over the data instead of collapsing onto one prototype.
All averaged over the batch; y = W x (the bias, if any, is not used and not learned).
modulated:                 each sample's update weighted by a third factor in [0, 1] (``ctx.target``, one per
                           sample: e.g. how relevant a patch is), a neuromodulatory gate: the units learn the
                           components of the gated samples (three-factor Hebbian learning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import RuleConfig, RuleContext, register_rule
from .hebbian import Activity, HebbianRule

FORMS = ("sanger", "subspace", "soft-wta", "rank-wta")


@dataclass
class OjaConfig(RuleConfig):
    form: str = "sanger"
    temperature: float = 1.0  # of the soft winner-take-all competition
    anti_hebbian_rank: int = 2  # rank-wta: which runner-up is pushed away
    anti_hebbian_strength: float = 0.4
    modulated: bool = False  # weight each sample by ctx.target (a third factor), else every sample alike

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.form not in FORMS:
            raise ValueError(f"hebbian-oja form must be one of {FORMS}, got {self.form!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.anti_hebbian_rank < 2:
            raise ValueError(f"anti_hebbian_rank must be >= 2, got {self.anti_hebbian_rank}")


@register_rule
class Oja(HebbianRule):
    name = "hebbian-oja"
    Config = OjaConfig

    def layer_update(self, layer: int, activity: Activity, ctx: RuleContext) -> tuple[Tensor, None]:
        weight, x = self.layers[layer].weight, activity.x
        y = x @ weight.T  # pure Wx: Oja's analysis assumes no bias
        gate = self.gate(ctx, x)  # (N, 1) per-sample weights summing to one
        if self.config.form in ("soft-wta", "rank-wta"):
            r = self.competition(y) * gate
            return r.T @ x - (r * y).sum(0)[:, None] * weight, None
        correlation = y.T @ (gate * y)
        if self.config.form == "sanger":
            correlation = torch.tril(correlation)
        return (gate * y).T @ x - correlation @ weight, None

    def gate(self, ctx: RuleContext, x: Tensor) -> Tensor:
        """(N, 1) how much each sample counts: 1 / N each, or its third factor (normalised) when modulated."""
        n = x.shape[0]
        if not self.config.modulated:
            return x.new_full((n, 1), 1 / n)
        if ctx.target is None or ctx.target.numel() != n:
            got = None if ctx.target is None else tuple(ctx.target.shape)
            raise ValueError(f"a modulated hebbian-oja rule needs ctx.target with one factor per sample ({n}), "
                             f"got {got}")
        factor = ctx.target.reshape(n, 1).to(x.dtype)
        return factor / factor.sum().clamp_min(1e-6)

    def competition(self, y: Tensor) -> Tensor:
        """How much each unit learns from each sample (N, units)."""
        if self.config.form == "soft-wta":
            return torch.softmax(y / self.config.temperature, dim=-1)
        ranked = y.topk(self.config.anti_hebbian_rank, dim=-1).indices
        r = torch.zeros_like(y)
        r.scatter_(1, ranked[:, :1], 1.0)
        return r.scatter_(1, ranked[:, -1:], -self.config.anti_hebbian_strength)
