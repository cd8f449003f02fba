"""The box oracle: keep the K patches that overlap the (queried) digit's ground-truth box most.

It reads the labels' boxes, so it is no method: it is the ceiling of any allocation at that budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from arrcoc.backbones import BackboneAdapter, PatchGrid, select, top_k
from arrcoc.budget import Budget, num_kept
from arrcoc.data.tasks import TaskData
from arrcoc.relevance.targets import box_target


def oracle_predict(adapter: BackboneAdapter, budget: Budget) -> Callable[[TaskData], Tensor]:
    """``predict(batch) -> logits`` of the backbone on the K patches of each image's box."""
    grid = adapter.grid()
    k = num_kept(budget, grid.num_patches)

    def predict(batch: TaskData) -> Tensor:
        target = box_target(batch.boxes, (grid.height, grid.width), adapter.patch_size)
        # ties (patches fully inside the box) go to the patch nearest the box centre
        kept = top_k(target + _centrality(batch.boxes, grid), k)
        return adapter.head(adapter.run_blocks(select(adapter.tokens(batch.images), kept)))

    return predict


def _centrality(boxes: Tensor, grid: PatchGrid) -> Tensor:
    ys, xs = torch.meshgrid(torch.arange(grid.height), torch.arange(grid.width), indexing="ij")
    centres = (torch.stack([xs.flatten(), ys.flatten()], -1).float() + 0.5) * grid.patch_size[0]
    box_centre = torch.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], -1) / 2
    return -1e-3 * (centres[None] - box_centre[:, None]).norm(dim=-1)
