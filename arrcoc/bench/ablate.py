"""Probe designs of the relevance module on one canvas task: variants paired against a base, before the benchmark.

    arrcoc bench ablate --task cluttered --variants '{"field: frozen": {"rules.field": {"name": "frozen"}}}'
    arrcoc bench ablate --task query --base '{"ablate.kept_set": false}' --variants v.yaml --budgets 0.03125
    arrcoc bench ablate --task query --grid configs/switches.yaml --out benchmarks/results/switches_query

The base (the task's relevance config in the benchmark config, plus ``--base``'s dotted overrides) and every variant
(``--variants``: name -> dotted overrides on top of the base, as JSON or a YAML file; or ``--grid``: dotted key ->
values, every combination a variant and the first the base) are trained and scored as
``arrcoc bench canvas`` trains and scores its ARR-COC ablations (the same job, steps and test canvases per seed): at
the task's budget, the hard regime's where it is this task, the task's ``ablation_budgets`` and ``--budgets``, on
the shift split where the task has one, and on its held-out layout at its ``held_out_layout`` budgets. Writes
``ablate.json``, ``ablate.md`` (each variant's paired difference to the base with its 95% interval) and
``ablate.png``. The canvas benchmark's ablation table stays the committed
measurement; this is how a redesign is tried first (docs/decisions.md names the probes it ran).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from arrcoc.config import load_yaml_mapping
from arrcoc.metrics import interval, paired_interval
from arrcoc.models.canvas_vit import DEFAULT_CHECKPOINT
from arrcoc.reporting import command_line, output_dir, pyplot, run_metadata, save_figure, save_results

from .canvas import RunPaths, run_job
from .canvas_settings import BenchSettings, load_bench

BASE = "base"
SCORES = {"accuracy": "test", "shift_accuracy": "shift", "layout_accuracy": "layout"}  # run_job's keys -> columns


def overrides_arg(text: str, what: str) -> dict[str, Any]:
    """A mapping given as JSON / YAML text or as the path of a YAML file."""
    if Path(text).is_file():
        return load_yaml_mapping(text, what=what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{what} is neither a YAML file nor valid JSON / YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a mapping (JSON, YAML or a YAML file), got {text!r}")
    return data


def grid_variants(grid: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Every combination of a grid's values: the first (each key's first value, the base) and the others by name,
    each named by where it differs from the first (e.g. "ablate.kept_set: False, ablate.propositional: False")."""
    if not (grid and all(isinstance(values, list) and values for values in grid.values())):
        raise ValueError(f"--grid must map dotted config keys to non-empty lists of values, got {grid!r}")
    first, *others = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return first, {", ".join(f"{k}: {v}" for k, v in cell.items() if v != first[k]): cell for cell in others}


def columns(result: dict[str, Any]) -> dict[str, float]:
    """One job's scores as {"test 0.25": accuracy, "shift 0.0625": ...}."""
    return {f"{prefix} {budget}": value for key, prefix in SCORES.items()
            for budget, value in result.get(key, {}).items()}


