"""Evaluate a trained relevance module (a ``save_pretrained`` folder) at several token budgets.

    python -m arrcoc.bench.evaluate --checkpoint runs/train --budgets 0.5 0.25 0.125

On test canvases of a task (composed from TEST source digits), per budget: accuracy next to the
full-token accuracy, agreement with the full-token prediction (label-free), box coverage (the share of
the target digit's patches kept) and the speed of the whole reduced forward (relevance module included)
as a ratio to the unmodified model, timed in the same run with interleaved repeats. Writes
``eval.json`` + ``eval.md`` + ``eval.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from arrcoc.relevance import ARRCOC

from .canvas import TASKS, TaskData, selection_metrics, task_data
from .common import budget_fraction, config_file, format_table, parse_with_config, save_json_atomic, timed
from .pretrain import load_canvas_vit

EXAMPLES = """examples:
  arrcoc eval --checkpoint runs/train                               # budgets 0.5 0.25 0.125
  arrcoc eval --checkpoint runs/query --task query --budgets 1 0.25 0.125 --out runs/query/eval
  arrcoc eval --checkpoint benchmarks/results/models/cluttered --test-images 2000
  arrcoc eval --checkpoint runs/train --config configs/eval.yaml  # settings from YAML
"""
COLUMNS = {"budget": "budget", "accuracy": "accuracy (%)", "full_token_accuracy": "full tokens (%)",
           "agreement": "agrees with full (%)", "box_coverage": "box coverage (%)", "speedup": "speed vs full"}


@torch.no_grad()
def speed_at_budgets(model: ARRCOC, images: Tensor, query: Tensor | None, budgets: list[float],
                     repeats: int = 5) -> dict[float, dict[str, float]]:
    """Median ms of one forward at each budget (relevance module included) and of the unmodified model,
    repeats interleaved so that load drifts hit every budget alike; ``speedup`` = full time / budget time."""
    kept = model.config.budget
    forwards = {budget: (lambda b=budget: model.set_budget(b)(images, query)) for budget in budgets}
    forwards["full"] = lambda: model.adapter(images)
    for forward in forwards.values():
        forward()  # warm-up
    times: dict[Any, list[float]] = {key: [] for key in forwards}
    for _ in tqdm(range(repeats), desc="timing", leave=False):
        for key, forward in forwards.items():
            times[key].append(timed(forward))
    model.set_budget(kept)
    full = statistics.median(times.pop("full"))
    return {budget: {"ms": 1000 * statistics.median(t), "full_ms": 1000 * full, "speedup": full / statistics.median(t)}
            for budget, t in times.items()}


@torch.no_grad()
def evaluate(model: ARRCOC, data: TaskData, budgets: list[float], speed_images: int = 64,
             repeats: int = 5) -> list[dict[str, float]]:
    """One row per budget: accuracy (%), full-token accuracy (%), agreement with the full-token prediction
    (%), box coverage (%), and ms / speed ratio of a forward on the first ``speed_images`` images."""
    kept = model.config.budget
    full_predictions = torch.cat([model.adapter(data.batch(slice(i, i + 250)).images).argmax(-1)
                                  for i in range(0, len(data), 250)])
    full_accuracy = 100.0 * (full_predictions == data.labels).float().mean().item()
    sample = data.batch(slice(0, speed_images))
    speed = speed_at_budgets(model, sample.images, sample.queries, budgets, repeats)
    rows = []
    for budget in tqdm(budgets, desc="budgets", leave=False):
        model.set_budget(budget)
        predictions = torch.cat([model(b.images, b.queries).argmax(-1)
                                 for b in (data.batch(slice(i, i + 250)) for i in range(0, len(data), 250))])
        rows.append({
            "budget": budget,
            "accuracy": 100.0 * (predictions == data.labels).float().mean().item(),
            "full_token_accuracy": full_accuracy,
            "agreement": 100.0 * (predictions == full_predictions).float().mean().item(),
            **selection_metrics(model, data),
            **speed[budget],
        })
    model.set_budget(kept)
    return rows


def plot_budgets(rows: list[dict[str, float]], path: Path, title: str, metric: str = "accuracy",
                 metric_label: str = "test accuracy (%)") -> None:
    """Two panels over the budget: ``metric`` (with the full-token accuracy as a line, for accuracy) and the
    speed ratio to the unmodified model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [row["budget"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(budgets, [row[metric] for row in rows], "o-", label="ARR-COC")
    if metric == "accuracy":
        left.axhline(rows[0]["full_token_accuracy"], color="gray", linestyle="--", label="every token")
    left.set(xscale="log", xlabel="budget (fraction of patch tokens)", ylabel=metric_label)
    left.legend()
    right.plot(budgets, [row["speedup"] for row in rows], "o-")
    right.axhline(1.0, color="gray", linestyle="--")
    right.set(xscale="log", xlabel="budget (fraction of patch tokens)", ylabel="speed vs. unmodified model (x)")
    for ax in (left, right):
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def checkpoint_parser(prog: str | None, doc: str, examples: str, config_example: str) -> argparse.ArgumentParser:
    """The options every command on a trained checkpoint shares (eval, adapt)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="folder written by `arrcoc train`")
    parser.add_argument("--config", type=config_file, help=f"YAML of defaults for these options, e.g. "
                                                            f"{config_example} (the command line wins)")
    parser.add_argument("--task", choices=TASKS, help="default: the task in the checkpoint's metrics.json, "
                                                      "else cluttered")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    parser = checkpoint_parser(prog, __doc__, EXAMPLES, "configs/eval.yaml")
    parser.add_argument("--budgets", type=budget_fraction, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--speed-images", type=int, default=64, help="batch the timing runs on")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (medians)")
    parser.add_argument("--seed", type=int, default=1, help="test canvases' seed")
    parser.add_argument("--backbone", type=Path, help="canvas ViT (.safetensors); default: the checkpoint's")
    parser.add_argument("--out", type=Path, help="output folder (default: CHECKPOINT/eval)")
    args = parse_with_config(parser, argv)
    model, trained = load_checkpoint(parser, args.checkpoint, args.backbone)
    task = args.task or trained.get("task", "cluttered")
    out = args.out or args.checkpoint / "eval"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    data = task_data(task, "test", args.test_images, args.seed)
    rows = evaluate(model, data, args.budgets, min(args.speed_images, args.test_images), args.repeats)
    meta = {"checkpoint": str(args.checkpoint), "task": task, "test_images": args.test_images, "seed": args.seed,
            "threads": torch.get_num_threads(), "trained_budget": model.config.budget}
    save_json_atomic(out / "eval.json", {"meta": meta, "rows": rows})
    table = format_table(rows, COLUMNS)
    (out / "eval.md").write_text(f"# {args.checkpoint} on {args.test_images} {task} test canvases\n\n{table}\n")
    plot_budgets(rows, out / "eval.png", f"{args.checkpoint}: {task} task, {args.test_images} test canvases")
    print(table)
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'eval.png'}")
    return out


def load_checkpoint(parser: argparse.ArgumentParser, folder: Path, backbone: Path | None
                    ) -> tuple[ARRCOC, dict[str, Any]]:
    """The checkpoint on its canvas ViT, and what ``arrcoc train`` recorded beside it (``metrics.json``, or {}).
    Bad input ends in ``parser.error``: a clear message and exit status 2."""

    if not folder.is_dir():
        parser.error(f"checkpoint folder {folder} does not exist (write one with `arrcoc train --out {folder}`)")
    metrics = folder / "metrics.json"
    trained = json.loads(metrics.read_text()) if metrics.is_file() else {}
    try:
        model = ARRCOC.from_pretrained(folder, load_canvas_vit(backbone or trained.get("backbone")))
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    return model, trained
