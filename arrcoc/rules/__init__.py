"""Learning rules. Each fills ``.grad`` of the sub-network it owns; see :mod:`arrcoc.rules.base`.

Knows nothing of ViTs or ARR-COC: every rule works on any ``nn.Module`` it can train.
"""

from . import (  # noqa: F401  (importing a rule module registers it)
    backprop,
    bcm,
    chl_energy,
    contrastive_hebbian,
    direct_feedback_alignment,
    equilibrium_propagation,
    feedback_alignment,
    frozen,
    gait_prop,
    infonce_hebbian,
    oja,
    predictive_coding,
    target_propagation,
)
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
from .diagnostics import feedback_weight_alignment, true_gradient, update_angles

__all__ = [
    "LOSSES",
    "RULES",
    "LearningRule",
    "NonFiniteUpdate",
    "RuleConfig",
    "RuleContext",
    "available_rules",
    "build_rule",
    "feedback_weight_alignment",
    "register_rule",
    "true_gradient",
    "update_angles",
]
