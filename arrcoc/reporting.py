"""The harness of every command and benchmark that writes a report: where it writes, what it records about
the run, Markdown tables, PASS/FAIL target lines and matplotlib figures.

A benchmark is a command that measures and writes ``NAME.json`` (machine-readable), ``NAME.md`` and PNGs to
:func:`output_dir` (``benchmarks/results`` for the committed run, ``runs/quick`` for a smoke run).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from arrcoc.config import REPO_ROOT
from arrcoc.storage import save_json_atomic

RESULTS = REPO_ROOT / "benchmarks" / "results"
QUICK = REPO_ROOT / "runs" / "quick"


def output_dir(out: str | Path | None, quick: bool) -> Path:
    """``out`` if given, else the committed results folder (or ``runs/quick`` for a quick run); created."""
    folder = Path(out) if out is not None else (QUICK if quick else RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    source_commit()  # read now, as the run starts: the checkout may move on while it runs
    return folder


@functools.cache
def source_commit() -> str | None:
    """The git commit of the source checkout the benchmark ran from: ``git rev-parse HEAD`` at the first call of
    the process (a benchmark calls :func:`output_dir` as it starts), else the ``ARRCOC_SOURCE_COMMIT`` environment
    variable (a copy without its .git, as benchmarks/gpu.sh ships it), else None."""
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is None or done.returncode != 0:
        return os.environ.get("ARRCOC_SOURCE_COMMIT") or None
    return done.stdout.strip() or None


def command_line(module: str, argv: list[str] | None) -> str:
    """How a benchmark was invoked, as ``python -m MODULE ARGS`` (``argv``, else this process's arguments)."""
    return " ".join([f"python -m {module}", *(sys.argv[1:] if argv is None else argv)])


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """A device as a report names it: the GPU's name, or ``cpu (its model name)``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})"


def run_metadata(command: str, quick: bool | None = None, **extra: Any) -> dict[str, Any]:
    """What reproduces and qualifies a run: the command, versions, machine, threads, device and commit."""
    meta: dict[str, Any] = {} if quick is None else {"mode": "quick" if quick else "full"}
    meta.update({
        "command": command,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": source_commit(),
    })
    meta.update(extra)
    return meta


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None


def save_results(out: Path, name: str, data: dict[str, Any], markdown: str) -> Path:
    """``NAME.json`` (written atomically) and ``NAME.md`` in ``out``, beside the ``NAME.png`` drawn before;
    says so on stdout and returns ``out``."""
    save_json_atomic(out / f"{name}.json", data)
    (out / f"{name}.md").write_text(markdown)
    print(f"wrote {out / name}.json, .md, .png")
    return out


def verdict(passed: bool | None) -> str:
    """A target's verdict in a report: **PASS**, **FAIL**, or **NO VERDICT** (None: not measured, or the numbers
    cannot decide it; the target's text says which)."""
    return "**NO VERDICT**" if passed is None else ("**PASS**" if passed else "**FAIL**")


def target_lines(targets: list[tuple[bool | None, str]]) -> list[str]:
    """Markdown list lines ``- **PASS**: what was asked (and measured)``, one per target."""
    return [f"- {verdict(passed)}: {text}" for passed, text in targets]


def closing_lines(checks: list[tuple[str, bool | None]], wall_seconds: float, png: str, caption: str) -> list[str]:
    """The end of a benchmark's Markdown: its targets (``checks``: (what was asked, passed) pairs), its wall
    time and its figure."""
    return ["", "Targets:", "", *target_lines([(ok, text) for text, ok in checks]), "",
            f"Total wall time: {wall_seconds:.0f} s.", "", f"![{caption}]({png})", ""]


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


def pyplot():
    """``matplotlib.pyplot`` drawing to files (the Agg backend): benchmarks run without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (its folder made), laid out tight unless it has a layout engine of its own
    (e.g. ``layout="constrained"``); a pyplot figure is then freed. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    if fig.canvas.manager is not None:  # made by pyplot, which keeps it until closed
        pyplot().close(fig)
    return path
