"""Energy-based models and their relaxation to equilibrium (Millidge et al., ICLR 2023).

An :class:`Energy` defines a per-sample energy ``E(states, params; x)`` (shape ``(B,)``) over a list
of state tensors, an initial state, a read-out ``output(states)`` and a default cost
``C(output, target)``. :func:`relax` descends ``F = sum_b E + beta * C`` in the states, batched
(one autograd call per step for the whole batch), and knows nothing of MLPs: any energy over any
states (e.g. a relevance field over image patches) relaxes the same way.

Two layered energies over a flat ``nn.Sequential`` MLP are provided:

* :class:`PredictionErrorEnergy` (default): ``E = sum_l 1/2 ||s_l - f_l(s_{l-1})||^2``. Its free
  equilibrium *is* the feedforward pass, so a network trained through it is used as ``model(x)``.
* :class:`HopfieldEnergy`: the layered Hopfield energy of Scellier & Bengio (2017); its free
  equilibrium is a recurrent fixed point, not ``model(x)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import max_over_shards, sum_over_shards

Cost = Callable[[Tensor, Tensor], Tensor]


class RelaxationDiverged(FloatingPointError):
    """States became non-finite or the energy rose while relaxing; nothing was updated."""

    def __init__(self, step: int, energy_trace: list[float], reason: str):
        self.step, self.energy_trace = step, energy_trace
        super().__init__(
            f"relaxation diverged at step {step} ({reason}); last energies "
            f"{[f'{e:.4g}' for e in energy_trace[-3:]]}. Lower the relaxation step_size."
        )


@dataclass
class Relaxation:
    """How a state is relaxed towards a minimum of its energy (see :func:`relax`): at most ``steps`` updates of
    size ``step_size`` with heavy-ball ``momentum``; converged once max |dF/ds| < ``tol`` (free phase) or
    < ``tol * |beta|`` (nudged and clamped phases, whose forces scale with beta)."""

    steps: int = 500
    step_size: float = 0.1
    momentum: float = 0.9
    tol: float = 1e-5

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)  # a rule config that extends this one validates too
        if parent is not None:
            parent()
        if self.steps <= 0 or self.step_size <= 0 or self.tol < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"relaxation needs steps > 0, step_size > 0, tol >= 0 and 0 <= momentum < 1, got steps={self.steps}, "
                f"step_size={self.step_size}, tol={self.tol}, momentum={self.momentum}"
            )

    def settings(self) -> dict[str, float]:
        """The keyword arguments of :func:`relax` this stands for."""
        return {"steps": self.steps, "step_size": self.step_size, "momentum": self.momentum, "tol": self.tol}


@dataclass
class RelaxationReport:
    """How a relaxation ended. ``energy`` is ``sum_b E + beta * C`` at the returned states."""

    steps: int  # state updates made
    energy: float
    residual: float  # max |dF/ds| over all state entries at the returned states
    converged: bool  # residual < tol
    energy_trace: list[float] = field(repr=False, default_factory=list)


class Energy(ABC):
    """An energy over a list of state tensors, parameterised by an owned module's parameters."""

    def __init__(self, module: nn.Module):
        self.module = module

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @abstractmethod
    def init_states(self, x: Tensor) -> list[Tensor]:
        """Where a free relaxation starts."""

    @abstractmethod
    def energy(self, states: list[Tensor], x: Tensor) -> Tensor:
        """Per-sample energy, shape ``(B,)``; ``x`` is clamped."""

    @abstractmethod
    def output(self, states: list[Tensor]) -> Tensor:
        """The read-out the cost is applied to."""

    def cost(self, output: Tensor, target: Tensor) -> Tensor:
        """Default nudging cost: squared error, per sample."""
        return 0.5 * (output - target).pow(2).flatten(1).sum(1)


