"""Rule-ablation sweep: train the relevance module under every combination of a grid of config
changes (a rule per sub-network, ways of knowing on/off, ...) and write one comparison table.

    python -m arrcoc.bench.sweep --config configs/sweep.yaml [--quick]

The sweep file names a task, a base relevance config and a grid of dotted keys, e.g.
``rules.field: [{name: ep}, {name: frozen}]`` or ``participatory: [true, false]``. Writes
``sweep.json`` and ``sweep.md`` (with a PNG of the accuracies) to the output folder.
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
import yaml
from tqdm import tqdm

import arrcoc
from arrcoc.data.toy_patches import TOY_TASKS, toy_vit
from arrcoc.relevance import ARRCOC, RelevanceConfig

from .common import config_file, find_config, save_json_atomic


def apply_override(config: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = config
    for key in path:
        node = node.setdefault(key, {})
    node[last] = copy.deepcopy(value)


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=YAML`` from the command line (``rules.allocator={name: backprop}``) as (dotted key, value);
    usable as an argparse ``type=``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"an override is KEY=VALUE (VALUE in YAML), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"the value of {key.strip()!r} is not valid YAML: {error}") from None


def label(value: Any) -> str:
    if isinstance(value, dict) and "name" in value:
        extras = ", ".join(f"{k}={v}" for k, v in value.items() if k != "name")
        return value["name"] + (f" ({extras})" if extras else "")
    return str(value)


def run_cell(base: dict, overrides: dict[str, Any], task: str, steps: int, seed: int) -> dict[str, float]:
    config = copy.deepcopy(base)
    for dotted, value in overrides.items():
        apply_override(config, dotted, value)
    torch.manual_seed(seed)
    model: ARRCOC = arrcoc.attach(toy_vit(), config=RelevanceConfig.from_dict(config),
                                  budget=config.get("budget", 0.25))
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
"""


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, default="configs/sweep.yaml", help="sweep file (YAML)")
    parser.add_argument("--quick", action="store_true", help="20 steps, one seed: a smoke run, not a result")
    parser.add_argument("--out", help="output folder (default: benchmarks/results, or runs/quick with --quick)")
    args = parser.parse_args(argv)
    sweep = yaml.safe_load(args.config.read_text())
    unknown = sorted(set(sweep) - {"task", "base", "grid", "steps", "seeds"})
    if unknown:
        parser.error(f"{args.config}: unknown sweep key(s) {unknown}; expected task, base, grid, steps, seeds")
    if sweep.get("task") not in TOY_TASKS:
        parser.error(f"{args.config}: unknown task {sweep.get('task')!r}; tasks: {sorted(TOY_TASKS)}")
    base = RelevanceConfig.from_yaml(find_config(sweep["base"])).to_dict() if "base" in sweep else {}
    base.update({"target": "box"})  # toy tasks know their answer boxes
    grid: dict[str, list] = sweep["grid"]
    steps, seeds = (20, [0]) if args.quick else (sweep.get("steps", 200), sweep.get("seeds", [0, 1, 2]))
    out = Path(args.out or ("runs/quick" if args.quick else "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)

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
    meta = {"mode": "quick" if args.quick else "full", "task": sweep["task"], "steps": steps, "seeds": seeds,
            "command": "python -m arrcoc.bench.sweep" + (" --quick" if args.quick else ""),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "wall_seconds": time.perf_counter() - start}
    save_json_atomic(out / "sweep.json", {"meta": meta, "grid": grid, "rows": rows})
    write_report(rows, grid, meta, out)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    return out


def write_report(rows: list[dict], grid: dict, meta: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [" / ".join(label(r["overrides"][k]) for k in grid) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ax.barh(names, [r["first_correct_mean"] for r in rows], xerr=[r["first_correct_std"] for r in rows], capsize=3)
    ax.set_xlabel("target patch ranked first (%)")
    ax.set_title(f"rule ablation on {meta['task']} ({meta['mode']})")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
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
    (out / "sweep.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
