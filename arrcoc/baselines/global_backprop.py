"""The global-backprop baseline (DynamicViT-style), for comparison with the local rules.

The same relevance module scores the patches, but the scorer is trained end to end by backprop
*through the frozen backbone*: a Gumbel-sigmoid keep mask m enters every attention layer as a key
bias log(m) (DynamicViT's attention masking; here through the adapters' size bias, which is exact
for hard masks), the task loss plus a keep-ratio penalty is differentiated back to the module's
parameters. The backbone's weights never change, but the gradient does flow through it: this is
what ARR-COC's local rules avoid (memory, step time, biological plausibility).
At inference it selects the top K like every other method. The relevance field is differentiated through
its equilibrium (:func:`~arrcoc.rules.energy.relax_differentiably`), so every sub-network of the module,
the field included, learns from the task loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from arrcoc.backbones import TokenSet
from arrcoc.budget import num_kept
from arrcoc.relevance.attach import ARRCOC
from arrcoc.relevance.learning import QueryInput


@dataclass
class GlobalBackpropConfig:
    temperature: float = 0.5  # of the Gumbel-sigmoid relaxation of keep/drop
    ratio_weight: float = 2.0  # weight of (mean keep - budget)^2, as in DynamicViT


def gumbel_sigmoid(logits: Tensor, temperature: float) -> Tensor:
    """A differentiable sample of Bernoulli(sigmoid(logits))."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


def global_backprop_step(model: ARRCOC, images: Tensor, labels: Tensor, query: QueryInput = None,
                         config: GlobalBackpropConfig | None = None, max_grad_norm: float | None = None
                         ) -> dict[str, float]:
    """One step of the DynamicViT-style baseline: task loss through the frozen backbone (the module's gradient
    norm clipped to ``max_grad_norm``, if given)."""
    cfg = config or GlobalBackpropConfig()
    was_training = model.relevance.training
    model.relevance.train()
    model.optimizer.zero_grad(set_to_none=True)
    out, state, _ = model.relevance_pass(images, query, differentiable=True)
    keep = gumbel_sigmoid(out.logits, cfg.temperature)
    prefix = keep.new_ones(keep.shape[0], state.num_prefix)
    soft = TokenSet(state.tokens, state.num_prefix, state.patch_index, torch.cat([prefix, keep.clamp_min(1e-6)], 1))
    logits = model.adapter.head(model.adapter.run_blocks(soft))
    budget = num_kept(model.budget, keep.shape[1]) / keep.shape[1]
    task = F.cross_entropy(logits, labels)
    loss = task + cfg.ratio_weight * (keep.mean(1) - budget).pow(2).mean()
    loss.backward()
    model.step_optimizer(max_grad_norm=max_grad_norm)
    model.relevance.train(was_training)
    return {"loss": loss.item(), "task_loss": task.item(), "keep": keep.mean().item()}
