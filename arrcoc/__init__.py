"""arrcoc: query-aware patch-token allocation for pretrained ViTs, learned with local rules."""

from .relevance import ARRCOC, VLMARRCOC, RelevanceConfig, VLMConfig, attach, attach_vlm

__version__ = "0.1.0"
__all__ = ["ARRCOC", "RelevanceConfig", "VLMARRCOC", "VLMConfig", "attach", "attach_vlm"]
