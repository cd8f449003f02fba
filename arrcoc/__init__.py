"""arrcoc: query-aware patch-token allocation for pretrained ViTs, learned with local rules."""

__version__ = "0.1.0"
