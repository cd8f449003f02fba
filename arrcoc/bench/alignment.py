"""How closely the energy-based and target-propagation rules follow backprop, per layer.

On one small MLP and batch (fixed seed, float64), the cosine between each rule's update and the
exact gradient (``loss.backward()``), per Linear layer: EP (one-sided, symmetric) and CHL against
the nudge/clamp strength beta, PC against its inference steps and its feedback strength, GAIT-prop
against its target step on an orthogonal invertible MLP. Also times the relaxation (steps/s).
Writes ``alignment.json``, ``alignment.md`` and ``alignment.png`` (log-log 1 - cosine).

    python -m arrcoc.bench.alignment
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from arrcoc.config import config_file, parse_with_config
from arrcoc.reporting import command_line, device_label, output_dir, pyplot, run_metadata, save_figure, save_results
from arrcoc.rules import RuleContext, build_rule
from arrcoc.rules.layered_energy import mlp_layers

BETAS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
PC_STEPS = [5, 10, 20, 50, 100, 200, 500]
PC_BETA_AT_STEPS = 1e-2
SWEEPS: list[dict[str, Any]] = [
    {"sweep": "ep one-sided", "axis": "beta", "values": BETAS,
     "config": lambda v: {"name": "ep", "nudge": "one-sided", "beta": v, "tol": 1e-8, "steps": 5000}},
    {"sweep": "ep symmetric", "axis": "beta", "values": BETAS,
     "config": lambda v: {"name": "ep", "nudge": "symmetric", "beta": v, "tol": 1e-8, "steps": 5000}},
    {"sweep": "chl", "axis": "beta", "values": BETAS,
     "config": lambda v: {"name": "chl", "beta": v, "tol": 1e-8, "steps": 5000}},
    {"sweep": "pc strict", "axis": "beta", "values": BETAS,
     "config": lambda v: {"name": "pc", "beta": v, "tol": 1e-8, "steps": 5000}},
    {"sweep": f"pc strict (beta={PC_BETA_AT_STEPS})", "axis": "inference steps", "values": PC_STEPS,
     "config": lambda v: {"name": "pc", "beta": PC_BETA_AT_STEPS, "steps": v, "tol": 0.0}},
    {"sweep": "pc fixed-prediction", "axis": "inference steps", "values": PC_STEPS,
     "config": lambda v: {"name": "pc", "variant": "fixed-prediction", "steps": v, "tol": 0.0}},
    {"sweep": "gait-prop (orthogonal)", "axis": "target step", "values": BETAS, "network": "orthogonal",
     "config": lambda v: {"name": "gait-prop", "target_step": v}},
]


def make_mlp(widths: list[int], activation: type[nn.Module], orthogonal: bool) -> nn.Sequential:
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(a, b)
        if orthogonal:
            nn.init.orthogonal_(linear.weight)
        modules += [linear, activation()] if i < len(widths) - 2 else [linear]
    return nn.Sequential(*modules).double()


def per_layer_cosines(mlp: nn.Module, update: dict, exact: dict) -> list[float]:
    cosines = []
    for layer in mlp_layers(mlp, "alignment"):
        params = layer.parameters()
        a = torch.cat([update[p].flatten() for p in params])
        b = torch.cat([exact[p].flatten() for p in params])
        cosines.append(F.cosine_similarity(a, b, dim=0).item())
    return cosines


def run(seed: int, batch_size: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    networks = {
        "default": make_mlp([20, 32, 32, 10], nn.Tanh, orthogonal=False),
        "orthogonal": make_mlp([20, 20, 20, 10], lambda: nn.LeakyReLU(0.2), orthogonal=True),
    }
    x = torch.randn(batch_size, 20, dtype=torch.float64)
    t = torch.randint(0, 10, (batch_size,))
    ctx = RuleContext(x, t)
    exact = {}
    for key, mlp in networks.items():
        params = list(mlp.parameters())
        exact[key] = dict(zip(params, torch.autograd.grad(F.cross_entropy(mlp(x), t), params)))

    results, relax_steps, relax_seconds = [], 0, 0.0
    bar = tqdm(total=sum(len(s["values"]) for s in SWEEPS), desc="alignment", unit="run")
    for sweep in SWEEPS:
        key = sweep.get("network", "default")
        mlp = networks[key]
        for value in sweep["values"]:
            bar.set_postfix_str(f"{sweep['sweep']} {sweep['axis']}={value:g}")
            rule = build_rule(sweep["config"](value), mlp)
            start = time.perf_counter()
            update = rule.compute_update(ctx)
            seconds = time.perf_counter() - start
            steps = sum(r.steps for r in getattr(rule, "last_reports", {}).values())
            if steps:
                relax_steps, relax_seconds = relax_steps + steps, relax_seconds + seconds
            everything = list(mlp.parameters())
            overall = F.cosine_similarity(
                torch.cat([update[p].flatten() for p in everything]),
                torch.cat([exact[key][p].flatten() for p in everything]), dim=0,
            ).item()
            results.append({
                "sweep": sweep["sweep"], "axis": sweep["axis"], "value": value, "network": key,
                "cosine_per_layer": per_layer_cosines(mlp, update, exact[key]), "cosine": overall,
                "relaxation_steps": steps, "seconds": seconds,
            })
            bar.update()
    bar.close()
    return {
        "results": results,
        "relaxation_steps_per_second": relax_steps / relax_seconds if relax_seconds else None,
        "networks": {
            "default": "MLP 20-32-32-10, tanh",
            "orthogonal": "MLP 20-20-20-10, leaky-relu(0.2), orthogonal init",
        },
        "batch_size": batch_size, "seed": seed, "dtype": "float64",
    }


def write_outputs(data: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    sweeps = list(dict.fromkeys(r["sweep"] for r in data["results"]))
    fig, axes = plt.subplots(2, (len(sweeps) + 1) // 2, figsize=(4 * ((len(sweeps) + 1) // 2), 7), squeeze=False)
    for ax, sweep in zip(axes.flat, sweeps):
        rows = [r for r in data["results"] if r["sweep"] == sweep]
        xs = [r["value"] for r in rows]
        for layer in range(len(rows[0]["cosine_per_layer"])):
            ys = [max(1 - r["cosine_per_layer"][layer], 1e-16) for r in rows]
            ax.loglog(xs, ys, "o-", ms=3, label=f"layer {layer + 1}")
        ax.loglog(xs, [max(1 - r["cosine"], 1e-16) for r in rows], "k--", lw=1, label="all")
        ax.set_title(sweep, fontsize=9)
        ax.set_xlabel(rows[0]["axis"])
        ax.set_ylabel("1 - cosine(update, backprop)")
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(sweeps):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    save_figure(fig, out / "alignment.png")

    lines = [
        "# Alignment of local rules with backprop",
        "",
        f"Command: `{data['command']}`. {data['networks']['default']} (GAIT-prop: "
        f"{data['networks']['orthogonal']}); one batch of {data['batch_size']}, cross-entropy, seed "
        f"{data['seed']}, {data['dtype']}; {data['device']}, torch {data['torch']}, {data['threads']} thread(s).",
        f"Relaxation speed: {data['relaxation_steps_per_second']:.0f} steps/s (all phases, this batch).",
        "",
        "| rule | swept | value | cosine layer 1 | layer 2 | layer 3 | all | relax steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        layers = " | ".join(f"{c:.6f}" for c in r["cosine_per_layer"])
        lines.append(
            f"| {r['sweep']} | {r['axis']} | {r['value']:g} | {layers} | {r['cosine']:.6f} | {r['relaxation_steps']} |"
        )
    lines += ["", "![1 - cosine per layer](alignment.png)", ""]
    save_results(out, "alignment", data, "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results)")
    parser.add_argument("--config", type=config_file,
                        help="YAML of defaults for these options (keys: option names with underscores)")
    args = parse_with_config(parser, argv)
    out = output_dir(args.out, quick=False)
    data = run(args.seed, args.batch_size)
    # the rules run on the CPU (float64) whatever accelerator the machine has
    data.update(run_metadata(command_line("arrcoc.bench.alignment", argv), device=device_label(torch.device("cpu"))))
    write_outputs(data, out)
    print(f"{data['relaxation_steps_per_second']:.0f} relaxation steps/s")


if __name__ == "__main__":
    main()
