"""The allocation network: a small per-patch MLP from equilibrium relevance (and the evidence) to budget
logits. Trained by feedback alignment by default (DFA as an option): its error
reaches the hidden layer through a fixed random matrix, never through W^T.

It refines the field rather than relearning relevance: logits = logit(relevance) + MLP(inputs), so an
untrained allocator follows the field's equilibrium and learns only corrections.

With a neighbourhood (``RelevanceConfig.neighbourhood`` > 0) the budget ranks each patch by the mean allocation
probability of its Gaussian neighbourhood instead of its own: a compact group of relevant patches outranks a lone
one, so the kept set covers one object rather than fragments of several. The MLP still learns per patch."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def neighbourhood_support(logits: Tensor, positions: Tensor, width: float) -> Tensor:
    """(B, N) budget logits: the logit of the Gaussian-weighted mean of ``sigmoid(logits)`` over each patch's
    neighbourhood (``positions`` (N, 2) in patches, ``width`` the Gaussian's sigma in patches; the weights of
    each patch's neighbours sum to one, also at the border)."""
    kernel = torch.softmax(-0.5 * torch.cdist(positions, positions).pow(2) / width**2, dim=-1).to(logits.dtype)
    support = torch.sigmoid(logits) @ kernel.T
    return torch.logit(support.clamp(1e-6, 1 - 1e-6))


class Allocator(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight), nn.init.zeros_(self.net[-1].bias)  # start on the field

    @staticmethod
    def inputs(relevance: Tensor, evidence: Tensor | None) -> Tensor:
        """(B, N, in): what the allocator sees of each patch: its relevance, and the evidence unless ablated."""
        return relevance[..., None] if evidence is None else torch.cat([relevance[..., None], evidence], -1)

    def forward(self, inputs: Tensor) -> Tensor:
        relevance = inputs[..., 0].clamp(1e-4, 1 - 1e-4)
        return torch.logit(relevance) + self.net(inputs).squeeze(-1)
