"""``arrcoc.attach``: wrap a frozen ViT so that it runs on the tokens the relevance module allocates.

    model = arrcoc.attach(timm.create_model("vit_small_patch16_224", pretrained=True), budget=0.25)
    logits = model(images)                       # or model(images, query=embeddings_or_strings)
    model.learn(images, query)                   # one step of every sub-network's local rule
    model.adapt(images)                          # label-free online adaptation, with rollback
    model.save_pretrained("dir"); ARRCOC.from_pretrained("dir", backbone)
"""

from __future__ import annotations

import copy
import dataclasses
import math
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
    num_kept,
    region_scores,
    select,
    tiered_tokens,
    top_k,
)
from arrcoc.rules import NonFiniteUpdate
from arrcoc.rules.distributed import batch_mean
from arrcoc.rules.energy import RelaxationDiverged

from .checkpoint import read_checkpoint
from .learning import LocalRuleLearner, QueryInput, check_finite
from .module import RelevanceConfig, RelevanceModule, RelevanceOutput
from .targets import attention_target, box_target, perturbation_target


@dataclass
class RelevanceMaps:
    """Per-patch maps for one batch, each (B, grid_h, grid_w), plus the kept patch indices (B, K)."""

    relevance: Tensor
    propositional: Tensor
    perspectival: Tensor
    participatory: Tensor
    logits: Tensor
    kept: Tensor


# online-update optimizers and their default step sizes
ADAPTATION_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], float]] = {
    "sgd": (torch.optim.SGD, 0.05), "adam": (torch.optim.Adam, 3e-3)}


