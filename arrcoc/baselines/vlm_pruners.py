"""Visual-token pruners of a LLaVA-architecture VLM, on the real ``LlavaForConditionalGeneration`` (issue 38).

Every pruner sees what its method reads and returns, per image, the visual tokens the language model gets
(:class:`Selection`): positions among the image's visual tokens, which keep their RoPE positions, and, for
methods that merge, the features those tokens carry instead of their own. The language model then runs on the
shortened prompt through :class:`~arrcoc.backbones.vlm.VLMAdapter` (the project's precomputed-features path: the
placeholders are never edited). The methods that prune inside the language model (FastV, PyramidDrop, DART) shorten
the sequence between decoder layers in :func:`pruned_prefill`.

  random        K tokens uniformly at random (seeded per image).
  grid          K tokens spread evenly over the token grid.
  pool          the grid cut into K cells; each cell one token, the mean of its tokens' features.
  oracle        the tokens of the digits the answer depends on (their ink boxes' share of each patch, ties to the
                patches nearest the boxes' centre), then the nearest others.
  divprune      max-min diversity of the projected features (Alvar et al., CVPR 2025).
  visionzip     the tower's CLS attention picks dominant tokens; the rest merge into a few contextual ones (Yang et
                al. 2024).
  prumerge+     the CLS attention's IQR outliers, spatially uniform extras, each merged with its most similar
                tokens (Shang et al. 2024).
  cdpruner      a determinantal point process over the projected features, conditioned on the question's relevance
                (Zhang et al., NeurIPS 2025).
  fastv         the last token's attention in the language model's layer 2 (Chen et al., ECCV 2024).
  pyramiddrop   the last instruction token's attention, at the start of each stage of the language model, keeps a
                share of the visual tokens the stage before kept (Xing et al. 2024).
  dart          tokens least similar to a few pivots, in the language model's layer 2 (Wen et al. 2025).

Every method keeps each token's original position (the project's shortening); VisionZip, PruMerge+, DivPrune and
CDPruner re-index the kept tokens contiguously in their code. Where a method reads the tower (VisionZip, PruMerge+)
it reads the block that makes the features the projector takes (the canvas VLM: the last block; LLaVA-1.5: the
penultimate), and merges before the projector, as its code does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arrcoc.backbones.vlm import EncodedPrompt, TokenGrid, adapt_vlm
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
    model: nn.Module | None = None  # the VLM, for the methods that read its tower or its question embedding
    pixels: Tensor | None = None  # (B, C, H, W) what the tower takes
    _tower: TowerPass | None = None

    def grid(self, image: int) -> TokenGrid:
        grids = self.prompt.grids[image]
        if len(grids) != 1:
            raise ValueError(f"the pruners take one token grid per image (LLaVA), image {image} has {len(grids)}")
        return grids[0]


@dataclass
class TowerPass:
    """What a tower-reading method sees of the block that makes the projector's features: those features ``hidden``
    (B, 1 + N, D, CLS first), the block's attention ``attention`` (B, heads, 1 + N, 1 + N), queries ``queries`` and
    keys ``keys`` (B, heads, 1 + N, d)."""

    hidden: Tensor
    attention: Tensor
    queries: Tensor
    keys: Tensor


def tower_pass(context: PruningContext) -> TowerPass:
    """The tower's last block, recomputed with its attention (the canvas VLM's timm tower), once per context."""
    if context._tower is not None:
        return context._tower
    if context.model is None or context.pixels is None:
        raise ValueError("this pruner reads the vision tower: give the context the model and the pixels")
    config, core = context.model.config, context.model.model
    vit = getattr(core.vision_tower, "vit", None)
    if vit is None or config.vision_feature_layer != -1:
        raise ValueError("the tower-reading pruners support the canvas VLM's tower (features from its last block)")
    with torch.no_grad():
        states = core.vision_tower(context.pixels.to(vit.cls_token.dtype)).hidden_states
        block = vit.blocks[-1]
        x = block.norm1(states[-2])
        batch, tokens, _ = x.shape
        qkv = block.attn.qkv(x).reshape(batch, tokens, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = block.attn.q_norm(qkv[0]), block.attn.k_norm(qkv[1])
        attention = (q * block.attn.scale @ k.transpose(-2, -1)).softmax(-1)
    context._tower = TowerPass(states[-1], attention, q, k)
    return context._tower


def _project(context: PruningContext, hidden: Tensor) -> Tensor:
    """Tower features (M, D) through the model's projector, as the language model gets them."""
    with torch.no_grad():
        return context.model.model.multi_modal_projector(hidden)


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


