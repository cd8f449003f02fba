"""REPORT.md and its plots from ``canvas.json`` (``python -m arrcoc.bench.canvas_report canvas.json`` redraws)."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from arrcoc.metrics import interval, paired_interval
from arrcoc.reporting import pyplot, read_json, save_figure, target_lines, verdict

from .canvas_settings import LAYOUT_SPLITS, TargetThresholds
from .vqa_report import paper_checks
from .vqa_report import targets as vqa_targets

TASK_TITLES = {"cluttered": "Cluttered canvases (vision only)", "query": "Query canvases (vision-language)"}
DYNAMIC_VIT = "DynamicViT-style (global backprop)"
ALL_BACKPROP = "ARR-COC all-backprop"  # the identical module, every sub-network trained by autograd
MAIN_METHODS = ("full", "random", "grid", "evit", "ats", "tome", DYNAMIC_VIT, ALL_BACKPROP, "ARR-COC")
HARD_BASELINES = ("evit", "ats", "tome", "random", "grid")  # each judged on all its schedules (equal_speed)
EARLY = tuple(f"{m} (early)" for m in ("evit", "ats", "tome"))  # the progressive baselines' fastest schedules
COST_METHODS = MAIN_METHODS[1:6] + EARLY + MAIN_METHODS[6:] + ("box oracle",)  # the accuracy-at-cost table's rows
NOT_MEASURED = "not in this run, or fewer than 2 seeds"
FIELD_FROZEN = "ARR-COC / field: frozen"  # the ablation the field's targets read


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    mean, half = interval(values)
    return f"{mean:.1f} ± {half:.1f}" if len(values) > 1 else f"{mean:.1f}"


def _mean(values: list[float] | None) -> float | None:
    return None if not values else sum(values) / len(values)


def _seeds(table: dict, task: str, method: str, budget: float) -> list[float] | None:
    """Per-seed accuracies (seed order) of ``method`` at ``budget``; None where the run has none."""
    entry = table.get(task, {}).get(method)
    return None if entry is None else entry["accuracy"].get(str(budget))


def _paired(a: list[float] | None, b: list[float] | None, shift: float = 0.0) -> tuple[float, float] | None:
    """Mean and 95% half-width of ``a - b - shift`` over the seeds both have (paired: same seed, same canvases);
    None with fewer than two seeds, which give no interval to judge by."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    return paired_interval(a, [y + shift for y in b])


def _versus_default(variant: list[float] | None, default: list[float] | None) -> tuple[float, float] | None:
    """An ablation's paired difference to the default ARR-COC; a variant may have run on the lowest few of the run's
    seeds only (its ``seeds`` in the config), and is paired with the default on those (both lists in seed order)."""
    return _paired(variant, default[:len(variant)] if variant and default else None)


def _at_least(diff: tuple[float, float] | None, tie: float) -> bool | None:
    """A ">=" target on a paired difference: a tie passes only if the interval's lower end is >= -``tie``."""
    return None if diff is None else diff[0] - diff[1] >= -tie


def _diff(d: tuple[float, float]) -> str:
    return f"{d[0]:+.1f} ± {d[1]:.1f}"


def speeds(results: dict[str, Any]) -> dict[str, dict[float, float]]:
    """Measured speed-up over full per method and budget (the throughput section), the method's scoring included.
    The ARR-COC references share ARR-COC's module and so its cost; the box oracle's selection costs a top-K."""
    by_method: dict[str, dict[float, float]] = {}
    for row in results["throughput"]["rows"] if results.get("throughput") else []:
        by_method.setdefault(row["method"], {})[row["budget"]] = row["speedup"]
    if "ARR-COC" in by_method:
        for reference in (DYNAMIC_VIT, ALL_BACKPROP):
            by_method[reference] = by_method["ARR-COC"]
    if "random" in by_method:
        by_method["box oracle"] = by_method["random"]
    return by_method


def accuracy_at_speed(points: list[tuple[float, float]], speed: float) -> tuple[float, bool]:
    """A method's accuracy at ``speed``, linear between its measured (speed-up, accuracy) points; beyond its
    fastest point, its accuracy there (second value True: the method cannot get that cheap)."""
    speeds, accuracies = zip(*sorted(points))
    return float(np.interp(speed, speeds, accuracies)), speed > speeds[-1]


def equal_speed(results: dict[str, Any], task: str, method: str, speed: float) -> tuple[list[float], bool] | None:
    """Per-seed accuracy of ``method`` at ``speed`` on its accuracy-speed frontier: every schedule it ran (its
    own and, for a progressive method, its early one) and all tokens at 1x; a point stays on the frontier if no
    faster one beats its mean accuracy; linear between them. None without measurements."""
    table, measured = results["accuracy"], speeds(results)
    full = _seeds(table, task, "full", 1.0)
    points = [(measured[name][b], acc) for name in (method, f"{method} (early)") for b in measured.get(name, {})
              if (acc := _seeds(table, task, name, b))]
    if not full or not points:
        return None
    frontier: list[tuple[float, list[float]]] = []
    best = -math.inf  # the highest mean accuracy of any faster point
    for point in sorted([(1.0, full)] + points, key=lambda p: -p[0]):  # fastest first
        if _mean(point[1]) > best:
            frontier.append(point)
            best = _mean(point[1])
    per_seed, beyond = [], False
    for i in range(len(full)):
        value, cut = accuracy_at_speed([(s, acc[i]) for s, acc in frontier], speed)
        per_seed.append(value)
        beyond |= cut
    return per_seed, beyond


