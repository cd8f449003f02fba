"""Tiers of detail per region, with an exact token total: the ViT form of "64 to 400 tokens per patch".

The patch grid is cut into 2 x 2-patch regions. Each region gets one tier:

* ``MERGED``:  1 token, the mean of its 4 patch tokens (pooled content and pooled position);
* ``NORMAL``:  its 4 patch tokens, exactly as the model embeds them;
* ``REFINED``: 16 tokens, each of its 4 patches seen at 2x resolution (a 2x view of the image, patch
  projection of the model, positions interpolated to the 2x grid the way the library interpolates them).

Every image of a batch has the same number of regions per tier (different regions), so the total is
exact: ``P + merged + 4 * normal + 16 * refined`` tokens.

    counts = TierCounts.for_total(num_regions, total=98, refined=4)
    state = tiered_tokens(adapter, images, assign_tiers(region_scores, counts))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .adapters import BackboneAdapter
from .tokens import TokenSet

MERGED, NORMAL, REFINED = 0, 1, 2
TOKENS_PER_REGION = {MERGED: 1, NORMAL: 4, REFINED: 16}


@dataclass(frozen=True)
class TierCounts:
    """Regions per tier, the same for every image."""

    merged: int
    normal: int
    refined: int

    @property
    def regions(self) -> int:
        return self.merged + self.normal + self.refined

    @property
    def total(self) -> int:
        """Patch tokens the tiers produce."""
        return self.merged + 4 * self.normal + 16 * self.refined

    @classmethod
    def for_total(cls, regions: int, total: int, refined: int = 0) -> TierCounts:
        """Counts with exactly ``total`` patch tokens and ``refined`` refined regions; the rest are split
        between merged and normal. Each tier change moves the total by a multiple of 3, so a total is
        reachable only if ``total - regions`` is divisible by 3."""
        # total = merged + 4 * normal + 16 * refined, merged + normal = regions - refined
        normal, remainder = divmod(total - (regions - refined) - 16 * refined, 3)
        merged = regions - refined - normal
        if remainder or normal < 0 or merged < 0 or refined < 0:
            low, high = regions + 15 * refined, 4 * regions + 12 * refined
            raise ValueError(
                f"no tiering of {regions} regions with {refined} refined gives {total} tokens: totals run from "
                f"{low} to {high} in steps of 3 (total - {regions} must be divisible by 3)"
            )
        return cls(merged, normal, refined)


def assign_tiers(scores: Tensor, counts: TierCounts) -> Tensor:
    """(B, R) tier per region: the ``refined`` highest-scoring regions are refined, the next ``normal``
    normal, the rest merged."""
    if scores.ndim != 2 or scores.shape[1] != counts.regions:
        raise ValueError(f"scores must have shape (batch, {counts.regions} regions), got {tuple(scores.shape)}")
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)
    tiers = torch.full_like(rank, MERGED)
    tiers[rank < counts.refined + counts.normal] = NORMAL
    tiers[rank < counts.refined] = REFINED
    return tiers


def region_scores(patch_scores: Tensor, height: int, width: int) -> Tensor:
    """(B, R) region scores: per-patch scores (B, height * width) summed over each 2 x 2 region."""
    return rearrange(patch_scores, "b (h i w j) -> b (h w) (i j)", h=height // 2, i=2, w=width // 2, j=2).sum(-1)


def _regions(x: Tensor, height: int, width: int, side: int) -> Tensor:
    """(B, H*W, ...) grid tokens -> (B, R, side*side, ...) grouped by 2 x 2-patch region."""
    return rearrange(x, "b (h i w j) ... -> b (h w) (i j) ...", h=height // side, i=side, w=width // side, j=side)


def _pick(x: Tensor, tiers: Tensor, tier: int, count: int) -> Tensor:
    # regions of one tier, in raster order: a stable sort puts them first; one batched gather
    index = torch.sort((tiers != tier).to(torch.uint8), dim=1, stable=True).indices[:, :count]
    index = index.view(*index.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index).flatten(1, 2)


def tiered_tokens(
    adapter: BackboneAdapter,
    images: Tensor,
    tiers: Tensor,
    fine_images: Tensor | None = None,
    proportional: bool = False,
) -> TokenSet:
    """Tokens for ``images`` with each 2 x 2-patch region at its tier (see the module docstring).

    tiers:        (B, R) long, one of MERGED / NORMAL / REFINED per region (raster order of regions);
                  every image must have the same count of each tier.
    fine_images:  the 2x-resolution view used by refined regions (default: bilinear 2x upsampling).
    proportional: track sizes (merged 4, refined 1/4 of a patch) so attention weighs each token by the
                  image area it covers; off by default (every token counts as one patch).
    Order: prefix, merged, normal, refined tokens; ``patch_index`` is the patch each token lies in
    (a merged token: its region's top-left patch).
    """
    grid = adapter.grid(images)
    h, w = grid.height, grid.width
    if h % 2 or w % 2:
        raise ValueError(f"tiers need an even patch grid (2 x 2-patch regions), got {h}x{w}")
    batch, regions = images.shape[0], (h // 2) * (w // 2)
    if tiers.shape != (batch, regions) or tiers.dtype != torch.long:
        raise ValueError(f"tiers must be a long tensor of shape ({batch}, {regions}), got {tiers.dtype} "
                         f"{tuple(tiers.shape)}")
    per_image = torch.stack([(tiers == t).sum(dim=1) for t in (MERGED, NORMAL, REFINED)], dim=1)
    if not (per_image == per_image[:1]).all() or int(per_image.sum(1)[0]) != regions:
        raise ValueError("every image must have the same number of regions per tier, all in {0, 1, 2}; got "
                         f"(merged, normal, refined) counts {per_image.tolist()}")
    counts = TierCounts(*per_image[0].tolist())

    embedded = adapter.embed_before_norm(images)  # pooling a region stays linear
    p = adapter.num_prefix_tokens
    patches = _regions(embedded[:, p:], h, w, 2)  # (B, R, 4, D)
    patch_index = _regions(torch.arange(h * w, device=images.device)[None].expand(batch, -1), h, w, 2)
    pieces = [_pick(patches.mean(dim=2, keepdim=True), tiers, MERGED, counts.merged),
              _pick(patches, tiers, NORMAL, counts.normal)]
    index_pieces = [_pick(patch_index[..., :1], tiers, MERGED, counts.merged),
                    _pick(patch_index, tiers, NORMAL, counts.normal)]
    if counts.refined:
        if fine_images is None:
            fine_images = F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False)
        if fine_images.shape[-2:] != (2 * images.shape[-2], 2 * images.shape[-1]):
            raise ValueError(f"fine_images must be twice the size of images {tuple(images.shape[-2:])}, "
                             f"got {tuple(fine_images.shape[-2:])}")
        fine = adapter.patch_content(fine_images) + adapter.patch_positions(2 * h, 2 * w)
        pieces.append(_pick(_regions(fine, 2 * h, 2 * w, 4), tiers, REFINED, counts.refined))
        # a 2x sub-patch lies in patch (row // 2, col // 2) of the model's grid
        rows = torch.arange(2 * h, device=images.device) // 2
        cols = torch.arange(2 * w, device=images.device) // 2
        parent = (rows[:, None] * w + cols[None, :]).flatten()[None].expand(batch, -1)
        index_pieces.append(_pick(_regions(parent, 2 * h, 2 * w, 4), tiers, REFINED, counts.refined))

    tokens = adapter.pre_norm(torch.cat([embedded[:, :p], *pieces], dim=1))
    size = None
    if proportional:
        area = [4.0] * counts.merged + [1.0] * (4 * counts.normal) + [0.25] * (16 * counts.refined)
        size = torch.tensor([1.0] * p + area, device=images.device).expand(batch, -1)
    return TokenSet(tokens, p, torch.cat(index_pieces, dim=1), size)
