"""The global-backprop baseline (DynamicViT-style), for comparison with the local rules.

The same relevance module scores the patches, but the scorer is trained end to end by the task loss *through the
frozen backbone*; the backbone's weights never change, but the gradient flows through it: this is what ARR-COC's
local rules avoid (memory, step time, biological plausibility).

How the choice of K patches is made differentiable: a perturbed top-K (Berthet et al. 2020, "Learning with
differentiable perturbed optimizers"; as Cordonnier et al. 2021, "Differentiable patch selection for image
recognition", use it for patches). Forward, the budget logits are perturbed by Gaussian noise (std ``sigma``)
``samples`` times; each draw keeps exactly K patches (its top K, in raster order), and slot k of the backbone's
input is the mean over draws of the patch each draw put in slot k. The backbone therefore runs on exactly K patch
tokens plus its prefix, as at inference, where the module keeps its plain top K (the limit sigma -> 0).
Backward, the gradient of the expected selection is estimated from the same draws (E[selection x noise] / sigma,
the mean over draws subtracted as a control variate). The loss is the cross-entropy of the backbone's output
against the labels; the module's gradient norm is clipped (``max_grad_norm``; without it the participatory
coupling's first gradient, ~3e7 through its per-image standardisation, stalls Adam and the query is never used).
The relevance field is differentiated through its equilibrium (:func:`~arrcoc.rules.relaxation.relax_differentiably`),
so every sub-network of the module, the field included, learns from the task loss.

Why not DynamicViT's own relaxation (a Gumbel-sigmoid keep mask m as the attention key bias log(m), plus a
keep-ratio penalty): trained that way the allocator scored 33-41% on the canvas query task at 12.5%, random-K
level, because training sees a soft, leaky mask and inference a hard top K (docs/decisions.md, "The DynamicViT-style
baseline").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from arrcoc.backbones import TokenSet, top_k
from arrcoc.budget import num_kept
from arrcoc.relevance.attach import ARRCOC
from arrcoc.relevance.wrapper import QueryInput

from .module_backprop import training_pass


@dataclass
class GlobalBackpropConfig:
    """Settings of the DynamicViT-style baseline; the defaults are the best measured on the canvas query task
    (docs/decisions.md)."""

    sigma: float = 1.0  # std of the Gaussian noise added to the budget logits in each draw
    samples: int = 100  # perturbed draws per image: the gradient estimate's sample count
    max_grad_norm: float | None = 10.0  # clip the module's gradient norm to this (None: no clipping)

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not (isinstance(self.samples, int) and self.samples >= 2):
            raise ValueError(f"samples must be an integer >= 2 (the control variate is their mean), got {self.samples}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


class PerturbedTopK(torch.autograd.Function):
    """(B, N) scores -> (B, K, N) slot weights: row k is the share of draws that put each patch in slot k."""

    @staticmethod
    def forward(ctx, scores: Tensor, k: int, sigma: float, samples: int) -> Tensor:
        batch, n = scores.shape
        noise = torch.randn(batch, samples, n, device=scores.device, dtype=scores.dtype)
        index = (scores[:, None] + sigma * noise).topk(k, -1).indices.sort(-1).values  # (B, S, K), raster order
        weights = scores.new_zeros(batch, k, n).scatter_add_(
            2, index.transpose(1, 2), scores.new_full((batch, k, samples), 1.0 / samples))
        ctx.save_for_backward(index, noise)
        ctx.sigma = sigma
        return weights

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        index, noise = ctx.saved_tensors
        samples = index.shape[1]
        # each draw's loss gradient along its own selection, minus the mean over draws (a control variate)
        per_draw = grad[:, None].expand(-1, samples, -1, -1).gather(3, index[..., None]).sum((2, 3))
        per_draw = per_draw - per_draw.mean(1, keepdim=True)
        return torch.einsum("bs,bsn->bn", per_draw, noise) / (samples * ctx.sigma), None, None, None


def perturbed_top_k(scores: Tensor, k: int, sigma: float, samples: int) -> Tensor:
    """(B, K, N) weights of the patches in each of K slots, averaged over ``samples`` top-K choices of the scores
    perturbed by Gaussian noise of std ``sigma``; differentiable in ``scores`` (the perturbed-optimizer estimate)."""
    return PerturbedTopK.apply(scores, k, sigma, samples)


def global_backprop_grads(model: ARRCOC, images: Tensor, labels: Tensor, query: QueryInput = None,
                          config: GlobalBackpropConfig | None = None) -> dict[str, float]:
    """Fill the relevance module's .grad (cleared first) with the gradient of the cross-entropy of the backbone's
    output on the module's perturbed top K, differentiated through the frozen backbone; no weight changes (an
    optimizer applies it: :func:`global_backprop_step`, or :class:`~arrcoc.training.Trainer` with
    ``learning="global"``).

    Returns:
        ``loss``: the cross-entropy, mean over the images.
    """
    cfg = config or GlobalBackpropConfig()
    out, state = training_pass(model, images, query)
    k = num_kept(model.budget, out.logits.shape[1])
    slots = perturbed_top_k(out.logits, k, cfg.sigma, cfg.samples)
    patches = torch.einsum("bkn,bnd->bkd", slots.to(state.tokens.dtype), state.tokens[:, state.num_prefix:])
    chosen = TokenSet(torch.cat([state.prefix, patches], 1), state.num_prefix, top_k(out.logits.detach(), k))
    loss = F.cross_entropy(model.adapter.head(model.adapter.run_blocks(chosen)), labels)
    model.relevance.zero_grad(set_to_none=True)
    loss.backward()
    return {"loss": loss.item()}


def global_backprop_step(model: ARRCOC, images: Tensor, labels: Tensor, query: QueryInput = None,
                         config: GlobalBackpropConfig | None = None) -> dict[str, float]:
    """One step of the DynamicViT-style baseline (:func:`global_backprop_grads`), applied by the module's optimizer
    with the gradient norm clipped to ``config.max_grad_norm``."""
    cfg = config or GlobalBackpropConfig()
    metrics = global_backprop_grads(model, images, labels, query, cfg)
    model.step_optimizer(max_grad_norm=cfg.max_grad_norm)
    return metrics
