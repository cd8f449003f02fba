"""The learning-rule interface: a rule owns a sub-network and fills ``.grad`` of its parameters.

A rule computes a *local* update for the parameters it owns and writes it into ``param.grad``
with the sign of a gradient (the direction to descend). Any ``torch.optim`` optimizer, schedule,
clipping or all-reduce then applies it unchanged, so every rule - backprop included - is compared
under the same optimizer. A rule never back-propagates through anything it does not own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import all_shards_true

LossFn = Callable[[Tensor, Tensor], Tensor]


class NonFiniteUpdate(FloatingPointError):
    """A rule produced a NaN/Inf update; nothing was written into ``.grad``."""

    def __init__(self, rule: str, parameter: str):
        self.rule, self.parameter = rule, parameter
        super().__init__(
            f"rule {rule!r} produced a non-finite update for parameter {parameter!r}; "
            "no .grad was written and the weights are unchanged (lower the rule's step size or "
            "check the inputs for NaN/Inf)"
        )


@dataclass
class RuleContext:
    """What one training step shows a rule. Each rule reads the fields it needs.

    inputs:        what enters the owned sub-network (batch first).
    target:        desired output of the sub-network (class indices or a tensor like the output).
    output_error:  dC/d(output) handed in from outside (a downstream error, a reward-modulated
                   signal); when given it is used instead of ``target`` + the loss.
    loss_fn:       C(output, target); overrides the rule's configured loss.
    """

    inputs: Tensor
    target: Tensor | None = None
    output_error: Tensor | None = None
    loss_fn: LossFn | None = None


LOSSES: dict[str, LossFn] = {
    "cross-entropy": F.cross_entropy,
    # summed over features, averaged over the batch: its gradient is (y - t) / B, the delta rule
    "mse": lambda out, tgt: 0.5 * (out - tgt).pow(2).sum() / out.shape[0],
    # targets in [0, 1] (e.g. how relevant a patch is) for outputs that are logits
    "binary-cross-entropy": lambda out, tgt: F.binary_cross_entropy_with_logits(out, tgt, reduction="sum")
    / out.shape[0],
}


@dataclass
class RuleConfig:
    """Hyper-parameters common to every rule; each rule extends it with its own."""

    loss: str = "cross-entropy"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {sorted(LOSSES)}")


def as_module(subnet: nn.Module | Sequence[nn.Module]) -> nn.Module:
    """A list of modules is owned as a chain (applied in order)."""
    if isinstance(subnet, nn.Module):
        return subnet
    modules = list(subnet)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError(
            f"a rule owns an nn.Module or a non-empty list of nn.Modules, got {type(subnet).__name__}"
        )
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def linear_layers(module: nn.Module, rule: str) -> list[nn.Linear]:
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise TypeError(
            f"rule {rule!r} trains nn.Linear layers, but the sub-network {type(module).__name__} has none"
        )
    return layers


class LearningRule(nn.Module):
    """Base class. Subclasses implement :meth:`compute_update`.

    The rule is an ``nn.Module`` only for its own state (feedback matrices, running thresholds), so
    that ``state_dict()`` / ``.to()`` work; the owned sub-network is *not* registered as a child, so
    its parameters are never counted twice in a parent model.
    """

    name: ClassVar[str]
    Config: ClassVar[type[RuleConfig]] = RuleConfig

    def __init__(self, subnet: nn.Module | Sequence[nn.Module], config: RuleConfig | None = None):
        super().__init__()
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"rule {self.name!r} takes a {self.Config.__name__}, got {type(config).__name__}")
        self._owned = [as_module(subnet)]  # a list keeps it out of the module tree

    @property
    def subnet(self) -> nn.Module:
        return self._owned[0]

    def owned_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.subnet.parameters() if p.requires_grad]

    def loss_fn(self, ctx: RuleContext) -> LossFn:
        return ctx.loss_fn if ctx.loss_fn is not None else LOSSES[self.config.loss]

    def output_error(self, output: Tensor, ctx: RuleContext) -> Tensor:
        """dC/d(output): the only place a cost meets the sub-network (local to its output)."""
        if ctx.output_error is not None:
            if ctx.output_error.shape != output.shape:
                raise ValueError(
                    f"output_error has shape {tuple(ctx.output_error.shape)}, expected the output's "
                    f"shape {tuple(output.shape)}"
                )
            return ctx.output_error.to(output.dtype)
        if ctx.target is None:
            raise ValueError(f"rule {self.name!r} needs a target or an output_error in its RuleContext")
        out = output.detach().requires_grad_(True)
        with torch.enable_grad():
            (err,) = torch.autograd.grad(self.loss_fn(ctx)(out, ctx.target), out)
        return err

    def compute_update(self, ctx: RuleContext) -> dict[nn.Parameter, Tensor]:
        """Return {parameter: update} with the sign of a gradient.

        Must not touch ``.grad`` nor the rule's state (diagnostics call it freely); state that
        the step changes (running thresholds, persistent states) is kept pending and applied by
        :meth:`advance_state` once the update was accepted.
        """
        raise NotImplementedError

    def advance_state(self) -> None:
        """Apply the state change prepared by the last :meth:`compute_update` (if the rule has any)."""

    def step(self, ctx: RuleContext) -> None:
        """Compute the local update and add it to ``.grad`` (accumulating, like autograd)."""
        updates = self.compute_update(ctx)
        names = {p: n for n, p in self.subnet.named_parameters()}
        for p, u in updates.items():  # validate everything before writing anything
            if u.shape != p.shape:
                raise RuntimeError(f"rule {self.name!r}: update shape {tuple(u.shape)} != {tuple(p.shape)}")
        non_finite = next((p for p, u in updates.items() if not torch.isfinite(u).all()), None)
        if not all_shards_true(non_finite is None):  # every process of a sharded batch raises
            raise NonFiniteUpdate(self.name, names.get(non_finite, "?") if non_finite is not None else
                                  "(in another process's shard of the batch)")
        for p, u in updates.items():
            u = u.detach().to(p.dtype)
            if p.grad is None:
                p.grad = u.clone()
            else:
                p.grad.add_(u)
        self.advance_state()

    def extra_repr(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"subnet={type(self.subnet).__name__}, {fields}"


RULES: dict[str, type[LearningRule]] = {}


def register_rule(cls: type[LearningRule]) -> type[LearningRule]:
    """Class decorator: make a rule buildable by its ``name`` from a config."""
    if cls.name in RULES and RULES[cls.name] is not cls:
        raise ValueError(f"rule name {cls.name!r} is already registered by {RULES[cls.name].__name__}")
    RULES[cls.name] = cls
    return cls


def build_rule(config: str | dict[str, Any], subnet: nn.Module | Sequence[nn.Module]) -> LearningRule:
    """Build the learning rule that will fill the ``.grad`` of ``subnet``.

    Args:
        config: a registered rule's name, or ``{"name": ..., **hyper_parameters}`` (one YAML entry, e.g.
            ``{"name": "ep", "beta": 0.5}``); the hyper-parameters are the fields of the rule's ``Config``.
        subnet: the module the rule owns (a list of modules is owned as a chain).

    Returns:
        The rule; ``rule.step(RuleContext(...))`` fills ``subnet``'s ``.grad`` and changes no weight.

    Raises:
        KeyError: an unknown rule name or hyper-parameter (the message lists the known ones).
        ValueError: a malformed config or a bad hyper-parameter value.
    """
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"a rule config is a name or a mapping with a 'name' key, got {config!r}")
    params = dict(config)
    name = params.pop("name")
    if name not in RULES:
        raise KeyError(f"unknown rule {name!r}; known rules: {', '.join(sorted(RULES))}")
    cls = RULES[name]
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise TypeError(
            f"rule {name!r} got unknown hyper-parameter(s) {unknown}; it accepts {sorted(known)}"
        )
    return cls(subnet, cls.Config(**params))


def available_rules() -> list[str]:
    return sorted(RULES)