def visionzip_pruner(context: PruningContext) -> Selection:
    """Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (2024;
    github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py``): the CLS token's attention in the feature
    block, summed over heads, picks the dominant patches; of the rest, every step-th is a target (step = rest //
    contextual) and each other one joins the target whose key (averaged over heads) is most cosine-similar; a
    contextual token is its target's features plus the mean of those that joined it. 64 tokens = 54 + 10 (the
    paper's split; other budgets in the same proportion, at least one contextual token). The CLS token, one of
    VisionZip's dominant tokens, is not a visual token of this model ("default" strategy): all K are patches."""
    tower = tower_pass(context)
    contextual = max(1, round(context.kept * 10 / 64))
    dominant = context.kept - contextual
    keep, features = [], []
    for i in range(context.prompt.num_images):
        index = context.grid(i).index
        score = tower.attention[i, :, 0, 1:].sum(0)
        top = score.topk(dominant).indices
        rest = torch.ones_like(score, dtype=torch.bool).index_fill_(0, top, False).nonzero()[:, 0]
        step = max(1, len(rest) // contextual)
        target_at = torch.arange(0, len(rest), step, device=rest.device)[:contextual]
        metric = F.normalize(tower.keys[i, :, 1:].mean(0)[rest], dim=-1)
        others = torch.ones(len(rest), dtype=torch.bool, device=rest.device).index_fill_(0, target_at, False)
        joins = (metric[others] @ metric[target_at].T).argmax(-1)
        hidden = tower.hidden[i, 1:]
        pooled = hidden.new_zeros(contextual, hidden.shape[1]).index_add_(0, joins, hidden[rest][others])
        pooled /= torch.bincount(joins, minlength=contextual).clamp_min(1)[:, None]
        merged = hidden[rest[target_at]] + pooled
        keep.append(index[torch.cat([top, rest[target_at]])])
        features.append(_project(context, torch.cat([hidden[top], merged])))
    return Selection(keep, features)


PRUMERGE_NEIGHBOURS = 32  # each kept token absorbs its 32 most similar tokens (the official code's k)


def prumerge_plus_pruner(context: PruningContext) -> Selection:
    """Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models" (2024;
    github.com/42Shawn/LLaVA-PruMerge, ``clip_encoder.py``, ``token_prune_merge_advanced_plus``): the CLS attention
    of the feature block (one head over the full width, as the code computes it) marks its IQR outliers (above Q3 +
    1.5 IQR) as the kept tokens, spatially uniform samples (every (1 / ratio) / 3-th patch) are added, and each kept
    token adds the attention-weighted features of its 32 most key-similar tokens to its own. At a fixed budget: the
    outliers (at most K - 1, by attention), then the uniform samples in order, then the strongest remaining
    patches, to K - 1 tokens; the K-th carries the attention-weighted sum of every pruned token (the code's extra
    token) at the position of the strongest pruned patch."""
    tower = tower_pass(context)
    keep, features = [], []
    for i in range(context.prompt.num_images):
        index, hidden = context.grid(i).index, tower.hidden[i, 1:]
        queries, keys = (t[i].transpose(0, 1).flatten(1) for t in (tower.queries, tower.keys))  # (1 + N, full width)
        score = (queries[0] @ keys.T * keys.shape[1] ** -0.5).softmax(-1)[1:]
        n = len(score)
        q1, q3 = torch.quantile(score, torch.tensor([0.25, 0.75], device=score.device))
        outliers = (score > q3 + 1.5 * (q3 - q1)).nonzero()[:, 0]
        outliers = outliers[score[outliers].argsort(descending=True)][:context.kept - 1]
        ratio = max(len(outliers), 1) / n
        step = max(1, int(int(1 / ratio) / 3))
        chosen = _first_unique(torch.cat([outliers, torch.arange(0, n - 1, step, device=score.device),
                                          score.argsort(descending=True)]), context.kept - 1)
        unit = F.normalize(keys[1:], dim=-1)
        similarity = (unit[chosen] @ unit.T).index_put_((torch.arange(len(chosen)), chosen), torch.tensor(-2.0))
        # the code's merge weights are the raw attention of each absorbed token (not renormalised)
        near = similarity.topk(min(PRUMERGE_NEIGHBOURS, n - 1), dim=-1).indices
        merged = hidden[chosen] + (score[near, None] * hidden[near]).sum(1)
        pruned = torch.ones(n, dtype=torch.bool, device=score.device).index_fill_(0, chosen, False)
        extra = (score[pruned, None] * hidden[pruned]).sum(0, keepdim=True)
        strongest = pruned.nonzero()[:, 0][score[pruned].argmax()]
        keep.append(index[torch.cat([chosen, strongest[None]])])
        features.append(_project(context, torch.cat([merged, extra])))
    return Selection(keep, features)


def cdpruner_pruner(context: PruningContext) -> Selection:
    """Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
    (NeurIPS 2025; github.com/Theia-4869/CDPruner, ``llava/model/llava_arch.py``, ``encode_images``): the kernel
    L = diag(r) S diag(r), S the cosine similarity of the projected visual tokens, r each token's relevance to the
    question min-max normalised over the image; the K tokens of the greedy MAP of the DPP (Chen et al. 2018's fast
    greedy inference). This model has no CLIP text tower: the relevance is the cosine of each projected token with
    the question's mean language-model input embedding, with the paper's sign (the official code negates it for
    LLaVA-1.5's CLIP, a quirk of that model its author describes)."""
    if context.model is None:
        raise ValueError("CDPruner reads the question's embedding: give the context the model")
    question = adapt_vlm(context.model).text_embedding(context.prompt)
    keep = []
    for i in range(context.prompt.num_images):
        index = context.grid(i).index
        tokens = F.normalize(context.prompt.features[i][index].float(), dim=-1)
        relevance = tokens @ F.normalize(question[int(context.prompt.image_row[i])], dim=-1)
        relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
        kernel = relevance[:, None] * (tokens @ tokens.T) * relevance[None, :]
        keep.append(index[greedy_dpp(kernel, context.kept)])
    return Selection(keep)


def greedy_dpp(kernel: Tensor, count: int) -> Tensor:
    """The greedy MAP of a DPP with kernel ``kernel`` (N, N): ``count`` indices, each the one that most raises the
    log-determinant (Chen, Zhang and Zhou 2018, "Fast greedy MAP inference for determinantal point process":
    incremental Cholesky rows ``rows``, marginal gains ``gains``)."""
    n = kernel.shape[0]
    rows = kernel.new_zeros(count, n)
    gains = kernel.diagonal().clone()
    chosen = []
    for step in range(count):
        j = int(gains.argmax())
        chosen.append(j)
        if gains[j] > 1e-10:  # else the kernel's rank is spent: the rest go by what is left of their gains
            rows[step] = (kernel[j] - rows[:step, j] @ rows[:step]) / gains[j].sqrt()
            gains = gains - rows[step].square()
        gains[chosen] = -float("inf")
    return torch.tensor(chosen, device=kernel.device)


def _first_unique(candidates: Tensor, count: int) -> Tensor:
    """The first ``count`` distinct values of ``candidates``, in order of first appearance."""
    seen: list[int] = []
    for value in candidates.tolist():
        if value not in seen:
            seen.append(value)
            if len(seen) == count:
                break
    return torch.tensor(seen, device=candidates.device)


PRUNERS: dict[str, Callable[[PruningContext], Selection]] = {
    "random": random_pruner,
    "grid": grid_pruner,
    "pool": pool_pruner,
    "oracle": oracle_pruner,
    "divprune": divprune_pruner,
    "visionzip": visionzip_pruner,
    "prumerge+": prumerge_plus_pruner,
    "cdpruner": cdpruner_pruner,
}


# ---- pruning inside the language model ----------------------------------------------------------------
@dataclass
class LayerView:
    """The language model at the input of decoder layer ``layer``: its hidden states (B, L, D), position ids,
    attention mask (B, L) and which columns hold visual tokens (B, L); ``before`` the input of the layer before."""

    layer: int
    hidden: Tensor
    positions: Tensor
    mask: Tensor
    visual: Tensor
    before: Tensor | None


def layer_attention(model: nn.Module, layer: int, hidden: Tensor, positions: Tensor, mask: Tensor,
                    rows: Tensor) -> tuple[Tensor, Tensor]:
    """(B, Q, L) the softmax attention of the query columns ``rows`` (B, Q) in decoder layer ``layer`` given its input
    ``hidden``, averaged over heads (causal, padding masked), and the layer's keys (B, L, heads * d) after RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    lm = model.model.language_model
    block = lm.layers[layer]
    attn = block.self_attn
    x = block.input_layernorm(hidden)
    batch, length, _ = x.shape
    q = attn.q_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(x, position_ids=positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys = repeat_kv(k, attn.num_key_value_groups)
    picked = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
    scores = picked @ keys.transpose(-2, -1) * attn.scaling  # (B, H, Q, L)
    columns = torch.arange(length, device=x.device)
    allowed = (columns[None, None, :] <= rows[:, :, None]) & (mask[:, None, :] == 1)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1).mean(1), k.transpose(1, 2).flatten(2)


def _causal_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, L, L) additive mask: causal, padding keys masked (a padding query sees itself: no NaN rows)."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None] & (mask[:, None, :] == 1) | torch.eye(length, dtype=torch.bool, device=mask.device)[None]
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)[
        :, None]


@torch.no_grad()
def pruned_prefill(model: nn.Module, embeds: Tensor, mask: Tensor, positions: Tensor, visual: Tensor,
                   prune: Callable[[LayerView], Tensor | None]) -> Tensor:
    """(B, V) the next-token logits of a LLaVA language model whose sequence ``prune`` may shorten before any
    decoder layer: it gets a :class:`LayerView` and returns the columns (B, L') to keep (each row the same count), or
    None. Kept tokens keep their positions. ``embeds`` (B, L, D) the prompts' input embeddings (visual features at
    the placeholders), ``mask`` (B, L), ``positions`` (B, L), ``visual`` (B, L) bool."""
    lm = model.model.language_model
    hidden, before = embeds, None
    for index, block in enumerate(lm.layers):
        keep = prune(LayerView(index, hidden, positions, mask, visual, before))
        if keep is not None:
            hidden = hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
            positions, mask, visual = positions.gather(1, keep), mask.gather(1, keep), visual.gather(1, keep)
        before = hidden
        hidden = block(hidden, attention_mask=_causal_mask(mask, hidden.dtype), position_ids=positions,
                       position_embeddings=lm.rotary_emb(hidden, position_ids=positions))
    return model.lm_head(lm.norm(hidden[:, -1]))


def keep_visual(view: LayerView, score: Tensor, count: int) -> Tensor:
    """The columns to keep (B, L'): every text column and the ``count`` visual columns of highest ``score`` (B, L),
    in their order."""
    ranked = score.masked_fill(~view.visual, float("-inf")).topk(count, dim=-1).indices
    chosen = (~view.visual).scatter(1, ranked, True)
    return chosen.nonzero()[:, 1].view(chosen.shape[0], -1)


FASTV_LAYER = 2  # K: FastV prunes after layer K (the paper's setting)
DART_LAYER = 2  # DART too (its ``--pruned_layer 2``)
DART_PIVOTS = 4  # visual pivots, and as many text pivots


def fastv(model: nn.Module, kept: int, layer: int = FASTV_LAYER) -> Callable[[LayerView], Tensor | None]:
    """Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (ECCV 2024; github.com/pkunlp-icler/FastV,
    ``modeling_llama.py``, the ``USE_FAST_V`` branch): before layer K the visual tokens are ranked by the attention
    the last token paid them in layer K - 1 (averaged over heads) and the top ``kept`` stay, at their positions."""

    def prune(view: LayerView) -> Tensor | None:
        if view.layer != layer:
            return None
        last = torch.full((view.hidden.shape[0], 1), view.hidden.shape[1] - 1, device=view.hidden.device)
        attention, _ = layer_attention(model, layer - 1, view.before, view.positions, view.mask, last)
        return keep_visual(view, attention[:, 0], kept)

    return prune


def dart(model: nn.Module, kept: int, layer: int = DART_LAYER) -> Callable[[LayerView], Tensor | None]:
    """Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More" (2025;
    github.com/ZichenWen1/DART): before layer K, pivots are the 4 visual and 4 text tokens whose keys in layer K - 1
    have the largest L1 norm (the prompt's text but ``<s>``: the question after the image, as in LLaVA's prompts);
    for each pivot in turn, the visual tokens least cosine-similar to it (on the final-normed hidden states) join
    the kept set, (K - 4) / 8 per pivot (the remainder to the first pivots); the visual pivots stay, the text
    pivots are never dropped. Kept tokens keep their positions."""
    lm = model.model.language_model

    def prune(view: LayerView) -> Tensor | None:
        if view.layer != layer:
            return None
        batch, length = view.visual.shape
        rows = torch.arange(length, device=view.hidden.device).expand(batch, -1)
        _, keys = layer_attention(model, layer - 1, view.before, view.positions, view.mask, rows[:, -1:])
        state = F.normalize(lm.norm(view.hidden).float(), dim=-1)
        weight = keys.abs().sum(-1)
        text = ~view.visual & (view.mask == 1) & (rows > rows.masked_fill(view.mask == 0, length).amin(1, keepdim=True))
        counts = torch.full((2 * DART_PIVOTS,), (kept - DART_PIVOTS) // (2 * DART_PIVOTS))
        counts[:(kept - DART_PIVOTS) % (2 * DART_PIVOTS)] += 1
        chosen = torch.zeros_like(view.visual)
        for b in range(batch):
            visual_pivots = weight[b].masked_fill(~view.visual[b], -1).topk(DART_PIVOTS).indices
            text_pivots = weight[b].masked_fill(~text[b], -1).topk(DART_PIVOTS).indices
            chosen[b, visual_pivots] = True
            for pivot, count in zip(torch.cat([visual_pivots, text_pivots]).tolist(), counts.tolist()):
                similarity = state[b] @ state[b, pivot]
                open_ = view.visual[b] & ~chosen[b]
                chosen[b, similarity.masked_fill(~open_, float("inf")).topk(count, largest=False).indices] = True
        return keep_visual(view, chosen.float(), kept)

    return prune


def pyramid_drop(model: nn.Module, stages: tuple[int, ...], ratio: float) -> Callable[[LayerView], Tensor | None]:
    """Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
    Reduction" (2024; github.com/Cooperx521/PyramidDrop, ``modeling_llama_pdrop.py``, ``pdrop_rank_drop``): at the
    first layer of each later stage (``stages``, e.g. (8, 16, 24) of 32 layers) the visual tokens are ranked by the
    attention the last instruction token pays them, computed with that layer's own queries and keys on its input,
    averaged over heads, and ``ratio`` ** s of the image's tokens stay after the s-th drop (the code's 0.5, 0.25,
    0.125). Its budget is a count averaged over the layers: the first stage keeps every token."""

    def prune(view: LayerView) -> Tensor | None:
        if view.layer not in stages:
            return None
        stage = stages.index(view.layer) + 1
        count = max(1, int(view.visual.sum(1)[0] / ratio ** (stage - 1) * ratio ** stage))
        last = torch.full((view.hidden.shape[0], 1), view.hidden.shape[1] - 1, device=view.hidden.device)
        attention, _ = layer_attention(model, view.layer, view.hidden, view.positions, view.mask, last)
        return keep_visual(view, attention[:, 0], count)

    return prune


def pyramid_tokens(visual: int, layers: int, stages: tuple[int, ...], ratio: float) -> float:
    """The visual tokens PyramidDrop keeps, averaged over the language model's ``layers`` (its budget)."""
    bounds = [0, *stages, layers]
    return sum((end - start) * int(visual * ratio ** s) for s, (start, end) in enumerate(zip(bounds, bounds[1:]))
               ) / layers
