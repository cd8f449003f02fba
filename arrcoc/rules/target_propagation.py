"""Difference target propagation (Lee et al. 2015) with learned inverses, and the machinery it
shares with GAIT-prop: targets computed top-down, each layer pulled towards its own target.

Every layer ``l`` of a flat MLP gets a target ``t_l``; its weights descend the local loss
``1/2 ||f_l(h_{l-1}) - t_l||^2`` (through that layer only). The output target is
``t_L = y - eta * dC/dy`` per sample; updates are divided by ``eta * B`` so that the last layer's
update is exactly its gradient and every update is on the gradient's scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LearningRule, RuleConfig, RuleContext, register_rule
from .distributed import shard_rows, sum_over_shards
from .layered_energy import mlp_layers


@dataclass
class TargetPropagationConfig(RuleConfig):
    """target_step: eta, how far the output target moves against the per-sample loss gradient."""

    target_step: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_step <= 0:
            raise ValueError(f"target_step must be > 0, got {self.target_step}")


class TargetRule(LearningRule):
    """Base of target-propagation rules: subclasses say how a target crosses one layer downwards."""

    Config = TargetPropagationConfig

    def __init__(self, subnet: nn.Module, config: TargetPropagationConfig | None = None):
        super().__init__(subnet, config)
        self.layers = mlp_layers(self.subnet, self.name)

    def propagate_target(self, index: int, target: Tensor, below: Tensor, above: Tensor) -> Tensor:
        """Target for the input of layer ``index`` (activity ``below``) from its output's target."""
        raise NotImplementedError

    def forward_activities(self, x: Tensor) -> list[Tensor]:
        """[h_0 = x, h_1, ..., h_L], detached."""
        activities = [x.detach()]
        with torch.no_grad():
            for layer in self.layers:
                activities.append(layer(activities[-1]))
        return activities

    def layer_targets(self, activities: list[Tensor], ctx: RuleContext) -> list[Tensor]:
        """[t_1, ..., t_L]: the output target, then propagated down through the layers."""
        output = activities[-1]
        step = self.config.target_step * output.shape[0]  # per sample: the loss is a batch mean
        targets = [output - step * self.output_error(output, ctx)]
        with torch.no_grad():
            for index in range(len(self.layers) - 1, 0, -1):
                below, above = activities[index], activities[index + 1]
                targets.insert(0, self.propagate_target(index, targets[0], below, above))
        return targets

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        return self.layer_updates(self.forward_activities(ctx.inputs), ctx)

    def layer_updates(self, activities: list[Tensor], ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        targets = self.layer_targets(activities, ctx)
        scale = self.config.target_step * activities[0].shape[0]
        updates: dict[nn.Parameter, Tensor] = {}
        with torch.enable_grad():
            for layer, below, target in zip(self.layers, activities, targets):
                params = layer.parameters()
                output = layer(below)
                # gradient of the layer-local loss 1/2 ||output - target||^2, on the gradient's scale
                grads = torch.autograd.grad(output, params, (output - target).detach() / scale)
                updates.update(zip(params, grads))
        return updates


@dataclass
class DifferenceTargetPropagationConfig(TargetPropagationConfig):
    """inverse_lr: SGD step of the inverses on their reconstruction loss (one per rule step);
    noise: std of the corruption the inverses learn to undo (Lee et al. 2015)."""

    inverse_lr: float = 0.01
    noise: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inverse_lr < 0 or self.noise < 0:
            raise ValueError(f"inverse_lr and noise must be >= 0, got {self.inverse_lr}, {self.noise}")


@register_rule
class DifferenceTargetPropagation(TargetRule):
    """``t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)`` with learned inverses
    ``g_l(h) = rho_{l-1}(V_l h + c_l)``; ``V_l, c_l`` are buffers of the rule (its state_dict)."""

    name = "tp"
    Config = DifferenceTargetPropagationConfig

    def __init__(self, subnet: nn.Module, config: DifferenceTargetPropagationConfig | None = None):
        super().__init__(subnet, config)
        for index in range(1, len(self.layers)):
            w = self.layers[index].linear.weight
            bound = 1 / math.sqrt(w.shape[0])  # nn.Linear's init, for a map out -> in
            self.register_buffer(f"inverse_weight_{index}", w.new_empty(w.shape[1], w.shape[0]).uniform_(-bound, bound))
            self.register_buffer(f"inverse_bias_{index}", w.new_empty(w.shape[1]).uniform_(-bound, bound))
        self._pending: dict[str, Tensor] = {}

    def inverse(self, index: int, h: Tensor) -> Tensor:
        """g_index: from layer ``index``'s output back to its input."""
        weight, bias = getattr(self, f"inverse_weight_{index}"), getattr(self, f"inverse_bias_{index}")
        return self.layers[index - 1].activation(F.linear(h, weight, bias))

    def propagate_target(self, index: int, target: Tensor, below: Tensor, above: Tensor) -> Tensor:
        return below + self.inverse(index, target) - self.inverse(index, above)

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        activities = self.forward_activities(ctx.inputs)
        self._pending = self.inverse_updates(activities)
        return self.layer_updates(activities, ctx)

    def inverse_updates(self, activities: list[Tensor]) -> dict[str, Tensor]:
        """One SGD step of each inverse on ``1/2 ||g_l(f_l(h + noise)) - (h + noise)||^2``, averaged over the
        whole batch (each sample draws the noise it would draw in one process, also when sharded)."""
        new: dict[str, Tensor] = {}
        batch = activities[0].shape[0]
        whole, mine = shard_rows(batch)
        for index in range(1, len(self.layers)):
            names = (f"inverse_weight_{index}", f"inverse_bias_{index}")
            weight, bias = (getattr(self, n).detach().requires_grad_(True) for n in names)
            h = activities[index]
            noise = torch.randn(whole, *h.shape[1:], dtype=h.dtype, device=h.device)[mine]
            corrupted = h + self.config.noise * noise
            with torch.enable_grad():
                with torch.no_grad():
                    above = self.layers[index](corrupted)
                rebuilt = self.layers[index - 1].activation(F.linear(above, weight, bias))
                loss = 0.5 * (rebuilt - corrupted).pow(2).sum() / whole
                grads = torch.autograd.grad(loss, (weight, bias))
            for n, value, g in zip(names, (weight, bias), grads):
                new[n] = (value - self.config.inverse_lr * sum_over_shards(g)).detach()
        return new

    def advance_state(self) -> None:
        for n, value in self._pending.items():
            getattr(self, n).copy_(value)
        self._pending = {}
