"""REPORT.md and its plots from ``canvas.json`` (``python -m arrcoc.bench.canvas_report canvas.json`` redraws)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from arrcoc.data.tasks import TASKS
from arrcoc.metrics import interval
from arrcoc.reporting import pyplot, read_json, verdict

TASK_TITLES = {"cluttered": "Cluttered canvases (vision only)", "query": "Query canvases (vision-language)"}
MAIN_METHODS = ("full", "random", "grid", "evit", "ats", "tome", "DynamicViT-style (global backprop)", "ARR-COC")


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    mean, half = interval(values)
    return f"{mean:.1f} ± {half:.1f}" if len(values) > 1 else f"{mean:.1f}"


def _mean(values: list[float] | None) -> float | None:
    return None if not values else sum(values) / len(values)


def _accuracy(table: dict, task: str, method: str, budget: float) -> float | None:
    entry = table[task].get(method)
    return None if entry is None else _mean(entry["accuracy"].get(str(budget)))


def targets(results: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(target, pass/fail/None = not measured, the numbers behind it)."""
    table, meta = results["accuracy"], results["meta"]
    q_budget, c_budget = meta["tasks"]["query"]["budget"], meta["tasks"]["cluttered"]["budget"]
    rows: list[tuple[str, bool | None, str]] = []

    arr_q = _accuracy(table, "query", "ARR-COC", q_budget)
    fusion = _accuracy(table, "query", "query fusion (reference)", 1.0)
    if arr_q is not None and fusion is not None:
        rows.append((f"Query task at {q_budget:.1%}: ARR-COC >= 90% of the query-fusion reference",
                     arr_q >= 0.9 * fusion, f"{arr_q:.1f} vs 0.9 x {fusion:.1f} = {0.9 * fusion:.1f}"))
    for base in ("evit", "tome"):
        other = _accuracy(table, "query", base, q_budget)
        if arr_q is not None and other is not None:
            rows.append((f"Query task at {q_budget:.1%}: ARR-COC >= {base} + 20 points (same final token count)",
                         arr_q >= other + 20, f"{arr_q:.1f} vs {other:.1f} + 20"))
    arr_c = _accuracy(table, "cluttered", "ARR-COC", c_budget)
    full_c = _accuracy(table, "cluttered", "full", 1.0)
    evit_c = _accuracy(table, "cluttered", "evit", c_budget)
    if arr_c is not None and full_c is not None:
        rows.append((f"Cluttered task at {c_budget:.0%}: ARR-COC >= full - 1 point", arr_c >= full_c - 1,
                     f"{arr_c:.1f} vs {full_c:.1f} - 1"))
    if arr_c is not None and evit_c is not None:
        rows.append((f"Cluttered task at {c_budget:.0%}: ARR-COC >= EViT (same final token count)", arr_c >= evit_c,
                     f"{arr_c:.1f} vs {evit_c:.1f}"))
    cost = results["training_cost"]
    local, global_ = cost["local"], cost["global"]
    rows.append(("Local-rule training peak memory <= 0.3x global backprop", cost["memory_ratio"] <= 0.3,
                 f"{local['peak_mb']:.0f} MB vs {global_['peak_mb']:.0f} MB = {cost['memory_ratio']:.2f}x"))
    rows.append(("Local-rule training step time <= 0.5x global backprop", cost["time_ratio"] <= 0.5,
                 f"{local['step_ms']:.0f} ms vs {global_['step_ms']:.0f} ms = {cost['time_ratio']:.2f}x"))
    for task, budget in (("cluttered", c_budget), ("query", q_budget)):
        local = _accuracy(table, task, "ARR-COC", budget)
        global_ = _accuracy(table, task, "DynamicViT-style (global backprop)", budget)
        if local is not None and global_ is not None:
            rows.append((f"{task}: local-rule allocator within 2 points of the global-backprop allocator",
                         local >= global_ - 2, f"{local:.1f} vs {global_:.1f}"))
    a = results["adaptation"]
    fraction = a["recovered_fraction"]
    held_out = a["held_out_accuracy"]
    rows.append(("Online adaptation recovers >= 50% of the accuracy lost to the shift, without labels",
                 None if fraction is None else fraction >= 0.5,
                 f"at {a['budget'] * 100:g}%: test {a['test_accuracy']:.1f} -> shift {a['frozen']:.1f} "
                 f"(lost {a['test_accuracy'] - a['frozen']:.1f}); adapted {a['online']:.1f} over the stream"
                 + ("" if fraction is None else f" = {fraction:.0%} recovered")
                 + f", then {held_out['online']:.1f} on unseen shift canvases (frozen {held_out['frozen']:.1f}); "
                   f"TENT {a['tent']:.1f}"))
    return rows