# a data-dependent loop (host-side stopping and divergence checks every step, autograd inside) that dynamo cannot
# capture: a compiled model runs it eagerly, between its compiled graphs
@torch.compiler.disable
def relax(
    model: Energy,
    x: Tensor,
    beta: float = 0.0,
    target: Tensor | None = None,
    *,
    steps: int = 500,
    tol: float = 1e-5,
    step_size: float = 0.2,
    cost: Cost | None = None,
    states: list[Tensor] | None = None,
    momentum: float = 0.0,
    rise_tol: float = 1e-3,
) -> tuple[list[Tensor], RelaxationReport]:
    """Gradient descent of ``F = sum_b E(states; x) + beta * sum C(output(states), target)``.

    ``momentum`` > 0 adds heavy-ball momentum, reset whenever it points uphill (the gradient
    restart of O'Donoghue & Candes 2015): ill-conditioned layered energies then need far fewer
    steps (~sqrt of the condition number instead of linear in it).

    The free phase has ``target=None, beta=0``; a nudged phase a target and ``beta != 0``. Stops
    after ``steps`` updates or once the residual ``max |dF/ds|`` is below ``tol``. Raises
    :class:`RelaxationDiverged` if the states become non-finite or a plain gradient step (one
    without momentum) raises ``F`` by more than ``rise_tol`` (relative): with a stable step size
    it never climbs; a momentum step that climbs just resets the momentum. Parameters and
    ``.grad`` are never touched. ``F``, the residual and the momentum restarts are whole-batch quantities,
    combined over the shards inside :func:`~arrcoc.rules.distributed.sharded_batch`, so a sharded batch relaxes
    as one batch does.

    Args:
        model: the energy whose states are relaxed (its parameters stay fixed).
        x: the clamped input (B, ...).
        beta: the nudge's strength; 0 for the free phase.
        target: what the output is nudged towards (with ``beta != 0``).
        steps, tol, step_size, momentum: how to descend (:class:`Relaxation` holds them as one setting).
        cost: the nudging cost (default: the energy's own).
        states: where to start (default: the energy's initial states for ``x``).
        rise_tol: the relative rise of ``F`` in a plain step that counts as divergence.

    Returns:
        The relaxed states (detached) and a :class:`RelaxationReport` (steps taken, residual, converged).

    Raises:
        RelaxationDiverged: non-finite states, or ``F`` rising in a plain gradient step.
    """
    if steps <= 0:
        raise ValueError(f"relax needs steps > 0, got {steps}")
    if step_size <= 0 or tol < 0 or not 0 <= momentum < 1:
        raise ValueError(
            f"relax needs step_size > 0, tol >= 0, 0 <= momentum < 1; got {step_size}, {tol}, {momentum}"
        )
    if target is not None and beta == 0:
        raise ValueError("a nudged phase (target given) needs beta != 0; for the free phase pass target=None")
    if target is None and beta != 0:
        raise ValueError(f"beta={beta} nudges towards a target, but target is None")
    cost = model.cost if cost is None else cost
    # dF/ds comes from autograd, which inference mode forbids even under enable_grad: descend outside it, on
    # copies of the tensors given in it (autograd may not save those); the relaxed states are ordinary tensors
    copy = torch.is_inference_mode_enabled()
    with torch.inference_mode(False), torch.no_grad():
        x = x.clone() if copy else x.detach()
        target = target.clone() if copy and target is not None else target
        states = [s.detach().clone() for s in (model.init_states(x) if states is None else states)]
        velocity = [torch.zeros_like(s) for s in states]

    trace: list[float] = []
    coasting = False  # whether the last update carried momentum
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(steps + 1):
            states = [s.requires_grad_(True) for s in states]
            total = model.energy(states, x).sum()
            if target is not None:
                total = total + beta * cost(model.output(states), target).sum()
            grads = torch.autograd.grad(total, states)
            # whole-batch quantities: every decision below is the same on every shard of a sharded batch
            uphill = sum((v * g).sum() for v, g in zip(velocity, grads))  # > 0: momentum points uphill
            scalars = {"dtype": torch.float64, "device": total.device}  # NCCL reduces on the GPU
            energy, uphill = sum_over_shards(torch.tensor([total.item(), float(uphill)], **scalars)).tolist()
            residual = max(g.abs().max().item() for g in grads)
            moving = float(any(bool(v.any()) for v in velocity))
            residual, moving = max_over_shards(torch.tensor([residual, moving], **scalars)).tolist()
            trace.append(energy)
            if not (math.isfinite(energy) and math.isfinite(residual)):
                raise RelaxationDiverged(step, trace, "non-finite states or energy")
            restart = False
            if step > 0 and energy > trace[-2] + rise_tol * max(abs(trace[-2]), abs(trace[0]), 1e-12):
                if not coasting:  # a plain gradient step with a stable step size never climbs
                    raise RelaxationDiverged(step, trace, "energy rose")
                restart = True
            if residual < tol or step == steps:
                break
            # restart when momentum overshot or points uphill (O'Donoghue & Candes 2015)
            if restart or uphill > 0:
                velocity = [torch.zeros_like(v) for v in velocity]
                moving = 0.0
            coasting = momentum > 0 and moving > 0
            velocity = [momentum * v - step_size * g for v, g in zip(velocity, grads)]
            states = [(s + v).detach() for s, v in zip(states, velocity)]
    report = RelaxationReport(step, energy, residual, residual < tol, trace)
    return [s.detach() for s in states], report



