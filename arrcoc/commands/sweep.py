"""Rule-ablation sweep: train the relevance module under every combination of a grid of config
changes (a rule per sub-network, ways of knowing on/off, ...) and write one comparison table.

    arrcoc sweep --config configs/sweep.yaml [--quick]          # a toy task, in this process
    arrcoc sweep --config configs/sweep_canvas.yaml [--quick]   # a canvas task, paired over seeds

The sweep file names a task and a grid of dotted keys, e.g. ``rules.field: [{name: ep}, {name: frozen}]`` or
``participatory: [true, false]``. On a toy task (``toy-single``, ``toy-query``) every combination overrides a base
relevance config (``base``); on a canvas task (``cluttered``, ``query``) it overrides that task's relevance config
in the canvas benchmark config (``benchmark``), is trained and scored as the benchmark's ARR-COC ablations are, and is
paired with the grid's first combination over the seeds (``arrcoc.bench.ablate``). Writes ``sweep.json`` and
``sweep.md`` (with a PNG) to the output folder.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import arrcoc
from arrcoc.bench import ablate
from arrcoc.bench.canvas import load_bench
from arrcoc.config import config_file, load_yaml_mapping
from arrcoc.data.tasks import TASKS as CANVAS_TASKS
from arrcoc.data.toy_patches import TOY_TASKS
from arrcoc.models.canvas_vit import DEFAULT_CHECKPOINT
from arrcoc.models.toy_vit import toy_vit
from arrcoc.relevance import ARRCOC, RelevanceConfig
from arrcoc.reporting import output_dir, pyplot, run_metadata, save_figure, save_results


def label(value: Any) -> str:
    if isinstance(value, dict) and "name" in value:
        extras = ", ".join(f"{k}={v}" for k, v in value.items() if k != "name")
        return value["name"] + (f" ({extras})" if extras else "")
    return str(value)


def run_cell(base: Path | None, overrides: dict[str, Any], task: str, steps: int, seed: int) -> dict[str, float]:
    """The toy-task module under ``overrides`` of the ``base`` config (with box targets: toy tasks know their
    answer), trained ``steps`` steps from ``seed``: how often it ranks the answer patch first, and ms per step."""
    overrides = {"target": "box", **overrides}
    config = RelevanceConfig.from_yaml(base, overrides) if base else RelevanceConfig.from_dict(overrides)
    torch.manual_seed(seed)
    model: ARRCOC = arrcoc.attach(toy_vit(), config=config)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        batch = TOY_TASKS[task](32, g)
        model.learn(batch.images, batch.query, boxes=batch.boxes)
    step_ms = 1000 * (time.perf_counter() - start) / steps
    test = TOY_TASKS[task](400, torch.Generator().manual_seed(10_000 + seed))
    first = model.relevance_map(test.images, test.query).logits.flatten(1).argmax(1)
    return {"first_correct": 100.0 * (first == test.answer).float().mean().item(), "step_ms": step_ms}


EXAMPLES = """examples:
  arrcoc sweep --config configs/sweep.yaml                     # the committed grid, 3 seeds
  arrcoc sweep --config configs/sweep.yaml --quick --out runs/sweep   # 20 steps, one seed (smoke run)
  arrcoc bench sweep --quick                                   # the same command under `arrcoc bench`
  arrcoc sweep --config configs/sweep_canvas.yaml              # the new switches on the canvas query task
"""


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, default="configs/sweep.yaml", help="sweep file (YAML)")
    parser.add_argument("--quick", action="store_true",
                        help="20 steps, one seed (two on a canvas task): a smoke run, not a result")
    parser.add_argument("--out", help="output folder (default: benchmarks/results, or runs/quick with --quick)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for a canvas task (one thread each)")
    args = parser.parse_args(argv)
    try:
        sweep = load_yaml_mapping(args.config, known=("task", "base", "benchmark", "backbone", "grid", "steps",
                                                                      "seeds"),
                                  what="sweep")
    except (KeyError, ValueError) as error:
        parser.error(str(error).strip('"'))
    task, grid = sweep.get("task"), sweep.get("grid")
    if task not in TOY_TASKS and task not in CANVAS_TASKS:
        parser.error(f"{args.config}: unknown task {task!r}; toy tasks: {sorted(TOY_TASKS)}, canvas tasks: "
                     f"{sorted(CANVAS_TASKS)}")
    if not (isinstance(grid, dict) and grid and all(isinstance(v, list) and v for v in grid.values())):
        parser.error(f"{args.config}: grid must map dotted config keys to non-empty lists of values, got {grid!r}")
    out = output_dir(args.out, args.quick)
    if task in CANVAS_TASKS:
        if "base" in sweep:
            parser.error(f"{args.config}: a canvas task's base is its relevance config in the benchmark config "
                         f"({sweep.get('benchmark', 'configs/canvas_bench.yaml')}); 'base' is for toy tasks")
        command = f"arrcoc sweep --config {args.config}" + (" --quick" if args.quick else "")
        return canvas_sweep(sweep, grid, args.quick, args.workers, out, command)
    base = sweep.get("base")
    steps, seeds = (20, [0]) if args.quick else (sweep.get("steps", 200), sweep.get("seeds", [0, 1, 2]))

    cells = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    rows = []
    start = time.perf_counter()
    for overrides in tqdm(cells, desc=f"sweep ({sweep['task']})", unit="config"):
        runs = [run_cell(base, overrides, sweep["task"], steps, seed) for seed in seeds]
        accuracy = [r["first_correct"] for r in runs]
        rows.append({
            "overrides": overrides,
            "first_correct": accuracy,
            "first_correct_mean": statistics.fmean(accuracy),
            "first_correct_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
            "step_ms": statistics.fmean(r["step_ms"] for r in runs),
        })
    meta = run_metadata("arrcoc sweep" + (" --quick" if args.quick else ""), args.quick, task=sweep["task"],
                        steps=steps, seeds=seeds, wall_seconds=time.perf_counter() - start)
    return save_results(out, "sweep", {"meta": meta, "grid": grid, "rows": rows}, write_report(rows, grid, meta, out))


def changes(cell: dict[str, Any], base: dict[str, Any]) -> str:
    """A combination's name: the keys where it differs from the base, e.g. 'neighbourhood: 0, field: False'."""
    return ", ".join(f"{k}: {label(v)}" for k, v in cell.items() if v != base[k])


