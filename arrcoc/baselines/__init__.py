"""What ARR-COC is compared with: query-agnostic token reduction (random, grid, EViT, ATS, ToMe), the
DynamicViT-style allocator trained by backprop through the backbone, the same relevance module trained end to end
by backprop instead of its local rules (all-backprop), TENT, and the box oracle.

These are *policies*; the mechanics they share with ARR-COC (keeping, fusing, merging tokens) live in
:mod:`arrcoc.backbones`.
"""

from .global_backprop import GlobalBackpropConfig, global_backprop_grads, global_backprop_step
from .module_backprop import module_backprop_grads, module_backprop_step
from .oracle import oracle_predict
from .tent import Tent
from .token_reduction import (
    BASELINES,
    BEFORE_BLOCKS,
    PROGRESSIVE,
    GridScorer,
    ToMe,
    TopK,
    ats_scores,
    cls_attention_scores,
    equal_compute_baseline,
    make_baseline,
    random_scores,
    run_reduced,
    tokens_per_block,
)

__all__ = [
    "BASELINES",
    "BEFORE_BLOCKS",
    "PROGRESSIVE",
    "GlobalBackpropConfig",
    "GridScorer",
    "Tent",
    "ToMe",
    "TopK",
    "ats_scores",
    "cls_attention_scores",
    "equal_compute_baseline",
    "global_backprop_grads",
    "global_backprop_step",
    "make_baseline",
    "module_backprop_grads",
    "module_backprop_step",
    "oracle_predict",
    "random_scores",
    "run_reduced",
    "tokens_per_block",
]
