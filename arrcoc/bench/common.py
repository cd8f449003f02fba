"""Small helpers shared by the benchmark commands."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from arrcoc.relevance.checkpoint import atomic_write

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
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def save_weights_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """``path`` (.safetensors) and its ``.json`` twin (``metadata``), each written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))
    save_json_atomic(path.with_suffix(".json"), metadata)


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


# ---- command-line arguments: bad values end in argparse's usage message, not a traceback -----------------
def budget_fraction(text: str) -> float:
    """argparse ``type=``: a budget as a fraction of the patch tokens, in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"budget must be a fraction of the patch tokens in (0, 1], got {text}")
    return value


def config_file(text: str) -> Path:
    """argparse ``type=``: an existing config file (see :func:`find_config`)."""
    try:
        return find_config(text)
    except FileNotFoundError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def format_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """A Markdown table of ``rows``: ``columns`` maps each row key to its header; numbers below 10 get three
    significant digits (budgets such as 0.125, speed ratios), larger ones one decimal (percentages, ms)."""

    def cell(value: Any) -> str:
        if not isinstance(value, float):
            return str(value)
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (cell(row[key]) for key in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, where the YAML file given as ``--config`` (if any) holds defaults for the
    other options (keys: their names with underscores, e.g. ``test_images: 500``); the command line wins."""
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    values = yaml.safe_load(args.config.read_text()) or {}
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    if not isinstance(values, dict) or set(values) - set(actions):
        unknown = sorted(set(values) - set(actions)) if isinstance(values, dict) else values
        parser.error(f"{args.config}: unknown setting(s) {unknown}; known: {sorted(actions)}")
    defaults = {}
    for key, value in values.items():
        convert = actions[key].type or (lambda text: text)
        try:
            defaults[key] = [convert(str(v)) for v in value] if isinstance(value, list) else (
                value if isinstance(value, bool) or value is None else convert(str(value)))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
            parser.error(f"{args.config}: {key}: {error}")
        if actions[key].choices is not None and defaults[key] not in actions[key].choices:
            parser.error(f"{args.config}: {key} must be one of {list(actions[key].choices)}, got {value!r}")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)
