"""Visual-token pruners of a LLaVA-architecture VLM, on the real ``LlavaForConditionalGeneration`` (issue 38).

Every pruner sees what its method reads and returns, per image, the visual tokens the language model gets
(:class:`Selection`): positions among the image's visual tokens, which keep their RoPE positions, and, for
methods that merge, the features those tokens carry instead of their own. The language model then runs on the
shortened prompt through :class:`~arrcoc.backbones.vlm.VLMAdapter` (the project's precomputed-features path: the
placeholders are never edited). Methods that prune inside the language model (FastV, PyramidDrop, DART) are not here
yet.

  random        K tokens uniformly at random (seeded per image).
  grid          K tokens spread evenly over the token grid.
  pool          the grid cut into K cells; each cell one token, the mean of its tokens' features.
  oracle        the tokens of the digits the answer depends on (their ink boxes' share of each patch, ties to the
                patches nearest the boxes' centre), then the nearest others.
  divprune      max-min diversity of the projected features (Alvar et al., CVPR 2025).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from arrcoc.backbones.vlm import EncodedPrompt, TokenGrid
from arrcoc.relevance.field import grid_positions
from arrcoc.relevance.targets import box_target, kept_set

__all__ = ["PRUNERS", "PruningContext", "Selection", "apply_selection"]


@dataclass
class PruningContext:
    """What a pruner may read about one batch of prompts (one image per prompt).

    prompt: the encoded prompts (``features[i]`` (N, D): image i's visual tokens after the projector).
    kept: K, the visual tokens each image keeps.
    boxes: (B, S, 4) the digits' ink boxes (px) and ``relevant`` (B, S) the ones the answer depends on (the oracle's).
    seed: of the random pruner.
    """

    prompt: EncodedPrompt
    kept: int
    boxes: Tensor | None = None
    relevant: Tensor | None = None
    seed: int = 0

    def grid(self, image: int) -> TokenGrid:
        grids = self.prompt.grids[image]
        if len(grids) != 1:
            raise ValueError(f"the pruners take one token grid per image (LLaVA), image {image} has {len(grids)}")
        return grids[0]


@dataclass
class Selection:
    """Per image: the kept visual-token positions (among its visual tokens) and, for merging methods, the
    features they carry instead of their own (None: their own)."""

    keep: list[Tensor]
    features: list[Tensor] | None = None


def apply_selection(prompt: EncodedPrompt, selection: Selection) -> EncodedPrompt:
    """The prompt whose kept tokens carry the selection's features (the others are dropped by ``shorten``)."""
    if selection.features is None:
        return prompt
    features = [f.index_copy(0, keep, new.to(f.dtype)) for f, keep, new in
                zip(prompt.features, selection.keep, selection.features)]
    return replace(prompt, features=features)


def _cells(height: int, width: int, kept: int) -> tuple[int, int]:
    """The most nearly square (rows, columns) of ``kept`` cells that fits the grid."""
    options = [(r, kept // r) for r in range(1, kept + 1) if kept % r == 0 and r <= height and kept // r <= width]
    if not options:
        raise ValueError(f"{kept} tokens do not tile a {height}x{width} grid")
    return min(options, key=lambda rc: abs(math.log(rc[0] / rc[1] * width / height)))


def _cell_of(height: int, width: int, kept: int) -> Tensor:
    """(height * width,) the cell (of :func:`_cells`) each grid position falls in, row-major."""
    rows, columns = _cells(height, width, kept)
    y = torch.arange(height) * rows // height
    x = torch.arange(width) * columns // width
    return (y[:, None] * columns + x[None, :]).flatten()


def random_pruner(context: PruningContext) -> Selection:
    generator = torch.Generator().manual_seed(context.seed)
    keep = []
    for i in range(context.prompt.num_images):
        index = context.grid(i).index
        keep.append(index[torch.randperm(len(index), generator=generator)[:context.kept]])
    return Selection(keep)


def grid_pruner(context: PruningContext) -> Selection:
    keep = []
    for i in range(context.prompt.num_images):
        grid = context.grid(i)
        rows, columns = _cells(grid.height, grid.width, context.kept)
        y = ((torch.arange(rows) + 0.5) * grid.height / rows).long()
        x = ((torch.arange(columns) + 0.5) * grid.width / columns).long()
        keep.append(grid.index[(y[:, None] * grid.width + x[None, :]).flatten()])
    return Selection(keep)


def pool_pruner(context: PruningContext) -> Selection:
    keep, features = [], []
    for i in range(context.prompt.num_images):
        grid = context.grid(i)
        cell = _cell_of(grid.height, grid.width, context.kept).to(grid.index.device)
        tokens = context.prompt.features[i][grid.index].float()
        means = torch.zeros(context.kept, tokens.shape[1], device=tokens.device).index_add_(0, cell, tokens)
        means /= torch.bincount(cell, minlength=context.kept)[:, None]
        first = torch.full((context.kept,), len(cell), device=cell.device).scatter_reduce(
            0, cell, torch.arange(len(cell), device=cell.device), "amin")  # each cell's first token holds its mean
        keep.append(grid.index[first])
        features.append(means)
    return Selection(keep, features)


def oracle_pruner(context: PruningContext) -> Selection:
    if context.boxes is None or context.relevant is None:
        raise ValueError("the oracle needs the digits' boxes and which of them the answer depends on")
    keep = []
    for i in range(context.prompt.num_images):
        grid = context.grid(i)
        size = grid.pixels.shape[-1]
        cell = size // grid.width
        boxes = context.boxes[i][context.relevant[i]]
        share = box_target(boxes, (grid.height, grid.width), (cell, cell)).amax(0) if len(boxes) else torch.zeros(
            grid.height * grid.width)
        positions = grid_positions(grid.height, grid.width)
        keep.append(grid.index[kept_set(share[None], positions, context.kept)[0].nonzero()[:, 0]])
    return Selection(keep)


def divprune_pruner(context: PruningContext) -> Selection:
    """Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR 2025;
    github.com/vbdi/divprune): the subset of K tokens that greedily maximises the minimum cosine distance among the
    projected visual features: first the token farthest from its nearest neighbour, then each time the token
    farthest from the tokens already kept."""
    keep = []
    for i in range(context.prompt.num_images):
        index = context.grid(i).index
        tokens = F.normalize(context.prompt.features[i][index].float(), dim=-1)
        distance = 1 - tokens @ tokens.T
        chosen = [int(distance.topk(2, dim=0, largest=False).values[1].argmax())]
        nearest = distance[chosen[0]].clone()
        for _ in range(context.kept - 1):
            nearest[chosen] = -1.0  # kept tokens are never chosen again
            chosen.append(int(nearest.argmax()))
            nearest = torch.minimum(nearest, distance[chosen[-1]])
        keep.append(index[torch.tensor(chosen, device=index.device)])
    return Selection(keep)


PRUNERS: dict[str, Callable[[PruningContext], Selection]] = {
    "random": random_pruner,
    "grid": grid_pruner,
    "pool": pool_pruner,
    "oracle": oracle_pruner,
    "divprune": divprune_pruner,
}
