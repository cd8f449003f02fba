"""Token sets and budget mechanics: keep exactly K patch tokens per image and decide what the rest become.

A :class:`TokenSet` is the running sequence of one batch: ``P`` prefix tokens (CLS, distillation,
registers; never dropped) followed by ``T`` patch tokens. Every operation here is batched: per-image
indices go through one ``gather``; there is no Python loop over images.

What happens to the patch tokens that are not kept:

* ``discard``: they are gone (plain top-K).
* ``fuse``: they are averaged into one summary token, weighted by their (non-negative) scores,
  appended after the kept tokens (EViT). The result holds ``K + 1`` patch tokens.
* ``merge``: each is averaged into its most similar kept token; ``size`` counts how many patches a
  token stands for and the backbone then uses proportional attention (a ``log(size)`` key bias, ToMe).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from arrcoc.budget import Budget, num_kept

Dropped = Literal["discard", "fuse", "merge"]
DROPPED_MODES: tuple[str, ...] = get_args(Dropped)

FUSED = -1  # patch_index of a summary token that stands for several dropped patches


@dataclass
class TokenSet:
    """A batch of token sequences: ``num_prefix`` protected tokens, then patch tokens.

    tokens:      (B, P + T, D) the sequence the transformer blocks run on.
    num_prefix:  P, the number of leading tokens that are never dropped or merged.
    patch_index: (B, T) long, the patch of the original grid each patch token comes from
                 (raster order; :data:`FUSED` for a summary token; a merged token keeps its destination's).
    size:        (B, P + T) float, patches each token stands for, or ``None`` when every token is one
                 patch. When set, the backbone adds ``log(size)`` to the attention logits of each key.
    """

    tokens: Tensor
    num_prefix: int
    patch_index: Tensor
    size: Tensor | None = None

    @classmethod
    def from_embedded(cls, tokens: Tensor, num_prefix: int) -> TokenSet:
        batch, length = tokens.shape[:2]
        patch_index = torch.arange(length - num_prefix, device=tokens.device).expand(batch, -1)
        return cls(tokens, num_prefix, patch_index)

    @property
    def num_patch_tokens(self) -> int:
        return self.tokens.shape[1] - self.num_prefix

    @property
    def prefix(self) -> Tensor:
        return self.tokens[:, : self.num_prefix]

    @property
    def patches(self) -> Tensor:
        return self.tokens[:, self.num_prefix :]

    def sizes(self) -> Tensor:
        """``size``, materialised as ones when not tracked."""
        if self.size is not None:
            return self.size
        return self.tokens.new_ones(self.tokens.shape[:2], dtype=torch.float32)

    def attention_bias(self) -> Tensor | None:
        """Additive key bias (B, 1, 1, P + T) for proportional attention, or ``None``."""
        if self.size is None:
            return None
        return self.size.log()[:, None, None, :].to(self.tokens.dtype)


def check_index(index: Tensor, batch: int, num_patches: int) -> None:
    """Raise a clear error unless ``index`` is a (batch, K) integer tensor of patch positions in range."""
    if not isinstance(index, Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index must be an int64 or int32 tensor, got dtype {index.dtype}")
    if index.ndim != 2 or index.shape[0] != batch:
        raise ValueError(f"index must have shape (batch={batch}, K), got {tuple(index.shape)}")
    if not 1 <= index.shape[1] <= num_patches:
        raise ValueError(f"index must keep K in [1, {num_patches}] tokens, got K={index.shape[1]}")
    if index.min() < 0 or index.max() >= num_patches:
        raise ValueError(
            f"index values must be patch positions in [0, {num_patches}), "
            f"got min {int(index.min())}, max {int(index.max())}"
        )


def check_scores(scores: Tensor, state: TokenSet) -> None:
    expected = (state.tokens.shape[0], state.num_patch_tokens)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != expected:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must have shape (batch, patch tokens) = {expected}, got {got}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def select(state: TokenSet, index: Tensor) -> TokenSet:
    """Keep the patch tokens at ``index`` (B, K) (positions among the current patch tokens), plus the prefix.

    One batched gather; each image may keep different patches.
    """
    check_index(index, state.tokens.shape[0], state.num_patch_tokens)
    return _select(state, index.long())


def _select(state: TokenSet, index: Tensor) -> TokenSet:
    """:func:`select` of int64 positions known to be in range (a top K's): no check, so no host sync."""
    prefix = torch.arange(state.num_prefix, device=index.device).expand(index.shape[0], -1)
    full = torch.cat([prefix, index + state.num_prefix], dim=1)
    size = None if state.size is None else state.size.gather(1, full)
    tokens = _gather_tokens(state.tokens, full)
    return TokenSet(tokens, state.num_prefix, state.patch_index.gather(1, index), size)


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices (B, k) of the k highest scores per row, in ascending (raster) order."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def keep_top_k(
    state: TokenSet,
    scores: Tensor,
    budget: Budget,
    dropped: Dropped = "discard",
    metric: Tensor | None = None,
) -> TokenSet:
    """Keep the K = ``num_kept(budget, T)`` highest-scoring patch tokens; treat the rest per ``dropped``.

    scores: (B, T) per-patch relevance (higher is kept). ``fuse`` uses them as weights, so they must then
            be non-negative (probabilities, CLS attention, ``exp`` of logits).
    metric: (B, T, C) features that decide the merge destination (``merge`` only); default the tokens.
    """
    check_scores(scores, state)
    if dropped not in DROPPED_MODES:
        raise ValueError(f"dropped must be one of {DROPPED_MODES}, got {dropped!r}")
    k = num_kept(budget, state.num_patch_tokens)
    if dropped == "discard" or k == state.num_patch_tokens:
        return _select(state, top_k(scores, k))
    order = scores.argsort(dim=1, descending=True)
    kept, gone = order[:, :k].sort(dim=1).values, order[:, k:]
    if dropped == "fuse":
        return _fuse(state, kept, gone, scores)
    return _merge(state, kept, gone, state.patches if metric is None else metric)


def _fuse(state: TokenSet, kept: Tensor, gone: Tensor, scores: Tensor) -> TokenSet:
    weights = scores.gather(1, gone)
    if bool((weights < 0).any()):
        raise ValueError("fusing dropped tokens weights them by their scores, which must be non-negative")
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    summary = torch.einsum("bt,btd->bd", weights.to(state.tokens.dtype), _gather_tokens(state.patches, gone))
    out = _select(state, kept)
    tokens = torch.cat([out.tokens, summary[:, None]], dim=1)
    patch_index = F.pad(out.patch_index, (0, 1), value=FUSED)
    size = None
    if state.size is not None:
        dropped_size = state.size[:, state.num_prefix :].gather(1, gone).sum(dim=1, keepdim=True)
        size = torch.cat([out.size, dropped_size], dim=1)
    return TokenSet(tokens, state.num_prefix, patch_index, size)


def _merge(state: TokenSet, kept: Tensor, gone: Tensor, metric: Tensor) -> TokenSet:
    unit = F.normalize(metric.float(), dim=-1)
    similarity = _gather_tokens(unit, gone) @ _gather_tokens(unit, kept).transpose(1, 2)
    destination = similarity.argmax(dim=-1)  # (B, T - K): position among the kept tokens
    size = state.sizes()[:, state.num_prefix :]
    kept_size, gone_size = size.gather(1, kept), size.gather(1, gone)
    weighted = state.patches * size[..., None].to(state.tokens.dtype)
    total = _gather_tokens(weighted, kept).scatter_add(
        1, destination[..., None].expand(-1, -1, weighted.shape[-1]), _gather_tokens(weighted, gone)
    )
    new_size = kept_size.scatter_add(1, destination, gone_size)
    patches = total / new_size[..., None].to(total.dtype)
    tokens = torch.cat([state.prefix, patches], dim=1)
    full_size = torch.cat([state.sizes()[:, : state.num_prefix], new_size], dim=1)
    return TokenSet(tokens, state.num_prefix, state.patch_index.gather(1, kept), full_size)


def bipartite_merge(state: TokenSet, metric: Tensor, r: int) -> TokenSet:
    """ToMe bipartite soft matching: merge the ``r`` most similar (even -> odd) patch-token pairs.

    metric: (B, T, C) similarity features of the patch tokens (ToMe: the block's keys, head-averaged).
    Prefix tokens are never matched. Merged tokens are size-weighted means and sizes add, so the
    backbone's proportional attention keeps each merged token weighted like the patches it replaced.
    """
    r = min(r, state.num_patch_tokens // 2)
    if r <= 0:
        return state
    unit = F.normalize(metric.float(), dim=-1)
    similarity = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
    best, best_index = similarity.max(dim=-1)
    edges = best.argsort(dim=-1, descending=True)
    moved, unmoved = edges[:, :r], edges[:, r:].sort(dim=-1).values
    destination = best_index.gather(1, moved)

    size = state.sizes()[:, state.num_prefix :]
    weighted = state.patches * size[..., None].to(state.tokens.dtype)
    src, dst = weighted[:, ::2], weighted[:, 1::2]
    dst = dst.scatter_add(1, destination[..., None].expand(-1, -1, dst.shape[-1]), _gather_tokens(src, moved))
    src_size, dst_size = size[:, ::2], size[:, 1::2]
    dst_size = dst_size.scatter_add(1, destination, src_size.gather(1, moved))
    new_size = torch.cat([src_size.gather(1, unmoved), dst_size], dim=1)
    patches = torch.cat([_gather_tokens(src, unmoved), dst], dim=1) / new_size[..., None].to(dst.dtype)
    patch_index = torch.cat([state.patch_index[:, ::2].gather(1, unmoved), state.patch_index[:, 1::2]], dim=1)
    full_size = torch.cat([state.sizes()[:, : state.num_prefix], new_size], dim=1)
    return replace(
        state, tokens=torch.cat([state.prefix, patches], dim=1), patch_index=patch_index, size=full_size
    )
