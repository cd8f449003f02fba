"""A tiny random-weight timm ViT sized for the toy patch images (:mod:`arrcoc.data.toy_patches`)."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from arrcoc.data.toy_patches import GRID, PATCH


def toy_vit(seed: int = 0, num_classes: int = 10, **architecture: Any) -> nn.Module:
    """A one-block ViT (32x32 images, 8-px patches, width 32) with random weights drawn from ``seed``; the
    caller's global random state is left as it was (the backbone is only ever read). ``architecture``
    replaces timm settings of that ViT where a variant is needed (``img_size=64``, ``embed_dim=48``,
    ``dynamic_img_size=True``, ...)."""
    settings = dict(img_size=GRID * PATCH, patch_size=PATCH, embed_dim=32, depth=1, num_heads=2) | architecture
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **settings)