def _allocation_share(a: dict[str, Any]) -> str:
    """What of the loss under the shift any allocation could give back (up to the box oracle's accuracy on the
    shift), how much of the digit each selection keeps there, and how much adaptation gave back."""
    lost, reachable = a["test_accuracy"] - a["frozen"], a["oracle_shift"] - a["frozen"]
    if lost <= 0:
        return f"The frozen module loses nothing to the shift ({a['test_accuracy']:.1f}% -> {a['frozen']:.1f}%)."
    cover = a["coverage"]
    text = (f"Of the {lost:.1f} points lost, an allocation could give back at most {max(reachable, 0):.1f}: keeping "
            f"exactly the digit's patches (box oracle) reaches {a['oracle_shift']:.1f}% on the shift (all tokens "
            f"{a['full_tokens_shift']:.1f}%), so "
            + (f"{max(reachable, 0) / lost:.0%} of the loss is within reach of token allocation; the rest is the "
               "frozen backbone's." if reachable < lost else "all of the loss is within reach of token allocation.")
            + f" On the shift the frozen module keeps "
            f"{cover['frozen']:.0f}% of the digit's patches, its label-free target ({a['adaptation']['target']}) "
            f"{cover['teacher']:.0f}%, and the module after adaptation {cover['adapted']:.0f}%.")
    if reachable <= 0:
        return text
    recovered = (a["online"] - a["frozen"]) / reachable
    return text + f" Label-free adaptation recovers {recovered:.0%} of what is within reach."


# one colour per method in every panel (ARR-COC's red is its own; C2 is the query-fusion line)
METHOD_COLORS = {"ARR-COC": "C3", "DynamicViT-style (global backprop)": "C0", "random": "C1", "grid": "C8",
                 "evit": "C4", "ats": "C5", "tome": "C6", "box oracle": "grey"}


