from collections.abc import Callable

import pytest
import torch
from torch import nn

from arrcoc.models.toy_vit import toy_vit


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_vit() -> Callable[..., nn.Module]:
    """Builds the toy ViT (:func:`arrcoc.models.toy_vit.toy_vit`: 32x32 images, 8-px patches, width 32, one block,
    random weights from a fixed seed) or a variant of it: ``tiny_vit(embed_dim=48)``, ``tiny_vit(img_size=64)``.
    One definition of the small test backbone instead of timm settings repeated in each test."""
    return toy_vit