def canvas_sweep(sweep: dict[str, Any], grid: dict[str, list], quick: bool, workers: int, out: Path,
                 command: str) -> Path:
    """The grid on a canvas task: each combination trained on every seed, paired with the first combination;
    writes ``sweep_<task>.json``, ``.md`` and ``.png``. ``quick``: 20 steps, two seeds, 100 test canvases (a smoke
    run, not a result)."""
    task, path = sweep["task"], config_file(sweep.get("benchmark", "configs/canvas_bench.yaml"))
    bench = load_bench(str(path), quick=False)
    if task not in bench["tasks"]:
        raise ValueError(f"task {task!r} is not a task of {path}: {list(bench['tasks'])}")
    seeds = [0, 1] if quick else sweep.get("seeds", [0, 1, 2, 3])
    if len(seeds) < 2:
        raise ValueError(f"a canvas sweep pairs over seeds: give at least two, got {seeds}")
    steps, test_images = (20, 100) if quick else (sweep.get("steps"), None)
    cells = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    names = [ablate.BASE, *(changes(cell, cells[0]) for cell in cells[1:])]
    start = time.perf_counter()
    backbone = Path(sweep.get("backbone", DEFAULT_CHECKPOINT))
    scores = ablate.run_variants(copy.deepcopy(bench), task, dict(zip(names, cells)), seeds, workers, backbone,
                                 steps=steps, test_images=test_images)
    rows = ablate.paired_table(scores)
    meta = run_metadata(command, quick, task=task, seeds=seeds,
                        base=cells[0], steps=steps or bench["train"]["steps"][task],
                        test_images=test_images or bench["test_images"], wall_seconds=time.perf_counter() - start)
    name = f"sweep_{task}"
    ablate.plot(rows, out / f"{name}.png")
    report = ablate.markdown(rows, meta, title="Switch sweep", figure=f"{name}.png")
    return save_results(out, name, {"meta": meta, "grid": grid, "rows": rows, "scores": scores}, report)


def write_report(rows: list[dict], grid: dict, meta: dict, out: Path) -> str:
    """Draws ``sweep.png`` into ``out``; returns the Markdown report."""
    plt = pyplot()
    names = [" / ".join(label(r["overrides"][k]) for k in grid) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ax.barh(names, [r["first_correct_mean"] for r in rows], xerr=[r["first_correct_std"] for r in rows], capsize=3)
    ax.set_xlabel("target patch ranked first (%)")
    ax.set_title(f"rule ablation on {meta['task']} ({meta['mode']})")
    ax.invert_yaxis()
    save_figure(fig, out / "sweep.png")
    lines = [
        f"# Rule-ablation sweep: {meta['task']} ({meta['mode']})",
        "",
        f"Command: `{meta['command']}`; {meta['steps']} training steps of 32 images, seeds {meta['seeds']}, "
        f"held-out 400 images per seed; torch {meta['torch']}, {meta['threads']} threads.",
        "",
        "| " + " | ".join(grid) + " | target first (%) | step (ms) |",
        "|" + "---|" * (len(grid) + 2),
    ]
    for r in rows:
        cells = " | ".join(label(r["overrides"][k]) for k in grid)
        lines.append(f"| {cells} | {r['first_correct_mean']:.1f} ± {r['first_correct_std']:.1f} | {r['step_ms']:.0f} |")
    lines += ["", f"Wall time: {meta['wall_seconds']:.0f} s.", "", "![sweep](sweep.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
