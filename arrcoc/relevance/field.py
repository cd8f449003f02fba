"""The relevance field: the budget goes to the equilibrium of an energy over the patches, the last step before top-K.

    E(r) = sum_i [rho_i r_i - softplus(r_i)] - sum_i rho_i h_i - 1/2 sum_ij rho_i L_ij rho_j
           + gamma / (2N) (sum_i rho_i - K)^2

with rho = sigmoid(r) (the first sum is the negative entropy of each patch's keep-or-drop belief: a mean-field
Hopfield energy, whose equilibrium is r = h + L rho - gamma/N (sum rho - K)). Opponent processing is in the terms:
  h_i = sum_k alpha_k e_ik + b + a_i   the three ways of knowing, balanced by alpha (per query where there is one),
                                         plus the allocation network's per-patch logit a_i;
  L_ij = A_e G(d_ij; w_e) - A_i G(d_ij; w_i)
                                         a difference of Gaussians over the patches' distance: neighbours excite
                                         and a wider surround inhibits (or not: amplitudes and widths are learned),
                                         so a compact group of relevant patches outranks lone look-alike fragments;
  gamma (sum rho - K)^2                  all patches compete for a budget of K tokens.
The free phase relaxes E; the nudged phases E +- beta C(rho, target); equilibrium propagation contrasts dE/dtheta
between them, and the allocation network's error is the difference of the nudged equilibria (so nothing after
the field can undo what its lateral structure does). Patch positions come in with the evidence, so any grid (or
tier layout) works.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arrcoc.rules.relaxation import Energy, Relaxation, relax

from .constants import shape_constant

EVIDENCE = 3  # propositional, perspectival, participatory
ALLOCATION = 1  # the allocation network's logit, part of the drive
POSITION = 2
# a patch's squared distance to itself for the lateral Gaussians: exp(-d2 / 2w^2) underflows to 0 for widths up to
# 100 patches, and unlike infinity it keeps their gradients finite
SELF_DISTANCE2 = 1e6


@dataclass
class FieldRelaxation(Relaxation):
    """How the field relaxes: monitored, as :class:`~arrcoc.rules.relaxation.Relaxation` says, wherever it learns
    (the training passes, its rule's phases, the backprop references): there a divergence is reported, never passed
    on; at inference (eval mode, no autograd) ``inference_steps`` damped mean-field steps of ``inference_step_size``
    with no check and no host sync (:meth:`RelevanceField.equilibrium`; 0 steps: monitored there too)."""

    inference_steps: int = 40
    inference_step_size: float = 0.9

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
    tokens: Tensor  # the budget K, in patches


class RelevanceField(nn.Module):
    """Parameters of the field; :meth:`as_energy` gives the energy the EP rule relaxes."""

    def __init__(self, query_dim: int, budget: float, adaptive_balance: bool = True):
        super().__init__()
        self.query_dim = query_dim
        # the budget as a tensor (a share of the patches, a count), so that a compiled forward reads it instead of
        # compiling a graph for each budget; not saved: the config holds the budget
        self.register_buffer("budget_terms", torch.zeros(2), persistent=False)
        self.budget = budget
        self.evidence_weight = nn.Parameter(torch.ones(EVIDENCE))
        self.evidence_bias = nn.Parameter(torch.zeros(()))
        # the lateral difference of Gaussians: amplitudes and log widths (in patches) of centre and surround
        self.excitation = nn.Parameter(torch.tensor(0.5))
        self.inhibition = nn.Parameter(torch.tensor(0.1))
        self.excitation_width = nn.Parameter(torch.tensor(0.0))
        self.inhibition_width = nn.Parameter(torch.tensor(1.0))
        self.competition = nn.Parameter(torch.tensor(0.0))  # gamma = softplus(.)
        self.balance = nn.Linear(query_dim, EVIDENCE) if adaptive_balance else None
        if self.balance is not None:
            nn.init.zeros_(self.balance.weight), nn.init.zeros_(self.balance.bias)

    @staticmethod
    def pack(evidence: Tensor, allocation: Tensor, positions: Tensor, query: Tensor | None) -> Tensor:
        """Everything the field holds clamped, as one (B, N, 3 + 1 + 2 + Dq) tensor; (B, N, 3 + 1 + 2) without a
        query (a zero query, not repeated at every patch: at batch 128 and Dq 384 those zeros were half of a
        training step's peak memory)."""
        b, n, _ = evidence.shape
        parts = [evidence, allocation[..., None], positions.to(evidence).expand(b, n, POSITION)]
        return torch.cat(parts if query is None else [*parts, query.to(evidence.dtype)[:, None].expand(b, n, -1)], -1)

    def drive(self, evidence: Tensor, allocation: Tensor, query: Tensor | None) -> Tensor:
        """(B, N) external input h: the evidence (B, N, 3), balanced per query (B, Dq) where there is one, plus the
        allocation network's logits (B, N)."""
        weight = self.evidence_weight
        if self.balance is None:
            return evidence @ weight + self.evidence_bias + allocation
        # without a query the balance of a zero query: its bias
        balance = self.balance.bias.expand(len(evidence), EVIDENCE) if query is None else self.balance(query)
        weight = weight * 2 * torch.sigmoid(balance)  # (B, 3): per query
        return torch.baddbmm((allocation + self.evidence_bias)[..., None], evidence, weight[..., None]).squeeze(-1)

    def lateral(self, distance2: Tensor) -> Tensor:
        """(N, N) lateral weights L from the layout's squared distances (:func:`squared_distances`): one matrix for
        the whole batch."""
        centre = torch.exp(distance2 * (-0.5 * torch.exp(-2 * self.excitation_width)))
        surround = torch.exp(distance2 * (-0.5 * torch.exp(-2 * self.inhibition_width)))
        return self.excitation * centre - self.inhibition * surround

    @property
    def budget(self) -> float:
        """A fraction of the patches in (0, 1], or a count if > 1."""
        return self._budget

    @budget.setter
    def budget(self, budget: float) -> None:
        self._budget = budget
        with torch.no_grad():  # in place: a compiled or graph-captured forward reads the new values
            self.budget_terms.copy_(torch.tensor([budget, 0.0] if budget <= 1 else [0.0, budget]))

    def tokens(self, patches: int) -> Tensor:
        """The budget K, in patches (a 0-d tensor)."""
        return self.budget_terms[0] * patches + self.budget_terms[1]

    def terms(self, x: Tensor) -> FieldTerms:
        """The parts of the energy that depend on ``x`` (as :meth:`pack` made it) and the parameters alone, not on
        the state. Every image of a batch shares one patch layout (``pack`` broadcasts it)."""
        n = x.shape[1]
        evidence, allocation = x[..., :EVIDENCE], x[..., EVIDENCE]
        positions = x[0, :, EVIDENCE + ALLOCATION:EVIDENCE + ALLOCATION + POSITION]
        query = x[:, 0, EVIDENCE + ALLOCATION + POSITION:] if x.shape[-1] > EVIDENCE + ALLOCATION + POSITION else None
        return FieldTerms(self.drive(evidence, allocation, query), self.lateral(squared_distances(positions)),
                          F.softplus(self.competition) / n, self.tokens(n))

    def equilibrium(self, evidence: Tensor, allocation: Tensor, query: Tensor | None, distance2: Tensor, steps: int,
                    step_size: float) -> Tensor:
        """(B, N) the equilibrium's logits r after ``steps`` damped mean-field steps from r = h, with no check and no
        host sync: inference's relaxation, three operations a step (it compiles whole and captures in a CUDA graph).
        The monitored :func:`~arrcoc.rules.relaxation.relax`, wherever the field learns, is its reference.

        Args:
            evidence: (B, N, 3) the three ways of knowing.
            allocation: (B, N) the allocation network's logits.
            query: (B, Dq) or None.
            distance2: (N, N) the layout's :func:`squared_distances` (:func:`grid_distances` for a grid).
            steps: mean-field steps.
            step_size: of each.
        """
        n = evidence.shape[1]
        drive = self.drive(evidence, allocation, query)
        competition = F.softplus(self.competition) / n
        # the budget's competition as part of the coupling: h + L rho - gamma/N (sum rho - K) = h' + L' rho
        biased, coupling = torch.addcmul(drive, competition, self.tokens(n)), self.lateral(distance2) - competition
        r = drive
        for _ in range(steps):
            r = torch.lerp(r, torch.addmm(biased, torch.sigmoid(r), coupling), step_size)
        return r

    def energy(self, r: Tensor, x: Tensor) -> Tensor:
        return self.energy_and_gradient(r, self.terms(x))[0]

    @staticmethod
    def energy_and_gradient(r: Tensor, terms: FieldTerms) -> tuple[Tensor, Tensor]:
        """E(r) per sample (B,) and the mean-field residual (B, N) (:meth:`gradient`). Both share rho, h + L rho and
        the budget surplus: the relaxation evaluates this at every step; autograd of E only follows the energy."""
        rho, field_input, surplus, residual = RelevanceField._mean_field(r, terms)
        # sum [rho r - softplus(r)] - sum rho h - 1/2 rho L rho = sum [rho (r - (h + (h + L rho)) / 2) - softplus(r)]
        entropy_and_drive = rho * (r - 0.5 * (terms.drive + field_input)) - F.softplus(r)
        energy = entropy_and_drive.sum(-1) + 0.5 * terms.competition * surplus.squeeze(-1).pow(2)
        return energy, residual

    @staticmethod
    def gradient(r: Tensor, terms: FieldTerms) -> Tensor:
        """(B, N) the mean-field residual r - (h + L rho - gamma/N (sum rho - K)): dE/dr = rho' times it (L is
        symmetric), computed without the factor rho', which vanishes in float32 where a belief saturates and
        would leave a state run off to infinity looking like an equilibrium."""
        return RelevanceField._mean_field(r, terms)[3]

    @staticmethod
    def _mean_field(r: Tensor, terms: FieldTerms) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """rho, h + L rho, the budget surplus sum rho - K (B, 1) and the mean-field residual."""
        rho = torch.sigmoid(r)
        field_input = torch.addmm(terms.drive, rho, terms.lateral)  # h + L rho
        surplus = rho.sum(-1, keepdim=True) - terms.tokens
        return rho, field_input, surplus, r - torch.addcmul(field_input, surplus, terms.competition, value=-1)

    def as_energy(self) -> FieldEnergy:
        return FieldEnergy(self)


class FieldEnergy(Energy):
    """The field as an :class:`~arrcoc.rules.relaxation.Energy`: one state, r (B, N), descended in the metric of
    the beliefs rho (dE/dr divided by rho'), where a mean-field step is r -> r - a (r - (h + L rho ...)): a
    confident patch (rho' tiny) moves as fast as an undecided one."""

    def __init__(self, field: RelevanceField):
        super().__init__(field)

    def init_states(self, x: Tensor) -> list[Tensor]:
        return [self.module.terms(x).drive.detach()]  # start from the drive alone

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

    def precondition(self, states: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        # a nudge's autograd gradient carries the factor rho': where that underflows the nudge is lost (not NaN)
        slope = belief_slope(states[0])
        return [grads[0] / slope.clamp_min(torch.finfo(slope.dtype).tiny)]

    def equilibrium_force(self, states: list[Tensor], x: Tensor) -> list[Tensor]:
        return [RelevanceField._mean_field(states[0], self.module.terms(x))[3]]

    def output(self, states: list[Tensor]) -> Tensor:
        return torch.sigmoid(states[0])

    def cost(self, output: Tensor, target: Tensor) -> Tensor:
        return 0.5 * (output - target).pow(2).sum(-1)


def belief_slope(r: Tensor) -> Tensor:
    """rho' = sigmoid(r) sigmoid(-r), which unlike rho (1 - rho) stays above 0 in float32 up to |r| ~ 88."""
    return torch.sigmoid(r) * torch.sigmoid(-r)


@shape_constant
def grid_positions(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """(1, N, 2) patch centres in patch units, row-major; made once per grid and device (:func:`shape_constant`)."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], -1).float()[None]


@shape_constant
def grid_distances(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`squared_distances` of a grid's patches, made once per grid, device and dtype (:func:`shape_constant`)."""
    return squared_distances(grid_positions(height, width, device)[0].to(dtype))


def squared_distances(positions: Tensor) -> Tensor:
    """(N, N) squared distances (in patches) between the patches at ``positions`` (N, 2), and on the diagonal
    ``SELF_DISTANCE2``, out of reach of any lateral Gaussian: whom each patch's lateral terms reach
    (:meth:`RelevanceField.lateral` weighs them), never itself."""
    distance2 = torch.cdist(positions, positions).pow(2)
    return distance2.masked_fill(torch.eye(len(positions), device=positions.device, dtype=torch.bool), SELF_DISTANCE2)


def nudged_error(field: RelevanceField, x: Tensor, free: Tensor, target: Tensor, beta: float, how: Relaxation
                 ) -> Tensor:
    """(B, N) what the field's drive should have been: (r(-beta) - r(+beta)) / (2 beta), the difference of the
    equilibria nudged towards and away from ``target`` (B, N), each relaxed as ``how`` says from ``free``, the free
    equilibrium's r (the pass's budget logits: the forward relaxed it already; ``x`` as :meth:`RelevanceField.pack`
    made it). Without lateral terms it is rho - target, the gradient of the binary cross-entropy in the logits;
    with them it carries what the lateral structure does with a change of the drive, from the field's own settling
    alone."""
    energy, start = field.as_energy(), [free.detach()]
    nudged = dataclasses.replace(how, tol=how.tol * abs(beta))  # forces scale with beta (as the EP rule's)
    plus, _ = relax(energy, x, beta, target, how=nudged, states=start)
    minus, _ = relax(energy, x, -beta, target, how=nudged, states=start)
    return (minus[0] - plus[0]) / (2 * beta)