@dataclass
class AdaptationConfig:
    # sgd: plain SGD, so that |step| <= lr * max_grad_norm bounds the weight change of every update (the
    # reliability benchmark's guarantee). adam (lr ~3e-3): each weight moves at most ~3.2 lr per update
    # (Kingma & Ba 2015, 2.1); its per-weight step sizes adapt far faster on a clutter shift (one pass over
    # 2,048 canvases: 79.8 -> 81.3 with SGD, 85.9 with Adam; configs/canvas_bench.yaml). Its moments live
    # across adapt() calls and restart after a rollback or probe rejection.
    optimizer: str = "sgd"
    lr: float | None = None  # default per optimizer: sgd 0.05, adam 3e-3
    max_grad_norm: float = 1.0  # gradients are clipped to this norm before the step
    proxy_momentum: float = 0.9  # running agreement of the reduced with the full-token prediction
    # roll back when the running proxy falls this far below its best. The proxy of one batch of 32 is
    # noisy (std ~0.09); at 0.05 ordinary noise while learning kept undoing the learning (measured).
    rollback_drop: float = 0.15
    # the self-supervised target: perturbation importance (16 reduced forwards per image on an 8x8 grid) or
    # the backbone's own CLS attention (one forward; as good where the head reads CLS)
    target: str = "perturbation"
    # With a clean probe (set_probe), an update is kept only if the probe shows, with confidence, that the
    # agreement of the reduced with the full-token predictions lost at most `probe_max_drop` against the
    # frozen module: with g probe images gained and l lost (paired, per image),
    #     l - g + probe_confidence * sqrt(g + l) <= probe_max_drop * probe size
    # (a one-sided McNemar-style non-inferiority test; 1.64: 95%). Without the confidence term a probe of a
    # few hundred images let accuracy on other clean images fall 1.6 points (measured).
    probe_max_drop: float = 0.01
    probe_confidence: float = 1.64
    probe_chunk: int = 64  # probe images per forward pass

    def __post_init__(self) -> None:
        if self.target not in ("perturbation", "attention"):
            raise ValueError(f"adaptation target must be 'perturbation' or 'attention', got {self.target!r}")
        if self.optimizer not in ADAPTATION_OPTIMIZERS:
            raise ValueError(f"adaptation optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr is None:
            self.lr = ADAPTATION_OPTIMIZERS[self.optimizer][1]
        if not self.lr >= 0 or not self.max_grad_norm > 0:
            raise ValueError(f"adaptation needs lr >= 0 and max_grad_norm > 0, got lr={self.lr}, "
                             f"max_grad_norm={self.max_grad_norm}")


@dataclass
class AdaptReport:
    agreement: float  # fraction of images whose reduced prediction equals the full-token one
    running_agreement: float
    snapshot: bool  # the weights this call started from became the rollback point
    rolled_back: bool  # the weights were restored to the rollback point (and not updated)
    probe_agreement: float | None = None  # on the clean probe after this call (None: no probe set)
    probe_rejected: bool = False  # this call's update lowered the probe agreement too far and was undone
    skipped: str | None = None  # why no update was made (a diverging relaxation, a non-finite update)


class ARRCOC(LocalRuleLearner, nn.Module):
    def __init__(
        self,
        model: nn.Module,
        config: RelevanceConfig | None = None,
        text_encoder: Callable[[list[str]], Tensor] | None = None,
        adaptation: AdaptationConfig | None = None,
    ):
        super().__init__()
        self.config = config or RelevanceConfig()
        self.adapter = adapt_backbone(model)  # frozen, eval mode
        self.text_encoder = text_encoder
        self.adaptation = adaptation or AdaptationConfig()
        weight = next(self.adapter.model.parameters())
        probe = weight.new_zeros(1, self.adapter.in_chans, *self.adapter.image_size)
        with torch.no_grad():
            token_dim = self.adapter.embed(probe).shape[-1]
        self.relevance = RelevanceModule(self.config, token_dim, self.adapter.patch_size)
        self._build_rules()
        self._running_agreement: float | None = None
        self._best_agreement = 0.0
        self._last_good: dict[str, Tensor] | None = None
        self._adaptation_optimizer: tuple[AdaptationConfig, torch.optim.Optimizer] | None = None
        # probe images, queries, full-token predictions, and whether the frozen module agreed with them
        self._probe: tuple[Tensor, Tensor | None, Tensor, Tensor] | None = None
        self._probe_accepted: tuple[dict[str, Tensor], Tensor] | None = None  # weights that passed, their agreement
        self._reward_baseline: Tensor | None = None
        self.eval()  # ready for inference; learn() switches to training mode only while it runs

    # ---- inputs -------------------------------------------------------------------------------
    def check_images(self, images: Tensor) -> None:
        self.adapter.check_images(images)
        if images.shape[0] == 0:
            raise ValueError("images must hold at least one image, got a batch of 0")
        check_finite("images", images)

    # ---- the pass -----------------------------------------------------------------------------
    def _relevance(self, images: Tensor, query: QueryInput, differentiable: bool = False
                   ) -> tuple[RelevanceOutput, TokenSet, tuple[int, int]]:
        """Validate the inputs, embed the images (never differentiated) and run the relevance module
        (with autograd only for the global-backprop baseline)."""
        self.check_images(images)
        q = self.encode_query(query, images.shape[0])
        grid = self.adapter.grid(images)
        with torch.no_grad():
            state = self.adapter.tokens(images)
        # the small relevance module keeps its own precision under autocast: its relaxation needs it
        with torch.set_grad_enabled(differentiable), torch.autocast(images.device.type, enabled=False):
            out = self.relevance(images, state.patches, (grid.height, grid.width), q)
        return out, state, (grid.height, grid.width)

    def forward(self, images: Tensor, query: QueryInput = None) -> Tensor:
        if self.config.budget == 1.0:  # the identity: every token, the original computation
            self.check_images(images)
            self.encode_query(query, images.shape[0])
            return self.adapter(images)
        out, state, (h, w) = self._relevance(images, query)
        if self.config.tiers:
            reduced = tiered_tokens(self.adapter, images, self.tiers(out.logits, h, w))
        else:
            scores = torch.sigmoid(out.logits).to(state.tokens.dtype)  # non-negative, for EViT-style fusion
            reduced = keep_top_k(state, scores, self._budget(), dropped=self.config.dropped, metric=state.patches)
        return self.adapter.head(self.adapter.run_blocks(reduced))

    def set_budget(self, budget: float) -> ARRCOC:
        """Keep a different share of the tokens from now on, without retraining: the allocator's ranking is
        budget-free; the field's competition term pulls its total relevance towards the new K."""
        self.config = dataclasses.replace(self.config, budget=budget)  # validates
        self.relevance.config = self.config
        self.relevance.field.budget = budget
        return self

    def tier_counts(self, height: int, width: int) -> TierCounts:
        """Regions per tier: ``refined_regions`` refined, the rest merged or normal, with the largest
        exact total that fits the budget (a tier change moves the total by 3 tokens)."""
        if height % 2 or width % 2:
            raise ValueError(f"tiers group the patches in 2x2 regions: the patch grid must have even sides, got "
                             f"{height}x{width}")
        regions, budget = (height // 2) * (width // 2), num_kept(self._budget(), height * width)
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
    def relevance_map(self, images: Tensor, query: QueryInput = None) -> RelevanceMaps:
        out, _, (h, w) = self._relevance(images, query)
        k = num_kept(self._budget(), h * w)

        def grid(t: Tensor) -> Tensor:
            return t.reshape(t.shape[0], h, w)

        return RelevanceMaps(grid(out.relevance), *(grid(out.evidence[..., i]) for i in range(3)),
                             grid(out.logits), top_k(out.logits, k))

    # ---- learning -----------------------------------------------------------------------------
    @torch.no_grad()
    def relevance_target(self, images: Tensor, boxes: Tensor | None = None, state: TokenSet | None = None,
                         kind: str | None = None) -> Tensor:
        """(B, N) the forward-only target ``kind`` (default: the configured one; see
        :mod:`arrcoc.relevance.targets`); ``state``: the images' embedded tokens, if already computed."""
        kind = kind or self.config.target
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
        k = num_kept(self._budget(), out.logits.shape[1])
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

    def learn(self, images: Tensor, query: QueryInput = None, target: Tensor | None = None,
              boxes: Tensor | None = None, labels: Tensor | None = None,
              optimizer: torch.optim.Optimizer | None = None, max_grad_norm: float | None = None) -> dict[str, float]:
        """One step: every sub-network's rule fills its .grad (:meth:`fill_grads`), then the optimizer steps.

        If any rule fails (a diverging relaxation, a non-finite update), no weight, buffer or optimizer
        state changes; the error is raised.
        """
        metrics = self.fill_grads(images, query, target, boxes, labels)
        self.step_optimizer(optimizer, max_grad_norm)
        return metrics

    def fill_grads(self, images: Tensor, query: QueryInput = None, target: Tensor | None = None,
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

    def _fill_grads(self, images: Tensor, query: QueryInput, target: Tensor | None, boxes: Tensor | None,
                    labels: Tensor | None) -> dict[str, float]:
        was_training = self.relevance.training
        self.relevance.train()  # feature statistics follow the training stream
        try:
            out, state, (h, w) = self._relevance(images, query)
        finally:
            self.relevance.train(was_training)
        if labels is not None and (labels.shape != images.shape[:1] or labels.is_floating_point()):
            raise ValueError(f"labels must be ({images.shape[0]},) class indices (one per image), got "
                             f"{tuple(labels.shape)} {labels.dtype}")
        if target is None and self.config.target == "reward":
            target = self.reward_target(out, state, labels)
        elif target is None:
            target = self.relevance_target(images, boxes, state)
        self.fill_rule_grads([(out, target)])
        k = num_kept(self._budget(), h * w)
        chosen = torch.zeros_like(out.logits).scatter_(1, top_k(out.logits, k), 1.0)
        wanted = torch.zeros_like(target).scatter_(1, top_k(target, k), 1.0)
        return {"target_overlap": ((chosen * wanted).sum(1) / k).mean().item()}

    # ---- online adaptation ---------------------------------------------------------------------
    @torch.no_grad()
    def agreement(self, images: Tensor, query: QueryInput = None) -> Tensor:
        """(B,) 1 where the prediction at the budget equals the full-token prediction: a label-free proxy."""
        return (self(images, query).argmax(-1) == self.adapter(images).argmax(-1)).float()

    def adapt(self, images: Tensor, query: QueryInput = None) -> AdaptReport:
        """Label-free online step towards a self-supervised target (``AdaptationConfig.target``: perturbation
        importance against the full-token prediction, or the backbone's CLS attention). Updates are bounded;
        if the running proxy (agreement of the reduced with the full prediction) falls ``rollback_drop``
        below its best, the last good weights come back. With a clean probe (:meth:`set_probe`), an update
        after which the probe does not show, with confidence, that at most ``probe_max_drop`` of the frozen
        module's agreement was lost is undone. An update that diverges is skipped and reported."""
        cfg = self.adaptation
        with torch.no_grad():
            agreement = self.agreement(images, query).mean().item()
            running = self._running_agreement
            m = cfg.proxy_momentum
            running = agreement if running is None else m * running + (1 - m) * agreement
            self._running_agreement = running
            rolled_back = snapshot = False
            if running >= self._best_agreement or self._last_good is None:
                self._best_agreement = max(self._best_agreement, running)
                self._last_good, snapshot = copy.deepcopy(self.relevance.state_dict()), True
            elif running < self._best_agreement - cfg.rollback_drop:
                self.relevance.load_state_dict(self._last_good)
                self._running_agreement, rolled_back = self._best_agreement, True
                self._adaptation_optimizer = None  # the moments led here: start them afresh
        report = AdaptReport(agreement, self._running_agreement, snapshot, rolled_back)
        if not rolled_back:
            target = self.relevance_target(images, kind=cfg.target)
            try:
                self.learn(images, query, target=target, optimizer=self._online_optimizer(),
                           max_grad_norm=cfg.max_grad_norm)
            except (RelaxationDiverged, NonFiniteUpdate) as error:  # nothing changed (fill_grads is all or nothing)
                report.skipped = str(error)
        if self._probe is not None:
            agrees = self._probe_agrees()
            frozen = self._probe[3]
            gained, lost = int((agrees & ~frozen).sum()), int((~agrees & frozen).sum())
            margin = cfg.probe_max_drop * len(agrees)
            if lost - gained + cfg.probe_confidence * math.sqrt(gained + lost) > margin:
                weights, agrees = self._probe_accepted
                self.relevance.load_state_dict(weights)
                self._adaptation_optimizer = None
                report.probe_rejected = True
            else:  # every weight state that serves has passed the probe
                self._probe_accepted = copy.deepcopy(self.relevance.state_dict()), agrees
            report.probe_agreement = agrees.float().mean().item()
        return report

    def _online_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of online updates: one per ``AdaptationConfig`` object (Adam's moments carry across
        calls; assigning a new config starts afresh), its step size following ``adaptation.lr``."""
        cfg = self.adaptation
        if self._adaptation_optimizer is None or self._adaptation_optimizer[0] is not cfg:
            kind = ADAPTATION_OPTIMIZERS[cfg.optimizer][0]
            self._adaptation_optimizer = cfg, kind(self.relevance.parameters(), lr=cfg.lr)
        optimizer = self._adaptation_optimizer[1]
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
        return optimizer

    def set_probe(self, images: Tensor, query: QueryInput = None) -> float:
        """Guard online adaptation with clean, unlabelled, in-distribution images: their full-token predictions
        (the backbone is frozen: computed once) are what the reduced predictions must keep agreeing with, image
        by image, about as often as the module does now (see ``AdaptationConfig.probe_max_drop``). Returns the
        module's agreement now: the reference."""
        self.check_images(images)
        q = self.encode_query(query, images.shape[0])
        chunk = self.adaptation.probe_chunk
        with torch.no_grad():
            full = torch.cat([self.adapter(images[i:i + chunk]).argmax(-1) for i in range(0, len(images), chunk)])
        self._probe = (images, q, full, torch.ones_like(full, dtype=torch.bool))
        reference = self._probe_agrees()
        self._probe = (images, q, full, reference)
        self._probe_accepted = copy.deepcopy(self.relevance.state_dict()), reference
        return reference.float().mean().item()

    @torch.no_grad()
    def _probe_agrees(self) -> Tensor:
        """(probe size,) whether each probe image's prediction at the budget equals its full-token prediction."""
        images, q, full, _ = self._probe
        chunk = self.adaptation.probe_chunk
        reduced = [self(images[i:i + chunk], None if q is None else q[i:i + chunk]).argmax(-1)
                   for i in range(0, len(images), chunk)]
        return torch.cat(reduced) == full

    # ---- checkpoints (save_pretrained: LocalRuleLearner) ------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: nn.Module, **kwargs: Any) -> ARRCOC:
        meta, tensors = read_checkpoint(directory)
        wrapped = cls(model, RelevanceConfig.from_dict(meta["config"]), **kwargs)
        wrapped.load_checkpoint_tensors(tensors, meta, directory)
        return wrapped


def attach(model: nn.Module, budget: float = 0.25, config: RelevanceConfig | dict | None = None,
           **kwargs: Any) -> ARRCOC:
    """Wrap a timm / transformers ViT: ``attach(model, budget=0.25)(images, query=None)``."""
    if config is not None and not isinstance(config, RelevanceConfig | dict):
        raise TypeError(f"config must be a RelevanceConfig or a dict of its keys, got {type(config).__name__}")
    if isinstance(config, dict):
        config = RelevanceConfig.from_dict(config)
    config = config or RelevanceConfig()
    if budget != config.budget:
        config = RelevanceConfig.from_dict({**config.to_dict(), "budget": budget})
    return ARRCOC(model, config, **kwargs)
