"""Backbone adapters and token-budget mechanics for frozen ViTs.

Takes token indices and scores, never policies: what to keep is decided elsewhere.
"""

from .adapters import (
    AttentionStats,
    BackboneAdapter,
    HFViTAdapter,
    PatchGrid,
    TimmViTAdapter,
    adapt_backbone,
    register_adapter,
    supported_families,
)
from .baselines import (
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
from .tiers import MERGED, NORMAL, REFINED, TierCounts, assign_tiers, region_scores, tiered_tokens
from .tokens import FUSED, TokenSet, bipartite_merge, check_index, keep_top_k, num_kept, select, top_k
from .vlm import EncodedPrompt, ShortPrompt, TokenGrid, VLMAdapter, adapt_vlm, supported_vlm_families

__all__ = [
    "MERGED",
    "NORMAL",
    "REFINED",
    "TierCounts",
    "assign_tiers",
    "region_scores",
    "tiered_tokens",
    "BASELINES",
    "BEFORE_BLOCKS",
    "PROGRESSIVE",
    "GridScorer",
    "ToMe",
    "TopK",
    "ats_scores",
    "cls_attention_scores",
    "equal_compute_baseline",
    "make_baseline",
    "random_scores",
    "run_reduced",
    "FUSED",
    "AttentionStats",
    "BackboneAdapter",
    "HFViTAdapter",
    "PatchGrid",
    "TimmViTAdapter",
    "TokenSet",
    "adapt_backbone",
    "bipartite_merge",
    "check_index",
    "keep_top_k",
    "num_kept",
    "register_adapter",
    "select",
    "supported_families",
    "tokens_per_block",
    "top_k",
    "EncodedPrompt",
    "ShortPrompt",
    "TokenGrid",
    "VLMAdapter",
    "adapt_vlm",
    "supported_vlm_families",
]
