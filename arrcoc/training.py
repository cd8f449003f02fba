"""Training the relevance module: one loop, whichever way it learns, with a schedule, progress and checkpoints.

    trainer = Trainer(wrapped, TrainerConfig(epochs=3, checkpoint_dir="runs/arrcoc", checkpoint_every=100))
    history = trainer.fit(batches)               # batches: an iterable (re-iterable per epoch) of Batch
    history = trainer.fit(batches, resume=True)  # after a crash: continue from the newest training checkpoint

Every step fills the module's .grad as ``TrainerConfig.learning`` says: ``local`` (each sub-network's own rule,
``wrapped.fill_grads``), ``backprop`` (autograd end to end inside the module towards the same target: the
all-backprop reference) or ``global`` (the task loss back-propagated through the frozen backbone: the
DynamicViT-style baseline); the .grad is all-reduced over the processes under ``torchrun``, clipped if asked, and
the optimizer steps. Under ``torchrun`` each process iterates its own shard of the data (:func:`distributed_loader`,
a ``DistributedSampler``); the batch-coupled computations see the whole batch (:mod:`arrcoc.rules.distributed`), so
N processes on batches of B/N make the update one process makes on batches of B. Only rank 0 writes checkpoints.
:func:`train_arrcoc` trains on canvas-task data for a number of steps (the canvas benchmark, the demos, the sweep).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import arrcoc
from arrcoc.baselines import GlobalBackpropConfig, global_backprop_grads, module_backprop_grads
from arrcoc.data.tasks import TaskData
from arrcoc.optim import warmup_cosine
from arrcoc.relevance import ARRCOC, RelevanceConfig
from arrcoc.relevance.training_state import (
    TrainingProgress,
    latest_training_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from arrcoc.relevance.wrapper import QueryInput
from arrcoc.rules.distributed import all_reduce_grads, sharded_batch

LEARNING = ("local", "backprop", "global")


@dataclass
class Batch:
    images: Tensor
    query: QueryInput = None
    target: Tensor | None = None  # (B, N) relevance target; else the model's configured target
    boxes: Tensor | None = None  # for the 'box' target
    labels: Tensor | None = None  # for the 'reward' target (without them it rewards agreement with full tokens), and
    # the task loss of global backprop


@dataclass
class TrainerConfig:
    """How :class:`Trainer` trains.

    Args:
        epochs: passes over the batches.
        learning: how a step fills the .grad: ``local`` | ``backprop`` | ``global`` (see the module).
        max_grad_norm: clip the module's gradient to this norm before each step (None: no clipping; ``global``
            learning then clips at :class:`~arrcoc.baselines.GlobalBackpropConfig`'s, without which it stalls).
        schedule: the step size's ``cosine`` decay to zero over the run, or ``constant``.
        warmup_steps: of linear warm-up first.
        checkpoint_dir: ``save_pretrained`` after every epoch, resumable training checkpoints in ``training/``.
        progress: a progress bar (rank 0 only).
        checkpoint_every: also a training checkpoint every this many steps (0: at the epochs' ends only).
        keep_checkpoints: newest training checkpoints kept.
    """

    epochs: int = 1
    learning: str = "local"
    max_grad_norm: float | None = None
    schedule: str = "cosine"
    warmup_steps: int = 0
    checkpoint_dir: str | None = None
    progress: bool = True
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.learning not in LEARNING:
            raise ValueError(f"learning must be one of {LEARNING}, got {self.learning!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError(f"checkpoint_every must be >= 0 and keep_checkpoints >= 1, got "
                             f"{self.checkpoint_every} and {self.keep_checkpoints}")


def fill_grads(model: ARRCOC, batch: Batch, learning: str, max_grad_norm: float | None
               ) -> tuple[dict[str, float], float | None]:
    """Fill the module's .grad from ``batch`` the ``learning`` way; returns the step's metrics and the gradient norm
    to clip at."""
    if learning == "local":
        metrics = model.fill_grads(batch.images, batch.query, target=batch.target, boxes=batch.boxes,
                                   labels=batch.labels)
        return metrics, max_grad_norm
    if learning == "backprop":
        return module_backprop_grads(model, batch.images, batch.query, boxes=batch.boxes, labels=batch.labels), \
            max_grad_norm
    if batch.labels is None:
        raise ValueError("global backprop learns from the task loss: every batch needs labels")
    config = GlobalBackpropConfig(**({} if max_grad_norm is None else {"max_grad_norm": max_grad_norm}))
    return global_backprop_grads(model, batch.images, batch.labels, batch.query, config), config.max_grad_norm


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
                bar.set_postfix({name: f"{value:.3g}" for name, value in metrics.items()})
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
            metrics, clip = fill_grads(model, batch, self.config.learning, self.config.max_grad_norm)
            all_reduce_grads(model.relevance.parameters(), shard_size=batch.images.shape[0])
        model.step_optimizer(max_grad_norm=clip)
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


class _TaskBatches(Sequence[Batch]):
    """``steps`` batches of ``batch_size`` canvases drawn in a seeded random order (cycling through the data)."""

    def __init__(self, data: TaskData, steps: int, batch_size: int, seed: int):
        self.data, self.steps, self.batch_size = data, steps, batch_size
        self.order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> Batch:
        if not 0 <= step < self.steps:
            raise IndexError(step)
        canvases = self.data.batch(self.order[(step * self.batch_size) % len(self.data):][:self.batch_size])
        return Batch(canvases.images, canvases.queries, boxes=canvases.boxes, labels=canvases.labels)


def train_arrcoc(backbone: torch.nn.Module, config: RelevanceConfig, train: TaskData, steps: int, batch_size: int,
                 seed: int, learning: str = "local", max_grad_norm: float | None = None) -> tuple[ARRCOC, float]:
    """ARR-COC attached to ``backbone`` and trained on canvas-task data by :class:`Trainer` (one epoch of ``steps``,
    the step size decaying on a cosine to zero, no progress bar or checkpoints).

    Args:
        backbone: the frozen ViT.
        config: the relevance config (its budget is the training budget).
        train: the training canvases (cycled through in a seeded random order).
        steps: optimizer steps.
        batch_size: images per step.
        seed: of the module's initialisation and the data order.
        learning: ``local`` | ``backprop`` | ``global`` (:class:`TrainerConfig`).
        max_grad_norm: clip the module's gradient norm to this in every step, if given (:class:`TrainerConfig`).

    Returns:
        The trained model (eval mode) and the mean step time in ms.
    """
    torch.manual_seed(seed)
    model = arrcoc.attach(backbone, config=config)
    batches = _TaskBatches(train, steps, batch_size, seed)
    trainer = Trainer(model, TrainerConfig(learning=learning, max_grad_norm=max_grad_norm, progress=False))
    start = time.perf_counter()
    trainer.fit(batches)
    return model.eval(), 1000 * (time.perf_counter() - start) / steps