def paired_table(scores: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Per variant and column: its mean accuracy and its paired difference to the base (mean, 95% half-width)."""
    rows = []
    for name, per_column in scores.items():
        row: dict[str, Any] = {"variant": name}
        for column, values in per_column.items():
            cell = {"accuracy": interval(values)}
            if name != BASE:
                cell["difference"] = paired_interval(values, scores[BASE][column])
            row[column] = cell
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    names = [c for c in rows[0] if c != "variant"]
    lines = [f"# Relevance-module variants on the {meta['task']} task", "",
             f"Command: `{meta['command']}` ({meta['wall_seconds'] / 60:.1f} min, code at commit {meta['commit']}). "
             f"Seeds {meta['seeds']}; base overrides {meta['base']}. Each cell: accuracy (mean ± 95% interval over the "
             "seeds) and, for a variant, its paired difference to the base.", "",
             "| variant | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        cells = []
        for column in names:
            mean, half = row[column]["accuracy"]
            text = f"{mean:.1f} ± {half:.1f}"
            if "difference" in row[column]:
                diff, dhalf = row[column]["difference"]
                text += f" ({diff:+.1f} ± {dhalf:.1f})"
            cells.append(text)
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "![paired differences](ablate.png)", ""])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    variants = [r for r in rows if r["variant"] != BASE]
    names = [c for c in rows[0] if c != "variant"]
    label_width = 0.07 * max((len(r["variant"]) for r in variants), default=0)  # inches, at the tick labels' size
    fig, ax = plt.subplots(figsize=(6 + label_width, 0.5 + 0.45 * max(1, len(variants)) * len(names) ** 0.5))
    height = 0.8 / len(names)
    for k, column in enumerate(names):
        ys = [i + k * height for i in range(len(variants))]
        diffs = [r[column]["difference"] for r in variants]
        ax.errorbar([d for d, _ in diffs], ys, xerr=[h for _, h in diffs], fmt="o", capsize=3, label=column)
    ax.axvline(0, color="grey", lw=0.8)
    for threshold in (-2, 2):
        ax.axvline(threshold, color="grey", lw=0.6, ls=":")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(variants))], [r["variant"] for r in variants])
    ax.invert_yaxis()
    ax.set_xlabel("accuracy difference to the base (points, paired 95% interval)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def settings_of_probe(bench: BenchSettings, args: argparse.Namespace) -> BenchSettings:
    """The benchmark's settings for ``--task`` alone, with ``--budgets`` among its ablation budgets and the
    ``--steps`` and ``--test-images`` given."""
    task = bench.tasks[args.task]
    task = dataclasses.replace(task, ablation_budgets=list(dict.fromkeys([*task.ablation_budgets, *args.budgets])))
    steps = bench.train.steps if args.steps is None else {**bench.train.steps, args.task: args.steps}
    return dataclasses.replace(bench, tasks={args.task: task}, train=dataclasses.replace(bench.train, steps=steps),
                               test_images=bench.test_images if args.test_images is None else args.test_images)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, help="a task of the benchmark config (cluttered | query)")
    designs = parser.add_mutually_exclusive_group(required=True)
    designs.add_argument("--variants", help="name -> dotted overrides: JSON / YAML text or a file")
    designs.add_argument("--grid", help="dotted key -> list of values: every combination is a variant, paired with "
                                        "the first (the base); JSON / YAML text or a file")
    parser.add_argument("--base", default="{}", help="dotted overrides every run gets (the design under test)")
    parser.add_argument("--config", default="configs/canvas_bench.yaml")
    parser.add_argument("--backbone", type=Path, default=DEFAULT_CHECKPOINT, help="canvas ViT checkpoint")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--budgets", type=float, nargs="*", default=[], help="more budgets to score at")
    parser.add_argument("--steps", type=int, help="training steps (default: the benchmark's for the task)")
    parser.add_argument("--test-images", type=int, help="test canvases per seed (default: the benchmark's)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablate"))
    args = parser.parse_args(argv)
    bench = load_bench(args.config, quick=False)
    if args.task not in bench.tasks:
        raise ValueError(f"--task {args.task!r} is not a task of {args.config}: {list(bench.tasks)}")
    base = overrides_arg(args.base, "--base")
    if args.grid is not None:
        first, variants = grid_variants(overrides_arg(args.grid, "--grid"))
        base = {**base, **first}
    else:
        variants = overrides_arg(args.variants, "--variants")
    if BASE in variants or not all(isinstance(v, dict) for v in variants.values()):
        raise ValueError(f"--variants must map names (not {BASE!r}) to mappings of dotted overrides, got {variants!r}")
    if len(args.seeds) < 2:
        raise ValueError(f"--seeds needs at least two seeds for a paired interval, got {args.seeds}")
    if not all(0 < b < 1 for b in args.budgets):
        raise ValueError(f"--budgets must be token fractions in (0, 1), got {args.budgets}")
    bench = settings_of_probe(bench, args)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="arrcoc-ablate-") as scratch:  # run_job saves only the benchmark's model
        paths = RunPaths(backbone=args.backbone, model_dir=Path(scratch), scratch_dir=Path(scratch))
        jobs = [{"kind": "arrcoc", "task": args.task, "seed": seed, "bench": bench, "paths": paths, "method": name,
                 "overrides": {**base, **overrides}, "learning": "local", "all_budgets": False}
                for name, overrides in {BASE: {}, **variants}.items() for seed in args.seeds]
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(tqdm(pool.map(run_job, jobs), total=len(jobs), desc="variants x seeds", unit="job"))
    scores: dict[str, dict[str, list[float]]] = {}
    for job, result in zip(jobs, results):  # jobs are in seed order within each variant: the pairs line up
        for column, value in columns(result).items():
            scores.setdefault(job["method"], {}).setdefault(column, []).append(value)
    rows = paired_table(scores)
    meta = run_metadata(command_line("arrcoc.bench.ablate", argv), None, task=args.task, seeds=args.seeds,
                        base=base, variants=variants, steps=bench.train.steps[args.task],
                        test_images=bench.test_images, wall_seconds=time.perf_counter() - start)
    out = output_dir(args.out, quick=False)
    plot(rows, out / "ablate.png")
    return save_results(out, "ablate", {"meta": meta, "rows": rows, "scores": scores}, markdown(rows, meta))


if __name__ == "__main__":
    main()
