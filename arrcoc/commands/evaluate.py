"""Evaluate a trained relevance module (a ``save_pretrained`` folder) at several token budgets.

    arrcoc eval --checkpoint runs/train --budgets 0.5 0.25 0.125
    arrcoc eval --checkpoint runs/photos --images photos/val      # your own images, on the training's backbone

On test canvases of a task (composed from TEST source digits), or on the images of a folder (one sub-folder per
class), per budget: accuracy next to the full-token accuracy, agreement with the full-token prediction
(label-free), box coverage (canvases only: the share of the target digit's patches kept) and the speed of the
whole reduced forward (relevance module included) as a ratio to the unmodified model, timed in the same run
with interleaved repeats. On a folder whose classes the backbone's head does not have, accuracy is not defined
and only agreement is reported. Writes ``eval.json`` + ``eval.md`` + ``eval.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from arrcoc.budget import Budget
from arrcoc.config import budget_argument, parse_with_config
from arrcoc.data.image_folder import cyclic_queries, read_image_folder, read_query_file
from arrcoc.data.tasks import TaskData, task_data
from arrcoc.metrics import EVAL_BATCH, selection_metrics, timed
from arrcoc.relevance import ARRCOC
from arrcoc.reporting import format_table, pyplot, save_figure
from arrcoc.storage import save_json_atomic

from .common import (
    add_image_folder_options,
    checkpoint_parser,
    load_checkpoint,
    load_folder_checkpoint,
    refuse_folder_options,
)

EXAMPLES = """examples:
  arrcoc eval --checkpoint runs/train                               # budgets 0.5 0.25 0.125
  arrcoc eval --checkpoint runs/photos --images photos/val --budgets 1.0 0.5 0.25   # your own images
  arrcoc eval --checkpoint runs/query --task query --budgets 1.0 0.25 0.125 --out runs/query/eval
  arrcoc eval --checkpoint benchmarks/results/models/cluttered --test-images 2000
  arrcoc eval --checkpoint runs/train --config configs/eval.yaml  # settings from YAML
"""
ACCURACY_KEYS = ("accuracy", "full_token_accuracy")  # left out where the labels are not the model's classes
COLUMNS = {"budget": "budget", "accuracy": "accuracy (%)", "full_token_accuracy": "full tokens (%)",
           "agreement": "agrees with full (%)", "box_coverage": "box coverage (%)", "speedup": "speed vs full"}


@torch.no_grad()
def speed_at_budgets(model: ARRCOC, images: Tensor, query: Tensor | None, budgets: list[Budget],
                     repeats: int = 5) -> dict[float, dict[str, float]]:
    """Median ms of one forward at each budget (relevance module included) and of the unmodified model,
    repeats interleaved so that load drifts hit every budget alike; ``speedup`` = full time / budget time."""
    kept = model.budget
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
def evaluate(model: ARRCOC, data: TaskData, budgets: list[Budget], speed_images: int = 64,
             repeats: int = 5) -> list[dict[str, float]]:
    """One row per budget: accuracy (%), full-token accuracy (%), agreement with the full-token prediction
    (%), what the selections keep (:func:`~arrcoc.metrics.selection_metrics`), and ms / speed ratio of a forward
    on the first ``speed_images`` images."""
    kept = model.budget
    full_predictions = torch.cat([model.adapter(batch.images).argmax(-1) for batch in data.batches(EVAL_BATCH)])
    full_accuracy = 100.0 * (full_predictions == data.labels).float().mean().item()
    sample = data.batch(slice(0, speed_images))
    speed = speed_at_budgets(model, sample.images, sample.queries, budgets, repeats)
    rows = []
    for budget in tqdm(budgets, desc="budgets", leave=False):
        model.set_budget(budget)
        predictions = torch.cat([model(batch.images, batch.queries).argmax(-1) for batch in data.batches(EVAL_BATCH)])
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
    plt = pyplot()
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
    save_figure(fig, path, dpi=110)


@dataclass
class Scored:
    """What an evaluation scores: the model, its test data and a phrase naming it, what eval.json records about
    it, notes for the report, and whether the labels are the model's classes (else agreement only)."""

    model: ARRCOC
    data: TaskData
    what: str
    meta: dict[str, Any]
    notes: list[str]
    has_accuracy: bool = True


