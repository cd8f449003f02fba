"""Query-agnostic token-reduction baselines (random, grid, EViT, ATS, ToMe), built from the same pieces a
learned allocator uses.

A *scorer* maps the running :class:`TokenSet` (and, at a layer, the block's :class:`AttentionStats`) to
per-patch scores (B, T); :class:`TopK` hands them to :func:`keep_top_k`, the shared budget machinery.
A learned relevance module is just another scorer. ToMe merges instead of scoring (:class:`ToMe`).

    reducer = make_baseline("evit", budget=0.25, depth=adapter.depth, grid=adapter.grid())
    state = run_reduced(adapter, images, reducer)
    logits = adapter.head(state)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache

import torch
from torch import Tensor

from arrcoc.backbones import AttentionStats, BackboneAdapter, Dropped, PatchGrid, TokenSet, bipartite_merge, keep_top_k
from arrcoc.budget import Budget, num_kept

BEFORE_BLOCKS = -1  # a stage index meaning "on the embedded tokens, before block 0"

Scorer = Callable[[TokenSet, AttentionStats | None], Tensor]


def random_scores(state: TokenSet, stats: AttentionStats | None = None) -> Tensor:
    """Uniform random scores: random-K selection."""
    return torch.rand(state.tokens.shape[0], state.num_patch_tokens, device=state.tokens.device)


@cache
def _progressive_grid_order(height: int, width: int) -> tuple[int, ...]:
    # bit-reversed Morton (Z-order) code: any prefix of this order is an even, strided cover of the grid
    # (e.g. the first quarter of a 14x14 grid is exactly every other row and column)
    bits = max(1, math.ceil(math.log2(max(height, width))))

    def key(row: int, col: int) -> int:
        morton = 0
        for b in range(bits):
            morton |= ((row >> b) & 1) << (2 * b + 1) | ((col >> b) & 1) << (2 * b)
        return int(f"{morton:0{2 * bits}b}"[::-1], 2)

    return tuple(key(r, c) for r in range(height) for c in range(width))


@dataclass
class GridScorer:
    """Uniform strided grid: scores that prefer coarse lattice points first, so top-K is evenly spread."""

    grid: PatchGrid

    def __call__(self, state: TokenSet, stats: AttentionStats | None = None) -> Tensor:
        order = _progressive_grid_order(self.grid.height, self.grid.width)
        order = torch.tensor(order, device=state.tokens.device)
        # summary tokens (patch_index -1) rank last
        rank = torch.where(state.patch_index >= 0, order[state.patch_index.clamp_min(0)], order.numel() + 1)
        return -rank.float()


def cls_attention_scores(state: TokenSet, stats: AttentionStats | None) -> Tensor:
    """EViT: attention of the CLS query to each patch token, averaged over heads."""
    return _require_cls(state, stats).cls_attention()[:, state.num_prefix :]


def ats_scores(state: TokenSet, stats: AttentionStats | None) -> Tensor:
    """ATS significance: CLS attention times the norm of each token's value."""
    stats = _require_cls(state, stats)
    return stats.cls_attention()[:, state.num_prefix :] * stats.value_norm()[:, state.num_prefix :]


def _require_cls(state: TokenSet, stats: AttentionStats | None) -> AttentionStats:
    if stats is None:
        raise ValueError("scorer reads a block's attention: use it at a layer >= 0, not before block 0")
    if state.num_prefix == 0:
        raise ValueError("CLS-attention scores need a class token; this backbone has no prefix tokens")
    return stats


@dataclass
class TopK:
    """After each block in ``layers`` (``BEFORE_BLOCKS`` = on the embedded tokens), keep the top-K patch
    tokens by ``scorer``; K = ``num_kept(keep, current patch tokens)`` at each stage."""

    scorer: Scorer
    keep: Budget
    layers: tuple[int, ...] = (BEFORE_BLOCKS,)
    dropped: Dropped = "discard"
    needs_attention: bool = False

    def __call__(self, state: TokenSet, stats: AttentionStats | None, layer: int) -> TokenSet:
        return keep_top_k(state, self.scorer(state, stats), self.keep, self.dropped)

    def tokens_after(self, tokens: int, layer: int) -> int:
        kept = num_kept(self.keep, tokens)
        return kept + (self.dropped == "fuse" and kept < tokens)  # the summary token


