"""Backbones the project builds itself: the canvas ViT the benchmark shares, the query-fusion reference,
and a tiny random-weight ViT for toy tasks and tests."""

from .canvas_vit import DEFAULT_CHECKPOINT, CanvasViTConfig, ConvStem, build_canvas_vit, load_canvas_vit
from .query_fusion import DEFAULT_QUERY_FUSION, QueryFusionViT, load_query_fusion

__all__ = ["DEFAULT_CHECKPOINT", "DEFAULT_QUERY_FUSION", "CanvasViTConfig", "ConvStem", "QueryFusionViT",
           "build_canvas_vit", "load_canvas_vit", "load_query_fusion"]