def canvas_test(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Scored:
    """The checkpoint on its canvas ViT and the test canvases of its task."""
    try:
        refuse_folder_options(args)
    except ValueError as error:
        parser.error(str(error))
    model, trained = load_checkpoint(parser, args.checkpoint, None if args.backbone is None else Path(args.backbone))
    task = args.task or trained.get("task", "cluttered")
    torch.manual_seed(args.seed)
    data = task_data(task, "test", args.test_images, args.seed)
    return Scored(model, data, f"{args.test_images} {task} test canvases",
                  {"task": task, "test_images": args.test_images, "seed": args.seed}, [])


def folder_test(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Scored:
    """The checkpoint on its own (or the given) backbone and the images of ``--images`` through that backbone's
    preprocessing; no boxes, so no box coverage; no accuracy where the head does not have the folder's classes."""
    if args.task is not None:
        parser.error(f"--task {args.task} names a canvas task; with --images the folder's images are scored")
    model, backbone, trained = load_folder_checkpoint(parser, args.checkpoint, args.backbone, args.weights,
                                                      dict(args.backbone_arg))
    query_file = args.query_file or trained.get("query_file")
    try:
        sentences = None if query_file is None else read_query_file(query_file)
        folder = read_image_folder(args.images, backbone.preprocess, args.max_images, args.seed)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    queries = None if sentences is None else cyclic_queries(sentences, len(folder))
    mismatch = backbone.head_mismatch(folder.classes)
    notes = [note for note in (
        mismatch, f"{len(folder.skipped)} file(s) could not be read and were skipped" if folder.skipped else None,
    ) if note]
    meta = {"images": str(args.images), "classes": folder.classes, "test_images": len(folder), "seed": args.seed,
            "backbone": backbone.description, "query_file": query_file, "accuracy_defined": mismatch is None,
            "skipped_files": folder.skipped}
    data = TaskData(folder.images, folder.labels, None, queries)  # photos have no boxes
    return Scored(model, data, f"{len(folder)} images of {args.images} ({len(folder.classes)} classes)", meta,
                  notes, mismatch is None)


def build_parser(prog: str | None) -> argparse.ArgumentParser:
    parser = checkpoint_parser(prog, __doc__, EXAMPLES, "configs/eval.yaml")
    parser.add_argument("--budgets", type=budget_argument, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--test-images", type=int, default=1000, help="test canvases (without --images)")
    parser.add_argument("--speed-images", type=int, default=64, help="batch the timing runs on")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (medians)")
    parser.add_argument("--seed", type=int, default=1, help="test canvases' seed (with --max-images: the sample's)")
    add_image_folder_options(parser, "score", "the checkpoint's")
    parser.add_argument("--out", type=Path, help="output folder (default: CHECKPOINT/eval)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    parser = build_parser(prog)
    args = parse_with_config(parser, argv)
    scored = folder_test(parser, args) if args.images is not None else canvas_test(parser, args)
    out = args.out or args.checkpoint / "eval"
    out.mkdir(parents=True, exist_ok=True)
    rows = evaluate(scored.model, scored.data, args.budgets, min(args.speed_images, len(scored.data)), args.repeats)
    if not scored.has_accuracy:
        rows = [{key: value for key, value in row.items() if key not in ACCURACY_KEYS} for row in rows]
    meta = {"checkpoint": str(args.checkpoint), **scored.meta, "threads": torch.get_num_threads(),
            "trained_budget": scored.model.budget, "notes": scored.notes}
    save_json_atomic(out / "eval.json", {"meta": meta, "rows": rows})
    table = format_table(rows, {key: header for key, header in COLUMNS.items() if key in rows[0]})
    notes = "".join(f"Note: {note}.\n\n" for note in scored.notes)
    (out / "eval.md").write_text(f"# {args.checkpoint} on {scored.what}\n\n{notes}{table}\n")
    metric = ("accuracy", "test accuracy (%)") if scored.has_accuracy else ("agreement", "agrees with full (%)")
    plot_budgets(rows, out / "eval.png", f"{args.checkpoint}: {scored.what}", *metric)
    print(table + "".join(f"\nnote: {note}" for note in scored.notes))
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'eval.png'}")
    return out


if __name__ == "__main__":
    main()
