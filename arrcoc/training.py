"""A relevance module trained on canvas-task data for a number of steps: by its local rules, by backprop inside
the module (the all-backprop reference), or by the DynamicViT-style global backprop baseline; what the canvas
benchmark, the commands' demos and the sweep share.
(``arrcoc train`` runs the resumable, distributed :class:`~arrcoc.relevance.trainer.Trainer` instead.)"""

from __future__ import annotations

import time

import torch

import arrcoc
from arrcoc.baselines import GlobalBackpropConfig, global_backprop_step, module_backprop_step
from arrcoc.data.tasks import TaskData
from arrcoc.optim import warmup_cosine
from arrcoc.relevance import ARRCOC, RelevanceConfig

LEARNING = ("local", "backprop", "global")


def train_arrcoc(backbone: torch.nn.Module, config: RelevanceConfig, train: TaskData, steps: int, batch_size: int,
                 seed: int, learning: str = "local", max_grad_norm: float | None = None) -> tuple[ARRCOC, float]:
    """ARR-COC attached to ``backbone`` and trained on ``train``.

    Args:
        backbone: the frozen ViT.
        config: the relevance config (its budget is the training budget).
        train: the training canvases (cycled through in a seeded random order).
        steps: optimizer steps; the step size decays on a cosine to zero, as in ``arrcoc train``.
        batch_size: images per step.
        seed: of the module's initialisation and the data order.
        learning: ``local`` (each sub-network's own rule), ``backprop`` (autograd end to end inside the module, the
            same target: the all-backprop reference) or ``global`` (backprop through the frozen backbone).
        max_grad_norm: clip the module's gradient norm to this in every step, if given, whatever the learning
            (``global`` clips at :class:`~arrcoc.baselines.GlobalBackpropConfig`'s default, 10, unless given).

    Returns:
        The trained model (eval mode) and the mean step time in ms.
    """
    if learning not in LEARNING:
        raise ValueError(f"learning must be one of {LEARNING}, got {learning!r}")
    torch.manual_seed(seed)
    model = arrcoc.attach(backbone, config=config)
    schedule = warmup_cosine(model.optimizer, steps)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    global_config = GlobalBackpropConfig(**({} if max_grad_norm is None else {"max_grad_norm": max_grad_norm}))
    start = time.perf_counter()
    for step in range(steps):
        batch = train.batch(order[(step * batch_size) % len(train):][:batch_size])
        if learning == "local":
            model.learn(batch.images, batch.queries, boxes=batch.boxes, labels=batch.labels,
                        max_grad_norm=max_grad_norm)
        elif learning == "backprop":
            module_backprop_step(model, batch.images, batch.queries, boxes=batch.boxes, labels=batch.labels,
                                 max_grad_norm=max_grad_norm)
        else:
            global_backprop_step(model, batch.images, batch.labels, batch.queries, global_config)
        schedule.step()
    return model.eval(), 1000 * (time.perf_counter() - start) / steps
