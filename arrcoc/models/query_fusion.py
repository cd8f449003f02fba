"""The query-fusion model: the canvas ViT with the query's sentence embedding as one extra token after CLS.

It sees the query inside every block, which no token-selection method does; ``arrcoc bench query-fusion``
trains it (:mod:`arrcoc.bench.query_fusion`) as the query task's full-token reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from arrcoc.config import REPO_ROOT
from arrcoc.data.text import TEXT_DIM
from arrcoc.storage import load_safetensors, read_json_object

from .canvas_vit import DEFAULT_CHECKPOINT, load_canvas_vit

DEFAULT_QUERY_FUSION = REPO_ROOT / "benchmarks" / "checkpoints" / "query_fusion.safetensors"


class QueryFusionViT(nn.Module):
    """A timm ViT whose sequence is [CLS, query token, patch tokens]; the head reads CLS."""

    def __init__(self, vit: VisionTransformer, query_dim: int = TEXT_DIM):
        super().__init__()
        if vit.global_pool != "token" or vit.cls_token is None:
            raise ValueError(f"query fusion reads the CLS token: needs global_pool='token', got {vit.global_pool!r}")
        self.vit = vit
        self.query_token = nn.Linear(query_dim, vit.embed_dim)

    def forward(self, images: Tensor, query: Tensor) -> Tensor:
        if query.shape != (images.shape[0], self.query_token.in_features):
            raise ValueError(f"query must be (batch, {self.query_token.in_features}), got {tuple(query.shape)}")
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(images))  # CLS + patches, positions added
        x = torch.cat([x[:, :1], self.query_token(query.to(x.dtype))[:, None], x[:, 1:]], dim=1)
        x = vit.norm(vit.blocks(vit.norm_pre(x)))
        return vit.forward_head(x)


def load_query_fusion(path: str | Path | None = None) -> QueryFusionViT:
    """The trained query-fusion model (eval mode) from ``path`` (.safetensors; its ``.json`` names the backbone)."""
    path = Path(path) if path is not None else DEFAULT_QUERY_FUSION
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise FileNotFoundError(f"query-fusion checkpoint {path} (+ .json) not found; create it with "
                                "`arrcoc bench query-fusion`")
    meta = read_json_object(path.with_suffix(".json"), "query-fusion description")
    backbone = Path(meta.get("backbone", DEFAULT_CHECKPOINT))
    model = QueryFusionViT(load_canvas_vit(backbone if backbone.is_absolute() else REPO_ROOT / backbone))
    weights = load_safetensors(path)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the query-fusion model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    return model.eval()
