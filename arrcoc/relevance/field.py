"""The relevance field: relevance is the equilibrium of an energy over the patches.

    E(r) = sum_i 1/2 r_i^2 - sum_i rho_i h_i - 1/2 sum_ij rho_i L_ij rho_j + gamma / (2N) (sum_i rho_i - K)^2

with rho = sigmoid(r) the relevance of each patch. Opponent processing is in the terms:
  h_i = sum_k alpha_k e_ik + b     the three ways of knowing, balanced by alpha (exploit the evidence);
                                    alpha adapts per query (alpha_k = a_k * 2 sigmoid(A q)_k) or is fixed;
  L_ij = w exp(-d_ij^2 / 2)         neighbours excite each other: local coherence (particularize) vs.
                                    the evidence of single patches (compress);
  gamma (sum rho - K)^2            all patches compete for a budget of K tokens: focus vs. diversify.
The free phase relaxes E; the nudged phase E + beta C(rho, target); equilibrium propagation
contrasts dE/dtheta between them ("relevance realization as free-energy minimisation").
Patch positions come in with the evidence, so any grid (or tier layout) works.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arrcoc.rules.relaxation import Energy

EVIDENCE = 3  # propositional, perspectival, participatory
POSITION = 2


class FieldTerms(NamedTuple):
    """What the field's energy holds fixed while the state relaxes."""

    drive: Tensor  # (B, N) h
    lateral: Tensor  # (N, N) L, symmetric
    competition: Tensor  # gamma / N
    tokens: float  # the budget K, in patches


class RelevanceField(nn.Module):
    """Parameters of the field; :meth:`as_energy` gives the energy the EP rule relaxes."""

    def __init__(self, query_dim: int, budget: float, adaptive_balance: bool = True):
        super().__init__()
        self.query_dim, self.budget = query_dim, budget  # a fraction of the patches, or a count if > 1
        self.evidence_weight = nn.Parameter(torch.ones(EVIDENCE))
        self.evidence_bias = nn.Parameter(torch.zeros(()))
        self.coherence = nn.Parameter(torch.tensor(0.1))
        self.competition = nn.Parameter(torch.tensor(0.0))  # gamma = softplus(.)
        self.balance = nn.Linear(query_dim, EVIDENCE) if adaptive_balance else None
        if self.balance is not None:
            nn.init.zeros_(self.balance.weight), nn.init.zeros_(self.balance.bias)

    @staticmethod
    def pack(evidence: Tensor, positions: Tensor, query: Tensor | None) -> Tensor:
        """Everything the field holds clamped, as one (B, N, 3 + 2 + Dq) tensor; (B, N, 3 + 2) without a query
        (a zero query, not repeated at every patch: at batch 128 and Dq 384 those zeros were half of a training
        step's peak memory)."""
        b, n, _ = evidence.shape
        parts = [evidence, positions.to(evidence).expand(b, n, POSITION)]
        return torch.cat(parts if query is None else [*parts, query.to(evidence.dtype)[:, None].expand(b, n, -1)], -1)

    def drive(self, x: Tensor) -> Tensor:
        """(B, N) external input h: the balanced evidence."""
        evidence, query = x[..., :EVIDENCE], x[:, 0, EVIDENCE + POSITION:]
        weight = self.evidence_weight
        if self.balance is not None:
            # without a query (no columns) the balance of a zero query: its bias
            balance = self.balance(query) if query.shape[-1] else self.balance.bias.expand(len(x), EVIDENCE)
            weight = weight * 2 * torch.sigmoid(balance)  # (B, 3): per query
            return torch.einsum("bnk,bk->bn", evidence, weight) + self.evidence_bias
        return evidence @ weight + self.evidence_bias

    def lateral(self, x: Tensor) -> Tensor:
        """(N, N) lateral weights from patch distances (in patches), no self-connection. Every image of a
        batch shares one patch layout (``pack`` broadcasts it), so one matrix serves the whole batch."""
        positions = x[0, :, EVIDENCE:EVIDENCE + POSITION]
        distance2 = torch.cdist(positions, positions).pow(2)
        return self.coherence * torch.exp(-0.5 * distance2) * (1 - torch.eye(len(positions), device=x.device))

    def terms(self, x: Tensor) -> FieldTerms:
        """The parts of the energy that depend on ``x`` and the parameters alone, not on the state."""
        n = x.shape[1]
        tokens = self.budget * n if self.budget <= 1 else self.budget
        return FieldTerms(self.drive(x), self.lateral(x), F.softplus(self.competition) / n, tokens)

    def energy(self, r: Tensor, x: Tensor) -> Tensor:
        return self.energy_and_gradient(r, self.terms(x))[0]

    @staticmethod
    def energy_and_gradient(r: Tensor, terms: FieldTerms) -> tuple[Tensor, Tensor]:
        """E(r) per sample (B,) and dE/dr (B, N) (:meth:`gradient`). Both share rho, h + L rho and the budget
        surplus, in few fused operations: the relaxation evaluates this at every step; autograd of E only follows
        the energy."""
        rho, field_input, surplus, gradient = RelevanceField._forces(r, terms)
        # 1/2 sum r^2 - sum rho h - 1/2 rho L rho = 1/2 sum (r^2 - rho (h + (h + L rho)))
        energy = 0.5 * (torch.addcmul(r * r, rho, terms.drive + field_input, value=-1).sum(-1)
                        + terms.competition * surplus.squeeze(-1).pow(2))
        return energy, gradient

    @staticmethod
    def gradient(r: Tensor, terms: FieldTerms) -> Tensor:
        """dE/dr (B, N) = r - rho' (h + L rho - gamma/N (sum rho - K)), rho' = rho (1 - rho) (L is symmetric)."""
        return RelevanceField._forces(r, terms)[3]

    @staticmethod
    def _forces(r: Tensor, terms: FieldTerms) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """rho, h + L rho, the budget surplus sum rho - K (B, 1) and dE/dr."""
        rho = torch.sigmoid(r)
        field_input = torch.addmm(terms.drive, rho, terms.lateral)  # h + L rho
        surplus = rho.sum(-1, keepdim=True) - terms.tokens
        net_input = torch.addcmul(field_input, surplus, terms.competition, value=-1)
        return rho, field_input, surplus, torch.addcmul(r, torch.addcmul(rho, rho, rho, value=-1), net_input, value=-1)

    def as_energy(self) -> FieldEnergy:
        return FieldEnergy(self)


