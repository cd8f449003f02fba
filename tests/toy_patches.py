"""Structured toy images for the relevance module: textured patches among low-contrast noise."""

from __future__ import annotations

import torch
from torch import Tensor

GRID, PATCH = 4, 8  # 4 x 4 patches of 8 px


def textured_patch_images(n: int, colours: list[tuple[float, float, float]], g: torch.Generator,
                          noise: float = 0.03, contrast: float = 0.6) -> tuple[Tensor, Tensor]:
    """(n, 3, 32, 32) gray noise with one binary-textured 8x8 patch per colour at distinct random
    positions; returns the images and (n, colours) patch indices (row-major)."""
    side = GRID * PATCH
    images = 0.5 + noise * torch.randn(n, 3, side, side, generator=g)
    positions = torch.rand(n, GRID * GRID, generator=g).argsort(1)[:, : len(colours)]
    for c, colour in enumerate(colours):
        texture = (torch.rand(n, 1, PATCH, PATCH, generator=g) > 0.5).float()
        patch = torch.tensor(colour).view(1, 3, 1, 1) * (1 - contrast + contrast * texture)
        tiles = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (n, 3, G, G, P, P) view
        rows, cols = positions[:, c] // GRID, positions[:, c] % GRID
        tiles[torch.arange(n), :, rows, cols] = patch
    return images.clamp(0, 1), positions


def patch_boxes(positions: Tensor) -> Tensor:
    """(n,) patch indices -> (n, 4) pixel boxes x0, y0, x1, y1."""
    rows, cols = positions // GRID, positions % GRID
    return torch.stack([cols * PATCH, rows * PATCH, cols * PATCH + PATCH, rows * PATCH + PATCH], -1).float()
