"""The allocation network: a small per-patch MLP from equilibrium relevance (and evidence and patch
features) to budget logits. Trained by feedback alignment by default (DFA as an option): its error
reaches the hidden layer through a fixed random matrix, never through W^T.

It refines the field rather than relearning relevance: logits = logit(relevance) + MLP(inputs), so an
untrained allocator follows the field's equilibrium and learns only corrections."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Allocator(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight), nn.init.zeros_(self.net[-1].bias)  # start on the field

    @staticmethod
    def inputs(relevance: Tensor, evidence: Tensor, features: Tensor | None) -> Tensor:
        """(B, N, in): what the allocator sees of each patch."""
        parts = [relevance[..., None], evidence] + ([] if features is None else [features])
        return torch.cat(parts, -1)

    def forward(self, inputs: Tensor) -> Tensor:
        relevance = inputs[..., 0].clamp(1e-4, 1 - 1e-4)
        return torch.logit(relevance) + self.net(inputs).squeeze(-1)
