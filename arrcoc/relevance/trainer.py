"""Trainer for the relevance module: local rules, a standard optimizer and schedule, progress, checkpoints.

    trainer = Trainer(wrapped, TrainerConfig(epochs=3, checkpoint_dir="runs/arrcoc", checkpoint_every=100))
    history = trainer.fit(batches)               # batches: an iterable (re-iterable per epoch) of Batch
    history = trainer.fit(batches, resume=True)  # after a crash: continue from the newest training checkpoint

Every step: each sub-network's rule fills its own .grad (``wrapped.fill_grads``), the .grad is all-reduced
over the processes when run under ``torchrun``, the optimizer steps. Under ``torchrun`` each process
iterates its own shard of the data (:func:`distributed_loader`, a ``DistributedSampler``); the batch-coupled
computations see the whole batch (:mod:`arrcoc.rules.distributed`), so N processes on batches of B/N make
the update one process makes on batches of B. Only rank 0 writes checkpoints.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from arrcoc.optim import warmup_cosine
from arrcoc.rules.distributed import all_reduce_grads, sharded_batch

from .attach import ARRCOC, QueryInput
from .training_state import (
    TrainingProgress,
    latest_training_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)


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
    checkpoint_dir: str | None = None  # save_pretrained after every epoch, training checkpoints in training/
    progress: bool = True
    checkpoint_every: int = 0  # also a resumable training checkpoint every this many steps (0: epoch ends only)
    keep_checkpoints: int = 2  # newest training checkpoints kept

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError(f"checkpoint_every must be >= 0 and keep_checkpoints >= 1, got "
                             f"{self.checkpoint_every} and {self.keep_checkpoints}")


def world() -> tuple[int, int]:
    """(rank, number of processes) of the default process group; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed_loader(dataset: Dataset, batch_size: int, collate_fn: Callable[[list[Any]], Batch],
                       seed: int = 0, shuffle: bool = True) -> DataLoader:
    """This process's shard of ``dataset`` in batches of ``batch_size`` (per process): a ``DistributedSampler``
    over the default process group (one replica without torch.distributed), shuffled from ``seed`` and the
    epoch (the trainer sets it), so every epoch's order is reproducible, also when resuming. Global batch k is
    the same set of samples whatever the number of processes, as long as that number divides the dataset
    (otherwise the sampler repeats a few samples to even out the shards)."""
    rank, size = world()
    sampler = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed))  # never draws from the global RNG


class Trainer:
    def __init__(self, model: ARRCOC, config: TrainerConfig | None = None):
        self.model, self.config = model, config or TrainerConfig()

    def _schedule(self, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        return warmup_cosine(self.model.optimizer, total_steps, self.config.warmup_steps, decay=self.config.schedule)

    @property
    def training_dir(self) -> Path | None:
        return Path(self.config.checkpoint_dir) / "training" if self.config.checkpoint_dir else None

    def _schedule_config(self, total_steps: int) -> dict[str, Any]:
        """What the learning-rate schedule depends on: a resumed run must have the same."""
        cfg = self.config
        return {"epochs": cfg.epochs, "schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps,
                "total_steps": total_steps}

    def fit(self, batches: Iterable[Batch], resume: bool = False) -> list[dict[str, float]]:
        """Train for ``epochs`` passes over ``batches``; returns one metrics dict per step (of this call).

        ``resume``: continue from the newest training checkpoint in ``checkpoint_dir/training`` (if there is
        none, start from the beginning). With the same data order (a re-iterable sequence, or
        :func:`distributed_loader`) the result equals an uninterrupted run's.
        """
        cfg, model = self.config, self.model
        rank, world_size = world()
        steps_per_epoch = len(batches) if hasattr(batches, "__len__") else None
        total_steps = cfg.epochs * steps_per_epoch if steps_per_epoch else 10**9
        schedule = self._schedule(total_steps)
        schedule_config = self._schedule_config(total_steps)
        progress = TrainingProgress(world_size=world_size)
        if resume:
            if self.training_dir is None:
                raise ValueError("resume=True needs TrainerConfig.checkpoint_dir (where the training checkpoints are)")
            latest = latest_training_checkpoint(self.training_dir)
            if latest is not None:
                progress = load_training_checkpoint(latest, model, model.optimizer, schedule, schedule_config,
                                                    world_size)
        if world_size > 1:
            self._broadcast_module_state()
        history: list[dict[str, float]] = []
        for epoch in range(progress.epoch, cfg.epochs):
            iterator = self._epoch_iterator(batches, epoch, progress)
            bar = tqdm(iterator, total=steps_per_epoch, initial=progress.step_in_epoch,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress or rank != 0)
            for batch in bar:
                metrics = self._step(batch)
                schedule.step()
                metrics["lr"] = schedule.get_last_lr()[0]
                history.append(metrics)
                bar.set_postfix(overlap=f"{metrics['target_overlap']:.3f}")
                progress.step += 1
                progress.step_in_epoch += 1
                epoch_done = progress.step_in_epoch == steps_per_epoch and cfg.checkpoint_dir  # saved below
                if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0 and not epoch_done:
                    self._save(progress, schedule, schedule_config)
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
            if cfg.checkpoint_dir:
                self._save(progress, schedule, schedule_config, export=True)
        return history

    def _step(self, batch: Batch) -> dict[str, float]:
        model = self.model
        with sharded_batch():  # a no-op in one process
            metrics = model.fill_grads(batch.images, batch.query, target=batch.target, boxes=batch.boxes,
                                       labels=batch.labels)
            all_reduce_grads(model.relevance.parameters(), shard_size=batch.images.shape[0])
        model.optimizer.step()
        return metrics

    def _epoch_iterator(self, batches: Iterable[Batch], epoch: int, progress: TrainingProgress) -> Iterable[Batch]:
        """The epoch's batches from where ``progress`` stands, with the RNG where an uninterrupted run has it."""
        sampler = getattr(batches, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        resuming_mid_epoch = progress.step_in_epoch > 0
        if progress.rng is not None:
            # making the iterator may draw from the RNG (a shuffling loader): draw what the original run drew
            torch.set_rng_state(progress.epoch_rng if resuming_mid_epoch else progress.rng)
        progress.epoch_rng = torch.get_rng_state()
        iterator = iter(batches)
        for _ in range(progress.step_in_epoch):  # the batches this epoch already trained on
            next(iterator, None)
        if progress.rng is not None:
            if resuming_mid_epoch:
                torch.set_rng_state(progress.rng)
            if progress.cuda_rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(progress.cuda_rng)
            progress.rng, progress.cuda_rng = None, []  # restored once
        return iterator

    def _save(self, progress: TrainingProgress, schedule: torch.optim.lr_scheduler.LRScheduler,
              schedule_config: dict[str, Any], export: bool = False) -> None:
        rank, world_size = world()
        if rank == 0:
            progress.rng = torch.get_rng_state()
            progress.cuda_rng = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []
            if export:
                self.model.save_pretrained(Path(self.config.checkpoint_dir))
            save_training_checkpoint(self.training_dir, self.model, self.model.optimizer, schedule, progress,
                                     schedule_config, keep=self.config.keep_checkpoints)
            progress.rng, progress.cuda_rng = None, []
        if world_size > 1:
            dist.barrier()  # nobody runs ahead of a checkpoint rank 0 is still writing

    def _broadcast_module_state(self) -> None:
        """Every process starts from rank 0's weights and buffers (as DDP does)."""
        for module in (self.model.relevance, self.model.rules):
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                dist.broadcast(tensor.data, src=0)
