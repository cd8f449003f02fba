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

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arrcoc.rules.relaxation import Energy, Relaxation

from .constants import shape_constant

EVIDENCE = 3  # propositional, perspectival, participatory
POSITION = 2


@dataclass
class FieldRelaxation(Relaxation):
    """How the field relaxes: monitored, as :class:`~arrcoc.rules.relaxation.Relaxation` says, wherever it learns
    (the training passes, its rule's phases, the backprop references): there a divergence is reported, never passed
    on; at inference (eval mode, no autograd) ``inference_steps`` plain gradient steps of ``inference_step_size``
    with no check and no host sync (:meth:`RelevanceField.equilibrium`; 0 steps: monitored there too)."""

    inference_steps: int = 8
    inference_step_size: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.inference_steps, bool) or not isinstance(self.inference_steps, int) \
                or self.inference_steps < 0 or not 0 < self.inference_step_size <= 1:
            raise ValueError(f"inference_steps must be an integer >= 0 and inference_step_size in (0, 1], got "
                             f"{self.inference_steps!r} and {self.inference_step_size!r}")


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

    def drive(self, evidence: Tensor, query: Tensor | None) -> Tensor:
        """(B, N) external input h: the evidence (B, N, 3), balanced per query (B, Dq) where there is one."""
        weight = self.evidence_weight
        if self.balance is None:
            return evidence @ weight + self.evidence_bias
        # without a query the balance of a zero query: its bias
        balance = self.balance.bias.expand(len(evidence), EVIDENCE) if query is None else self.balance(query)
        weight = weight * 2 * torch.sigmoid(balance)  # (B, 3): per query
        return torch.baddbmm(self.evidence_bias, evidence, weight[..., None]).squeeze(-1)

    def lateral(self, kernel: Tensor) -> Tensor:
        """(N, N) lateral weights L from the layout's :func:`neighbour_kernel`: one matrix for the whole batch."""
        return self.coherence * kernel

    def tokens(self, patches: int) -> float:
        """The budget K, in patches."""
        return self.budget * patches if self.budget <= 1 else self.budget

    def terms(self, x: Tensor) -> FieldTerms:
        """The parts of the energy that depend on ``x`` (as :meth:`pack` made it) and the parameters alone, not on
        the state. Every image of a batch shares one patch layout (``pack`` broadcasts it)."""
        n = x.shape[1]
        evidence, positions = x[..., :EVIDENCE], x[0, :, EVIDENCE:EVIDENCE + POSITION]
        query = x[:, 0, EVIDENCE + POSITION:] if x.shape[-1] > EVIDENCE + POSITION else None
        return FieldTerms(self.drive(evidence, query), self.lateral(neighbour_kernel(positions)),
                          F.softplus(self.competition) / n, self.tokens(n))

    def equilibrium(self, evidence: Tensor, query: Tensor | None, kernel: Tensor, steps: int, step_size: float
                    ) -> Tensor:
        """(B, N) relevance rho = sigmoid(r) after ``steps`` plain gradient steps of E from r = h, with no check and
        no host sync: inference's relaxation, four operations a step (it compiles whole and captures in a CUDA
        graph). The monitored :func:`~arrcoc.rules.relaxation.relax`, wherever the field learns, is its reference.

        Args:
            evidence: (B, N, 3) the three ways of knowing.
            query: (B, Dq) or None.
            kernel: (N, N) the layout's :func:`neighbour_kernel` (:func:`grid_kernel` for a grid).
            steps: gradient steps.
            step_size: of each.
        """
        n = evidence.shape[1]
        drive = self.drive(evidence, query)
        competition = F.softplus(self.competition) / n
        # the budget's competition as part of the coupling: h + L rho - gamma/N (sum rho - K) = h' + L' rho
        biased, coupling = torch.add(drive, competition, alpha=self.tokens(n)), self.lateral(kernel) - competition
        r = drive
        for _ in range(steps):
            rho = torch.sigmoid(r)
            # r - a dE/dr = r + a (rho' (h' + L' rho) - r): a lerp towards rho' (h' + L' rho)
            r = torch.lerp(r, torch.ops.aten.sigmoid_backward(torch.addmm(biased, rho, coupling), rho), step_size)
        return torch.sigmoid(r)

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
        return [self.module.terms(x).drive.detach()]  # start from the evidence alone

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


@shape_constant
def grid_positions(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """(1, N, 2) patch centres in patch units, row-major; made once per grid and device (:func:`shape_constant`)."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], -1).float()[None]


@shape_constant
def grid_kernel(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`neighbour_kernel` of a grid's patches, made once per grid, device and dtype (:func:`shape_constant`)."""
    return neighbour_kernel(grid_positions(height, width, device)[0].to(dtype))


def neighbour_kernel(positions: Tensor) -> Tensor:
    """(N, N) exp(-d^2 / 2) of the distances d (in patches) between the patches at ``positions`` (N, 2), zero on the
    diagonal: whom each patch's lateral terms reach (:meth:`RelevanceField.lateral` scales it)."""
    distance2 = torch.cdist(positions, positions).pow(2)
    return torch.exp(-0.5 * distance2) * (1 - torch.eye(len(positions), device=positions.device, dtype=positions.dtype))
