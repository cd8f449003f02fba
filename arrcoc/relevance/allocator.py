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

from .constants import shape_constant
from .field import grid_positions


def neighbourhood_support(logits: Tensor, kernel: Tensor) -> Tensor:
    """(B, N) budget logits: the logit of the Gaussian-weighted mean of ``sigmoid(logits)`` over each patch's
    neighbourhood, ``kernel`` from :func:`neighbourhood_kernel`."""
    return torch.logit(torch.sigmoid(logits) @ kernel, eps=1e-6)


@shape_constant
def neighbourhood_kernel(height: int, width: int, sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(N, N) column j: the Gaussian weights (``sigma`` in patches) of patch j's neighbourhood on a grid, summing to
    one also at the border; made once per grid (:func:`~arrcoc.relevance.constants.shape_constant`)."""
    positions = grid_positions(height, width, device)[0]
    weights = torch.softmax(-0.5 * torch.cdist(positions, positions).pow(2) / sigma**2, dim=-1)
    return weights.T.contiguous().to(dtype)


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
        batch, patches, features = inputs.shape  # the MLP on every patch at once, as a matrix product
        return torch.logit(inputs[..., 0], eps=1e-4) + self.net(inputs.reshape(-1, features)).view(batch, patches)
