"""Energy-based models and their relaxation to equilibrium (Millidge et al., ICLR 2023).

An :class:`Energy` defines a per-sample energy ``E(states, params; x)`` (shape ``(B,)``) over a list
of state tensors, an initial state, a read-out ``output(states)`` and a default cost
``C(output, target)``. :func:`relax` descends ``F = sum_b E + beta * C`` in the states, batched
(one gradient per step for the whole batch: autograd's, or the energy's analytic one), the way a
:class:`Relaxation` says, and knows nothing of MLPs: any energy over any states (the relevance field over
image patches, the layered energies of :mod:`arrcoc.rules.layered_energy`) relaxes the same way.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import torch
from torch import Tensor, nn

from arrcoc.config import from_mapping

from .distributed import is_sharded, max_over_shards, sum_over_shards

Cost = Callable[[Tensor, Tensor], Tensor]
RISE_TOL = 1e-3  # the relative rise of F in a plain step that counts as too large a step


class RelaxationDiverged(FloatingPointError):
    """States became non-finite or the energy rose while relaxing; nothing was updated."""

    def __init__(self, step: int, energy_trace: list[float], reason: str):
        self.step, self.energy_trace, self.reason = step, energy_trace, reason
        super().__init__(
            f"relaxation diverged at step {step} ({reason}); last energies "
            f"{[f'{e:.4g}' for e in energy_trace[-3:]]}. Lower the relaxation step_size."
        )

    def __reduce__(self):  # raised in a worker process, it reaches the parent whole
        return type(self), (self.step, self.energy_trace, self.reason)


@dataclass
class Relaxation:
    """How a state is relaxed towards a minimum of its energy (:func:`relax`); the one home of the defaults, those
    of the relevance field (``configs/arrcoc.yaml`` shows the same).

    Args:
        steps: at most this many state updates.
        step_size: of each update, with heavy-ball ``momentum`` (restarted whenever it points uphill).
        momentum: in [0, 1).
        tol: converged once max |dF/ds| < ``tol`` (free phase) or < ``tol * |beta|`` (nudged and clamped
            phases, whose forces scale with beta).
        backtracks: a plain step that raises the energy is undone and the step size halved, at most this many
            times; once more, it raises :class:`RelaxationDiverged`.
        gradient_only: free phases of an energy with an analytic gradient descend on dE/ds alone, with no
            energy per step, falling back to the monitored relaxation if that does not converge.
    """

    steps: int = 60
    step_size: float = 0.5
    momentum: float = 0.3
    tol: float = 1e-4
    backtracks: int = 4
    gradient_only: bool = True

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)  # a rule config that extends this one validates too
        if parent is not None:
            parent()
        if (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0
                or self.step_size <= 0 or self.tol < 0 or not 0 <= self.momentum < 1
                or isinstance(self.backtracks, bool) or not isinstance(self.backtracks, int) or self.backtracks < 0
                or not isinstance(self.gradient_only, bool)):
            raise ValueError(
                f"relaxation needs an integer steps > 0, step_size > 0, tol >= 0, 0 <= momentum < 1, an integer "
                f"backtracks >= 0 and a boolean gradient_only, got steps={self.steps!r}, "
                f"step_size={self.step_size}, tol={self.tol}, momentum={self.momentum}, "
                f"backtracks={self.backtracks!r}, gradient_only={self.gradient_only!r}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Relaxation:
        """The settings of a mapping (a YAML ``relaxation:``), unknown keys named with the known ones."""
        return from_mapping(cls, data, "relaxation")

    def settings(self) -> dict[str, Any]:
        """The relaxation's own settings as a mapping (also of a rule config that extends this class)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Relaxation)}


@dataclass
class RelaxationReport:
    """How a relaxation ended. ``energy`` is ``sum_b E + beta * C`` at the returned states."""

    steps: int  # state updates made
    energy: float
    residual: float  # max |dF/ds| over all state entries at the returned states
    converged: bool  # residual < tol
    energy_trace: list[float] = field(repr=False, default_factory=list)  # F at every step, undone ones included
    halvings: int = 0  # plain steps undone (each halving the step size)
    # the states come from a gradient-only descent (False after one that did not converge: the monitored one ran)
    gradient_only: bool = False


