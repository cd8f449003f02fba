"""Run by tests/test_faults.py in a subprocess: SIGKILL a process at every step of a save.

A save is a sequence of file-system events (a safetensors file written, a rename, a removal). For each event
k, a forked child starts saving checkpoint B over a folder that holds checkpoint A, stops at event k (after a
safetensors write, with the file cut to half its size, as a kill in mid-write leaves it) and is killed with
SIGKILL; then the folder is loaded. It must load, as A before the save's commit point and as B after it.
Writes {kind: [[k, event, "previous" | "new" | error], ...]} as JSON to the path given on the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # no thread pool in the parent: fork is safe

import arrcoc  # noqa: E402
import arrcoc.relevance.checkpoint as checkpoint_module  # noqa: E402
import arrcoc.relevance.training_state as training_state  # noqa: E402
from arrcoc.models.toy_vit import toy_vit  # noqa: E402
from arrcoc.training import Trainer, TrainerConfig  # noqa: E402

PAUSE_AT = -1  # the event the child stops at (-1: never)
EVENTS: list[str] = []
SIGNAL_FD = -1


def event(name: str, path: object) -> None:
    EVENTS.append(f"{name} {Path(str(path)).name}")
    if len(EVENTS) - 1 == PAUSE_AT:
        os.write(SIGNAL_FD, b"paused")
        time.sleep(600)  # killed here


def patch_file_system() -> None:
    real_replace, real_rmtree, real_unlink = os.replace, shutil.rmtree, Path.unlink

    def save_file(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        if len(EVENTS) == PAUSE_AT:  # killed in mid-write: half the file is on disk
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
        event("wrote", filename)

    def replace(src, dst, *args, **kwargs):
        event("rename to", dst)
        return real_replace(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        event("remove folder", path)
        return real_rmtree(path, *args, **kwargs)

    def unlink(self, *args, **kwargs):
        event("remove", self)
        return real_unlink(self, *args, **kwargs)

    real_save_file = checkpoint_module.save_file
    checkpoint_module.save_file = training_state.save_file = save_file
    os.replace, shutil.rmtree, Path.unlink = replace, rmtree, unlink


def model_state(seed: int) -> arrcoc.ARRCOC:
    backbone = toy_vit()
    torch.manual_seed(seed)
    model = arrcoc.attach(backbone, budget=0.5, config={"target": "attention"})
    model.learn(torch.rand(4, 3, 32, 32))
    return model


def relevance_weights(model: arrcoc.ARRCOC) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.relevance.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def save_pretrained(model: arrcoc.ARRCOC, folder: Path) -> None:
    model.save_pretrained(folder)


def load_pretrained(folder: Path) -> dict[str, torch.Tensor]:
    return relevance_weights(arrcoc.ARRCOC.from_pretrained(folder, toy_vit()))


def training_checkpoint(step: int):
    def save(model: arrcoc.ARRCOC, folder: Path) -> None:
        trainer = Trainer(model, TrainerConfig(progress=False))
        progress = training_state.TrainingProgress(step=step, rng=torch.get_rng_state())
        training_state.save_training_checkpoint(folder, model, model.optimizer, trainer._schedule(10), progress,
                                                trainer._schedule_config(10), keep=1)
    return save


def load_training(folder: Path) -> dict[str, torch.Tensor]:
    model = arrcoc.attach(toy_vit(), budget=0.5, config={"target": "attention"})
    trainer = Trainer(model, TrainerConfig(progress=False))
    latest = training_state.latest_training_checkpoint(folder)
    training_state.load_training_checkpoint(latest, model, model.optimizer, trainer._schedule(10),
                                            trainer._schedule_config(10), world_size=1)
    return relevance_weights(model)


def kill_at_every_event(save_previous, save_new, load, previous, new) -> list[list[object]]:
    global PAUSE_AT, SIGNAL_FD
    base = Path(tempfile.mkdtemp())
    save_previous(previous, base / "previous")
    PAUSE_AT = -1
    EVENTS.clear()
    shutil.copytree(base / "previous", base / "count")
    save_new(new, base / "count")
    names = list(EVENTS)
    want_previous, want_new = relevance_weights(previous), relevance_weights(new)
    outcomes: list[list[object]] = []
    for k, name in enumerate(names):
        folder = base / f"kill{k}"
        shutil.copytree(base / "previous", folder)
        read_fd, SIGNAL_FD = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(read_fd)
            PAUSE_AT = k
            EVENTS.clear()
            save_new(new, folder)
            os._exit(0)
        os.close(SIGNAL_FD)
        os.read(read_fd, 16)  # returns once the child paused
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(read_fd)
        try:
            loaded = load(folder)
            outcome = "previous" if same(loaded, want_previous) else "new" if same(loaded, want_new) else "other"
        except Exception as error:  # reported, the test fails on it
            outcome = f"{type(error).__name__}: {error}"
        outcomes.append([k, name, outcome])
    shutil.rmtree(base)
    return outcomes


def main() -> None:
    patch_file_system()
    previous, new = model_state(0), model_state(1)
    report = {
        "save_pretrained": kill_at_every_event(save_pretrained, save_pretrained, load_pretrained, previous, new),
        "training_checkpoint": kill_at_every_event(training_checkpoint(1), training_checkpoint(2), load_training,
                                                   previous, new),
    }
    Path(sys.argv[1]).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