class _ThroughEquilibrium(torch.autograd.Function):
    """Identity on the relaxed states s*; backward sends the incoming gradient u to the force dE/ds as
    -H^-1 u, H = d2E/ds2 at s* (per sample): the implicit function theorem at the equilibrium dE/ds = 0."""

    @staticmethod
    def forward(ctx, states: Tensor, force: Tensor, hessian: Tensor) -> Tensor:
        ctx.save_for_backward(hessian)
        return states.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:
        (hessian,) = ctx.saved_tensors
        return None, -torch.linalg.solve(hessian, grad.unsqueeze(-1)).squeeze(-1), None


@torch.compiler.disable
def relax_differentiably(model: Energy, x: Tensor, **settings: Any) -> tuple[list[Tensor], RelaxationReport]:
    """The free equilibrium s* of :func:`relax` (same ``settings``), differentiable in ``x`` and the energy's
    parameters theta by implicit differentiation: at dE/ds = 0, ds*/dtheta = -H^-1 d2E/ds dtheta.

    The Hessian H (B, D, D) over each sample's D state entries is built with one batched double-backward and
    solved directly, so it suits states of up to a few hundred entries (the relevance field's patches). The
    gradient is exact at the equilibrium, whatever path the relaxation took; the relaxation's own ``tol`` bounds
    how far s* is from it. Energies must be per sample (sample b's energy depends on its own states only).
    """
    states, report = relax(model, x, **settings)
    with torch.enable_grad():
        fixed = [s.requires_grad_(True) for s in states]  # fresh detached tensors: the Hessian's variables
        force = torch.autograd.grad(model.energy(fixed, x).sum(), fixed, create_graph=True)
        flat_force = torch.cat([f.flatten(1) for f in force], 1)  # (B, D), a function of theta and x
        batch, dim = flat_force.shape
        directions = torch.eye(dim, dtype=flat_force.dtype, device=flat_force.device)[:, None].expand(dim, batch, dim)
        rows = torch.autograd.grad(flat_force, fixed, grad_outputs=directions, is_grads_batched=True,
                                   retain_graph=True)
    hessian = torch.cat([r.flatten(2) for r in rows], 2).transpose(0, 1).detach()
    flat = _ThroughEquilibrium.apply(torch.cat([s.detach().flatten(1) for s in states], 1), flat_force, hessian)
    sizes = [s[0].numel() for s in states]
    return [part.view_as(s) for part, s in zip(flat.split(sizes, 1), states)], report


@dataclass(frozen=True)
class MLPLayer:
    """One layer of a flat ``nn.Sequential`` MLP: ``activation(linear(pre(h)))``."""

    linear: nn.Linear
    activation: nn.Module  # the modules after the Linear (identity if none)
    pre: nn.Module  # modules before the first Linear (e.g. Flatten); identity elsewhere

    def __call__(self, h: Tensor) -> Tensor:
        return self.activation(self.linear(self.pre(h)))

    def parameters(self) -> list[nn.Parameter]:
        modules = (self.pre, self.linear, self.activation)
        return [p for m in modules for p in m.parameters() if p.requires_grad]