class Energy(ABC):
    """An energy over a list of state tensors, parameterised by an owned module's parameters.

    :func:`relax` differentiates :meth:`energy` in the states with autograd, unless the energy gives its state
    gradient analytically: :meth:`prepare` then returns what the energy holds fixed while the states relax
    (computed once per relaxation) and :meth:`energy_and_gradient` evaluates from it (:meth:`gradient` alone, for a
    gradient-only relaxation)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @abstractmethod
    def init_states(self, x: Tensor) -> list[Tensor]:
        """Where a free relaxation starts."""

    def start(self, x: Tensor, prepared: Any) -> list[Tensor]:
        """Where :func:`relax` starts a free relaxation, given :meth:`prepare`'s parts for ``x`` (an energy whose
        start is among them need not recompute it); default :meth:`init_states`."""
        return self.init_states(x)

    @abstractmethod
    def energy(self, states: list[Tensor], x: Tensor) -> Tensor:
        """Per-sample energy, shape ``(B,)``; ``x`` is clamped."""

    @abstractmethod
    def output(self, states: list[Tensor]) -> Tensor:
        """The read-out the cost is applied to."""

    def cost(self, output: Tensor, target: Tensor) -> Tensor:
        """Default nudging cost: squared error, per sample."""
        return 0.5 * (output - target).pow(2).flatten(1).sum(1)

    def prepare(self, x: Tensor) -> Any:
        """The state-independent parts of the energy for ``x``, for :meth:`energy_and_gradient`; None (the
        default): no analytic state gradient, autograd differentiates :meth:`energy`."""
        return None

    def energy_and_gradient(self, states: list[Tensor], prepared: Any) -> tuple[Tensor, list[Tensor]]:
        """Per-sample energy ``(B,)`` and the direction the relaxation descends for every state, from
        :meth:`prepare`'s parts: dE/ds, or ``P dE/ds`` for an energy that sets :meth:`precondition` (computed
        directly, where the product would lose precision)."""
        raise NotImplementedError(f"{type(self).__name__} has no analytic state gradient")

    def gradient(self, states: list[Tensor], prepared: Any) -> list[Tensor]:
        """:meth:`energy_and_gradient`'s direction alone (a gradient-only relaxation's step); an energy may give it in
        fewer operations."""
        return self.energy_and_gradient(states, prepared)[1]

    def precondition(self, states: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """``P g`` for a gradient ``g`` autograd computed (a nudge's, or the whole objective's without
        :meth:`prepare`): :func:`relax` descends ``P dF/ds`` for a positive definite ``P`` (still downhill, so the
        energy checks hold), which an energy with badly scaled states may set; the identity by default. The
        residual is measured on it too."""
        return grads

    def equilibrium_force(self, states: list[Tensor], x: Tensor) -> list[Tensor]:
        """``P dE/ds`` at ``states``, differentiable in the states, ``x`` and the parameters: what is zero at an
        equilibrium (:func:`relax_differentiably` differentiates it). An energy whose ``P dE/ds`` loses precision
        as a product (the field's, where its beliefs saturate) may compute it directly."""
        grads = torch.autograd.grad(self.energy(states, x).sum(), states, create_graph=True)
        return self.precondition(states, list(grads))


class _Objective:
    """``F = sum_b E(states; x) + beta * sum C(output(states), target)`` and dF/ds, at any states."""

    def __init__(self, model: Energy, x: Tensor, beta: float, target: Tensor | None, cost: Cost):
        self.model, self.beta, self.cost = model, beta, cost
        with torch.no_grad():
            self.prepared = model.prepare(x)
        # autograd may not save tensors made in inference mode (even outside it): copy those it will differentiate
        self.x = x.clone() if self.prepared is None and x.is_inference() else x
        self.target = target.clone() if target is not None and target.is_inference() else target

    def __call__(self, states: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``F`` and the direction to descend: dF/ds, preconditioned as the energy asks."""
        if self.prepared is None:
            total, grads = self._autograd(states, lambda s: self.model.energy(s, self.x).sum() + self._nudge(s))
            return total, self.model.precondition(states, grads)
        energy, grads = self.model.energy_and_gradient(states, self.prepared)  # relax runs under no_grad
        total = energy.sum()
        if self.target is not None:  # the cost is any callable: autograd, through the read-out only
            nudge, nudge_grads = self._autograd(states, self._nudge)
            nudge_grads = self.model.precondition(states, nudge_grads)
            total, grads = total + nudge, [g + n for g, n in zip(grads, nudge_grads)]
        return total, grads

    def _nudge(self, states: list[Tensor]) -> Tensor | float:
        if self.target is None:
            return 0.0
        return self.beta * self.cost(self.model.output(states), self.target).sum()

    @staticmethod
    def _autograd(states: list[Tensor], objective: Callable[[list[Tensor]], Tensor]) -> tuple[Tensor, list[Tensor]]:
        with torch.enable_grad():
            variables = [s.detach().requires_grad_(True) for s in states]
            total = objective(variables)
            return total.detach(), list(torch.autograd.grad(total, variables))


# a data-dependent loop (host-side stopping and divergence checks, autograd inside) that dynamo cannot capture: a
# compiled model runs it eagerly, between its compiled graphs
@torch.compiler.disable
def relax(
    model: Energy,
    x: Tensor,
    beta: float = 0.0,
    target: Tensor | None = None,
    *,
    how: Relaxation | None = None,
    cost: Cost | None = None,
    states: list[Tensor] | None = None,
    check_every: int | None = None,
) -> tuple[list[Tensor], RelaxationReport]:
    """Gradient descent of ``F = sum_b E(states; x) + beta * sum C(output(states), target)``, as ``how`` says.

    The free phase has ``target=None, beta=0``; a nudged phase a target and ``beta != 0``. Momentum is
    restarted whenever it points uphill (the gradient restart of O'Donoghue & Candes 2015): ill-conditioned
    energies then need far fewer steps (~sqrt of the condition number instead of linear in it). Stops after
    ``how.steps`` updates or once the residual ``max |dF/ds|`` is below ``how.tol``. A plain gradient step (one
    without momentum) that raises ``F`` by more than ``RISE_TOL`` (relative) took too large a step: it is undone
    and the step size halved, at most ``how.backtracks`` times; once more, or if the states become non-finite,
    :class:`RelaxationDiverged` is raised. A momentum step that climbs just resets the momentum. Parameters and
    ``.grad`` are never touched. ``F``, the residual and the momentum restarts are whole-batch quantities,
    combined over the shards inside :func:`~arrcoc.rules.distributed.sharded_batch`, so a sharded batch relaxes
    as one batch does.

    With ``check_every=1`` (the CPU's default) every step's decisions are made on the host
    (:func:`_relax_checked_on_host`); otherwise on the device, read every ``check_every`` steps in one transfer
    (:func:`_relax_checked_on_device`): the states and the report are the same, only the number of host syncs
    and of steps computed after convergence differ. ``how.gradient_only`` descends a free phase of an energy
    with an analytic gradient on that gradient alone (:func:`_descend_gradient_only`); its states are within
    ``tol`` of the same equilibrium and depend on ``check_every``. Nudged phases and sharded batches always
    watch the energy.

    Args:
        model: the energy whose states are relaxed (its parameters stay fixed).
        x: the clamped input (B, ...).
        beta: the nudge's strength; 0 for the free phase.
        target: what the output is nudged towards (with ``beta != 0``).
        how: the relaxation's settings (default ``Relaxation()``).
        cost: the nudging cost (default: the energy's own).
        states: where to start (default: the energy's initial states for ``x``).
        check_every: steps between host-side checks; default 1 on the CPU (a check costs nothing there), 8 on an
            accelerator (where each is a sync that stalls the queue of kernels).

    Returns:
        The relaxed states (detached) and a :class:`RelaxationReport` (steps taken, residual, converged).

    Raises:
        RelaxationDiverged: non-finite states, or ``F`` rising in a plain gradient step once ``how.backtracks``
            are spent.
    """
    how = Relaxation() if how is None else how
    if check_every is not None and check_every <= 0:
        raise ValueError(f"relax needs check_every > 0, got {check_every}")
    if target is not None and beta == 0:
        raise ValueError("a nudged phase (target given) needs beta != 0; for the free phase pass target=None")
    if target is None and beta != 0:
        raise ValueError(f"beta={beta} nudges towards a target, but target is None")
    check_every = check_every or (1 if x.device.type == "cpu" else 8)
    # descend outside inference mode, so that autograd (of the energy or the cost) works and the relaxed states are
    # ordinary tensors
    with torch.inference_mode(False), torch.no_grad():
        objective = _Objective(model, x.detach(), beta, target, model.cost if cost is None else cost)
        states = [s.detach().clone() for s in (model.start(x, objective.prepared) if states is None else states)]
        if how.gradient_only and target is None and objective.prepared is not None and not is_sharded():
            descended = _descend_gradient_only(model, objective.prepared, states, how, check_every)
            if descended is not None:
                return descended
        if check_every == 1:
            states, report = _relax_checked_on_host(objective, states, how)
        else:
            states, report = _relax_checked_on_device(objective, states, how, check_every)
    return [s.detach() for s in states], report


def _whole_batch_numbers(total: Tensor, grads: list[Tensor], velocity: list[Tensor]) -> Tensor:
    """(3,) float64: F, how far the velocity points uphill (> 0: momentum uphill) and the residual max |dF/ds|, of
    the whole batch (combined over the shards of a sharded batch)."""
    uphill = reduce(torch.add, [torch.dot(v.flatten(), g.flatten()) for v, g in zip(velocity, grads)])
    residual = reduce(torch.maximum, [torch.linalg.vector_norm(g, math.inf) for g in grads])
    numbers = torch.stack([total, uphill, residual]).double()
    if is_sharded():
        numbers = torch.cat([sum_over_shards(numbers[:2]), max_over_shards(numbers[2:])])
    return numbers


def _relax_checked_on_host(objective: _Objective, states: list[Tensor], how: Relaxation
                           ) -> tuple[list[Tensor], RelaxationReport]:
    """:func:`relax`'s monitored descent, every step's numbers read and its decisions made on the host."""
    velocity = [torch.zeros_like(s) for s in states]
    checks = _Checks(how.tol, how.steps, how.backtracks)
    previous = rise_floor = None  # whole-batch F at the step before; max(|F at step 0|, 1e-12)
    coasting = None  # whether the last update carried momentum (None: there was none)
    before: tuple[list[Tensor], list[Tensor]] | None = None  # states and dF/ds a step before
    scale = 1.0  # the step size's factor, halved by every undone step
    for step in range(how.steps + 1):
        total, grads = objective(states)
        energy, uphill, residual = _whole_batch_numbers(total, grads, velocity).tolist()
        rose = previous is not None and energy > previous + RISE_TOL * max(abs(previous), rise_floor)
        rise_floor = max(abs(energy), 1e-12) if previous is None else rise_floor
        undo = rose and not coasting
        report = checks.read([[energy, residual, float(undo)]], step)
        if report is not None:
            return (before[0] if undo else states), report  # the last step undone
        if undo:  # back to the states before that step (the checks allowed it), at half the step
            (states, grads), energy, scale = before, previous, scale * 0.5
        keep = not (rose or uphill > 0)  # and not converged: the check above stopped then
        velocity = [v.mul_(how.momentum * keep).sub_(g * (how.step_size * scale)) for v, g in zip(velocity, grads)]
        before = states, grads
        states = [s + v for s, v in zip(states, velocity)]
        coasting, previous = how.momentum > 0 and step > 0 and keep, energy
    raise AssertionError("the checks report the last step")


def _relax_checked_on_device(objective: _Objective, states: list[Tensor], how: Relaxation, check_every: int
                             ) -> tuple[list[Tensor], RelaxationReport]:
    """:func:`relax`'s monitored descent with every decision of a step on the device (converged states stand
    still, momentum restarts and undone steps by masking); the host reads the steps' numbers every
    ``check_every`` steps and stops or raises as a check after every step would have."""
    velocity = [torch.zeros_like(s) for s in states]
    checks = _Checks(how.tol, how.steps, how.backtracks)
    pending: list[Tensor] = []  # per step since the last check: (F, residual, rose in a plain step)
    previous = rise_floor = coasting = before = None  # as in _relax_checked_on_host, as tensors
    scale = torch.ones((), dtype=torch.float64, device=states[0].device)  # in float64, as Python's floats are
    for step in range(how.steps + 1):
        total, grads = objective(states)
        energy, uphill, residual = _whole_batch_numbers(total, grads, velocity).unbind()
        if previous is None:
            rose, rise_floor = torch.zeros_like(residual, dtype=torch.bool), energy.abs().clamp_min(1e-12)
        else:
            rose = energy > previous + RISE_TOL * torch.maximum(previous.abs(), rise_floor)
        undo = rose if coasting is None else rose & ~coasting  # a stable plain step never climbs
        pending.append(torch.stack([energy, residual, undo.double()]))
        if how.backtracks and before is not None:  # undo a plain step that raised F (the checks raise past the last)
            states = [torch.where(undo, b, s) for b, s in zip(before[0], states)]
            grads = [torch.where(undo, b, g) for b, g in zip(before[1], grads)]
            energy, residual = torch.where(undo, previous, energy), torch.where(undo, before[2], residual)
            scale = torch.where(undo, scale * 0.5, scale)
        if (step + 1) % check_every == 0 or step == how.steps:
            report = checks.read(torch.stack(pending).tolist(), step + 1 - len(pending))
            if report is not None:
                return states, report  # converged states stand still: they are those of the step reported
            pending = []
        converged = residual < how.tol
        # restart when momentum overshot or points uphill (O'Donoghue & Candes 2015); stand still once converged
        keep = ~(rose | (uphill > 0) | converged)
        velocity = [v.mul_(how.momentum * keep.to(v.dtype)).sub_(g * (how.step_size * scale * (~converged).to(g.dtype)))
                    for v, g in zip(velocity, grads)]
        before = states, grads, residual
        states = [s + v for s, v in zip(states, velocity)]
        coasting = keep if how.momentum > 0 and step > 0 else None  # the velocity was zero at step 0
        previous = energy
    raise AssertionError("the checks report the last step")


def _descend_gradient_only(model: Energy, prepared: Any, states: list[Tensor], how: Relaxation, check_every: int
                           ) -> tuple[list[Tensor], RelaxationReport] | None:
    """:func:`relax`'s gradient-only free phase: heavy ball on :meth:`Energy.gradient` alone, the momentum restarted
    whenever it points uphill, the residual read every ``check_every`` steps. None if it has not converged within
    ``how.steps`` or its states became non-finite: the monitored relaxation then starts over from ``states`` (left
    as they were), so that its failures are the monitored relaxation's. Its report's trace holds only the final
    energy."""
    velocity = [torch.zeros_like(s) for s in states]
    for step in range(how.steps + 1):
        grads = model.gradient(states, prepared)
        if step % check_every == 0 or step == how.steps:
            residual = max(float(torch.linalg.vector_norm(g, math.inf)) for g in grads)
            if not math.isfinite(residual):
                return None
            if residual < how.tol:
                energy = float(model.energy_and_gradient(states, prepared)[0].sum())
                return [s.detach() for s in states], RelaxationReport(step, energy, residual, True, [energy], 0, True)
        if step == how.steps:
            return None
        # restart the momentum once it points uphill (O'Donoghue & Candes 2015), decided on the device
        uphill = reduce(torch.add, [(v * g).sum() for v, g in zip(velocity, grads)])
        carried = (uphill <= 0) * how.momentum
        velocity = [v.mul_(carried).sub_(g, alpha=how.step_size) for v, g in zip(velocity, grads)]
        states = [s + v for s, v in zip(states, velocity)]
    return None


class _Checks:
    """Goes through the steps' (F, residual, rose in a plain step) as a check after every step would: extends the
    energy trace, counts undone steps and raises once they exceed ``backtracks`` (or on non-finite numbers), and
    reports the first step that converged (or the last step)."""

    def __init__(self, tol: float, steps: int, backtracks: int):
        self.tol, self.steps, self.backtracks = tol, steps, backtracks
        self.trace: list[float] = []
        self.halvings = 0
        self.kept = (math.nan, math.nan)  # F and residual where the states are: those of the last step not undone

    def read(self, rows: list[list[float]], first_step: int) -> RelaxationReport | None:
        for step, (energy, residual, rose) in enumerate(rows, first_step):
            self.trace.append(energy)
            if not (math.isfinite(energy) and math.isfinite(residual)):
                raise RelaxationDiverged(step, self.trace, "non-finite states or energy")
            if rose:
                if self.halvings == self.backtracks:
                    spent = f" after {self.halvings} halvings of the step" if self.halvings else ""
                    raise RelaxationDiverged(step, self.trace, "energy rose" + spent)
                self.halvings += 1
            else:
                self.kept = energy, residual
            energy, residual = self.kept
            if residual < self.tol or step == self.steps:
                return RelaxationReport(step, energy, residual, residual < self.tol, self.trace, self.halvings)
        return None


class _ThroughEquilibrium(torch.autograd.Function):
    """Identity on the relaxed states s*; backward sends the incoming gradient u to the force F as -J^-T u,
    J = dF/ds at s* (per sample): the implicit function theorem at the equilibrium F = 0."""

    @staticmethod
    def forward(ctx, states: Tensor, force: Tensor, jacobian: Tensor) -> Tensor:
        ctx.save_for_backward(jacobian)
        return states.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:
        (jacobian,) = ctx.saved_tensors
        return None, -torch.linalg.solve(jacobian.transpose(-1, -2), grad.unsqueeze(-1)).squeeze(-1), None


@torch.compiler.disable
def relax_differentiably(model: Energy, x: Tensor, how: Relaxation | None = None
                         ) -> tuple[list[Tensor], RelaxationReport]:
    """The free equilibrium s* of :func:`relax` (settings ``how``), differentiable in ``x`` and the energy's
    parameters theta by implicit differentiation: at F = P dE/ds = 0 (the force the relaxation descends,
    :meth:`Energy.equilibrium_force`), ds*/dtheta = -J^-1 dF/dtheta with J = dF/ds = P H, the same as
    -H^-1 d2E/ds dtheta but conditioned as the relaxation is (the field's H vanishes where its beliefs saturate; its
    J does not).

    The Jacobian J (B, D, D) over each sample's D state entries is built with one batched double-backward and
    solved directly, so it suits states of up to a few hundred entries (the relevance field's patches). The
    gradient is exact at the equilibrium, whatever path the relaxation took; the relaxation's own ``tol`` bounds
    how far s* is from it. Energies must be per sample (sample b's energy depends on its own states only).
    """
    states, report = relax(model, x, how=how)
    with torch.enable_grad():
        fixed = [s.requires_grad_(True) for s in states]  # fresh detached tensors: the Jacobian's variables
        force = model.equilibrium_force(fixed, x)
        flat_force = torch.cat([f.flatten(1) for f in force], 1)  # (B, D), a function of theta and x
        batch, dim = flat_force.shape
        directions = torch.eye(dim, dtype=flat_force.dtype, device=flat_force.device)[:, None].expand(dim, batch, dim)
        rows = torch.autograd.grad(flat_force, fixed, grad_outputs=directions, is_grads_batched=True,
                                   retain_graph=True)
    jacobian = torch.cat([r.flatten(2) for r in rows], 2).transpose(0, 1).detach()
    flat = _ThroughEquilibrium.apply(torch.cat([s.detach().flatten(1) for s in states], 1), flat_force, jacobian)
    sizes = [s[0].numel() for s in states]
    return [part.view_as(s) for part, s in zip(flat.split(sizes, 1), states)], report
