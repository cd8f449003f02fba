"""Small helpers shared by the benchmark commands."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[2]


def find_config(path: str | Path) -> Path:
    """A config path as given, else relative to the source checkout (editable installs)."""
    candidate = Path(path)
    for option in (candidate, REPO_ROOT / candidate):
        if option.is_file():
            return option
    raise FileNotFoundError(f"config file {str(path)!r} not found (looked in . and {REPO_ROOT})")


def save_json_atomic(path: Path, data: object) -> None:
    """Write to a temporary file beside ``path`` and rename it over: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_weights_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """``path`` (.safetensors) and its ``.json`` twin (``metadata``), each written to a temporary file and
    renamed over, world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    save_json_atomic(path.with_suffix(".json"), metadata)
    os.chmod(path.with_suffix(".json"), 0o644)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: float
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def timed(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> float:
    """Seconds one call of ``fn`` takes; ``sync`` waits for queued device work (e.g. ``torch.cuda.synchronize``)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start