def _flattened(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _flattened(child)]
    return [module]


def mlp_layers(module: nn.Module, rule: str) -> list[MLPLayer]:
    """Split an MLP (an ``nn.Linear``, or ``nn.Sequential``s of Linear layers and activations, nested
    or flat) into Linear layers, each with the activations that follow it."""
    groups: list[list[nn.Module]] = [[]]
    for m in _flattened(module):
        if isinstance(m, nn.Linear):
            groups.append([m])
        elif any(isinstance(x, nn.Linear) for x in m.modules()):
            raise TypeError(f"rule {rule!r} needs an MLP of nn.Sequential blocks; {type(m).__name__} hides Linears")
        else:
            groups[-1].append(m)
    pre, blocks = groups[0], groups[1:]
    if not blocks:
        raise TypeError(f"rule {rule!r} trains nn.Linear layers, but {type(module).__name__} has none")
    return [
        MLPLayer(b[0], nn.Sequential(*b[1:]), nn.Sequential(*(pre if i == 0 else ())))
        for i, b in enumerate(blocks)
    ]


class LayeredEnergy(Energy):
    """An energy over the layers of an MLP: one state per Linear layer, the last is the output."""

    def __init__(self, module: nn.Module, name: str = "energy"):
        super().__init__(module)
        self.layers = mlp_layers(module, name)

    def init_states(self, x: Tensor) -> list[Tensor]:
        states, h = [], x
        with torch.no_grad():
            for layer in self.layers:
                h = layer(h)
                states.append(h)
        return states

    def output(self, states: list[Tensor]) -> Tensor:
        return states[-1]


class PredictionErrorEnergy(LayeredEnergy):
    """``E = sum_l 1/2 ||s_l - f_l(s_{l-1})||^2``, ``s_0 = x``: zero at the feedforward pass."""

    def energy(self, states: list[Tensor], x: Tensor) -> Tensor:
        below = [x, *states[:-1]]
        return sum(
            0.5 * (s - layer(h)).pow(2).flatten(1).sum(1) for layer, h, s in zip(self.layers, below, states)
        )


class HopfieldEnergy(LayeredEnergy):
    """Layered Hopfield energy (Scellier & Bengio 2017), with rho_l the activation after Linear l:

    ``E = sum_l 1/2 ||s_l||^2 - rho_l(s_l) . (W_l rho_{l-1}(s_{l-1}) + b_l)``, ``rho_0(s_0) = pre(x)``.
    Needs bounded hidden activations (tanh, sigmoid, hardtanh) to be bounded below.
    """

    def __init__(self, module: nn.Module, name: str = "energy"):
        super().__init__(module, name)
        self.input_transform = self.layers[0].pre

    def energy(self, states: list[Tensor], x: Tensor) -> Tensor:
        rates = [self.input_transform(x), *(layer.activation(s) for layer, s in zip(self.layers, states))]
        quadratic = sum(0.5 * s.pow(2).flatten(1).sum(1) for s in states)
        coupling = sum(
            (rate * layer.linear(below)).flatten(1).sum(1)
            for layer, below, rate in zip(self.layers, rates[:-1], rates[1:])
        )
        return quadratic - coupling


class OutputClamped(Energy):
    """A layered energy with its output state held fixed (the clamped phase of CHL)."""

    def __init__(self, base: LayeredEnergy, clamped_output: Tensor):
        super().__init__(base.module)
        self.base, self.clamped_output = base, clamped_output.detach()

    def init_states(self, x: Tensor) -> list[Tensor]:
        return self.base.init_states(x)[:-1]

    def energy(self, states: list[Tensor], x: Tensor) -> Tensor:
        return self.base.energy([*states, self.clamped_output], x)

    def output(self, states: list[Tensor]) -> Tensor:
        return self.clamped_output


ENERGIES: dict[str, type[LayeredEnergy]] = {
    "prediction-error": PredictionErrorEnergy,
    "hopfield": HopfieldEnergy,
}
