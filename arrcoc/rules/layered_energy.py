"""Energies over the layers of a flat ``nn.Sequential`` MLP, for the energy-based rules (EP, CHL, PC).

* :class:`PredictionErrorEnergy` (default): ``E = sum_l 1/2 ||s_l - f_l(s_{l-1})||^2``. Its free
  equilibrium *is* the feedforward pass, so a network trained through it is used as ``model(x)``.
* :class:`HopfieldEnergy`: the layered Hopfield energy of Scellier & Bengio (2017); its free
  equilibrium is a recurrent fixed point, not ``model(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .relaxation import Energy


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
