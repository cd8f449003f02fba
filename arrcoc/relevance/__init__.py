"""The ARR-COC relevance module: three ways of knowing, a relevance field, an allocator."""

from .adaptation import AdaptationConfig, AdaptReport, OnlineAdaptation
from .attach import ARRCOC, RelevanceMaps, attach
from .field import RelevanceField
from .module import DEFAULT_RULES, SUBNETWORKS, Ablations, RelevanceConfig, RelevanceModule, RelevanceOutput
from .vlm import VLMARRCOC, VLMAllocation, VLMConfig, attach_vlm

__all__ = [
    "ARRCOC",
    "Ablations",
    "AdaptReport",
    "AdaptationConfig",
    "DEFAULT_RULES",
    "OnlineAdaptation",
    "RelevanceConfig",
    "RelevanceField",
    "RelevanceMaps",
    "RelevanceModule",
    "RelevanceOutput",
    "SUBNETWORKS",
    "VLMARRCOC",
    "VLMAllocation",
    "VLMConfig",
    "attach",
    "attach_vlm",
]
