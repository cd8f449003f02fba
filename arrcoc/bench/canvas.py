"""The offline canvas benchmark, the project's main job: ``arrcoc bench`` (quick) or ``arrcoc bench canvas``.

Every method runs on one frozen backbone, the committed canvas ViT (``python -m arrcoc.bench.pretrain``),
over canvases composed from real MNIST digits (``arrcoc.data.canvas``):

* cluttered task: one digit among fragments of others; label = the digit.
* query task: 3-4 coloured digits, a sentence asks for one (embedded by all-MiniLM-L6-v2); label = the
  queried digit. Query-agnostic methods must keep every digit; a query-aware one needs only the queried one.

Methods x budgets (fractions of the 64 patch tokens): full, random-K, uniform grid, EViT, ATS, ToMe (the
same final token count, and, where reachable, the same mean tokens per block), a DynamicViT-style
allocator trained by backprop through the frozen backbone, ARR-COC trained by its local rules and its
ablations (``configs/canvas_bench.yaml``), a box oracle (ground truth; an upper bound for selection) and,
for the query task, the query-fusion reference (``python -m arrcoc.bench.query_fusion``).
Then: throughput as ratios to full in one run, the relevance module's overhead, peak memory and step time
of local-rule training vs. global backprop, and online adaptation under a distribution shift (frozen vs.
ARR-COC's label-free adaptation vs. TENT). Writes ``canvas.json`` and PNGs to the output folder and
``REPORT.md`` beside it (``benchmarks/`` for the full run, ``runs/quick/`` for the quick one).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import arrcoc
from arrcoc.backbones import BackboneAdapter, adapt_backbone
from arrcoc.baselines import (
    PROGRESSIVE,
    Tent,
    equal_compute_baseline,
    global_backprop_step,
    make_baseline,
    oracle_predict,
    run_reduced,
    tokens_per_block,
)
from arrcoc.budget import num_kept
from arrcoc.config import REPO_ROOT
from arrcoc.data.tasks import TASKS, shared_text_encoder, task_data
from arrcoc.metrics import (
    accuracy,
    autocast,
    peak_tensor_memory,
    relevance_module_call,
    selection_metrics,
    target_coverage,
    timed,
)
from arrcoc.models.canvas_vit import DEFAULT_CHECKPOINT, load_canvas_vit
from arrcoc.models.query_fusion import DEFAULT_QUERY_FUSION, load_query_fusion
from arrcoc.relevance import ARRCOC, RelevanceConfig
from arrcoc.reporting import output_dir, read_json, run_metadata, save_figure
from arrcoc.storage import save_json_atomic
from arrcoc.training import train_arrcoc
from arrcoc.visualize import canvas_queries, demo_canvases, explain, queries_figure

from .canvas_report import ALL_BACKPROP, ablation_budgets, earlier_runs, write_report
from .canvas_settings import LAYOUT_SPLITS, AdaptationSettings, BenchSettings, TrainingCostSettings, load_bench

EVAL_BATCH = 250
SMALL_BATCH = 16  # the relevance module's share of a forward is also measured at this batch


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a run's workers find the checkpoints and keep the ARR-COC models they train (the command line's, not
    the settings file's).

    Args:
        backbone: the canvas ViT checkpoint every method runs on.
        query_fusion: the query task's full-token reference.
        model_dir: the first seed's ARR-COC per task, kept with the results (visualize, the demos, the web app).
        scratch_dir: the other seeds' ARR-COC, for adaptation; lives as long as the run.
    """

    backbone: Path
    query_fusion: Path | None = None
    model_dir: Path | None = None
    scratch_dir: Path | None = None


# ---- methods ---------------------------------------------------------------------------------------
def relevance_config(bench: BenchSettings, task: str, overrides: dict[str, Any]) -> RelevanceConfig:
    """The task's relevance config: the base file, the task's and the variant's overrides, the task's budget."""
    return RelevanceConfig.from_yaml(bench.base, {**bench.tasks[task].relevance, **overrides},
                                     budget=bench.tasks[task].budget)


