"""Learning rules. Each fills ``.grad`` of the sub-network it owns; see :mod:`arrcoc.rules.base`.

Knows nothing of ViTs or ARR-COC: every rule works on any ``nn.Module`` it can train.
"""

from . import backprop, frozen  # noqa: F401  (registers the rules)
from .base import (
    LOSSES,
    RULES,
    LearningRule,
    NonFiniteUpdate,
    RuleConfig,
    RuleContext,
    available_rules,
    build_rule,
    register_rule,
)

__all__ = [
    "LOSSES",
    "RULES",
    "LearningRule",
    "NonFiniteUpdate",
    "RuleConfig",
    "RuleContext",
    "available_rules",
    "build_rule",
    "register_rule",
]
