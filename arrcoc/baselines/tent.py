"""TENT (Wang et al. 2021) as the backprop reference for online adaptation: entropy minimisation of the
reduced prediction over the backbone's norm layers, with the gradient through the backbone."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from arrcoc.backbones import select, top_k
from arrcoc.budget import num_kept
from arrcoc.relevance import ARRCOC, attach


class Tent:
    """A copy of ``model`` (its relevance module frozen as it is) whose backbone's LayerNorm affine parameters
    adapt online by entropy minimisation; ``model`` itself is left untouched."""

    def __init__(self, model: ARRCOC, lr: float = 1e-3, momentum: float = 0.9):
        backbone = copy.deepcopy(model.adapter.model)
        self.model = attach(backbone, config=model.config)
        self.model.relevance.load_state_dict(model.relevance.state_dict())
        norms = [p for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()]
        for p in norms:
            p.requires_grad_(True)
        self.optimizer = torch.optim.SGD(norms, lr=lr, momentum=momentum)

    def step(self, images: Tensor) -> Tensor:
        """One step on ``images``; returns the logits it predicted before the step."""
        model, adapter = self.model, self.model.adapter
        with torch.no_grad():
            out, state, _ = model.relevance_pass(images)
        with torch.enable_grad():
            kept = top_k(out.logits, num_kept(model.budget, out.logits.shape[1]))
            logits = adapter.head(adapter.run_blocks(select(state, kept)))
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
            self.optimizer.zero_grad(set_to_none=True)
            entropy.backward()
            self.optimizer.step()
        return logits.detach()
