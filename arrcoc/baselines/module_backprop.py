"""ARR-COC all-backprop: the reference for the local rules.

The same relevance module, target, optimizer and schedule as :meth:`~arrcoc.relevance.attach.ARRCOC.learn`, but
every sub-network is trained by autograd on one loss instead of by its own local rule: the binary cross-entropy of
the budget logits against what the local rules' ranking learns, the target's kept set
(:meth:`~arrcoc.relevance.wrapper.RelevanceWrapper.ranking_target`). Its gradient flows end to end inside the
module: relevance field, differentiated through its equilibrium (:func:`~arrcoc.rules.relaxation.relax_differentiably`)
-> allocator and the three ways of knowing -> perspectival readout and encoder, participatory coupling. The
backbone's features enter detached: unlike the DynamicViT-style baseline (:mod:`.global_backprop`), no gradient
flows through the backbone. What the local rules lose (or gain) against this reference is what their locality
costs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from arrcoc.backbones import TokenSet
from arrcoc.relevance.attach import ARRCOC
from arrcoc.relevance.module import RelevanceOutput
from arrcoc.relevance.wrapper import QueryInput


def training_pass(model: ARRCOC, images: Tensor, query: QueryInput) -> tuple[RelevanceOutput, TokenSet]:
    """The relevance module's pass with autograd recorded (the field through its equilibrium) and its feature
    statistics following the training stream, as in ``learn()``: what both backprop references train on."""
    was_training = model.relevance.training
    model.relevance.train()
    try:
        out, state, _ = model.relevance_pass(images, query, differentiable=True)
    finally:
        model.relevance.train(was_training)
    return out, state


def module_backprop_grads(model: ARRCOC, images: Tensor, query: QueryInput = None, boxes: Tensor | None = None,
                          labels: Tensor | None = None) -> dict[str, float]:
    """Fill the relevance module's .grad (cleared first) with the autograd gradient of the whole module towards its
    configured target; no weight changes (an optimizer applies it: :func:`module_backprop_step`, or
    :class:`~arrcoc.training.Trainer` with ``learning="backprop"``).

    Args:
        model: the attached model (its rules are not used).
        images: (B, C, H, W) as the backbone takes them.
        query: (B, query_dim) embeddings, strings, or None.
        boxes: (B, 4) pixel boxes (target 'box').
        labels: (B,) class indices (target 'reward').

    Returns:
        ``loss``: the binary cross-entropy, summed over the patches, mean over the images.
    """
    out, state = training_pass(model, images, query)
    target = model.training_target(out, state, images, boxes, labels).to(out.logits.dtype)
    target = model.ranking_target(out, target)
    # without lateral terms the allocator's local rule descends exactly this loss's gradient in the logits
    loss = F.binary_cross_entropy_with_logits(out.logits, target, reduction="sum") / target.shape[0]
    model.relevance.zero_grad(set_to_none=True)
    loss.backward()
    return {"loss": loss.item()}


def module_backprop_step(model: ARRCOC, images: Tensor, query: QueryInput = None, boxes: Tensor | None = None,
                         labels: Tensor | None = None, max_grad_norm: float | None = None) -> dict[str, float]:
    """One autograd step of the whole relevance module towards its configured target (:func:`module_backprop_grads`),
    applied by its optimizer, the gradient norm clipped to ``max_grad_norm`` if given (as ``learn`` does)."""
    metrics = module_backprop_grads(model, images, query, boxes, labels)
    model.step_optimizer(max_grad_norm=max_grad_norm)
    return metrics
