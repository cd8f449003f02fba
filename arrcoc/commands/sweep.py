"""Rule-ablation sweep: train the relevance module under every combination of a grid of config
changes (a rule per sub-network, ways of knowing on/off, ...) and write one comparison table.

    arrcoc sweep --config configs/sweep.yaml [--quick]

The sweep file names a task, a base relevance config and a grid of dotted keys, e.g.
``rules.field: [{name: ep}, {name: frozen}]`` or ``participatory: [true, false]``. Writes
``sweep.json`` and ``sweep.md`` (with a PNG of the accuracies) to the output folder.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import arrcoc
from arrcoc.config import config_file, load_yaml_mapping
from arrcoc.data.tasks import TASKS as CANVAS_TASKS
from arrcoc.data.toy_patches import TOY_TASKS
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
  arrcoc bench ablate --task query --grid configs/switches.yaml    # a grid on a canvas task, paired over seeds
"""


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, default="configs/sweep.yaml", help="sweep file (YAML)")
    parser.add_argument("--quick", action="store_true", help="20 steps, one seed: a smoke run, not a result")
    parser.add_argument("--out", help="output folder (default: benchmarks/results, or runs/quick with --quick)")
    args = parser.parse_args(argv)
    try:
        sweep = load_yaml_mapping(args.config, known=("task", "base", "grid", "steps", "seeds"), what="sweep")
    except (KeyError, ValueError) as error:
        parser.error(str(error).strip('"'))
    if sweep.get("task") in CANVAS_TASKS:
        parser.error(f"{args.config}: the canvas tasks are swept under the canvas benchmark, paired over seeds: "
                     f"arrcoc bench ablate --task {sweep['task']} --grid FILE (e.g. configs/switches.yaml)")
    if sweep.get("task") not in TOY_TASKS:
        parser.error(f"{args.config}: unknown task {sweep.get('task')!r}; tasks: {sorted(TOY_TASKS)}")
    base = sweep.get("base")
    grid: dict[str, list] = sweep["grid"]
    steps, seeds = (20, [0]) if args.quick else (sweep.get("steps", 200), sweep.get("seeds", [0, 1, 2]))
    out = output_dir(args.out, args.quick)

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
