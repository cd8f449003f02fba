"""The allocation network: a small per-patch MLP from the evidence to a logit that joins the relevance field's drive.
Trained by feedback alignment by default (DFA as an option): its error reaches the hidden layer through a fixed
random matrix, never through W^T. Its error is the difference of the field's nudged equilibria
(:func:`~arrcoc.relevance.field.nudged_error`): the field ranks the patches last, so the allocator learns what
helps the field's equilibrium, lateral structure included."""

from __future__ import annotations

from torch import Tensor, nn


class Allocator(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight), nn.init.zeros_(self.net[-1].bias)  # start on the balanced evidence

    def forward(self, evidence: Tensor) -> Tensor:
        """(B, N) logits from the evidence (B, N, 3), the MLP on every patch at once, as a matrix product."""
        batch, patches, features = evidence.shape
        return self.net(evidence.reshape(-1, features)).view(batch, patches)
