"""The three ways of knowing: what each patch offers as evidence of relevance.

propositional   information content of the patch itself (entropy of its lightness); no learning.
perspectival    salience: a Hebbian-learned attention map. An encoder learns label-free (Oja/Sanger,
                BCM, ...) which directions of patch features vary across patches; a one-unit readout
                of its responses, learned by a contrastive Hebbian rule where a relevance target
                exists, says which responses mark relevant patches.
participatory   query-patch coupling: a bilinear score f_i . (W q) between the patch's features and
                the query embedding, W learned by the InfoNCE-style Hebbian rule. Off without a query.
Each returns a (B, N) score; the relevance field balances them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def standardize_per_image(score: Tensor, dim: int = -1) -> Tensor:
    """Zero mean, unit std over each image's patches (``dim``), so evidence of different kinds is comparable."""
    return (score - score.mean(dim, keepdim=True)) / score.std(dim, keepdim=True, correction=0).clamp_min(1e-6)


class PerspectivalKnowing(nn.Module):
    def __init__(self, feature_dim: int, units: int, gain_control: bool = False):
        super().__init__()
        self.gain_control = gain_control
        self.encoder = nn.Linear(feature_dim, units, bias=False)
        self.readout = nn.Linear(units, 1)
        nn.init.orthogonal_(self.encoder.weight)  # start as a random orthonormal projection, as Oja ends

    def responses(self, context: Tensor) -> Tensor:
        """(B, N, units) responses to each patch's features relative to its image (centre-surround). With gain
        control each unit's drive is divided by its spread over the image's patches before the tanh (divisive
        normalisation): every unit then works in its graded range in every image, not saturated in busy ones and
        silent in plain ones (the context has zero mean over the patches, and so has the drive)."""
        batch, patches, features = context.shape  # every patch at once, as one matrix product
        drive = self.encoder(context.reshape(-1, features)).view(batch, patches, -1)
        if self.gain_control:
            drive = drive / drive.std(1, keepdim=True, correction=0).clamp_min(1e-6)
        return torch.tanh(drive)

    def forward(self, context: Tensor) -> Tensor:
        responses = self.responses(context)
        return self.readout(responses.view(-1, responses.shape[-1])).view(responses.shape[:2])


class ParticipatoryKnowing(nn.Module):
    def __init__(self, query_dim: int, feature_dim: int, temperature: float = 0.1):
        super().__init__()
        self.query_map = nn.Linear(query_dim, feature_dim, bias=False)
        nn.init.zeros_(self.query_map.weight)  # no coupling until learned
        self.temperature = temperature

    def forward(self, features: Tensor, query: Tensor) -> Tensor:
        """(B, N) coupling of every patch with its image's query."""
        return torch.einsum("bnf,bf->bn", features, self.query_map(query)) / self.temperature

    @torch.no_grad()
    def clamped_output(self, features: Tensor, query: Tensor, target: Tensor) -> Tensor:
        """(B, F) the positive phase of within-image contrast: the map's output W q moved by
        (E_target[f] - E_p[f]) / T, with p the softmax of the coupling over the image's patches. A contrastive
        Hebbian (delta) rule towards it makes exactly the gradient of the cross-entropy between the patch
        softmax and the normalised target: Hebbian on the queried patches, anti-Hebbian on the ones it picks."""
        chosen = torch.softmax(self(features, query), dim=-1)
        wanted = target / target.sum(-1, keepdim=True).clamp_min(1e-6)
        return self.query_map(query) + torch.einsum("bn,bnf->bf", wanted - chosen, features) / self.temperature

    @staticmethod
    def queried_content(features: Tensor, target: Tensor) -> Tensor:
        """(B, F) the features of the relevant patches (target-weighted mean): the key a query should
        retrieve; the other images of the batch give the negatives."""
        weights = target / target.sum(-1, keepdim=True).clamp_min(1e-6)
        return torch.einsum("bn,bnf->bf", weights, features)