class FieldEnergy(Energy):
    """The field as an :class:`~arrcoc.rules.relaxation.Energy`: one state, r (B, N)."""

    def __init__(self, field: RelevanceField):
        super().__init__(field)

    def init_states(self, x: Tensor) -> list[Tensor]:
        return [self.module.drive(x).detach()]  # start from the evidence alone

    def start(self, x: Tensor, prepared: FieldTerms | None) -> list[Tensor]:
        return self.init_states(x) if prepared is None else [prepared.drive.detach()]

    def energy(self, states: list[Tensor], x: Tensor) -> Tensor:
        return self.module.energy(states[0], x)

    def prepare(self, x: Tensor) -> FieldTerms:
        return self.module.terms(x)

    def energy_and_gradient(self, states: list[Tensor], prepared: FieldTerms) -> tuple[Tensor, list[Tensor]]:
        energy, gradient = self.module.energy_and_gradient(states[0], prepared)
        return energy, [gradient]

    def gradient(self, states: list[Tensor], prepared: FieldTerms) -> list[Tensor]:
        return [self.module.gradient(states[0], prepared)]

    def output(self, states: list[Tensor]) -> Tensor:
        return torch.sigmoid(states[0])

    def cost(self, output: Tensor, target: Tensor) -> Tensor:
        return 0.5 * (output - target).pow(2).sum(-1)


@functools.lru_cache(maxsize=16)
def grid_positions(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """(1, N, 2) patch centres in patch units, row-major. Made once per grid and device and shared (an ordinary
    tensor, also when first asked for in inference mode): do not modify it in place."""
    with torch.inference_mode(False), torch.no_grad():
        ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        return torch.stack([ys.flatten(), xs.flatten()], -1).float()[None]