SHIFT_TASKS = ("cluttered",)  # tasks whose ARR-COC runs are also scored on the shift split (the adaptation's shift)
SCHEDULES = ("equal compute", "early")  # a progressive baseline's other schedules, each its own row: "evit (early)"


def baseline_predict(adapter: BackboneAdapter, name: str, budget: float, schedule: str | None = None):
    """``predict`` for a query-agnostic baseline, on its own schedule or on one of ``SCHEDULES``: "equal compute"
    (the mean tokens per block of a method that keeps K from block 0; None where unreachable) or "early" (its
    fastest, for comparisons at measured speed). Also returns the mean patch tokens per block."""
    grid = adapter.grid()
    if schedule == "equal compute":
        reducer = equal_compute_baseline(name, num_kept(budget, grid.num_patches), adapter.depth, grid)
        if reducer is None:
            return None, None
    else:
        reducer = make_baseline(name, budget, adapter.depth, grid, early=schedule == "early")
    mean_tokens = statistics.fmean(tokens_per_block(reducer, grid.num_patches, adapter.depth))
    return (lambda batch: adapter.head(run_reduced(adapter, batch.images, reducer))), mean_tokens


# ---- jobs (run in worker processes, one thread each) -----------------------------------------------
def run_job(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    kind, task, seed, bench, paths = job["kind"], job["task"], job["seed"], job["bench"], job["paths"]
    torch.manual_seed(seed)  # random-K draws the same tokens whichever jobs its worker process ran before
    test = task_data(task, "test", bench.test_images, seed)
    backbone = load_canvas_vit(paths.backbone)
    result: dict[str, Any] = {"kind": kind, "task": task, "seed": seed, "method": job["method"], "accuracy": {}}
    layout_budgets = bench.tasks[task].held_out_layout
    layout = task_data(task, LAYOUT_SPLITS[task], bench.test_images, seed) if layout_budgets else None
    if kind == "full":
        adapter = adapt_backbone(backbone)
        result["accuracy"] = {"1.0": accuracy(lambda b: adapter(b.images), test)}
        if layout is not None:
            result["layout_accuracy"] = {"1.0": accuracy(lambda b: adapter(b.images), layout)}
        return result
    if kind == "baseline":
        adapter = adapt_backbone(backbone)
        for budget in sorted({b for b in bench.budgets if b < 1} | set(layout_budgets), reverse=True):
            for schedule in (None, *SCHEDULES) if job["method"] in PROGRESSIVE else (None,):
                predict, mean_tokens = baseline_predict(adapter, job["method"], budget, schedule)
                scored = {"accuracy": test} if budget in bench.budgets else {}
                if budget in layout_budgets and schedule is None:
                    scored["layout_accuracy"] = layout
                if predict is not None and scored:
                    key = job["method"] + (f" ({schedule})" if schedule else "")
                    result.setdefault("rows", {}).setdefault(key, {})[str(budget)] = {
                        "mean_tokens": mean_tokens, **{k: accuracy(predict, data) for k, data in scored.items()}}
        return result
    if kind == "oracle":
        adapter = adapt_backbone(backbone)
        result["accuracy"] = {str(b): accuracy(oracle_predict(adapter, b), test) for b in bench.budgets if b < 1}
        if layout is not None:
            result["layout_accuracy"] = {str(b): accuracy(oracle_predict(adapter, b), layout) for b in layout_budgets}
        return result
    # ARR-COC (local rules, a variant of them, or the global-backprop allocator)
    config = relevance_config(bench, task, job["overrides"])
    # the end-to-end allocator may train longer (its own `global_steps`): a reference is only as good as its training
    per_task = bench.train.global_steps if job["learning"] == "global" else bench.train.steps
    steps, batch_size = per_task[task], bench.train.batch_size
    train = task_data(task, "train", steps * batch_size, 100 + seed)
    model, step_ms = train_arrcoc(backbone, config, train, steps, batch_size, seed, job["learning"],
                                  max_grad_norm=bench.train.max_grad_norm)
    result["step_ms"] = step_ms
    # an ablation is scored at its task's ablation budgets; where the task has a shift split, also on shifted canvases
    # at those budgets (a regime some pieces may matter in). The default is scored there too, for the pairing.
    budgets_of_ablations = ablation_budgets(bench.meta(), task)  # the rule a redraw of the results reads too
    everywhere = bench.budgets + [b for b in budgets_of_ablations if b not in bench.budgets]
    scored = {"accuracy": (test, everywhere if job["all_budgets"] else budgets_of_ablations)}
    if task in SHIFT_TASKS:
        scored["shift_accuracy"] = task_data(task, "shift", bench.test_images, seed), budgets_of_ablations
    if layout is not None:
        scored["layout_accuracy"] = layout, layout_budgets
    for key, (canvases, budgets) in scored.items():
        for budget in budgets:
            if not tiers_fit(model.set_budget(budget)) and budget != config.budget:
                continue  # tiers need a token per 2x2 region: the hard regime's budget may be below that
            result.setdefault(key, {})[str(budget)] = accuracy(lambda b: model(b.images, b.queries), canvases)
    model.set_budget(config.budget)
    result.update(selection_metrics(model, test))
    if job["method"] == "ARR-COC":  # the first seed's is kept (timing, heatmaps, demos); others for adaptation
        model.save_pretrained(model_path(bench, paths, task, seed))
    return result


def tiers_fit(model: ARRCOC) -> bool:
    """Whether ``model``'s budget can be allocated on its backbone's grid (always, without tiers)."""
    if not model.config.tiers:
        return True
    grid = model.adapter.grid()
    try:
        model.tier_counts(grid.height, grid.width)
    except ValueError:  # fewer tokens than 2x2 regions (plus the refined ones)
        return False
    return True


def model_path(bench: BenchSettings, paths: RunPaths, task: str, seed: int) -> Path:
    """Where the ARR-COC of ``task`` trained with ``seed`` is saved: the first seed's in the results, the others
    in a scratch folder that lives as long as the run."""
    if seed == bench.seeds[0]:
        return paths.model_dir / task
    return paths.scratch_dir / f"{task}-seed{seed}"


def jobs_for(bench: BenchSettings) -> list[dict[str, Any]]:
    """Every (method, task, seed) of the run; each job still needs the run's ``paths``."""
    jobs = []
    for task in bench.tasks:
        for seed in bench.seeds:
            common = {"task": task, "seed": seed, "bench": bench}
            jobs.append({**common, "kind": "arrcoc", "method": "ARR-COC", "overrides": {}, "learning": "local",
                         "all_budgets": True})
            jobs.append({**common, "kind": "arrcoc", "method": "DynamicViT-style (global backprop)", "overrides": {},
                         "learning": "global", "all_budgets": True})
            jobs.append({**common, "kind": "arrcoc", "method": ALL_BACKPROP, "overrides": {}, "learning": "backprop",
                         "all_budgets": True})
            for name, variant in bench.variants.items():
                # a variant may apply to some tasks only, and run on the lowest few seeds only (an expensive one;
                # results are kept in seed order, so the report pairs it with the default's first runs)
                variant_tasks = bench.tasks if variant.tasks is None else variant.tasks
                if task not in variant_tasks or seed not in sorted(bench.seeds)[:variant.seeds]:
                    continue
                jobs.append({**common, "kind": "arrcoc", "method": f"ARR-COC / {name}",
                             "overrides": variant.overrides, "learning": "local", "all_budgets": False})
            jobs += [{**common, "kind": "baseline", "method": name} for name in bench.baselines]
            jobs.append({**common, "kind": "oracle", "method": "box oracle"})
            jobs.append({**common, "kind": "full", "method": "full"})
    # the longest jobs first, so that two workers finish together
    return sorted(jobs, key=lambda j: (j["kind"] != "arrcoc", j.get("learning") != "global"))


def collect(results: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """{task: {method: {"accuracy": {budget: [per seed, in seed order]}, "mean_tokens": ..., other metrics: [per
    seed]}}}"""
    table: dict[str, dict[str, Any]] = {task: {} for task in tasks}
    for r in sorted(results, key=lambda r: r["seed"]):  # every list in seed order: methods pair up by position
        rows = r.get("rows") or {r["method"]: {b: {"accuracy": a} for b, a in r["accuracy"].items()}}
        for method, per_budget in rows.items():
            entry = table[r["task"]].setdefault(method, {"kind": r["kind"], "accuracy": {}, "mean_tokens": {}})
            for budget, cell in per_budget.items():
                if "mean_tokens" in cell:
                    entry["mean_tokens"][budget] = cell["mean_tokens"]
                for key in ("accuracy", "layout_accuracy"):
                    if key in cell:
                        entry.setdefault(key, {}).setdefault(budget, []).append(cell[key])
            for metric in ("step_ms", "box_coverage", "query_overlap"):
                if metric in r:
                    entry.setdefault(metric, []).append(r[metric])
            for key in ("shift_accuracy", "layout_accuracy"):
                for budget, value in r.get(key, {}).items():
                    entry.setdefault(key, {}).setdefault(budget, []).append(value)
    return table


# ---- timing and memory --------------------------------------------------------------------------------
@torch.no_grad()
def throughput(methods: dict[str, Any], models: dict[str, ARRCOC], threads: int, batch: int, repeats: int,
               device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """Images/s of every method on one batch of cluttered test canvases, interleaved repeats, as ratios to
    full; and the relevance module's share of ARR-COC's time. ``methods``: the ``backbone`` checkpoint, and the
    ``budgets`` and ``baselines`` to time (this benchmark's, or the GPU suite's: a plain mapping)."""
    torch.set_num_threads(threads)
    backbone = load_canvas_vit(methods["backbone"]).to(device)
    adapter = adapt_backbone(backbone)
    images = task_data("cluttered", "test", batch, 0).images.to(device)
    grid = adapter.grid()
    fns: dict[tuple[str, float], Any] = {}
    for budget in methods["budgets"]:
        for name in methods["baselines"] if budget < 1 else ["full"]:
            for early in (False, True) if name in PROGRESSIVE else (False,):
                reducer = make_baseline(name, budget, adapter.depth, grid, early)
                fns[(name + " (early)" * early, budget)] = (
                    lambda reducer=reducer: adapter.head(run_reduced(adapter, images, reducer)))
        if budget < 1:
            model = models["cluttered"].to(device)
            fns[("ARR-COC", budget)] = lambda model=model, budget=budget: model.set_budget(budget)(images)
            fns[("ARR-COC relevance module", budget)] = relevance_module_call(model, images)
    fns[("full", 1.0)] = lambda: adapter(images)
    times: dict[tuple[str, float], list[float]] = {key: [] for key in fns}
    with autocast(device, dtype):
        for fn in fns.values():
            fn()  # warm-up
        for _ in tqdm(range(repeats), desc="throughput", leave=False):
            for key, fn in fns.items():
                times[key].append(timed(fn, device))
        # the module's share of a full forward also at a small batch, where its many small operations weigh more
        small = images[:SMALL_BATCH]
        module_small, full_small = relevance_module_call(models["cluttered"], small), lambda: adapter(small)
        small_times: dict[str, list[float]] = {"module": [], "full": []}
        for _ in range(repeats):
            small_times["module"].append(timed(module_small, device))
            small_times["full"].append(timed(full_small, device))
    full = statistics.median(times[("full", 1.0)])
    rows = [{"method": name, "budget": budget, "images_per_s": len(images) / statistics.median(t),
             "speedup": full / statistics.median(t)} for (name, budget), t in times.items()]
    module = statistics.median([x for (name, _), t in times.items() if name == "ARR-COC relevance module" for x in t])
    share = {str(len(images)): module / full,
             str(len(small)): statistics.median(small_times["module"]) / statistics.median(small_times["full"])}
    return {"batch": len(images), "threads": threads, "repeats": repeats, "device": device, "dtype": dtype,
            "full_ms": 1000 * full, "rows": rows, "module_share": share}


def _training_cost_worker(learning: str, bench: BenchSettings, backbone: Path, batch_size: int,
                          steps: int) -> dict[str, float]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = task_data("cluttered", "train", batch_size, 0)
    config = relevance_config(bench, "cluttered", {})
    model = arrcoc.attach(load_canvas_vit(backbone), budget=config.budget, config=config)

    def step() -> None:
        if learning == "local":
            model.learn(data.images, boxes=data.boxes)
        else:
            global_backprop_step(model, data.images, data.labels)

    step()  # warm-up: lazily built state, the optimizer's moments
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_tensor_memory(step)  # apart from the timed steps: the profiler slows a step down
    return {"peak_mb": peak, "step_ms": 1000 * statistics.median(times)}


def training_cost(bench: BenchSettings, backbone: Path, settings: TrainingCostSettings) -> dict[str, Any]:
    """Peak tensor memory of one training step (deterministic: one step serves) and the median step time,
    local rules vs. global backprop, each in a fresh process on the same batch."""
    out: dict[str, Any] = {}
    for learning in ("local", "global"):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
            out[learning] = fresh.submit(_training_cost_worker, learning, bench, backbone, settings.batch,
                                         settings.steps).result()
    out["batch"] = settings.batch
    out["memory_ratio"] = out["local"]["peak_mb"] / max(out["global"]["peak_mb"], 1e-9)
    out["time_ratio"] = out["local"]["step_ms"] / out["global"]["step_ms"]
    return out


# ---- online adaptation under a distribution shift ------------------------------------------------------
def adaptation(model: ARRCOC, settings: AdaptationSettings, test_images: int) -> dict[str, Any]:
    """Prequential accuracy (predict each batch, then adapt on it) on the cluttered shift split: the frozen
    module, ARR-COC's label-free local adaptation (``adapt`` with ``settings.method``), and TENT on the
    backbone's norm layers; then each adapted model on ``held_out`` other shift canvases, where
    how much of the digit each selection keeps is measured too (the teacher's own scoring is as costly as a
    pass of adaptation: on the stream it would double the section's time).
    One thread: the relaxation's many small ops slow down badly when threads outnumber free cores."""
    torch.set_num_threads(1)
    stream_images, held_out, batch, budget = settings.stream_images, settings.held_out, settings.batch, settings.budget
    shift = task_data("cluttered", "shift", stream_images, 0)
    unseen = task_data("cluttered", "shift", held_out, 1)  # shift canvases no method adapted on
    test = task_data("cluttered", "test", test_images, 0)
    model.set_budget(budget)
    model.adaptation = copy.copy(settings.method)  # the model's own: the run's settings stay as read
    frozen_state = copy.deepcopy(model.relevance.state_dict())
    result = {"budget": budget, "stream_images": stream_images, "held_out": held_out, "batch": batch,
              "adaptation": vars(model.adaptation),
              "test_accuracy": accuracy(lambda b: model(b.images), test),
              "full_tokens_shift": accuracy(lambda b: model.adapter(b.images), shift),
              "full_tokens_test": accuracy(lambda b: model.adapter(b.images), test),
              # the ceiling of any allocation on the shift, and how much of the digit each selection keeps
              "oracle_shift": accuracy(oracle_predict(model.adapter, budget), shift),
              "coverage": {"frozen": selection_metrics(model, unseen)["box_coverage"],
                           "teacher": target_coverage(model, unseen, model.adaptation.target)},
              "held_out_accuracy": {"frozen": accuracy(lambda b: model(b.images), unseen)}}

    def stream(step) -> tuple[float, float, list[float]]:
        correct, curve = 0, []
        start = time.perf_counter()
        for i in tqdm(range(0, stream_images, batch), desc="adaptation stream", leave=False):
            chunk = shift.batch(slice(i, i + batch))
            hits = int((step(chunk.images).argmax(-1) == chunk.labels).sum())
            correct += hits
            curve.append(100.0 * hits / len(chunk))
        return 100.0 * correct / stream_images, 1000 * (time.perf_counter() - start) / stream_images, curve

    with torch.no_grad():
        result["frozen"], result["frozen_ms"], result["frozen_curve"] = stream(lambda x: model(x))

    def adapt_step(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = model(x)
        model.adapt(x)
        return logits

    result["online"], result["online_ms"], result["online_curve"] = stream(adapt_step)
    result["coverage"]["adapted"] = selection_metrics(model, unseen)["box_coverage"]
    result["held_out_accuracy"]["online"] = accuracy(lambda b: model(b.images), unseen)
    model.relevance.load_state_dict(frozen_state)

    tent = Tent(model)
    result["tent"], result["tent_ms"], result["tent_curve"] = stream(tent.step)
    result["held_out_accuracy"]["tent"] = accuracy(lambda b: tent.model(b.images), unseen)
    lost = result["test_accuracy"] - result["frozen"]
    result["recovered_fraction"] = (result["online"] - result["frozen"]) / lost if lost > 0 else None
    # the label-free ceiling: agreeing with the full-token prediction on every image gives back at most this
    ceiling = min(lost, result["full_tokens_shift"] - result["frozen"])
    result["of_ceiling"] = (result["online"] - result["frozen"]) / ceiling if ceiling > 0 else None
    return result


PER_SEED_ADAPTATION = ("test_accuracy", "frozen", "online", "tent", "held_out_accuracy", "coverage",
                       "full_tokens_shift", "recovered_fraction", "of_ceiling")


def _adaptation_worker(bench: BenchSettings, paths: RunPaths, seed: int) -> dict[str, Any]:
    model = ARRCOC.from_pretrained(model_path(bench, paths, "cluttered", seed), load_canvas_vit(paths.backbone))
    return adaptation(model, bench.adaptation, bench.test_images)


# ---- heatmaps ------------------------------------------------------------------------------------------
@torch.no_grad()
def heatmaps(model: ARRCOC, path: Path, images: int = 3) -> None:
    """Relevance and kept patches on query canvases, each image under four questions about two of its digits."""
    text = shared_text_encoder()
    canvases = demo_canvases()
    rows = []
    for index in range(images):
        asked = canvas_queries(canvases, index)
        rows.append(explain(model, canvases.images[index], asked, embeddings=text(asked)))
    title = "ARR-COC on query canvases: relevance and the patches it keeps (outlined; the rest dimmed) per query"
    save_figure(queries_figure(rows, title), path, dpi=110)


# ---- command -------------------------------------------------------------------------------------------
CLUTTERED_ONLY = ("throughput", "training_cost", "adaptation")  # measured on cluttered canvases
SAME_SETTINGS = ("seeds", "budgets", "test_images", "backbone_meta", "mode")


def keep_earlier_tasks(results: dict[str, Any], earlier: dict[str, Any] | None) -> dict[str, Any]:
    """``results`` of a run over some tasks, completed with the other tasks of an ``earlier`` run's results (and
    what only the cluttered task measures, if this run skipped it). Both runs must share their seeds, budgets,
    test images, backbone and mode; ``meta.earlier`` records, per run a kept task's results come from, its command,
    commit and wall time (a task the earlier run had itself kept from a run before it names that run)."""
    if earlier is None:
        return results
    meta, before = results["meta"], earlier["meta"]
    differ = [key for key in SAME_SETTINGS if meta.get(key) != before.get(key)]
    if differ:
        raise ValueError(f"cannot keep the earlier run's tasks: its {differ} differ from this run's; rerun every "
                         "task (without --tasks)")
    kept = [task for task in before["tasks"] if task not in meta["tasks"]]
    if not kept:
        return results
    merged = copy.deepcopy(results)
    order = [task for task in TASKS if task in meta["tasks"] or task in kept]
    merged["accuracy"] = {task: (results if task in meta["tasks"] else earlier)["accuracy"][task] for task in order}
    merged["meta"]["tasks"] = {task: (meta if task in meta["tasks"] else before)["tasks"][task] for task in order}
    if "cluttered" in kept:
        merged.update({key: earlier[key] for key in CLUTTERED_ONLY})
    own = {key: before.get(key) for key in ("command", "commit", "wall_seconds", "workers")}
    sources: dict[tuple, dict[str, Any]] = {}  # per source run, the kept tasks that come from it
    for task in kept:
        run = next((run for run in earlier_runs(before) if task in run["tasks"]), own)
        record = sources.setdefault((run.get("command"), run.get("commit")),
                                    {**{k: v for k, v in run.items() if k != "tasks"}, "tasks": []})
        record["tasks"].append(task)
    merged["meta"]["earlier"] = list(sources.values())
    return merged


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the README's smoke run (~1.5 min on 2 cores)")
    parser.add_argument("--config", default="configs/canvas_bench.yaml")
    parser.add_argument("--backbone", type=Path, default=DEFAULT_CHECKPOINT, help="canvas ViT checkpoint")
    parser.add_argument("--query-fusion", type=Path, default=DEFAULT_QUERY_FUSION)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results or runs/quick)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS,
                        help="rerun only these tasks; the other tasks' results in the folder's canvas.json (an "
                             "earlier run with the same seeds, budgets and test images) are kept, and the report "
                             "names the run each comes from")
    return parser.parse_args(argv)


def settings_of_run(args: argparse.Namespace) -> BenchSettings:
    """The config file's settings, limited to the tasks of ``--tasks`` where given."""
    bench = load_bench(args.config, args.quick)
    if not args.tasks:
        return bench
    missing = sorted(set(args.tasks) - set(bench.tasks))
    if missing:
        raise ValueError(f"--tasks {missing} are not in {args.config}'s tasks {list(bench.tasks)}")
    return dataclasses.replace(bench, tasks={task: entry for task, entry in bench.tasks.items() if task in args.tasks})


def accuracy_table(bench: BenchSettings, paths: RunPaths, workers: int) -> dict[str, Any]:
    """Every method x budget x seed (:func:`collect`): the jobs in worker processes, then the query-fusion
    reference."""
    jobs = [{**job, "paths": paths} for job in jobs_for(bench)]
    results = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in tqdm(pool.map(run_job, jobs), total=len(jobs), desc="canvas benchmark", unit="job"):
            results.append(result)
    if "query" in bench.tasks:
        fusion = load_query_fusion(paths.query_fusion)  # read only now: it may be retrained while the pool runs
        results += [{"kind": "query_fusion", "task": "query", "seed": seed, "method": "query fusion (reference)",
                     "accuracy": {"1.0": accuracy(lambda b: fusion(b.images, b.queries),
                                                  task_data("query", "test", bench.test_images, seed))}}
                    for seed in bench.seeds]
    return collect(results, list(bench.tasks))


def measure_on_cluttered(bench: BenchSettings, paths: RunPaths, models: dict[str, ARRCOC],
                         workers: int) -> dict[str, Any]:
    """Throughput, training cost and adaptation (``CLUTTERED_ONLY``), where the run has the cluttered task and
    the settings have the measurement's section; None where not measured."""
    measured: dict[str, Any] = dict.fromkeys(CLUTTERED_ONLY)
    if "cluttered" not in models:
        return measured
    if bench.throughput is not None:
        methods = {"backbone": paths.backbone, "budgets": bench.budgets, "baselines": bench.baselines}
        measured["throughput"] = throughput(methods, models, threads=2, batch=bench.throughput.batch,
                                            repeats=bench.throughput.repeats)
    if bench.training_cost is not None:
        measured["training_cost"] = training_cost(bench, paths.backbone, bench.training_cost)
    if bench.adaptation is not None:
        measured["adaptation"] = adapt_every_seed(bench, paths, models["cluttered"], workers)
    return measured


def adapt_every_seed(bench: BenchSettings, paths: RunPaths, model: ARRCOC, workers: int) -> dict[str, Any]:
    """:func:`adaptation` of the first seed's ``model``, alone, as it is timed, with every adapted seed's own
    results: the target is a mean over seeds, each seed's module adapting on the same stream, the others side by
    side in worker processes."""
    seeds = bench.seeds[:bench.adaptation.seeds]
    adapted = adaptation(model, bench.adaptation, bench.test_images)
    others = []
    if len(seeds) > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            others = list(tqdm(pool.map(functools.partial(_adaptation_worker, bench, paths), seeds[1:]),
                               total=len(seeds) - 1, desc="adaptation, other seeds"))
    adapted["by_seed"] = [{key: run[key] for key in PER_SEED_ADAPTATION} for run in [adapted, *others]]
    adapted["recovered_by_seed"] = [run["recovered_fraction"] for run in adapted["by_seed"]]
    adapted["of_ceiling_by_seed"] = [run["of_ceiling"] for run in adapted["by_seed"]]
    adapted["seeds"] = seeds
    return adapted


def run_meta(args: argparse.Namespace, bench: BenchSettings, paths: RunPaths, start: float) -> dict[str, Any]:
    """``canvas.json``'s ``meta``: the command, machine and code, the checkpoints, and the settings."""
    command = "arrcoc bench canvas" + (" --quick" if args.quick else "") + (
        f" --tasks {' '.join(args.tasks)}" if args.tasks else "")
    return run_metadata(command, args.quick, backbone=str(paths.backbone),
                        backbone_meta=read_json(Path(paths.backbone).with_suffix(".json")),
                        query_fusion_meta=read_json(Path(paths.query_fusion).with_suffix(".json")),
                        **bench.meta(), workers=args.workers, wall_seconds=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    bench = settings_of_run(args)
    out = output_dir(args.out, args.quick)  # reads the commit now: the checkout may move on during the run
    scratch = tempfile.TemporaryDirectory(prefix="arrcoc-canvas-")  # the other seeds' models, for adaptation
    paths = RunPaths(backbone=args.backbone, query_fusion=args.query_fusion, model_dir=out / "models",
                     scratch_dir=Path(scratch.name))
    start = time.perf_counter()
    table = accuracy_table(bench, paths, args.workers)
    print(f"methods x budgets x seeds done ({time.perf_counter() - start:.0f} s); timing and adaptation next")
    # the first seed's default ARR-COC of each task, as trained above, for timing, adaptation and heatmaps
    models = {task: ARRCOC.from_pretrained(paths.model_dir / task, load_canvas_vit(paths.backbone))
              for task in bench.tasks}
    if "query" in models:
        heatmaps(models["query"], out / "canvas_heatmaps.png")
    measured = measure_on_cluttered(bench, paths, models, args.workers)
    scratch.cleanup()

    results_json = {"meta": run_meta(args, bench, paths, start), "accuracy": table, **measured}
    if args.tasks:
        results_json = keep_earlier_tasks(results_json, read_json(out / "canvas.json"))
    save_json_atomic(out / "canvas.json", results_json)
    full_run = out.resolve() == (REPO_ROOT / "benchmarks" / "results").resolve()
    report = write_report(results_json, out, REPO_ROOT / "benchmarks" / "REPORT.md" if full_run else out / "REPORT.md")
    print(f"wrote {out / 'canvas.json'}, {report} and the ARR-COC models in {paths.model_dir}")
    return out


if __name__ == "__main__":
    main()