@dataclass
class ToMe:
    """ToMe: after block ``i`` merge ``r[i]`` token pairs by bipartite soft matching on the block's keys."""

    r: Sequence[int]
    layers: tuple[int, ...] = field(init=False)
    needs_attention: bool = True

    def __post_init__(self) -> None:
        self.layers = tuple(i for i, r in enumerate(self.r) if r > 0)

    def __call__(self, state: TokenSet, stats: AttentionStats | None, layer: int) -> TokenSet:
        return bipartite_merge(state, stats.key_metric()[:, state.num_prefix :], self.r[layer])

    def tokens_after(self, tokens: int, layer: int) -> int:
        return tokens - max(0, min(self.r[layer], tokens // 2))  # as bipartite_merge caps r


Reducer = TopK | ToMe


def run_reduced(
    adapter: BackboneAdapter, images: Tensor, reducer: Reducer | None, trace: list[int] | None = None
) -> TokenSet:
    """Embed ``images``, run every block, reducing tokens at the reducer's stages; return the final tokens.

    trace: if given, receives the number of tokens each block ran on.
    """
    state = adapter.tokens(images)
    stages = set() if reducer is None else set(reducer.layers)
    if BEFORE_BLOCKS in stages:
        state = reducer(state, None, BEFORE_BLOCKS)
    start = 0
    for layer in sorted(stages - {BEFORE_BLOCKS}):
        if trace is not None:
            trace.extend([state.tokens.shape[1]] * (layer + 1 - start))
        state = adapter.run_blocks(state, start, layer)
        state, stats = adapter.run_block(layer, state, capture=reducer.needs_attention)
        state, start = reducer(state, stats, layer), layer + 1
    if trace is not None:
        trace.extend([state.tokens.shape[1]] * (adapter.depth - start))
    return adapter.run_blocks(state, start)


def tokens_per_block(reducer: Reducer | None, num_patches: int, depth: int) -> list[int]:
    """Patch tokens each block runs on under ``reducer``'s schedule (no forward pass needed)."""
    stages = set() if reducer is None else set(reducer.layers)
    tokens = reducer.tokens_after(num_patches, BEFORE_BLOCKS) if BEFORE_BLOCKS in stages else num_patches
    per_block = []
    for layer in range(depth):
        per_block.append(tokens)
        if layer in stages:
            tokens = reducer.tokens_after(tokens, layer)
    return per_block


def _stages(depth: int, count: int) -> tuple[int, ...]:
    # EViT's 4/7/10-of-12 layout, scaled to the depth: reduce after blocks depth*i/(count+1)
    return tuple(sorted({min(depth - 1, depth * i // (count + 1)) for i in range(1, count + 1)}))


def make_baseline(name: str, budget: Budget, depth: int, grid: PatchGrid, early: bool = False) -> Reducer | None:
    """A baseline whose last stage keeps ``num_kept(budget, N)`` patch tokens (ToMe: about as many).

    full: no reduction (None). random / grid: select before block 0. evit: CLS-attention top-K at three
    stages with the rest fused (keep rate budget^(1/3) per stage). ats: CLS attention x value norm,
    one stage after the first quarter of the blocks. tome: bipartite merging after every block.

    early: a progressive method's fastest schedule, for comparisons at a speed its own schedule cannot reach:
    EViT / ATS reduce once, straight to the budget, after block 0 (the first block whose attention they can
    read); ToMe merges as many pairs as it can (half the tokens) after each block until it reaches the budget.
    """
    n = grid.num_patches
    if early:
        if name not in PROGRESSIVE:
            raise ValueError(f"an early schedule is for the progressive baselines {PROGRESSIVE}, got {name!r}")
        if name == "tome":
            per_step, tokens = [], n
            for _ in range(max(1, depth - 1)):
                per_step.append(min(tokens - num_kept(budget, n), tokens // 2))
                tokens -= per_step[-1]
            return ToMe(per_step + [0] * (depth - len(per_step)))
        scorer = cls_attention_scores if name == "evit" else ats_scores
        return TopK(scorer, budget, (0,), "fuse" if name == "evit" else "discard", needs_attention=True)
    if name == "full":
        return None
    if name == "random":
        return TopK(random_scores, budget)
    if name == "grid":
        return TopK(GridScorer(grid), budget)
    if name == "evit":
        stages = _stages(depth, 3)
        return TopK(cls_attention_scores, budget ** (1 / len(stages)), stages, "fuse", needs_attention=True)
    if name == "ats":
        return TopK(ats_scores, budget, _stages(depth, 3)[:1], needs_attention=True)
    if name == "tome":
        merges = n - num_kept(budget, n)
        steps = max(1, depth - 1)  # merging after the last block saves nothing
        per_step = [merges // steps + (i < merges % steps) for i in range(steps)]
        return ToMe(per_step + [0] * (depth - steps))
    raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")


BASELINES: tuple[str, ...] = ("full", "random", "grid", "evit", "ats", "tome")
PROGRESSIVE: tuple[str, ...] = ("evit", "ats", "tome")  # reduce after blocks, so early blocks see every token


def equal_compute_baseline(name: str, mean_tokens: float, depth: int, grid: PatchGrid) -> Reducer | None:
    """A progressive baseline rescheduled so that its blocks run on ``mean_tokens`` patch tokens on average:
    equal compute with a method that keeps that many tokens from block 0 on.

    EViT / ATS keep their stages and change the keep rate per stage; ToMe changes the number of merges per
    block. Returns ``None`` when no schedule gets within 5% (or half a token) of ``mean_tokens``: blocks that
    run before the first reduction see every token, which puts a floor under their compute.
    """
    if name not in PROGRESSIVE:
        raise ValueError(f"equal-compute scheduling is for the progressive baselines {PROGRESSIVE}, got {name!r}")
    n = grid.num_patches
    if name == "tome":
        candidates = [ToMe([r] * (depth - 1) + [0]) for r in range(n // 2 + 1)]
    else:
        template = make_baseline(name, 0.5, depth, grid)
        candidates = [replace(template, keep=keep / 1000) for keep in range(1, 1001)]

    def error(reducer: Reducer) -> float:
        return abs(sum(tokens_per_block(reducer, n, depth)) / depth - mean_tokens)

    best = min(candidates, key=error)
    return best if error(best) <= max(0.5, 0.05 * mean_tokens) else None
