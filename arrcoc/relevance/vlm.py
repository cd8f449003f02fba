"""``arrcoc.attach_vlm``: a vision-language model whose language model sees only the visual tokens that the
relevance module allocates for the prompt.

    model = arrcoc.attach_vlm(llava, budget=0.25)
    ids = model.generate(**processor_outputs, max_new_tokens=20)   # as llava.generate, on 25% of the tokens
    model.learn(**processor_outputs, labels=labels)                # one step of every sub-network's local rule

The query is the prompt itself: the language model's own input embeddings of the prompt's text tokens,
averaged (or, with ``text_encoder=``, sentence embeddings of ``query=`` strings). Each image's visual
tokens are scored by the same relevance module as in :mod:`arrcoc.relevance.attach` (their
language-space features, the pixels each covers, the query), and the top K of each image are kept.

Learning stays local: the VLM is frozen and only read. The relevance target comes from forward passes
only: how much the answer's log-likelihood (``labels``) falls, or, without labels, how far the next-token
distribution moves (KL), when a g x g group of an image's visual tokens is dropped.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from arrcoc.backbones.vlm import IGNORE_INDEX, EncodedPrompt, TokenGrid, VLMAdapter, adapt_vlm
from arrcoc.budget import Budget, num_kept

from .checkpoint import read_checkpoint
from .graphs import GraphedForward
from .module import RelevanceConfig, RelevanceModule, RelevanceOutput
from .targets import box_target, prediction_change
from .wrapper import QueryInput, RelevanceWrapper

__all__ = ["VLMARRCOC", "VLMAllocation", "VLMConfig", "attach_vlm"]

VLM_TARGETS = ("perturbation", "box")
RUN_OPTIONS = ("logits_to_keep", "use_cache", "output_attentions", "output_hidden_states")


@dataclass
class VLMConfig:
    """How ARR-COC allocates a VLM's visual tokens.

    relevance: the relevance module, its rules and the budget: a fraction of each image's scored visual
        tokens, or a count per image (tokens outside every grid, e.g. a CLS token or LLaVA-NeXT's row ends,
        are always kept on top). ``target`` must be ``perturbation`` or ``box``.
    group: the perturbation target drops g x g groups of neighbouring visual tokens together.
    chunk: perturbed prompts per language-model forward (memory vs. speed).
    """

    relevance: RelevanceConfig = dataclasses.field(default_factory=lambda: RelevanceConfig(target="perturbation"))
    group: int = 2
    chunk: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.relevance, dict):
            self.relevance = RelevanceConfig.from_dict(self.relevance)
        if self.relevance.target not in VLM_TARGETS:
            raise ValueError(f"a VLM's relevance target must be one of {VLM_TARGETS} (forward-only signals of the "
                             f"language model), got {self.relevance.target!r}")
        if self.relevance.tiers or self.relevance.dropped != "discard":
            raise ValueError("a VLM's visual tokens are kept or dropped: tiers and fused/merged tokens are not "
                             "supported (set tiers=False, dropped='discard')")
        if self.group < 1 or self.chunk < 1:
            raise ValueError(f"group and chunk must be >= 1, got group={self.group}, chunk={self.chunk}")


@dataclass
class VLMAllocation:
    """Per image: the kept visual-token positions, and the budget logits of its tokens (+inf: always kept)."""

    keep: list[Tensor]
    logits: list[Tensor]


@dataclass
class _GridBatch:
    """The grids of one shape, stacked: which (image, grid) each row is, the pixels and tokens, each row's prompt."""

    members: list[tuple[int, int]]
    grids: list[TokenGrid]
    pixels: Tensor
    tokens: Tensor
    rows: Tensor


