"""Relevance targets from forward passes only: what the sub-networks learn towards.

attention      the frozen backbone's own CLS attention over the patches in its last block.
perturbation   how much the backbone's prediction changes when a g x g group of patches is dropped
               (batched forward passes, no gradient): the KL divergence of the prediction from the
               full-token one, or 1 - cosine for a backbone that outputs embeddings.
box            the fraction of each patch inside a ground-truth box, where a data set has boxes.
set            the set-level signal: for the patches the module keeps and those it would keep next, how much the
               prediction's loss rises when a kept one is left out or falls when an excluded one is added; the
               best K of them are the target (it depends on the module's own choice: made in each step).
Each is (B, N) in [0, 1] (divided by its per-image maximum). No gradient reaches the backbone.

What the field and the allocation network learn is :func:`kept_set` of the target: the K patches a perfect ranking
of it would keep at the training budget (docs/decisions.md, "The field decides").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from arrcoc.backbones import BackboneAdapter, TokenSet, select

# the kept set's tie-break: per patch of distance from the target's centre of mass, small enough to move no patch
# past one whose target is 0.01 higher on a grid of 10 x 10 patches
NEARNESS = 1e-3


def _per_image_max(score: Tensor) -> Tensor:
    score = score.clamp_min(0)
    return score / score.amax(-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def attention_target(adapter: BackboneAdapter, state: TokenSet) -> Tensor:
    if state.num_prefix < 1:
        raise ValueError("the 'attention' target needs a backbone with a CLS token; use 'perturbation' instead")
    state = adapter.run_blocks(state, 0, adapter.depth - 1)
    _, stats = adapter.run_block(adapter.depth - 1, state, capture=True)
    return _per_image_max(stats.cls_attention()[:, state.num_prefix:])


def prediction_change(full: Tensor, reduced: Tensor, logits: bool) -> Tensor:
    """(M,) how far each reduced prediction moved from the full-token one."""
    # in float32 whatever precision the backbone ran in: in bf16/fp16 the change is below the rounding noise
    full, reduced = full.float(), reduced.float()
    if logits:
        return F.kl_div(reduced.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return 1 - F.cosine_similarity(full, reduced, dim=-1)


@torch.no_grad()
def perturbation_target(
    adapter: BackboneAdapter, state: TokenSet, grid: tuple[int, int], group: int = 2, chunk: int = 512,
    logits: bool = True,
) -> Tensor:
    """Importance of each patch = prediction change when its group is dropped (all groups batched)."""
    height, width = grid
    if height % group or width % group:
        raise ValueError(f"patch grid {height}x{width} is not divisible by the perturbation group size {group}")
    batch, n = state.patch_index.shape
    full = adapter.head(adapter.run_blocks(state))
    cell = rearrange(torch.arange(n, device=state.tokens.device), "(h g1 w g2) -> (h w) (g1 g2)",
                     h=height // group, g1=group, g2=group)
    groups = cell.shape[0]
    in_group = torch.zeros(groups, n, dtype=torch.bool, device=cell.device).scatter_(1, cell, True)
    kept = torch.nonzero(~in_group)[:, 1].view(groups, n - group * group)  # patches kept when a group drops
    change = torch.empty(batch, groups, device=cell.device)
    images = torch.arange(batch, device=cell.device).repeat_interleave(groups)  # every (image, group) job
    dropped = torch.arange(groups, device=cell.device).repeat(batch)
    for start in range(0, batch * groups, chunk):
        b_idx, g_idx = images[start:start + chunk], dropped[start:start + chunk]
        sub = TokenSet(state.tokens[b_idx], state.num_prefix, state.patch_index[b_idx])
        reduced = adapter.head(adapter.run_blocks(select(sub, kept[g_idx])))
        change[b_idx, g_idx] = prediction_change(full[b_idx], reduced, logits).to(change.dtype)
    per_patch = torch.zeros(batch, n, device=cell.device).scatter_(1, repeat(cell, "g k -> b (g k)", b=batch),
                                                                  repeat(change, "b g -> b (g k)", k=group * group))
    return _per_image_max(per_patch)


def _reduced_loss(adapter: BackboneAdapter, state: TokenSet, rows: Tensor, index: Tensor, reference: Tensor,
                  labels: bool, chunk: int) -> Tensor:
    """(M,) the loss of the prediction from image ``rows[m]``'s patches ``index[m]``: cross-entropy against
    ``reference`` labels, or the KL divergence from the ``reference`` full-token logits."""
    losses = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        sub = TokenSet(state.tokens[part], state.num_prefix, state.patch_index[part])
        reduced = adapter.head(adapter.run_blocks(select(sub, index[start:start + chunk]))).float()
        losses.append(F.cross_entropy(reduced, reference[part], reduction="none") if labels
                      else prediction_change(reference[part], reduced, logits=True))
    return torch.cat(losses)


@torch.no_grad()
def set_target(adapter: BackboneAdapter, state: TokenSet, logits: Tensor, kept: int, labels: Tensor | None = None,
               chunk: int = 512) -> Tensor:
    """(B, N) the set-level target: the module keeps the top ``kept`` (K) of ``logits``; each kept patch is scored by
    how much the prediction's loss rises when it is left out of that set, each of the K patches it would keep next by
    how much the loss falls when it is added; the best K of the 2K are 1 (a candidate that helps more than a kept
    patch costs takes its place), the other K 0, and every other patch keeps the module's own relevance,
    sigmoid(logits): no signal there. A harmless neighbour of the object and a look-alike fragment of another
    object no longer get the same target. Costs B (1 + 2K) reduced forwards of about K tokens (and one full forward
    without labels): at 4 of 64 tokens about a tenth of the perturbation target's 16 forwards of 60.

    Args:
        adapter: the frozen backbone.
        state: the images' embedded tokens.
        logits: (B, N) the module's budget logits.
        kept: K, the tokens the budget keeps.
        labels: (B,) class indices, or None: the full-token prediction is the reference (label-free).
        chunk: reduced forwards per batch.
    """
    batch, n = logits.shape
    candidates = min(kept, n - kept)
    if candidates == 0:  # every patch is kept: nothing to choose
        return torch.ones_like(logits)
    order = logits.topk(kept + candidates, dim=-1).indices
    chosen, extra = order[:, :kept], order[:, kept:]
    reference = labels if labels is not None else adapter.head(adapter.run_blocks(state)).float()

    def loss(rows: Tensor, index: Tensor) -> Tensor:
        return _reduced_loss(adapter, state, rows, index, reference, labels is not None, chunk)

    every = torch.arange(batch, device=logits.device)
    base = loss(every, chosen)
    others = ~torch.eye(kept, dtype=torch.bool, device=logits.device)  # row i: the kept set without patch i
    left_out = chosen[:, None, :].expand(batch, kept, kept)[:, others].view(batch * kept, kept - 1)
    without = loss(every.repeat_interleave(kept), left_out).view(batch, kept)
    added = torch.cat([chosen[:, None, :].expand(batch, candidates, kept), extra[..., None]], -1)
    with_extra = loss(every.repeat_interleave(candidates), added.view(batch * candidates, kept + 1))
    score = torch.cat([without - base[:, None], base[:, None] - with_extra.view(batch, candidates)], 1)
    best = torch.zeros_like(score).scatter_(1, score.topk(kept, dim=-1).indices, 1.0)
    return torch.sigmoid(logits.float()).scatter(1, order, best).to(logits.dtype)


def box_target(boxes: Tensor, grid: tuple[int, int], patch_size: tuple[int, int]) -> Tensor:
    """(B, 4) boxes (x0, y0, x1, y1) in pixels -> (B, N) fraction of each patch inside its box."""
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (batch, 4) as x0, y0, x1, y1 in pixels, got {tuple(boxes.shape)}")
    height, width = grid
    ph, pw = patch_size
    device = boxes.device
    y0 = torch.arange(height, device=device)[:, None] * ph
    x0 = torch.arange(width, device=device)[None, :] * pw
    b = boxes.float()[:, :, None, None]
    overlap_y = (torch.minimum(y0 + ph, b[:, 3]) - torch.maximum(y0, b[:, 1])).clamp_min(0)
    overlap_x = (torch.minimum(x0 + pw, b[:, 2]) - torch.maximum(x0, b[:, 0])).clamp_min(0)
    return (overlap_y * overlap_x / (ph * pw)).flatten(1)


def kept_set(target: Tensor, positions: Tensor, kept: int) -> Tensor:
    """(B, N) 1 on the ``kept`` patches a perfect ranking of ``target`` (B, N) keeps, 0 elsewhere: its top K, ties
    (e.g. the patches wholly inside a box) going to the patches nearest the target's centre of mass, so the set is
    compact, as the box oracle's is. What the ranking (field and allocator) learns: it scores the budget's choice,
    not each patch's relevance, which a per-patch target leaves unordered outside the object.

    Args:
        target: (B, N) per-patch relevance in [0, 1].
        positions: (N, 2) or (1, N, 2) the patches' centres (in patches).
        kept: K, the tokens the budget keeps.
    """
    positions = positions.reshape(-1, 2).to(target)
    centre = (target @ positions) / target.sum(-1, keepdim=True).clamp_min(1e-12)
    distance = (positions[None] - centre[:, None]).norm(dim=-1)
    chosen = (target - NEARNESS * distance).topk(kept, dim=-1).indices
    return torch.zeros_like(target).scatter_(1, chosen, 1.0)
