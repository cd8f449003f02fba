"""Structured toy images for the relevance module: textured patches among low-contrast noise.

Small and fast (32 x 32 images, a 4 x 4 patch grid), with known answers: which patch is informative,
and which of two candidates a query names. Used by the tests and by the rule-ablation sweep, on
:func:`arrcoc.models.toy_vit.toy_vit`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


RED, GREEN, WHITE = (1.0, 0.1, 0.1), (0.1, 1.0, 0.1), (1.0, 1.0, 1.0)


def word_queries(which: Tensor, g: torch.Generator, noise: float = 0.15) -> Tensor:
    """Stand-in sentence embeddings (unit norm, 384-d): one fixed direction per word, plus noise."""
    words = F.normalize(torch.randn(2, 384, generator=torch.Generator().manual_seed(5)), dim=1)
    return F.normalize(words[which] + noise * torch.randn(len(which), 384, generator=g), dim=1)


@dataclass
class ToyBatch:
    images: Tensor
    query: Tensor | None
    answer: Tensor  # (B,) the patch that should be ranked first
    boxes: Tensor  # (B, 4) its pixel box


def single_patch_task(n: int, g: torch.Generator) -> ToyBatch:
    """One informative (textured, bright) patch among noise."""
    images, where = textured_patch_images(n, [WHITE], g)
    return ToyBatch(images, None, where[:, 0], patch_boxes(where[:, 0]))


def query_patch_task(n: int, g: torch.Generator) -> ToyBatch:
    """A red and a green candidate patch; the query names one of them."""
    images, where = textured_patch_images(n, [RED, GREEN], g)
    which = torch.randint(0, 2, (n,), generator=g)
    answer = where[torch.arange(n), which]
    return ToyBatch(images, word_queries(which, g), answer, patch_boxes(answer))


TOY_TASKS: dict[str, Callable[[int, torch.Generator], ToyBatch]] = {
    "toy-single": single_patch_task,
    "toy-query": query_patch_task,
}


COLOURS = (RED, GREEN, (0.1, 0.1, 1.0))


def coloured_patch_stream(n: int, g: torch.Generator, noise: float = 0.2) -> tuple[Tensor, Tensor, Tensor]:
    """A shifted task: one *smooth* coloured patch in noisy gray, its colour the label (0, 1, 2).
    The patch that matters has the least texture, so lightness entropy points away from it."""
    labels = torch.randint(0, len(COLOURS), (n,), generator=g)
    images, where = textured_patch_images(n, [WHITE], g, noise=noise, contrast=0.0)
    tiles = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)
    rows, cols = where[:, 0] // GRID, where[:, 0] % GRID
    tiles[torch.arange(n), :, rows, cols] = 0.8 * torch.tensor(COLOURS)[labels][:, :, None, None]
    return images, labels, where[:, 0]