class VLMARRCOC(RelevanceWrapper, nn.Module):
    def __init__(self, model: nn.Module, config: VLMConfig | None = None,
                 text_encoder: Callable[[list[str]], Tensor] | None = None, graphs: bool | None = None):
        super().__init__()
        self.adapter: VLMAdapter = adapt_vlm(model)  # frozen, eval; not a sub-module: never saved or trained
        self.vlm_config = config or VLMConfig()
        self.config = self.vlm_config.relevance
        self.text_encoder = text_encoder
        self.graphs = graphs
        self._graphed: GraphedForward | None = None
        if text_encoder is None and self.config.query_dim != self.adapter.feature_dim:
            raise ValueError(
                f"the prompt's own embedding is the query: query_dim must be the language model's hidden size "
                f"{self.adapter.feature_dim}, got {self.config.query_dim} (attach_vlm sets it)"
            )
        device = next(model.parameters()).device  # the module lives where the VLM is, before the optimizer
        self.relevance = RelevanceModule(self.config, self.adapter.feature_dim, self.adapter.cell).to(device)
        self._build_rules()
        self.eval()

    # ---- checkpoints (save_pretrained: RelevanceWrapper) ------------------------------------------
    def checkpoint_config(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.vlm_config), "relevance": self.config.to_dict()}

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: nn.Module,
                        text_encoder: Callable[[list[str]], Tensor] | None = None,
                        graphs: bool | None = None) -> VLMARRCOC:
        """A :meth:`save_pretrained` folder on ``model`` (the same VLM architecture it was trained on); ``graphs`` as
        :func:`attach_vlm`'s."""
        meta, tensors = read_checkpoint(directory)
        config = meta.get("config")
        if not isinstance(config, dict) or "relevance" not in config:
            raise ValueError(f"{directory} is not a VLM checkpoint (its config has no 'relevance' section): it was "
                             f"saved for {meta.get('backbone')}; load ViT checkpoints with ARRCOC.from_pretrained")
        wrapped = cls(model, VLMConfig(**config), text_encoder, graphs)
        wrapped.load_checkpoint_tensors(tensors, meta, directory)
        return wrapped

    # ---- inputs ---------------------------------------------------------------------------------
    def _split(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Processor outputs vs. everything else (generation settings)."""
        adapter = self.adapter
        # inputs_embeds / mm_encoder_outputs count as inputs so that encode() refuses them: the wrapper builds both
        keys = {"input_ids", "attention_mask", "position_ids", "inputs_embeds", "mm_encoder_outputs",
                *adapter.image_inputs, *adapter.token_inputs, *adapter.unsupported_inputs}
        return {k: v for k, v in kwargs.items() if k in keys}, {k: v for k, v in kwargs.items() if k not in keys}

    def prompt_query(self, prompt: EncodedPrompt, query: QueryInput) -> Tensor:
        """(B, query_dim) one query per prompt: the prompt's own pooled text embedding unless ``query`` is given
        (embeddings, or sentences with a text encoder)."""
        given = self.given_query(prompt, query)
        return self.adapter.text_embedding(prompt) if given is None else given

    def given_query(self, prompt: EncodedPrompt, query: QueryInput) -> Tensor | None:
        """(B, query_dim) the query embeddings ``query`` gives (validated), or None where the prompt's own pooled
        text embedding is the query (the scoring pools it: inside its graph where compiled)."""
        if query is None:
            if self.text_encoder is not None:
                raise ValueError("with a text_encoder, pass the query sentences: query=[...] (one per prompt)")
            return None
        return self.encode_query(query, prompt.batch_size).float()

    # ---- relevance ------------------------------------------------------------------------------
    def _grid_batches(self, prompt: EncodedPrompt) -> list[_GridBatch]:
        """Every image's grids, stacked by shape (one relevance pass per shape)."""
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for image, grids in enumerate(prompt.grids):
            for t, grid in enumerate(grids):
                by_shape.setdefault((grid.height, grid.width), []).append((image, t))
        batches = []
        for members in by_shape.values():
            grids = [prompt.grids[i][t] for i, t in members]
            tokens = torch.stack([prompt.features[i][g.index] for (i, _), g in zip(members, grids)]).float()
            pixels = torch.stack([g.pixels for g in grids]).float()
            batches.append(_GridBatch(members, grids, pixels, tokens, prompt.image_row[[i for i, _ in members]]))
        return batches

    def _pass(self, pixels: Tensor, tokens: Tensor, query: Tensor) -> RelevanceOutput:
        """The relevance module on grids of one shape (their grid read off the pixels)."""
        cell_h, cell_w = self.adapter.cell
        return self.relevance(pixels, tokens, (pixels.shape[-2] // cell_h, pixels.shape[-1] // cell_w), query)

    def grid_logits(self, pixels: Tensor, tokens: Tensor, rows: Tensor, input_ids: Tensor, attention_mask: Tensor,
                    query: Tensor | None) -> Tensor:
        """(G, N) the budget logits of G grids of one shape, ``rows`` their prompts: what inference runs, compiled
        whole where :attr:`graphs` says (no host sync, no data-dependent Python branch). The query is ``query``
        (B, query_dim), or if None each prompt's own pooled text (of ``input_ids``, ``attention_mask``)."""
        if query is None:
            query = self.adapter.pooled_text(input_ids, attention_mask)
        return self._pass(pixels, tokens, query[rows]).logits

    def graph_target(self) -> Callable[..., Tensor]:
        return self.grid_logits

    def _allocation(self, prompt: EncodedPrompt, batches: list[_GridBatch], query: Tensor | None) -> VLMAllocation:
        logits = [torch.full((prompt.num_tokens(i),), float("inf"), device=prompt.input_ids.device)
                  for i in range(prompt.num_images)]
        for batch in batches:
            run = self.graphed.run if self.graphs_wanted(batch.tokens) else self.grid_logits
            scored_logits = run(batch.pixels, batch.tokens, batch.rows, prompt.input_ids, prompt.attention_mask, query)
            for row, ((image, _), grid) in enumerate(zip(batch.members, batch.grids)):
                logits[image][grid.index] = scored_logits[row].to(logits[image].device)
        keep = []
        for image, scores in enumerate(logits):
            scored = sum(grid.index.numel() for grid in prompt.grids[image])  # a shape: no host sync
            try:
                k = num_kept(self.budget, scored)
            except ValueError as error:
                raise ValueError(f"image {image} has {scored} visual tokens to allocate: {error}") from None
            keep.append(scores.topk(k + scores.numel() - scored).indices.sort().values)
        return VLMAllocation(keep, logits)

    @torch.no_grad()
    def allocate(self, query: QueryInput = None, **inputs: Any) -> VLMAllocation:
        """Which visual tokens of each image the language model gets, for these processor outputs."""
        prompt = self.adapter.encode(inputs)
        return self._allocation(prompt, self._grid_batches(prompt), self.given_query(prompt, query))

    # ---- the model ------------------------------------------------------------------------------
    def forward(self, query: QueryInput = None, **kwargs: Any) -> Any:
        """The VLM's output on the allocated tokens; ``.logits`` cover the shortened prompt (left-padded),
        so ``logits[:, -1]`` is the next-token prediction. Besides the processor outputs, the model's
        ``RUN_OPTIONS`` (e.g. ``logits_to_keep=1``) are passed on."""
        inputs, options = self._split(kwargs)
        unknown = sorted(set(options) - set(RUN_OPTIONS))
        if unknown:
            raise ValueError(f"unexpected model input(s) {unknown}; processor outputs for {self.adapter.family}: "
                             f"{sorted(inputs) or 'none given'}, run options: {list(RUN_OPTIONS)}")
        prompt = self.adapter.encode(inputs, "forward")
        return self.adapter.forward(prompt, self.kept_tokens(prompt, query), **options)

    def generate(self, query: QueryInput = None, **kwargs: Any) -> Any:
        """``model.generate(**processor_outputs, **generation_settings)`` on the allocated visual tokens;
        returns the full prompt followed by the new tokens, as the model's own ``generate``."""
        inputs, settings = self._split(kwargs)
        prompt = self.adapter.encode(inputs, "generate")
        return self.adapter.generate(prompt, self.kept_tokens(prompt, query), **settings)

    @torch.no_grad()
    def kept_tokens(self, prompt: EncodedPrompt, query: QueryInput = None) -> list[Tensor] | None:
        """Per image of an encoded prompt, the visual tokens the language model gets (None: all of them)."""
        given = self.given_query(prompt, query)  # validated even when every token is kept
        if all(self.keeps_all(prompt.num_tokens(i)) for i in range(prompt.num_images)):
            return None  # the identity: every visual token, the model's own computation
        return self._allocation(prompt, self._grid_batches(prompt), given).keep

    # ---- learning -------------------------------------------------------------------------------
    def _answer_score(self, prompt: EncodedPrompt, keep: Sequence[Tensor] | None) -> Tensor:
        """(B,) the answer's log-likelihood if the prompt has labels, else the next-token logits (B, V)."""
        short = self.adapter.shorten(prompt, keep)
        logits = self.adapter.model(**self.adapter.model_inputs(short)).logits.float()
        labels = short.per_token.get("labels")
        if labels is None:
            last = (short.attention_mask * torch.arange(1, short.attention_mask.shape[1] + 1,
                                                        device=logits.device)).argmax(1)
            return logits[torch.arange(logits.shape[0]), last]
        targets = labels[:, 1:]  # logits at t predict the token at t + 1 (transformers' convention)
        log_probs = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return (log_probs * (targets != IGNORE_INDEX)).sum(1)

    @torch.no_grad()
    def relevance_target(self, prompt: EncodedPrompt) -> list[Tensor]:
        """Per image, (N_i,) importance of each visual token in [0, 1] (divided by the image's maximum): how
        much dropping its g x g group lowers the answer's log-likelihood (labels in ``prompt.per_token``) or
        moves the next-token distribution (KL). Forward passes of the frozen VLM only, batched in chunks."""
        cfg = self.vlm_config
        full = self._answer_score(prompt, None)
        jobs: list[tuple[int, Tensor]] = []  # (image, its visual tokens dropped together)
        for image, grids in enumerate(prompt.grids):
            for grid in grids:
                groups = _group_ids(grid.height, grid.width, cfg.group).to(grid.index.device)
                jobs += [(image, grid.index[groups == g]) for g in range(int(groups.max()) + 1)]
        change = torch.zeros(len(jobs), device=full.device)
        for start in range(0, len(jobs), cfg.chunk):
            chunk = jobs[start:start + cfg.chunk]
            rows = [int(prompt.image_row[image]) for image, _ in chunk]
            sub = prompt.rows(rows)
            keep = []
            for new_row, (image, dropped) in enumerate(chunk):
                own = prompt.images_of(rows[new_row])
                for other in own:
                    everything = torch.arange(prompt.num_tokens(other), device=dropped.device)
                    keep.append(everything[~torch.isin(everything, dropped)] if other == image else everything)
            reduced = self._answer_score(sub, keep)
            reference = full[rows]
            if reduced.ndim == 1:  # log-likelihoods: how much the answer became less likely
                change[start:start + len(chunk)] = reference - reduced
            else:
                change[start:start + len(chunk)] = prediction_change(reference, reduced, logits=True)
        target = [torch.zeros(prompt.num_tokens(i), device=full.device) for i in range(prompt.num_images)]
        for (image, dropped), value in zip(jobs, change):
            target[image][dropped] = value
        return [t.clamp_min(0) / t.clamp_min(0).amax().clamp_min(1e-12) for t in target]

    def learn(self, query: QueryInput = None, labels: Tensor | None = None, target: Sequence[Tensor] | None = None,
              boxes: Tensor | None = None, optimizer: torch.optim.Optimizer | None = None,
              max_grad_norm: float | None = None, **inputs: Any) -> dict[str, float]:
        """One step of every sub-network's local rule towards a forward-only target.

        labels: (B, L) answer tokens as for the model's loss (-100 elsewhere); without them the target is the
            next-token distribution's sensitivity. target: per image (N_i,) in [0, 1], instead of computing one.
        boxes: (images, 4) x0, y0, x1, y1 in the pixels of each image's grid (target 'box').
        """
        prompt = self.adapter.encode(inputs, "forward")
        if labels is not None:
            prompt.per_token["labels"] = self._check_labels(prompt, labels)
        q = self.prompt_query(prompt, query)
        was_training = self.relevance.training
        self.relevance.train()  # feature statistics follow the training stream
        try:
            with torch.no_grad():  # each rule builds its own graph; under autograd the field would build its Hessian
                batches = self._grid_batches(prompt)
                outs = [self._pass(b.pixels, b.tokens, q[b.rows]) for b in batches]
        finally:
            self.relevance.train(was_training)
        if target is None:
            target = self._target(prompt, boxes)
        elif len(target) != prompt.num_images or any(
                t.shape != (prompt.num_tokens(i),) for i, t in enumerate(target)):
            raise ValueError(f"target must give one (visual tokens,) tensor per image: "
                             f"{[prompt.num_tokens(i) for i in range(prompt.num_images)]}")
        passes = [(out, torch.stack([target[i][g.index] for (i, _), g in zip(batch.members, batch.grids)])
                   .to(out.logits.device)) for batch, out in zip(batches, outs)]
        self.apply_rules_over(passes, optimizer, max_grad_norm)
        overlaps = []
        for out, wanted in passes:
            k = num_kept(self.budget, wanted.shape[1])
            chosen = torch.zeros_like(wanted).scatter_(1, out.logits.topk(k).indices, 1.0)
            best = torch.zeros_like(wanted).scatter_(1, wanted.topk(k).indices, 1.0)
            overlaps.append((chosen * best).sum(1) / k)
        return {"target_overlap": torch.cat(overlaps).mean().item()}

    def _check_labels(self, prompt: EncodedPrompt, labels: Tensor) -> Tensor:
        if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(prompt.input_ids.shape):
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must have the shape of input_ids {tuple(prompt.input_ids.shape)}, got {got}")
        on_images = labels[prompt.input_ids == self.adapter.image_token_id]
        if bool((on_images != IGNORE_INDEX).any()):
            raise ValueError(f"labels must be {IGNORE_INDEX} on image placeholder tokens (they are not text)")
        return labels.long()

    def _target(self, prompt: EncodedPrompt, boxes: Tensor | None) -> list[Tensor]:
        if self.config.target == "perturbation":
            return self.relevance_target(prompt)
        if boxes is None or boxes.shape != (prompt.num_images, 4):
            got = None if boxes is None else tuple(boxes.shape)
            raise ValueError(f"target 'box' needs boxes (images={prompt.num_images}, 4), got {got}")
        target = []
        for image, grids in enumerate(prompt.grids):
            if len(grids) != 1:
                raise ValueError("target 'box' needs one token grid per image (LLaVA, Qwen2-VL); use 'perturbation'")
            grid = grids[0]
            t = torch.zeros(prompt.num_tokens(image), device=boxes.device)
            t[grid.index.to(boxes.device)] = box_target(boxes[image:image + 1], (grid.height, grid.width),
                                                        self.adapter.cell)[0]
            target.append(t)
        return target


def _group_ids(height: int, width: int, group: int) -> Tensor:
    """(height * width,) the g x g group of each grid cell, raster order (edge groups may be smaller)."""
    rows = torch.arange(height)[:, None] // group
    cols = torch.arange(width)[None, :] // group
    return rearrange(rows * (-(-width // group)) + cols, "h w -> (h w)")


def attach_vlm(model: nn.Module, budget: Budget | None = None, config: VLMConfig | dict | None = None,
               text_encoder: Callable[[list[str]], Tensor] | None = None, graphs: bool | None = None) -> VLMARRCOC:
    """Wrap a transformers VLM (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) so that its language model gets only
    the visual tokens ARR-COC allocates: ``attach_vlm(model, 0.25).generate(**processor_outputs)``.

    Args:
        model: the VLM (frozen; only run forward).
        budget: a ratio of each image's visual tokens in (0, 1] (1.0: the unmodified model) or a count;
            default: the config's relevance budget.
        config: a :class:`VLMConfig` or a dict of its keys.
        text_encoder: embeds ``query=`` sentences; without one the prompt's own text embedding is the query,
            so ``query_dim`` becomes the language model's hidden size.
        graphs: score the visual tokens at inference compiled whole and captured in CUDA graphs
            (:mod:`~arrcoc.relevance.graphs`; each new shape compiles once, falling back to eager with a warning if
            that fails); default: on CUDA.

    Returns:
        The :class:`VLMARRCOC` wrapper.
    """
    if isinstance(config, dict):
        config = VLMConfig(**config)
    config = config or VLMConfig()
    relevance = config.relevance.to_dict()
    if budget is not None:
        relevance["budget"] = budget
    if text_encoder is None:
        relevance["query_dim"] = adapt_vlm(model).feature_dim  # also rejects an unsupported model clearly
    config = dataclasses.replace(config, relevance=RelevanceConfig.from_dict(relevance))
    return VLMARRCOC(model, config, text_encoder, graphs)
