"""``arrcoc.attach``: wrap a frozen ViT so that it runs on the tokens the relevance module allocates.

    model = arrcoc.attach(timm.create_model("vit_small_patch16_224", pretrained=True), budget=0.25)
    logits = model(images)                       # or model(images, query=embeddings_or_strings)
    model.learn(images, query)                   # one step of every sub-network's local rule
    model.adapt(images)                          # label-free online adaptation, with rollback
    model.save_pretrained("dir"); ARRCOC.from_pretrained("dir", backbone)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from arrcoc.backbones import (
    TierCounts,
    TokenSet,
    adapt_backbone,
    assign_tiers,
    keep_top_k,
    region_scores,
    select,
    tiered_tokens,
    top_k,
)
from arrcoc.budget import Budget, num_kept
from arrcoc.rules.distributed import batch_mean

from .adaptation import AdaptationConfig, AdaptReport, OnlineAdaptation
from .checkpoint import read_checkpoint
from .graphs import GraphedForward
from .module import RelevanceConfig, RelevanceModule, RelevanceOutput
from .targets import attention_target, box_target, perturbation_target, set_target
from .wrapper import QueryInput, RelevanceWrapper


@dataclass
class RelevanceMaps:
    """Per-patch maps for one batch, each (B, grid_h, grid_w), plus the kept patch indices (B, K)."""

    relevance: Tensor
    propositional: Tensor
    perspectival: Tensor
    participatory: Tensor
    logits: Tensor
    kept: Tensor


class ARRCOC(RelevanceWrapper, nn.Module):
    """A frozen ViT that runs on the patch tokens its relevance module allocates, per image and query.

    Build it with :func:`attach`. The backbone is frozen and only ever run forward: no gradient reaches it.
    Each sub-network of the relevance module learns with its own local rule (:meth:`learn`), online too
    (:meth:`adapt`).

    Args:
        model: a timm ``VisionTransformer`` or a transformers ViT / CLIP / SigLIP / DINOv2 vision model (see
            :func:`arrcoc.backbones.adapt_backbone`).
        config: the relevance module's settings, budget included (default: ``RelevanceConfig()``).
        text_encoder: turns a list of sentences into (n, query_dim) embeddings, for string queries.
        adaptation: the settings of online adaptation (default: ``AdaptationConfig()``).
        graphs: run inference compiled whole and captured in CUDA graphs (:mod:`~arrcoc.relevance.graphs`; each
            new input shape compiles once, falling back to eager with a warning if that fails); default: on CUDA.
    """

    def __init__(
        self,
        model: nn.Module,
        config: RelevanceConfig | None = None,
        text_encoder: Callable[[list[str]], Tensor] | None = None,
        adaptation: AdaptationConfig | None = None,
        graphs: bool | None = None,
    ):
        super().__init__()
        self.graphs = graphs
        self._graphed: GraphedForward | None = None
        self.config = config or RelevanceConfig()
        self.adapter = adapt_backbone(model)  # frozen, eval mode
        self.text_encoder = text_encoder
        self.adaptation = adaptation or AdaptationConfig()
        weight = next(self.adapter.model.parameters())
        probe = weight.new_zeros(1, self.adapter.in_chans, *self.adapter.image_size)
        with torch.no_grad():
            token_dim = self.adapter.embed(probe).shape[-1]
        # built where the backbone is, before the rules' optimizer takes its parameters
        self.relevance = RelevanceModule(self.config, token_dim, self.adapter.patch_size).to(weight.device)
        self._build_rules()
        self.online = OnlineAdaptation(self)
        self._reward_baseline: Tensor | None = None
        self.eval()  # ready for inference; learn() switches to training mode only while it runs

    # ---- inputs -------------------------------------------------------------------------------
    @staticmethod
    def _images(images: Tensor | None, pixel_values: Tensor | None) -> Tensor:
        """The batch given positionally or, as transformers models take it, as ``pixel_values``."""
        if (images is None) == (pixel_values is None):
            raise TypeError("give the images once: model(images) or model(pixel_values=images)")
        return images if images is not None else pixel_values

    def check_images(self, images: Tensor) -> None:
        self.adapter.check_images(images)
        if images.shape[0] == 0:
            raise ValueError("images must hold at least one image, got a batch of 0")
        self.check_finite("images", images)

    # ---- the pass -----------------------------------------------------------------------------
    def relevance_pass(self, images: Tensor, query: QueryInput = None, differentiable: bool = False
                       ) -> tuple[RelevanceOutput, TokenSet, tuple[int, int]]:
        """Validate the inputs, embed the images (never differentiated) and run the relevance module.

        Args:
            images: (B, C, H, W) as the backbone takes them.
            query: (B, query_dim) embeddings, one string or a list of strings (with a text encoder), or None.
            differentiable: record autograd through the relevance module, its field's equilibrium included
                (only the backprop references in :mod:`arrcoc.baselines`).

        Returns:
            The module's output (budget logits, relevance, evidence), the images' embedded tokens, and the
            patch grid (height, width).
        """
        self.check_images(images)
        return self._checked_pass(images, query, differentiable)

    def _checked_pass(self, images: Tensor, query: QueryInput, differentiable: bool = False
                      ) -> tuple[RelevanceOutput, TokenSet, tuple[int, int]]:
        """:meth:`relevance_pass` on images already checked (the forward pass checks them once)."""
        return self._module_pass(images, self.encode_query(query, images.shape[0]), differentiable)

    def _module_pass(self, images: Tensor, query: Tensor | None, differentiable: bool = False
                     ) -> tuple[RelevanceOutput, TokenSet, tuple[int, int]]:
        """The relevance module on checked images and encoded queries (B, query_dim) or None."""
        grid = self.adapter.grid(images)
        with torch.no_grad():
            state = self.adapter.tokens(images)
        with torch.set_grad_enabled(differentiable):
            out = self.relevance(images, state.patches, (grid.height, grid.width), query)
        return out, state, (grid.height, grid.width)

    def forward(self, images: Tensor | None = None, query: QueryInput = None, *,
                pixel_values: Tensor | None = None) -> Tensor:
        """The backbone's output on the allocated tokens.

        Args:
            images: (B, C, H, W) as the backbone takes them (transformers users may pass ``pixel_values=``).
            query: (B, query_dim) embeddings, one string or a list of strings (with a text encoder), or None.

        Returns:
            What the backbone's head returns (logits, or pooled features for a headless model). With a budget
            that keeps every token, exactly the unmodified model's output.
        """
        images = self._images(images, pixel_values)
        self.check_images(images)
        q = self.encode_query(query, images.shape[0])
        if self.keeps_all(self.adapter.grid(images).num_patches):  # every token: the original computation
            return self.adapter(images)
        if self.config.tiers:
            out, _, (h, w) = self._module_pass(images, q)
            return self.adapter.head(self.adapter.run_blocks(tiered_tokens(self.adapter, images,
                                                                          self.tiers(out.logits, h, w))))
        if self.graphs_wanted(images):
            return self.graphed.run(images, q)
        return self.reduced_forward(images, q)

    def reduced_forward(self, images: Tensor, query: Tensor | None) -> Tensor:
        """The backbone on the top K tokens of checked images, ``query`` encoded: what :meth:`forward` runs, and
        what its graph-captured path compiles whole (no host sync, no data-dependent Python branch)."""
        out, state, _ = self._module_pass(images, query)
        # the top K of the logits; EViT-style fusion weighs the dropped tokens by non-negative scores
        scores = out.logits if self.config.dropped == "discard" else torch.sigmoid(out.logits)
        reduced = keep_top_k(state, scores, self.budget, dropped=self.config.dropped, metric=state.patches)
        return self.adapter.head(self.adapter.run_blocks(reduced))

    def graph_target(self) -> Callable[..., Tensor]:
        return self.reduced_forward

    def tier_counts(self, height: int, width: int) -> TierCounts:
        """Regions per tier: ``refined_regions`` refined, the rest merged or normal, with the largest
        exact total that fits the budget (a tier change moves the total by 3 tokens)."""
        if height % 2 or width % 2:
            raise ValueError(f"tiers group the patches in 2x2 regions: the patch grid must have even sides, got "
                             f"{height}x{width}")
        regions, budget = (height // 2) * (width // 2), num_kept(self.budget, height * width)
        refined = self.config.refined_regions
        lowest = regions + 15 * refined  # every region merged except the refined ones
        if budget < lowest or refined > regions:
            raise ValueError(
                f"a budget of {budget} patch tokens is infeasible for tiers with {refined} refined regions on a "
                f"{height}x{width} grid: it needs at least {lowest} (one token per 2x2 region, 16 per refined one)"
            )
        total = budget - (budget - lowest) % 3
        return TierCounts.for_total(regions, min(total, 4 * regions + 12 * refined), refined)

    def tiers(self, logits: Tensor, height: int, width: int) -> Tensor:
        """(B, regions) tier of every 2x2-patch region, the most relevant regions in the finest tiers."""
        counts = self.tier_counts(height, width)  # validates the grid first
        return assign_tiers(region_scores(logits, height, width), counts)

    @torch.no_grad()
    def relevance_map(self, images: Tensor | None = None, query: QueryInput = None, *,
                      pixel_values: Tensor | None = None) -> RelevanceMaps:
        """Relevance, the three ways of knowing, the budget logits (each (B, grid_h, grid_w)) and the kept
        patch indices (B, K) of a batch: what the model would keep, and why."""
        out, _, (h, w) = self.relevance_pass(self._images(images, pixel_values), query)
        k = num_kept(self.budget, h * w)

        def grid(t: Tensor) -> Tensor:
            return t.reshape(t.shape[0], h, w)

        return RelevanceMaps(grid(out.relevance), *(grid(out.evidence[..., i]) for i in range(3)),
                             grid(out.logits), top_k(out.logits, k))

    # ---- learning -----------------------------------------------------------------------------
    @torch.no_grad()
    def relevance_target(self, images: Tensor, boxes: Tensor | None = None, state: TokenSet | None = None,
                         kind: str | None = None, query: QueryInput = None) -> Tensor:
        """(B, N) the forward-only target ``kind`` (default: the configured one; see
        :mod:`arrcoc.relevance.targets`); ``state``: the images' embedded tokens, if already computed; ``query``:
        what the module is asked (the set target scores the module's own choice)."""
        kind = kind or self.config.target
        if kind == "set":
            out, state, _ = self.relevance_pass(images, query)
            return self.training_target(out, state, images, boxes, None, kind)
        grid = self.adapter.grid(images)
        if kind == "box":
            if boxes is None:
                raise ValueError("target 'box' needs boxes (batch, 4) for every image, got boxes=None")
            return box_target(boxes, (grid.height, grid.width), self.adapter.patch_size)
        if kind == "reward":
            raise ValueError("the 'reward' target depends on the module's own choice: it is made inside learn()")
        state = self.adapter.tokens(images) if state is None else state
        if kind == "attention":
            return attention_target(self.adapter, state)
        return perturbation_target(self.adapter, state, (grid.height, grid.width))

    @torch.no_grad()
    def reward_target(self, out: RelevanceOutput, state: TokenSet, labels: Tensor | None) -> Tensor:
        """Three-factor target: move each patch's keep probability p towards the choice that was made
        (the top-K mask m) in proportion to the reward R of that choice minus its running mean b:
        t = p + (R - b)(m - p). R = the reduced prediction is right (labels), or agrees with the
        full-token prediction (no labels)."""
        k = num_kept(self.budget, out.logits.shape[1])
        kept = top_k(out.logits, k)
        mask = torch.zeros_like(out.logits).scatter_(1, kept, 1.0)
        reduced = self.adapter.head(self.adapter.run_blocks(select(state, kept))).argmax(-1)
        reference = labels if labels is not None else self.adapter.head(self.adapter.run_blocks(state)).argmax(-1)
        reward = (reduced == reference).float()
        batch_reward = batch_mean(reward)  # of the whole batch, also when it is sharded over processes
        baseline = batch_reward if self._reward_baseline is None else self._reward_baseline
        self._reward_baseline = 0.9 * baseline + 0.1 * batch_reward
        p = torch.sigmoid(out.logits)
        return (p + (reward - baseline)[:, None] * (mask - p)).clamp(0, 1)

    def training_target(self, out: RelevanceOutput, state: TokenSet, images: Tensor, boxes: Tensor | None,
                        labels: Tensor | None, kind: str | None = None) -> Tensor:
        """(B, N) what a training step on the pass ``out`` learns towards: the target ``kind`` (default: the
        configured one; the reward and set targets judge the choice ``out`` made)."""
        kind = kind or self.config.target
        if kind == "reward":
            return self.reward_target(out, state, labels)
        if kind == "set":
            return set_target(self.adapter, state, out.logits, num_kept(self.budget, out.logits.shape[1]), labels)
        return self.relevance_target(images, boxes, state, kind)

    def learn(self, images: Tensor, query: QueryInput = None, target: Tensor | str | None = None,
              boxes: Tensor | None = None, labels: Tensor | None = None,
              optimizer: torch.optim.Optimizer | None = None, max_grad_norm: float | None = None) -> dict[str, float]:
        """One step: every sub-network's rule fills its .grad (:meth:`fill_grads`), then the optimizer steps.
        ``target``: (B, N) per patch, or the name of a target made on this step's pass (default: the configured one).

        If any rule fails (a diverging relaxation, a non-finite update), no weight, buffer or optimizer
        state changes; the error is raised.
        """
        metrics = self.fill_grads(images, query, target, boxes, labels)
        self.step_optimizer(optimizer, max_grad_norm)
        return metrics

    def fill_grads(self, images: Tensor, query: QueryInput = None, target: Tensor | str | None = None,
                   boxes: Tensor | None = None, labels: Tensor | None = None) -> dict[str, float]:
        """Clear every .grad of the relevance module, then let each sub-network's rule fill its own.

        Changes no weight: an optimizer (after an all-reduce of the .grad, under torchrun) applies it.
        All or nothing: if any rule fails, every .grad is cleared and the buffers (feature statistics,
        rule state) and reward baseline are restored to what they were; the error is raised.
        """
        buffers = [b for m in (self.relevance, self.rules) for b in m.buffers()]
        saved = [b.clone() for b in buffers], self._reward_baseline
        self.relevance.zero_grad(set_to_none=True)
        try:
            return self._fill_grads(images, query, target, boxes, labels)
        except Exception:
            self.relevance.zero_grad(set_to_none=True)
            for b, value in zip(buffers, saved[0]):
                b.copy_(value)
            self._reward_baseline = saved[1]
            raise

    def _fill_grads(self, images: Tensor, query: QueryInput, target: Tensor | str | None, boxes: Tensor | None,
                    labels: Tensor | None) -> dict[str, float]:
        was_training = self.relevance.training
        self.relevance.train()  # feature statistics follow the training stream
        try:
            out, state, (h, w) = self.relevance_pass(images, query)
        finally:
            self.relevance.train(was_training)
        if labels is not None and (labels.shape != images.shape[:1] or labels.is_floating_point()):
            raise ValueError(f"labels must be ({images.shape[0]},) class indices (one per image), got "
                             f"{tuple(labels.shape)} {labels.dtype}")
        if target is None or isinstance(target, str):  # a kind of target, made on this pass
            target = self.training_target(out, state, images, boxes, labels, target)
        self.fill_rule_grads([(out, target)])
        k = num_kept(self.budget, h * w)
        chosen = torch.zeros_like(out.logits).scatter_(1, top_k(out.logits, k), 1.0)
        wanted = torch.zeros_like(target).scatter_(1, top_k(target, k), 1.0)
        return {"target_overlap": ((chosen * wanted).sum(1) / k).mean().item()}

    # ---- online adaptation ---------------------------------------------------------------------
    @torch.no_grad()
    def agreement(self, images: Tensor, query: QueryInput = None) -> Tensor:
        """(B,) 1 where the prediction at the budget equals the full-token prediction: a label-free proxy."""
        return (self(images, query).argmax(-1) == self.adapter(images).argmax(-1)).float()

    def adapt(self, images: Tensor, query: QueryInput = None) -> AdaptReport:
        """One label-free online step (:class:`~arrcoc.relevance.adaptation.OnlineAdaptation`, settings in
        ``self.adaptation``).

        Learns towards a self-supervised target (perturbation importance or the backbone's CLS attention) with
        bounded updates. If the running agreement of the reduced with the full-token prediction falls
        ``rollback_drop`` below its best, the last good weights come back. With a clean probe
        (:meth:`set_probe`), an update after which the probe does not show, with confidence, that at most
        ``probe_max_drop`` of the frozen module's agreement was lost is undone. An update that diverges is
        skipped and reported, never written into the weights.

        Args:
            images: (B, C, H, W) a batch of the stream, as the backbone takes it.
            query: optional query embeddings (B, query_dim) or strings.

        Returns:
            An :class:`AdaptReport`: agreement, whether it rolled back, was rejected by the probe or skipped.
        """
        return self.online.step(images, query)

    def set_probe(self, images: Tensor, query: QueryInput = None) -> float:
        """Guard online adaptation with clean, unlabelled, in-distribution images.

        Their full-token predictions (computed once: the backbone is frozen) are what the reduced predictions
        must keep agreeing with, image by image, about as often as the module does now (see
        ``AdaptationConfig.probe_max_drop``).

        Returns:
            The module's agreement on the probe now: the reference.
        """
        return self.online.set_probe(images, query)

    def fork(self, adaptation: AdaptationConfig | None = None) -> ARRCOC:
        """A new wrapper on the same frozen backbone (shared, not copied) with a copy of this relevance module's
        config and weights, and its own optimizer, rule state and online-adaptation state.

        Args:
            adaptation: the fork's online-adaptation settings (default: this model's).

        Returns:
            The fork; adapting it leaves this model unchanged.
        """
        fork = ARRCOC(self.adapter.model, self.config, self.text_encoder, adaptation or self.adaptation, self.graphs)
        fork.relevance.load_state_dict(self.relevance.state_dict())
        return fork

    # ---- checkpoints (save_pretrained: RelevanceWrapper) ------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: nn.Module, **kwargs: Any) -> ARRCOC:
        meta, tensors = read_checkpoint(directory)
        wrapped = cls(model, RelevanceConfig.from_dict(meta["config"]), **kwargs)
        wrapped.load_checkpoint_tensors(tensors, meta, directory)
        return wrapped


def attach(model: nn.Module, budget: Budget | None = None, config: RelevanceConfig | dict | None = None,
           **kwargs: Any) -> ARRCOC:
    """Wrap a frozen timm / transformers ViT so that it runs on the tokens ARR-COC allocates.

    Args:
        model: the ViT (it is frozen and put in eval mode; its weights never change).
        budget: the share of patch tokens kept (a float in (0, 1]; 1.0 keeps all and runs the model unmodified)
            or their count (an int); default: the config's budget.
        config: a :class:`RelevanceConfig` or a dict of its keys (default: ``RelevanceConfig()``).
        **kwargs: ``text_encoder`` and ``adaptation``, see :class:`ARRCOC`.

    Returns:
        The :class:`ARRCOC` wrapper: ``attach(model, budget=0.25)(images, query=None)``.
    """
    if config is not None and not isinstance(config, RelevanceConfig | dict):
        raise TypeError(f"config must be a RelevanceConfig or a dict of its keys, got {type(config).__name__}")
    if isinstance(config, dict):
        config = RelevanceConfig.from_dict(config)
    config = config or RelevanceConfig()
    if budget is not None:
        config = dataclasses.replace(config, budget=budget)  # validates
    return ARRCOC(model, config, **kwargs)