def targets(results: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """Targets v2: (target, pass/fail/None = not measured, the numbers behind it), judged by the run's thresholds
    (the defaults for results written before runs recorded them). Comparisons of two methods are paired over
    seeds; a missing method or budget is reported as not measured."""
    limits = TargetThresholds.of_run(results["meta"])
    hard = _hard_regime(results["meta"])
    return [*_query_target(results, limits), *_hard_regime_targets(results, hard, limits),
            *_field_targets(results, hard, limits), *_backprop_targets(results, hard, limits),
            *_training_cost_targets(results, limits), *_adaptation_target(results, limits)]


def _hard_regime(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The run's hard regime; None where it has none, or lacks its task or budget."""
    hard = meta.get("hard_regime")
    if hard and (hard["task"] not in meta["tasks"] or hard["budget"] not in meta["budgets"]):
        return None
    return hard or None


def _query_target(results: dict[str, Any], limits: TargetThresholds) -> list[tuple[str, bool | None, str]]:
    tasks = results["meta"]["tasks"]
    if "query" not in tasks:
        return []
    q, share = tasks["query"]["budget"], limits.query_of_oracle
    arr, oracle = (_seeds(results["accuracy"], "query", m, q) for m in ("ARR-COC", "box oracle"))
    d = _paired(arr, [share * y for y in oracle] if oracle else None)
    floor = limits.query_accuracy
    judged = arr if arr and len(arr) > 1 else None  # over seeds, as the paired targets: one seed judges nothing
    return [(f"Query task at {q:.1%}: ARR-COC >= {share:.0%} of the box oracle", _at_least(d, limits.tie),
             NOT_MEASURED if d is None else f"{_cell(arr)} vs {share:g} x {_cell(oracle)}: paired {_diff(d)}"),
            (f"Query task at {q:.1%}, no hand-set pooling: ARR-COC >= {floor:g}",
             None if judged is None else _mean(judged) >= floor, NOT_MEASURED if judged is None else _cell(judged))]


def _field_targets(results: dict[str, Any], hard: dict[str, Any] | None,
                   limits: TargetThresholds) -> list[tuple[str, bool | None, str]]:
    """The relevance field earns its place: freezing it (the ``field: frozen`` ablation) costs at least
    ``field_cost`` points on the query task and on its held-out layout at the task's budget, and ``field_cost_hard``
    in the hard regime, each with its paired interval above 0."""
    tasks, rows = results["meta"]["tasks"], []
    where = []
    if "query" in tasks:
        q = str(tasks["query"]["budget"])
        where += [("the query task", "query", "accuracy", q, limits.field_cost),
                  ("the held-out layout", "query", "layout_accuracy", q, limits.field_cost)]
    if hard:
        where.append(("the hard regime", hard["task"], "accuracy", str(hard["budget"]), limits.field_cost_hard))
    for name, task, key, budget, cost in where:
        default, frozen = (results["accuracy"].get(task, {}).get(method, {}).get(key, {}).get(budget)
                           for method in ("ARR-COC", FIELD_FROZEN))
        d = _versus_default(frozen, default)
        rows.append((f"Freezing the relevance field costs >= {cost:g} points on {name} at {100 * float(budget):g}% "
                     "(paired interval above 0)", None if d is None else -d[0] >= cost and d[0] + d[1] < 0,
                     NOT_MEASURED if d is None else
                     f"default {_cell(default)}, field frozen {_cell(frozen)}: paired {_diff(d)}"))
    return rows


def _hard_regime_targets(results: dict[str, Any], hard: dict[str, Any] | None,
                         limits: TargetThresholds) -> list[tuple[str, bool | None, str]]:
    """Where allocation decides: whether the regime is one, ARR-COC against the best baseline at equal measured
    speed-up, and against the box oracle."""
    margin, gap = limits.hard_margin, limits.hard_oracle_gap
    if not hard:
        return [(f"Hard regime: at equal measured speed-up, ARR-COC >= the best baseline + {margin:g} points, and "
                 f"within {gap:g} points of the box oracle", None, "no hard regime in this run")]
    task, budget = hard["task"], hard["budget"]
    arr, oracle, full, rand = (_seeds(results["accuracy"], task, m, b) for m, b in
                               (("ARR-COC", budget), ("box oracle", budget), ("full", 1.0), ("random", budget)))
    drop, within = limits.regime_random_drop, limits.regime_oracle_gap
    regime = None if not (full and oracle and rand) else (
        _mean(full) - _mean(rand) >= drop and _mean(full) - _mean(oracle) <= within)
    d = _paired(arr, oracle, -gap)
    return [(f"Hard regime ({task}, {budget:.2%}): random-K >= {drop:g} points below all tokens, box oracle within "
             f"{within:g} (the regime itself)", regime, NOT_MEASURED if regime is None else
             f"all tokens {_cell(full)}, random-K {_cell(rand)}, box oracle {_cell(oracle)}"),
            _at_equal_speed(results, task, budget, arr, margin),
            (f"Hard regime: ARR-COC within {gap:g} points of the box oracle at {budget:.2%}", _at_least(d, limits.tie),
             NOT_MEASURED if d is None else f"{_cell(arr)} vs {_cell(oracle)} - {gap:g}: paired {_diff(d)}")]


def _at_equal_speed(results: dict[str, Any], task: str, budget: float, arr: list[float] | None,
                    margin: float) -> tuple[str, bool | None, str]:
    """ARR-COC against the best of ``HARD_BASELINES``, each read off its accuracy-speed frontier at ARR-COC's
    measured speed-up (:func:`equal_speed`)."""
    speed = speeds(results).get("ARR-COC", {}).get(budget)
    best = None
    if arr and speed is not None:
        curves = {m: equal_speed(results, task, m, speed) for m in HARD_BASELINES}
        curves = {m: c for m, c in curves.items() if c is not None}
        if curves:
            name = max(curves, key=lambda m: _mean(curves[m][0]))
            best = (name, *curves[name])
    target = (f"Hard regime: at equal measured speed-up, ARR-COC >= the best of {' / '.join(HARD_BASELINES)} + "
              f"{margin:g} points")
    if best is None or len(arr) < 2:
        return target, None, NOT_MEASURED
    name, values, beyond = best
    d = paired_interval(arr, values)
    return (target + " (paired interval above 0)", d[0] >= margin and d[0] - d[1] > 0,
            f"ARR-COC {_cell(arr)} at {speed:.2f}x; best there: {name} {_cell(values)}"
            + (" (at its cheapest: it cannot get that fast)" if beyond else " (interpolated)") + f"; paired {_diff(d)}")


def _backprop_targets(results: dict[str, Any], hard: dict[str, Any] | None,
                      limits: TargetThresholds) -> list[tuple[str, bool | None, str]]:
    """Per task: local-rule ARR-COC against the identical module trained by backprop."""
    tasks, gap, rows = results["meta"]["tasks"], limits.backprop_gap, []
    for task in tasks:
        # judged where allocation decides: at its own budget the hard regime's task saturates (every method ties)
        budget = hard["budget"] if hard and hard["task"] == task else tasks[task]["budget"]
        arr, allbp = (_seeds(results["accuracy"], task, m, budget) for m in ("ARR-COC", ALL_BACKPROP))
        d = _paired(arr, allbp, -gap)
        rows.append((f"{task} at {100 * budget:g}%: local-rule ARR-COC >= all-backprop ARR-COC - {gap:g} points",
                     _at_least(d, limits.tie),
                     NOT_MEASURED if d is None else f"{_cell(arr)} vs {_cell(allbp)} - {gap:g}: paired {_diff(d)}"))
    return rows


def _training_cost_targets(results: dict[str, Any], limits: TargetThresholds) -> list[tuple[str, bool | None, str]]:
    cost, tasks = results.get("training_cost"), results["meta"]["tasks"]
    if not cost:
        return []
    local, global_ = cost["local"], cost["global"]
    # a cost comparison is only as strong as the allocator it compares with: show whether it learned
    reached = {task: _seeds(results["accuracy"], task, DYNAMIC_VIT, tasks[task]["budget"]) for task in tasks}
    learned = "; its accuracy: " + ", ".join(f"{task} {_cell(acc)}" for task, acc in reached.items() if acc)
    memory, step_time, spread = limits.memory_ratio, limits.time_ratio, limits.time_ratio_spread
    return [(f"Local-rule training peak memory <= {memory:g}x the end-to-end allocator's",
             cost["memory_ratio"] <= memory,
             f"{local['peak_mb']:.0f} MB vs {global_['peak_mb']:.0f} MB = {cost['memory_ratio']:.2f}x" + learned),
            (f"Local-rule training step time <= {step_time:g}x the end-to-end allocator's",
             cost["time_ratio"] <= step_time,
             f"{local['step_ms']:.0f} ms vs {global_['step_ms']:.0f} ms = {cost['time_ratio']:.2f}x{learned}"
             # step times of the same code have differed by ~0.1x between runs: near the limit, say so
             + (f"; marginal: within {spread / step_time:.0%} of the limit, inside the run-to-run spread"
                if step_time - spread <= cost["time_ratio"] <= step_time + spread else ""))]


def _adaptation_target(results: dict[str, Any], limits: TargetThresholds) -> list[tuple[str, bool | None, str]]:
    a = results.get("adaptation")
    if not a:
        return []
    fractions = [f for f in a.get("recovered_by_seed", [a["recovered_fraction"]]) if f is not None]
    mean, half = interval(fractions) if fractions else (None, None)
    share, seeds = limits.adaptation_recovery, limits.adaptation_seeds
    return [(f"Online adaptation recovers >= {share:.0%} of the accuracy lost to the shift, without labels (mean "
             f"over >= {seeds} seeds)", None if len(fractions) < seeds else mean >= share,
             (f"{len(fractions)} seed(s): " + ", ".join(f"{f:.0%}" for f in fractions)
              + ("" if mean is None else f"; mean {mean:.0%} ± {half:.0%}")
              + f". Cost per image: adapting {a['online_ms']:.1f} ms, frozen {a['frozen_ms']:.1f} ms "
                f"({a['online_ms'] / a['frozen_ms']:.0f}x)")), *_ceiling_target(a, limits)]


TEACHERS = {"set": "the set-level signal (does each kept patch, and each next candidate, move the reduced prediction "
                   "towards the full-token one)", "perturbation": "perturbation importance",
            "attention": "the backbone's CLS attention", "reward": "the reward of agreeing with all tokens"}


def _ceiling_target(a: dict[str, Any], limits: TargetThresholds) -> list[tuple[str, bool | None, str]]:
    """Issue 36's: adaptation recovers a share of the label-free ceiling (what agreeing with the full-token
    prediction on every shift image would give back, per seed) at a bounded cost per image."""
    if "of_ceiling_by_seed" not in a:  # runs before the ceiling was kept per seed
        return []
    shares = [f for f in a["of_ceiling_by_seed"] if f is not None]
    share, cost, seeds = limits.adaptation_of_ceiling, limits.adaptation_cost, limits.adaptation_seeds
    ratio = a["online_ms"] / a["frozen_ms"]
    mean, half = interval(shares) if shares else (None, None)
    passed = None if len(shares) < seeds else (mean >= share and ratio <= cost)
    return [(f"Online adaptation recovers >= {share:.0%} of the label-free ceiling at <= {cost:g}x the frozen cost "
             f"per image (mean over >= {seeds} seeds)", passed,
             f"{len(shares)} seed(s): " + ", ".join(f"{f:.0%}" for f in shares)
             + ("" if mean is None else f"; mean {mean:.0%} ± {half:.0%}") + f"; cost {ratio:.1f}x")]


def _allocation_share(a: dict[str, Any]) -> str:
    """What of the loss under the shift any allocation could give back (up to the box oracle's accuracy on the
    shift), how much of the digit each selection keeps there, and how much adaptation gave back."""
    lost, reachable = a["test_accuracy"] - a["frozen"], a["oracle_shift"] - a["frozen"]
    agreeable = a["full_tokens_shift"] - a["frozen"]  # what perfect agreement with all tokens would give back
    if lost <= 0:
        return f"The frozen module loses nothing to the shift ({a['test_accuracy']:.1f}% -> {a['frozen']:.1f}%)."
    cover = a["coverage"]
    where = f"{a['held_out']} unseen shift canvases" if "by_seed" in a else "the shift"  # earlier runs: the stream
    text = (f"Of the {lost:.1f} points lost, an allocation could give back at most {max(reachable, 0):.1f}: keeping "
            f"exactly the digit's patches (box oracle) reaches {a['oracle_shift']:.1f}% on the shift (all tokens "
            f"{a['full_tokens_shift']:.1f}%), so "
            + (f"{max(reachable, 0) / lost:.0%} of the loss is within reach of token allocation; the rest is the "
               "frozen backbone's." if reachable < lost else "all of the loss is within reach of token allocation.")
            + " A label-free teacher has only the full-token prediction to agree with: matching it on every image "
            + (f"would give back {max(agreeable, 0) / lost:.0%} of the loss." if agreeable < lost
               else "would give back all of the loss.")
            + f" On {where} the frozen module keeps "
            f"{cover['frozen']:.0f}% of the digit's patches, its label-free target ({a['adaptation']['target']}) "
            f"{cover['teacher']:.0f}%, and the module after adaptation {cover['adapted']:.0f}%.")
    if reachable <= 0:
        return text
    recovered = (a["online"] - a["frozen"]) / reachable
    return text + f" Label-free adaptation recovers {recovered:.0%} of what is within reach."


# one colour per method in every panel (ARR-COC's red is its own; C2 is the query-fusion line)
METHOD_COLORS = {"ARR-COC": "C3", DYNAMIC_VIT: "C0", ALL_BACKPROP: "C9", "random": "C1", "grid": "C8",
                 "evit": "C4", "ats": "C5", "tome": "C6", "box oracle": "grey"}


def _plots(results: dict[str, Any], out: Path) -> dict[str, str]:
    """Every plot of the report, drawn into ``out``: which -> its file name."""
    table = results["accuracy"]
    files = {"curves": _accuracy_plot(results, out)}
    if any(m.startswith("ARR-COC /") for entries in table.values() for m in entries):
        files["ablations"] = _ablation_plot(results, out)
    if results.get("throughput"):
        files["pareto"] = _pareto_plot(results, out)
    cost = results.get("training_cost")
    if cost:
        files["cost"] = _cost_plot(cost, out)
    adapted = results.get("adaptation")
    if adapted:
        files["adaptation"] = _adaptation_plot(adapted, out)
    if "query" in table:
        files["heatmaps"] = "canvas_heatmaps.png"
    return files


def _accuracy_plot(results: dict[str, Any], out: Path) -> str:
    """Accuracy vs. budget, one panel per task, one line per main method."""
    plt = pyplot()
    table, meta = results["accuracy"], results["meta"]
    budgets = [b for b in meta["budgets"] if b < 1]
    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4.2), squeeze=False)
    axes = axes[0]
    for ax, task in zip(axes, table):
        for method, entry in table[task].items():
            if method not in MAIN_METHODS and method != "box oracle":
                continue
            if method == "full":
                ax.axhline(interval(entry["accuracy"]["1.0"])[0], color="black", ls="--", label="full (all tokens)")
                continue
            points = [(b, interval(entry["accuracy"][str(b)])) for b in budgets if str(b) in entry["accuracy"]]
            if not points:
                continue
            xs = [100 * b for b, _ in points]
            style = dict(color=METHOD_COLORS.get(method), **({"lw": 2.5, "zorder": 3} if method == "ARR-COC" else {}),
                         **({"ls": ":"} if method == "box oracle" else {}))
            ax.errorbar(xs, [m for _, (m, _) in points], yerr=[h for _, (_, h) in points], marker="o", ms=4,
                        capsize=2, label=method, **style)
        fusion = table[task].get("query fusion (reference)")
        if fusion:
            ax.axhline(interval(fusion["accuracy"]["1.0"])[0], color="C2", ls="-.", label="query fusion (reference)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([100 * b for b in budgets], [f"{100 * b:g}%" for b in budgets])
        ax.set_xlabel("patch tokens kept")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(TASK_TITLES[task], fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=6, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend below both panels
    fig.savefig(out / "canvas_accuracy.png", dpi=110)
    plt.close(fig)
    return "canvas_accuracy.png"


def ablation_budgets(settings: dict[str, Any], task: str) -> list[float]:
    """The budgets a task's ablations are scored at (``settings``: the benchmark's, or a run's meta): the task's
    own, the hard regime's where that is this task, and any more the task lists as ``ablation_budgets`` (e.g. the
    lowest budget, where the allocator matters)."""
    entry, hard = settings["tasks"][task], settings.get("hard_regime") or {}
    extra = ([hard["budget"]] if hard.get("task") == task else []) + list(entry.get("ablation_budgets", []))
    return [entry["budget"], *(b for b in dict.fromkeys(extra) if b != entry["budget"])]


def _ablation_budgets(meta: dict[str, Any], task: str, variants: dict[str, Any]) -> list[str]:
    """:func:`ablation_budgets` of a run, each where the run scored its ablations (``variants``: method -> entry;
    runs from before a budget was added read as they did)."""
    own, *extra = map(str, ablation_budgets(meta, task))
    return [own, *(b for b in extra if any(v["accuracy"].get(b) for v in variants.values()))]


def _variants(table: dict[str, Any], task: str) -> dict[str, Any]:
    """The task's ARR-COC ablations: method -> entry."""
    return {m: e for m, e in table[task].items() if m.startswith("ARR-COC /")}


def _ablation_plot(results: dict[str, Any], out: Path) -> str:
    """Each ablation's paired difference to the default ARR-COC, with its 95% interval, where it matters most: in
    the hard regime for its task, else at the task's budget."""
    plt = pyplot()
    table, meta = results["accuracy"], results["meta"]
    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 5), squeeze=False)
    for ax, task in zip(axes[0], table):
        variants = _variants(table, task)
        budget = _ablation_budgets(meta, task, variants)[-1]
        default = table[task].get("ARR-COC", {}).get("accuracy", {}).get(budget)
        diffs = {m.removeprefix("ARR-COC / "): _versus_default(e["accuracy"].get(budget), default)
                 for m, e in variants.items()}
        diffs = {name: d for name, d in diffs.items() if d is not None}
        ax.barh(list(diffs), [d[0] for d in diffs.values()], xerr=[d[1] for d in diffs.values()], color="C3",
                alpha=0.7, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set(xlabel=f"accuracy minus the default's at {float(budget):.1%} (points, paired)",
               title=TASK_TITLES[task])
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, out / "canvas_ablations.png", dpi=110).name


