"""Backbone adapters and token-budget mechanics for frozen ViTs.

Takes token indices and scores, never policies: what to keep is decided elsewhere (the relevance module,
:mod:`arrcoc.baselines`). The budget itself is :mod:`arrcoc.budget`.
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
from .tiers import MERGED, NORMAL, REFINED, TierCounts, assign_tiers, region_scores, tiered_tokens
from .tokens import DROPPED_MODES, FUSED, Dropped, TokenSet, bipartite_merge, check_index, keep_top_k, select, top_k
from .vlm import EncodedPrompt, ShortPrompt, TokenGrid, VLMAdapter, adapt_vlm, supported_vlm_families

__all__ = [
    "MERGED",
    "NORMAL",
    "REFINED",
    "TierCounts",
    "assign_tiers",
    "region_scores",
    "tiered_tokens",
    "DROPPED_MODES",
    "Dropped",
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
    "register_adapter",
    "select",
    "supported_families",
    "top_k",
    "EncodedPrompt",
    "ShortPrompt",
    "TokenGrid",
    "VLMAdapter",
    "adapt_vlm",
    "supported_vlm_families",
]