def _plots(results: dict[str, Any], out: Path) -> dict[str, str]:
    plt = pyplot()
    table, meta = results["accuracy"], results["meta"]
    budgets = [b for b in meta["budgets"] if b < 1]
    files = {}
    fig, axes = plt.subplots(1, len(TASKS), figsize=(12, 4.2))
    for ax, task in zip(axes, TASKS):
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
    files["curves"] = "canvas_accuracy.png"
    fig.savefig(out / files["curves"], dpi=110)
    plt.close(fig)

    cost = results["training_cost"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    names = ["local rules", "global backprop"]
    axes[0].bar(names, [cost["local"]["peak_mb"], cost["global"]["peak_mb"]], color=["C3", "C0"])
    axes[0].set_ylabel("peak memory growth (MB)")
    axes[1].bar(names, [cost["local"]["step_ms"], cost["global"]["step_ms"]], color=["C3", "C0"])
    axes[1].set_ylabel("step time (ms)")
    fig.suptitle(f"one training step of the relevance module, batch {cost['batch']}", fontsize=10)
    fig.tight_layout()
    files["cost"] = "canvas_training_cost.png"
    fig.savefig(out / files["cost"], dpi=110)
    plt.close(fig)

    adapted = results["adaptation"]
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
    fig.tight_layout()
    files["adaptation"] = "canvas_adaptation.png"
    fig.savefig(out / files["adaptation"], dpi=110)
    plt.close(fig)
    files["heatmaps"] = "canvas_heatmaps.png"
    return files


def speed_lines(speed: dict[str, Any], budgets: list[float]) -> list[str]:
    """Markdown of one canvas throughput measurement (``canvas.throughput``): speed-up per method and budget."""
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
    return lines + ["", "\"ARR-COC relevance module\" is the module alone (scoring, field relaxation, allocation): "
                    "its speed-up below 1/overhead means it costs that share of one full forward.", ""]


def write_report(results: dict[str, Any], out: Path, report: Path) -> Path:
    files = _plots(results, out)
    link = os.path.relpath(out, report.parent)
    table, meta = results["accuracy"], results["meta"]
    budgets = [1.0] + [b for b in meta["budgets"] if b < 1]  # every table shows the full-token column
    backbone = meta.get("backbone_meta") or {}
    lines = [
        "# ARR-COC offline benchmark" + (" — QUICK MODE (a smoke run: 1 seed, short training; not a result)"
                                         if meta["mode"] == "quick" else ""),
        "",
        f"Command: `{meta['command']}` ({meta['wall_seconds'] / 60:.1f} min on {meta['cpu']}, "
        f"{meta['workers']} worker processes, torch {meta['torch']}"
        + (f", code at commit {meta['commit'][:7]}" if meta.get("commit") else "") + f"). Seeds {meta['seeds']}; "
        f"{meta['test_images']} test canvases per task and seed (TEST source digits only; each seed draws its own); "
        f"relevance modules trained for {meta['train']['steps']} steps of {meta['train']['batch_size']} canvases. "
        "Accuracies are means with a 95% interval over the seeds (Student t).",
        "",
        f"**Backbone (every method):** the canvas ViT `{Path(meta['backbone']).name}` "
        f"({json.dumps(backbone.get('architecture', {}))}), trained by `{backbone.get('command', '?')}` in "
        f"{backbone.get('train_seconds', '?')} s on {backbone.get('device', '?')}; full-token test accuracy "
        f"{100 * backbone.get('test_accuracy_random_keep', {}).get('1.0', float('nan')):.1f}% "
        "(its own evaluation, 2,000 cluttered test canvases). Frozen throughout.",
        "",
        "## Targets",
        "",
        "| target | result | numbers |",
        "|---|---|---|",
    ]
    for name, passed, numbers in targets(results):
        lines.append(f"| {name} | {verdict(passed)} | {numbers} |")
    lines += ["", f"![accuracy vs budget]({link}/{files['curves']})", ""]
    for task in TASKS:
        lines += [f"## {TASK_TITLES[task]}", "",
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
        variants = {m: e for m, e in table[task].items() if m.startswith("ARR-COC /")}
        if variants:
            budget = str(meta["tasks"][task]["budget"])
            default = _cell(arr.get("accuracy", {}).get(budget))
            lines += ["", f"**ARR-COC ablations at {float(budget):.1%}** (default: {default})",
                      "", "| variant | accuracy (%) | box coverage (%) | step (ms) |", "|---|---|---|---|"]
            for method, entry in variants.items():
                lines.append(f"| {method.removeprefix('ARR-COC / ')} | {_cell(entry['accuracy'].get(budget))} | "
                             f"{_cell(entry.get('box_coverage'))} | {_cell(entry.get('step_ms'))} |")
        lines.append("")
    lines += ["## Throughput (cluttered canvases)", "", *speed_lines(results["throughput"], budgets)]
    gpu = read_json(out / "gpu_canvas.json")
    if gpu:
        lines += ["## Throughput on a GPU", "",
                  f"The same measurement on {gpu['meta']['device']} (`{gpu['meta']['command']}`, commit "
                  f"{gpu['meta'].get('commit') or 'unknown'}); GPU throughput of the timm ViTs and the VLM prefill "
                  f"are in [{link}/gpu.md]({link}/gpu.md).", ""]
        for speed in gpu["runs"]:
            lines += [f"**{speed['dtype']}**", "", *speed_lines(speed, budgets)]
    cost = results["training_cost"]
    lines += ["## Training cost: local rules vs. global backprop", "",
              f"One step on a batch of {cost['batch']} cluttered canvases, each in a fresh process; peak memory = "
              "growth of the process's peak RSS during training steps above its peak after a forward pass.", "",
              "| | peak memory growth (MB) | step time (ms) |", "|---|---|---|",
              f"| local rules (ARR-COC) | {cost['local']['peak_mb']:.0f} | {cost['local']['step_ms']:.0f} |",
              f"| global backprop (DynamicViT-style) | {cost['global']['peak_mb']:.0f} | "
              f"{cost['global']['step_ms']:.0f} |",
              f"| ratio | {cost['memory_ratio']:.2f}x | {cost['time_ratio']:.2f}x |", "",
              f"![training cost]({link}/{files['cost']})", ""]
    adapted = results["adaptation"]
    held_out = adapted["held_out_accuracy"]
    settings = adapted["adaptation"]
    lines += ["## Online adaptation under a distribution shift", "",
              f"The cluttered shift split (3x the clutter fragments, larger digits) as a stream of "
              f"{adapted['stream_images']} images in batches of {adapted['batch']}, "
              f"budget {adapted['budget'] * 100:g}%; "
              "prequential accuracy (each batch is predicted before the method adapts on it), then each adapted "
              f"model on {adapted['held_out']} shift canvases no method saw. ARR-COC adapts towards "
              f"{settings['target']} importance with {settings['optimizer']} (lr {settings['lr']:g}), guarded by its "
              f"rollback. Full tokens: {adapted['full_tokens_test']:.1f}% on test, "
              f"{adapted['full_tokens_shift']:.1f}% on the shift.",
              "", _allocation_share(adapted), "",
              "| method | accuracy on the stream (%) | on unseen shift canvases after it (%) | cost per image (ms) |",
              "|---|---|---|---|",
              f"| ARR-COC before the shift (test split) | {adapted['test_accuracy']:.1f} | | |",
              f"| frozen | {adapted['frozen']:.1f} | {held_out['frozen']:.1f} | {adapted['frozen_ms']:.1f} |",
              f"| ARR-COC online, label-free local rules | {adapted['online']:.1f} | {held_out['online']:.1f} | "
              f"{adapted['online_ms']:.1f} |",
              f"| TENT (entropy minimisation of the backbone's norms, backprop) | {adapted['tent']:.1f} | "
              f"{held_out['tent']:.1f} | {adapted['tent_ms']:.1f} |", "",
              f"![adaptation]({link}/{files['adaptation']})", "",
              "## What ARR-COC keeps", "", f"![heatmaps]({link}/{files['heatmaps']})", ""]
    report.write_text("\n".join(lines))
    return report


if __name__ == "__main__":  # python -m arrcoc.bench.canvas_report RESULTS.json [REPORT.md]: redraw from a run
    path = Path(sys.argv[1])
    data = json.loads(path.read_text())
    print(write_report(data, path.parent, Path(sys.argv[2]) if len(sys.argv) > 2 else path.parent / "REPORT.md"))
