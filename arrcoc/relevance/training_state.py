"""Resumable training checkpoints: everything a step reads, so that a resumed run equals an uninterrupted one.

A checkpoint is a folder ``step-00000120/`` holding

* ``config.json`` + weights (:meth:`ARRCOC.save_pretrained`): relevance module, rule buffers (feedback
  matrices, BCM thresholds, TP inverses) and running feature statistics; loadable by ``from_pretrained``;
* ``trainer_state.json``: schema version, step, epoch, position in the epoch, number of processes, the
  relevance and schedule configs it was trained with, the scheduler's state, the optimizer's
  hyper-parameters and scalar state, and the name and sha256 of
* ``trainer_state.safetensors``: the optimizer's tensors (Adam moments, step counts), the torch RNG states
  (now and at the start of the epoch) and the reward target's running baseline.

The folder is written under a temporary name and renamed into place, so a process killed while saving
leaves the previous checkpoints untouched and at most a ``.partial`` folder, removed by the next save.
Nothing is pickled: JSON and safetensors only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from arrcoc.storage import load_verified, read_json_object, sha256

from .attach import ARRCOC
from .checkpoint import read_checkpoint

TRAINER_SCHEMA_VERSION = 1
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainingProgress:
    """Where training stands. ``step_in_epoch`` batches of ``epoch`` are done (0: the epoch has not begun)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    world_size: int = 1
    rng: Tensor | None = field(default=None, repr=False)  # torch CPU RNG state now
    epoch_rng: Tensor | None = field(default=None, repr=False)  # ... when this epoch's data iterator was made
    cuda_rng: list[Tensor] = field(default_factory=list, repr=False)


def _to_json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists: what a stored config reads back as


def _differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        return [d for k in sorted(stored.keys() | current.keys())
                for d in _differences(stored.get(k), current.get(k), f"{prefix}{k}.")]
    return [] if stored == current else [f"{prefix[:-1]}: checkpoint {stored!r}, this run {current!r}"]


def save_training_checkpoint(directory: str | os.PathLike, model: ARRCOC, optimizer: torch.optim.Optimizer,
                             scheduler: torch.optim.lr_scheduler.LRScheduler, progress: TrainingProgress,
                             schedule_config: dict[str, Any], keep: int = 2) -> Path:
    """Write ``directory/step-{progress.step}`` atomically and keep the newest ``keep`` checkpoints."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".step-*.partial"):  # from a save that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step-{progress.step:08d}"

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        optimizer_state = optimizer.state_dict()
        tensors: dict[str, Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for index, param_state in optimizer_state["state"].items():
            for key, value in param_state.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = value
        for name, value in (("rng", progress.rng), ("epoch_rng", progress.epoch_rng)):
            if value is not None:
                tensors[name] = value
        tensors.update({f"cuda_rng.{i}": s for i, s in enumerate(progress.cuda_rng)})
        if model._reward_baseline is not None:
            tensors["reward_baseline"] = model._reward_baseline.reshape(1)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / STATE_TENSORS)
        meta = {
            "schema_version": TRAINER_SCHEMA_VERSION,
            "step": progress.step,
            "epoch": progress.epoch,
            "step_in_epoch": progress.step_in_epoch,
            "world_size": progress.world_size,
            "relevance_config": _to_json(model.config.to_dict()),
            "schedule": _to_json(schedule_config),
            "scheduler": _to_json(scheduler.state_dict()),
            "optimizer": {"class": type(optimizer).__name__, "param_groups": _to_json(optimizer_state["param_groups"]),
                          "scalars": _to_json(scalars)},
            "tensors": STATE_TENSORS,
            "tensors_sha256": sha256(folder / STATE_TENSORS),
        }
        (folder / STATE_JSON).write_text(json.dumps(meta, indent=2))

    _commit_directory(final, write)
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name))
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_training_checkpoint(directory: str | os.PathLike) -> Path | None:
    root = Path(directory)
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name)) if root.is_dir() else []
    return steps[-1] if steps else None


def load_training_checkpoint(path: str | os.PathLike, model: ARRCOC, optimizer: torch.optim.Optimizer,
                             scheduler: torch.optim.lr_scheduler.LRScheduler, schedule_config: dict[str, Any],
                             world_size: int) -> TrainingProgress:
    """Restore model, optimizer and scheduler from a training checkpoint written for the same configuration
    and number of processes (the data order depends on it); returns where training stands."""
    folder = Path(path)
    state_file = folder / STATE_JSON
    meta = read_json_object(state_file, "training checkpoint")
    if meta.get("schema_version") != TRAINER_SCHEMA_VERSION:
        raise ValueError(f"{state_file}: trainer state schema version {meta.get('schema_version')!r}, expected "
                         f"{TRAINER_SCHEMA_VERSION}")
    differences = _differences(meta.get("relevance_config"), _to_json(model.config.to_dict()), "relevance.")
    differences += _differences(meta.get("schedule"), _to_json(schedule_config), "trainer.")
    if differences:
        raise ValueError(
            f"training checkpoint {folder} was written for a different configuration; resume with the one it was "
            f"trained with or start a new run. Differences: {'; '.join(differences)}"
        )
    if meta.get("world_size") != world_size:
        raise ValueError(
            f"training checkpoint {folder} was written by {meta.get('world_size')} processes, this run has "
            f"{world_size}: resume with the same number (each process's shard of the data depends on it)"
        )
    if meta.get("optimizer", {}).get("class") != type(optimizer).__name__:
        raise ValueError(f"training checkpoint {folder} holds {meta.get('optimizer', {}).get('class')} state, "
                         f"this run's optimizer is {type(optimizer).__name__}")
    tensors = load_verified(folder / str(meta.get("tensors", "")), meta.get("tensors_sha256"), state_file)

    weights_meta, weights = read_checkpoint(folder)
    model.load_checkpoint_tensors(weights, weights_meta, folder)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    baseline = tensors.get("reward_baseline")
    model._reward_baseline = None if baseline is None else baseline.reshape(()).to(model.relevance.pixel_std.device)
    cuda_rng = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_rng.")),
                                           key=lambda k: int(k.split(".")[1]))]
    return TrainingProgress(meta["step"], meta["epoch"], meta["step_in_epoch"], meta["world_size"],
                            tensors.get("rng"), tensors.get("epoch_rng"), cuda_rng)


def _commit_directory(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder beside ``final``, then rename it into place (atomic on POSIX)."""
    partial = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        write(partial)
        partial.chmod(0o755)  # mkdtemp makes it owner-only
        if final.exists():  # the same step saved again (e.g. after a resume): swap, then drop the old one
            stale = final.with_name(f".{final.name}.stale.partial")
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


__all__ = ["TrainingProgress", "latest_training_checkpoint", "load_training_checkpoint", "save_training_checkpoint"]
