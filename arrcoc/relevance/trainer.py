"""Trainer for the relevance module: local rules, a standard optimizer and schedule, progress, checkpoints.

    trainer = Trainer(wrapped, TrainerConfig(epochs=3, checkpoint_dir="runs/arrcoc"))
    history = trainer.fit(batches)      # batches: an iterable (re-iterable per epoch) of Batch

Every step is ``wrapped.learn``: each sub-network's rule fills its own .grad, the optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from .attach import ARRCOC, QueryInput


@dataclass
class Batch:
    images: Tensor
    query: QueryInput = None
    target: Tensor | None = None  # (B, N) relevance target; else the model's configured target
    boxes: Tensor | None = None  # for the 'box' target
    labels: Tensor | None = None  # for the 'reward' target (without them it rewards agreement with full tokens)


@dataclass
class TrainerConfig:
    epochs: int = 1
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    checkpoint_dir: str | None = None  # save_pretrained after every epoch
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")


class Trainer:
    def __init__(self, model: ARRCOC, config: TrainerConfig | None = None):
        self.model, self.config = model, config or TrainerConfig()

    def _schedule(self, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        cfg = self.config

        def factor(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            if cfg.schedule == "constant":
                return 1.0
            progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(self.model.optimizer, factor)

    def fit(self, batches: Iterable[Batch]) -> list[dict[str, float]]:
        """Train for ``epochs`` passes over ``batches``; returns one metrics dict per step."""
        cfg = self.config
        steps_per_epoch = len(batches) if hasattr(batches, "__len__") else None
        schedule = self._schedule(cfg.epochs * steps_per_epoch if steps_per_epoch else 10**9)
        history: list[dict[str, float]] = []
        for epoch in range(cfg.epochs):
            bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress)
            for batch in bar:
                metrics = self.model.learn(batch.images, batch.query, target=batch.target, boxes=batch.boxes,
                                           labels=batch.labels)
                schedule.step()
                metrics["lr"] = schedule.get_last_lr()[0]
                history.append(metrics)
                bar.set_postfix(overlap=f"{metrics['target_overlap']:.3f}")
            if cfg.checkpoint_dir:
                self.model.save_pretrained(Path(cfg.checkpoint_dir))
        return history