def _pareto_plot(results: dict[str, Any], out: Path) -> str:
    """Accuracy vs. measured speed-up, one panel per task, one line per method over the budgets."""
    plt = pyplot()
    table, measured = results["accuracy"], speeds(results)
    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4.2), squeeze=False)
    for ax, task in zip(axes[0], table):
        for method in COST_METHODS:
            entry, speed = table[task].get(method), measured.get(method, {})
            points = sorted((speed[b], _mean(entry["accuracy"][str(b)])) for b in speed
                            if entry is not None and entry["accuracy"].get(str(b)))
            full = _seeds(table, task, "full", 1.0)
            if points and full:
                points = [(1.0, _mean(full))] + points
                ax.plot(*zip(*points), marker="o", ms=4, label=method,
                        color=METHOD_COLORS.get(method.removesuffix(" (early)")),
                        **({"lw": 2.5, "zorder": 3} if method == "ARR-COC" else {}),
                        **({"ls": ":"} if method == "box oracle" else {"ls": "--"} if method in EARLY else {}))
        ax.set(xscale="log", xlabel="measured speed-up over the full model (scoring included)",
               ylabel="test accuracy (%)", title=TASK_TITLES[task])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out / "canvas_pareto.png", dpi=110).name


def _cost_plot(cost: dict[str, Any], out: Path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    names = ["local rules", "global backprop"]
    axes[0].bar(names, [cost["local"]["peak_mb"], cost["global"]["peak_mb"]], color=["C3", "C0"])
    axes[0].set_ylabel("peak tensor memory (MB)")
    axes[1].bar(names, [cost["local"]["step_ms"], cost["global"]["step_ms"]], color=["C3", "C0"])
    axes[1].set_ylabel("step time (ms)")
    fig.suptitle(f"one training step of the relevance module, batch {cost['batch']}", fontsize=10)
    return save_figure(fig, out / "canvas_training_cost.png", dpi=110).name


def _adaptation_plot(adapted: dict[str, Any], out: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for key, label in (("frozen", "frozen"), ("online", "ARR-COC online (label-free)"), ("tent", "TENT (backprop)")):
        curve = adapted[f"{key}_curve"]
        window = max(1, len(curve) // 8)
        smooth = [sum(curve[max(0, i - window + 1):i + 1]) / len(curve[max(0, i - window + 1):i + 1])
                  for i in range(len(curve))]
        ax.plot([adapted["batch"] * (i + 1) for i in range(len(curve))], smooth, label=label)
    ax.axhline(adapted["test_accuracy"], color="black", ls="--", lw=1, label="before the shift")
    ax.axhline(adapted["full_tokens_shift"], color="grey", ls=":", lw=1.5, label="all tokens, on the shift")
    # the most any allocation reaches on the shift: keeping exactly the digit's patches
    ax.axhline(adapted["oracle_shift"], color="grey", ls="-.", lw=1.5, label="box oracle, on the shift")
    ax.set_xlabel("images of the shifted stream seen")
    ax.set_ylabel(f"accuracy at {adapted['budget'] * 100:g}% (%)")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "canvas_adaptation.png", dpi=110).name


def speed_lines(speed: dict[str, Any], budgets: list[float], module_share: float | None = None) -> list[str]:
    """Markdown of one canvas throughput measurement (``canvas.throughput``): speed-up per method and budget;
    ``module_share``: the relevance module's target share of a full forward (``None``: the default target's)."""
    module_share = TargetThresholds().module_share if module_share is None else module_share
    where = f"{speed['threads']} threads" if speed.get("device", "cpu") == "cpu" else speed["device"]
    lines = [f"Batch {speed['batch']}, {where}, {speed['repeats']} interleaved repeats, medians; "
             f"full forward {speed['full_ms']:.{0 if speed['full_ms'] >= 10 else 2}f} ms. Speed-up = full time / "
             "method time, measured in the same run.",
             "", "| method | " + " | ".join(f"{100 * b:g}%" for b in budgets if b < 1) + " |",
             "|---|" + "---|" * sum(b < 1 for b in budgets)]
    by_method: dict[str, dict[float, float]] = {}
    for row in speed["rows"]:
        by_method.setdefault(row["method"], {})[row["budget"]] = row["speedup"]
    for method, cells in by_method.items():
        if method == "full":
            continue
        speedups = (f"{cells[b]:.2f}x" if b in cells else "–" for b in budgets if b < 1)
        lines.append(f"| {method} | " + " | ".join(speedups) + " |")
    share = speed.get("module_share")
    shares = "" if not share else " It costs " + ", ".join(
        f"{v:.1%} of a full forward at batch {b}" for b, v in share.items()) + f" (target <= {module_share:.0%})."
    # runs before module_share was measured timed the module together with the backbone's token embedding
    alone = ("on the embedded tokens every method computes" if share else
             "timed together with the backbone's token embedding, which every method computes")
    return lines + ["", f"\"ARR-COC relevance module\" is the module alone (scoring, field relaxation, allocation), "
                    f"{alone}: its speed-up below 1/overhead means it costs that share of one full forward." + shares,
                    ""]


def earlier_runs(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs whose tasks a results file kept (``meta.earlier``; one record in files written before it was a
    list)."""
    earlier = meta.get("earlier") or []
    return [earlier] if isinstance(earlier, dict) else earlier


def _earlier_run(meta: dict[str, Any]) -> list[str]:
    """The lines that say which tasks come from an earlier run (``arrcoc bench canvas --tasks``), if any."""
    lines = []
    for earlier in earlier_runs(meta):
        tasks = "the results of the " + " and ".join(f"{task} task" for task in earlier["tasks"])
        measured_there = (", and the timing, training cost and adaptation measured on its canvases"
                          if "cluttered" in earlier["tasks"] else "")
        lines += [f"**Kept from an earlier run:** {tasks}{measured_there} come from `{earlier['command']}` "
                  f"({earlier['wall_seconds'] / 60:.1f} min, {earlier['workers']} worker processes"
                  + (f", code at commit {earlier['commit'][:7]}" if earlier.get("commit") else "")
                  + "); this run reran the other tasks only.", ""]
    return lines


def write_report(results: dict[str, Any], out: Path, report: Path) -> Path:
    """``REPORT.md`` of a run's ``results`` at ``report``, its plots drawn into ``out``: one function per section."""
    files = _plots(results, out)
    link = os.path.relpath(out, report.parent)
    table, meta = results["accuracy"], results["meta"]
    budgets = [1.0] + [b for b in meta["budgets"] if b < 1]  # every table shows the full-token column
    module_share = TargetThresholds.of_run(meta).module_share
    lines = [*_header(meta), *_targets_section(results, link, files)]
    for task in table:
        lines += [*_task_section(table, meta, task, budgets), *_ablations_section(table, meta, task),
                  *_layout_section(table, meta, task), ""]
    if "ablations" in files:
        lines += [f"![paired differences of the ablations]({link}/{files['ablations']})", ""]
    if results.get("throughput"):
        lines += [*_accuracy_at_cost_section(results, budgets, link, files), "## Throughput (cluttered canvases)", "",
                  *speed_lines(results["throughput"], budgets, module_share)]
    lines += _gpu_section(out, link, budgets, module_share)
    lines += _vqa_section(out, link)
    if results.get("training_cost"):
        lines += _training_cost_section(results["training_cost"], link, files)
    if results.get("adaptation"):
        lines += _adaptation_lines(results["adaptation"], link, files)
    if "heatmaps" in files:
        lines += ["## What ARR-COC keeps", "", f"![heatmaps]({link}/{files['heatmaps']})", ""]
    report.write_text("\n".join(lines))
    return report


def _header(meta: dict[str, Any]) -> list[str]:
    """The title, the command and settings of the run (and of any run it kept tasks from), and the backbone."""
    backbone = meta.get("backbone_meta") or {}
    return [
        "# ARR-COC offline benchmark" + (" — QUICK MODE (a smoke run: 1 seed, short training; not a result)"
                                         if meta["mode"] == "quick" else ""),
        "",
        f"Command: `{meta['command']}` ({meta['wall_seconds'] / 60:.1f} min on {meta['cpu']}, "
        f"{meta['workers']} worker processes, torch {meta['torch']}"
        + (f", code at commit {meta['commit'][:7]}" if meta.get("commit") else "") + f"). Seeds {meta['seeds']}; "
        f"{meta['test_images']} test canvases per task and seed (TEST source digits only; each seed draws its own); "
        f"relevance modules trained for {meta['train']['steps']} steps of {meta['train']['batch_size']} canvases"
        + (f" (the DynamicViT-style allocator for {meta['train']['global_steps']})"
           if meta["train"].get("global_steps") not in (None, meta["train"]["steps"]) else "") + ". "
        "Accuracies are means with a 95% interval over the seeds (Student t).",
        "",
        *_earlier_run(meta),
        f"**Backbone (every method):** the canvas ViT `{Path(meta['backbone']).name}` "
        f"({json.dumps(backbone.get('architecture', {}))}), trained by `{backbone.get('command', '?')}` in "
        f"{backbone.get('train_seconds', '?')} s on {backbone.get('device', '?')}; full-token test accuracy "
        f"{100 * backbone.get('test_accuracy_random_keep', {}).get('1.0', float('nan')):.1f}% "
        "(its own evaluation, 2,000 cluttered test canvases). Frozen throughout.",
        "",
    ]


def _targets_section(results: dict[str, Any], link: str, files: dict[str, str]) -> list[str]:
    lines = ["## Targets", "", "| target | result | numbers |", "|---|---|---|"]
    lines += [f"| {name} | {verdict(passed)} | {numbers} |" for name, passed, numbers in targets(results)]
    return lines + ["", f"![accuracy vs budget]({link}/{files['curves']})", ""]


def _task_section(table: dict[str, Any], meta: dict[str, Any], task: str, budgets: list[float]) -> list[str]:
    """A task's accuracy of every method (its ablations aside) at every budget, and what ARR-COC's selection
    covers."""
    lines = [f"## {TASK_TITLES[task]}", "",
             "| method | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " | mean tokens / block |",
             "|---|" + "---|" * (len(budgets) + 1)]
    for method, entry in table[task].items():
        if method.startswith("ARR-COC /"):
            continue
        cells = [_cell(entry["accuracy"].get(str(b))) for b in budgets]
        tokens = ", ".join(f"{entry['mean_tokens'][str(b)]:.1f}" for b in budgets if str(b) in entry["mean_tokens"])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {tokens} |")
    arr = table[task].get("ARR-COC", {})
    extra = [f"{k.replace('_', ' ')} {_cell(arr[k])}%" for k in ("box_coverage", "query_overlap") if arr.get(k)]
    if extra:
        lines += ["", f"ARR-COC at {meta['tasks'][task]['budget']:.1%}: " + "; ".join(extra)
                  + " (box coverage: share of the target digit's patches kept, capped at K; query overlap: "
                    "share of the kept patches that are also kept without the query)."]
    return lines


def _ablations_section(table: dict[str, Any], meta: dict[str, Any], task: str) -> list[str]:
    """A task's ARR-COC ablations: each one's accuracy and paired difference to the default at every budget it was
    scored at, on the test canvases and on the shift split where it was scored there."""
    variants = _variants(table, task)
    if not variants:
        return []
    arr = table[task].get("ARR-COC", {})
    scored = _ablation_budgets(meta, task, variants)
    shifted = [b for b in scored if b in arr.get("shift_accuracy", {})]
    # (key, budget, column title): on the task's test canvases, then on its shift split where it was scored
    columns = ([("accuracy", b, f"accuracy at {100 * float(b):g}%") for b in scored]
               + [("shift_accuracy", b, f"shift at {100 * float(b):g}%") for b in shifted])
    at = " and ".join(f"{100 * float(b):g}%" for b in scored)
    hard = meta.get("hard_regime") or {}
    hard_budget = str(hard["budget"]) if hard.get("task") == task else None
    default = "; ".join(_cell(arr.get(key, {}).get(b)) for key, b, _ in columns)
    lines = ["", f"**ARR-COC ablations at {at}** (default: {default}); the paired difference to the default "
             "over the seeds, with its 95% interval, is what each piece contributes"
             + (f" ({100 * float(hard_budget):g}% is the hard regime, where allocation decides)"
                if hard_budget in scored[1:] else "")
             + (" and on the shift split (3x the clutter, larger digits: the online-adaptation section's "
                "shift), unseen in training" if shifted else ""), "",
             "| variant | " + " | ".join(f"{title} | paired difference" for _, _, title in columns)
             + " | box coverage (%) | step (ms) |",
             "|---|" + "---|---|" * len(columns) + "---|---|"]
    for method, entry in variants.items():
        cells = []
        for key, budget, _ in columns:
            d = _versus_default(entry.get(key, {}).get(budget), arr.get(key, {}).get(budget))
            cells += [_cell(entry.get(key, {}).get(budget)), "–" if d is None else _diff(d)]
        runs = len(entry["accuracy"].get(scored[0]) or [])
        all_runs = len(arr.get("accuracy", {}).get(scored[0]) or [])
        seeds = f" ({runs} of {all_runs} seeds)" if runs < all_runs else ""
        lines.append(f"| {method.removeprefix('ARR-COC / ')}{seeds} | " + " | ".join(cells)
                     + f" | {_cell(entry.get('box_coverage'))} | {_cell(entry.get('step_ms'))} |")
    return lines


def _layout_section(table: dict[str, Any], meta: dict[str, Any], task: str) -> list[str]:
    """Every method on the task's held-out layout (digits anywhere, some beside another), the modules trained on the
    usual layout; ARR-COC's ablations with their paired difference to the default."""
    budgets = [str(b) for b in meta["tasks"][task].get("held_out_layout", [])]
    if not budgets:
        return []
    default = table[task].get("ARR-COC", {}).get("layout_accuracy", {})
    lines = ["", f"**On the held-out layout** (`{LAYOUT_SPLITS[task]}` split: 2-5 digits anywhere, half of them "
             "beside another one, asked for by colour; every module trained on the usual layout at "
             f"{meta['tasks'][task]['budget']:.1%}; all tokens: "
             f"{_cell(table[task].get('full', {}).get('layout_accuracy', {}).get('1.0'))}). An ablation's "
             "paired difference to the default is in brackets.", "",
             "| method | " + " | ".join(f"{100 * float(b):g}%" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for method, entry in table[task].items():
        scores = entry.get("layout_accuracy", {})
        if not any(b in scores for b in budgets):
            continue
        cells = []
        for b in budgets:
            d = _versus_default(scores.get(b), default.get(b)) if method.startswith("ARR-COC /") else None
            cells.append(_cell(scores.get(b)) + ("" if d is None else f" ({_diff(d)})"))
        lines.append(f"| {method.removeprefix('ARR-COC / ')} | " + " | ".join(cells) + " |")
    return lines


def _accuracy_at_cost_section(results: dict[str, Any], budgets: list[float], link: str,
                              files: dict[str, str]) -> list[str]:
    """Every method's accuracy at its measured speed-up, per task, and the plot of the two."""
    table, measured = results["accuracy"], speeds(results)
    lines = ["## Accuracy at measured cost", "",
             "Every method's speed-up over the full model, measured in one run on cluttered canvases with its own "
             "scoring included (ARR-COC's relevance module, which its references share; EViT / ATS's full-token "
             "blocks before their first reduction; ToMe's matching), against its accuracy; in brackets the mean "
             "tokens per block where a method reduces progressively. A progressive method cannot get cheaper "
             "than its schedule at the smallest budget allows; its early schedule (\"(early)\": EViT / ATS "
             "reduce once, straight to the budget, after block 0; ToMe merges half the tokens per block) is its "
             "fastest, and the hard-regime target judges each method on the best of its schedules at that "
             "speed.", ""]
    for task in table:
        lines += [f"**{TASK_TITLES[task]}**", "", "| method | " + " | ".join(f"{100 * b:g}%" for b in budgets[1:])
                  + " |", "|---|" + "---|" * (len(budgets) - 1)]
        for method in COST_METHODS:
            entry, speed = table[task].get(method), measured.get(method, {})
            if entry is None:
                continue
            cells = []
            for b in budgets[1:]:
                acc, tokens = entry["accuracy"].get(str(b)), entry["mean_tokens"].get(str(b))
                cells.append("–" if not acc else f"{_mean(acc):.1f} at {speed[b]:.2f}x" if b in speed
                             else f"{_mean(acc):.1f}" + (f" ({tokens:.0f} tokens)" if tokens else ""))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines + [f"![accuracy vs measured speed-up]({link}/{files['pareto']})", ""]


def _gpu_section(out: Path, link: str, budgets: list[float], module_share: float) -> list[str]:
    """The same timing on a GPU, where ``arrcoc bench gpu`` left its ``gpu_canvas.json`` beside the results."""
    gpu = read_json(out / "gpu_canvas.json")
    if not gpu:
        return []
    lines = ["## Throughput on a GPU", "",
             f"The same measurement on {gpu['meta']['device']} (`{gpu['meta']['command']}`, commit "
             f"{gpu['meta'].get('commit') or 'unknown'}); GPU throughput of the timm ViTs and the VLM prefill "
             f"are in [{link}/gpu.md]({link}/gpu.md).", ""]
    for speed in gpu["runs"]:
        mode = "" if "graphs" not in speed else f", ARR-COC {'graph-captured' if speed['graphs'] else 'eager'}"
        lines += [f"**{speed['dtype']}{mode}**", "", *speed_lines(speed, budgets, module_share)]
    return lines


def _vqa_section(out: Path, link: str) -> list[str]:
    """Issue 38's targets, where ``arrcoc bench vqa`` left its ``vqa.json`` beside the results."""
    vqa = read_json(out / "vqa.json")
    if not vqa:
        return []
    meta = vqa["meta"]
    return ["## Canvas VQA: visual-token pruners and ARR-COC on a trained VLM", "",
            f"`{meta['command']}` at commit {meta.get('commit') or 'unknown'}, {meta['wall_seconds'] / 60:.0f} min; "
            f"every table in [{link}/vqa.md]({link}/vqa.md).", "", *target_lines(vqa_targets(vqa)), "",
            "Each baseline against random (its paper's qualitative claim):", "", *target_lines(paper_checks(vqa)), "",
            f"![accuracy vs visual tokens]({link}/vqa_accuracy.png)", ""]


def _training_cost_section(cost: dict[str, Any], link: str, files: dict[str, str]) -> list[str]:
    return ["## Training cost: local rules vs. global backprop", "",
            f"One step on a batch of {cost['batch']} cluttered canvases, each in a fresh process; peak memory = "
            "the peak of the bytes held by tensors allocated during one step (the profiler's allocation events "
            "replayed in order); step time = median over steps.", "",
            "| | peak tensor memory (MB) | step time (ms) |", "|---|---|---|",
            f"| local rules (ARR-COC) | {cost['local']['peak_mb']:.0f} | {cost['local']['step_ms']:.0f} |",
            f"| global backprop (DynamicViT-style) | {cost['global']['peak_mb']:.0f} | "
            f"{cost['global']['step_ms']:.0f} |",
            f"| ratio | {cost['memory_ratio']:.2f}x | {cost['time_ratio']:.2f}x |", "",
            f"![training cost]({link}/{files['cost']})", ""]


def _held_out_over_seeds(adapted: dict[str, Any]) -> list[str]:
    """Every seed's adapted module against its frozen self on the unseen shift canvases: a paired interval."""
    runs = adapted.get("by_seed", [])
    if len(runs) < 2:
        return []
    frozen, online, tent = ([run["held_out_accuracy"][key] for run in runs] for key in ("frozen", "online", "tent"))
    (gain, half), (tent_gain, tent_half) = paired_interval(online, frozen), paired_interval(tent, frozen)
    return ["", f"Over the {len(runs)} seeds' modules, on the unseen shift canvases: frozen "
                f"{statistics.fmean(frozen):.1f}%, adapted {statistics.fmean(online):.1f}% (paired difference "
                f"{gain:+.1f} ± {half:.1f} points; per seed "
                + ", ".join(f"{b - a:+.1f}" for a, b in zip(frozen, online))
                + f"), TENT {tent_gain:+.1f} ± {tent_half:.1f}."]


def _adaptation_lines(adapted: dict[str, Any], link: str, files: dict[str, str]) -> list[str]:
    held_out = adapted["held_out_accuracy"]
    settings = adapted["adaptation"]
    return ["## Online adaptation under a distribution shift", "",
              f"The cluttered shift split (3x the clutter fragments, larger digits) as a stream of "
              f"{adapted['stream_images']} images in batches of {adapted['batch']}, "
              f"budget {adapted['budget'] * 100:g}%; "
              "prequential accuracy (each batch is predicted before the method adapts on it), then each adapted "
              f"model on {adapted['held_out']} shift canvases no method saw. ARR-COC adapts towards "
              f"{TEACHERS.get(settings['target'], settings['target'])} with {settings['optimizer']} "
              f"(lr {settings['lr']:g}), guarded by its "
              f"rollback. Full tokens: {adapted['full_tokens_test']:.1f}% on test, "
              f"{adapted['full_tokens_shift']:.1f}% on the shift.",
              "", _allocation_share(adapted), *_held_out_over_seeds(adapted), "",
              "| method | accuracy on the stream (%) | on unseen shift canvases after it (%) | cost per image (ms) |",
              "|---|---|---|---|",
              f"| ARR-COC before the shift (test split) | {adapted['test_accuracy']:.1f} | | |",
              f"| frozen | {adapted['frozen']:.1f} | {held_out['frozen']:.1f} | {adapted['frozen_ms']:.1f} |",
              f"| ARR-COC online, label-free local rules | {adapted['online']:.1f} | {held_out['online']:.1f} | "
              f"{adapted['online_ms']:.1f} |",
              f"| TENT (entropy minimisation of the backbone's norms, backprop) | {adapted['tent']:.1f} | "
              f"{held_out['tent']:.1f} | {adapted['tent_ms']:.1f} |", "",
              f"![adaptation]({link}/{files['adaptation']})", ""]


if __name__ == "__main__":  # python -m arrcoc.bench.canvas_report RESULTS.json [REPORT.md]: redraw from a run
    path = Path(sys.argv[1])
    data = json.loads(path.read_text())
    print(write_report(data, path.parent, Path(sys.argv[2]) if len(sys.argv) > 2 else path.parent / "REPORT.md"))
