"""Throughput vs. token budget for every token-reduction method on timm ViTs (random weights).

Each model's full forward is measured in the same run as every method (repeats interleaved, medians),
and every method is reported as a throughput ratio to it. ``arrcoc`` rows are the library as a user runs it:
``arrcoc.attach(model)`` scores the patches with its relevance module (untrained here: its cost does not
depend on its weights) and the backbone runs on the top K, the module's time included. ``scores`` rows are
the allocation path alone: given per-patch scores consumed by ``keep_top_k`` before block 0, with the dropped
tokens discarded, fused (EViT-style) or merged (ToMe-style). Baselines: random-K, uniform grid, EViT, ATS,
ToMe (``arrcoc.baselines``). A second pass at batch 1 gives the latency of full / ARR-COC / EViT / ToMe.

    python -m arrcoc.bench.throughput            # ViT-Ti/S/B, 224x224, batch 32, all threads
    python -m arrcoc.bench.throughput --quick    # ViT-S only, batch 8, few repeats (smoke run)
    python -m arrcoc.bench.throughput --device cuda --dtype bfloat16 --compile
    python -m arrcoc.bench.throughput --device cuda --graphs   # ARR-COC compiled whole, in CUDA graphs
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from tqdm import tqdm

import arrcoc
from arrcoc.backbones import adapt_backbone, keep_top_k
from arrcoc.backbones.adapters import BackboneAdapter
from arrcoc.baselines import make_baseline, run_reduced
from arrcoc.config import config_file, parse_with_config
from arrcoc.metrics import DTYPES, autocast, relevance_module_call, timed
from arrcoc.relevance import ARRCOC
from arrcoc.reporting import (
    closing_lines,
    command_line,
    device_label,
    output_dir,
    pyplot,
    run_metadata,
    save_figure,
    save_results,
)

MODELS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
          "vit_base": "vit_base_patch16_224", "vit_large": "vit_large_patch16_224",
          "deit3_small": "deit3_small_patch16_224"}  # DeiT-III: LayerScale
DEFAULT_MODELS = ("vit_tiny", "vit_small", "vit_base", "deit3_small")
ALLOCATOR_MODES = {"scores": "discard", "scores+fuse": "fuse", "scores+merge": "merge"}
METHODS = ("arrcoc", *ALLOCATOR_MODES, "random", "grid", "evit", "ats", "tome")
LATENCY_METHODS = ("arrcoc", "evit", "tome")
LATENCY_BUDGET = 0.25
TARGET_SPEEDUP = 3.4  # ViT-S at 25% of the tokens; most of the 4x a quarter of the tokens allows (docs/decisions.md)
TARGET_OVERHEAD = 0.05  # selection cost, and the relevance module's, as a fraction of the full forward
TARGET_ARRCOC_VS_RANDOM = 0.85  # ARR-COC's speed-up at 25% as a fraction of random-K's at the same token count


@dataclass(frozen=True)
class Settings:
    """One measurement: every method x budget on one model, against its full forward."""

    methods: tuple[str, ...]
    budgets: tuple[float, ...]
    batch: int
    repeats: int
    warmup: int = 2
    device: str = "cpu"
    dtype: str = "float32"  # float32, or autocast to bfloat16 / float16
    compile: bool = False  # torch.compile each transformer block (dynamic shapes: one graph for every length)
    graphs: bool = False  # ARR-COC's inference compiled whole and graph-captured (attach(..., graphs=True))


def forward_fn(adapter: BackboneAdapter, model: ARRCOC, images: torch.Tensor, method: str,
               budget: float) -> Callable[[], Any]:
    if method == "full":
        return lambda: adapter(images)
    if method == "arrcoc":
        return lambda: model.set_budget(budget)(images)
    if method in ALLOCATOR_MODES:
        scores = torch.rand(images.shape[0], adapter.grid(images).num_patches, device=images.device)

        def allocate() -> torch.Tensor:
            state = keep_top_k(adapter.tokens(images), scores, budget, ALLOCATOR_MODES[method])
            return adapter.head(adapter.run_blocks(state))

        return allocate
    reducer = make_baseline(method, budget, adapter.depth, adapter.grid(images))
    return lambda: adapter.head(run_reduced(adapter, images, reducer))


def mean_token_fraction(adapter: BackboneAdapter, images: torch.Tensor, method: str, budget: float) -> float:
    """Mean over blocks of the tokens a block runs on, as a fraction of the full sequence."""
    full = adapter.num_prefix_tokens + adapter.grid(images).num_patches
    if method in ALLOCATOR_MODES or method == "arrcoc":  # ARR-COC keeps its top K before block 0, as scores do
        state = adapter.tokens(images[:1])
        scores = torch.rand(1, state.num_patch_tokens, device=images.device)
        mode = ALLOCATOR_MODES.get(method, "discard")
        return keep_top_k(state, scores, budget, mode).tokens.shape[1] / full
    trace: list[int] = []
    run_reduced(adapter, images[:1], make_baseline(method, budget, adapter.depth, adapter.grid(images)), trace)
    return statistics.mean(trace) / full


def measure(name: str, settings: Settings, bar: tqdm | None = None) -> dict[str, Any]:
    """Every method x budget of ``settings`` on timm model ``name`` (a key of MODELS), as ratios to its full
    forward measured in the same run; plus the cost of top-K selection and of the relevance module alone."""
    device = torch.device(settings.device)
    backbone = timm.create_model(MODELS[name], pretrained=False).to(device).eval()
    adapter = adapt_backbone(backbone)
    model = arrcoc.attach(backbone, budget=LATENCY_BUDGET, graphs=settings.graphs)  # on the backbone's device
    if settings.compile:
        for block in adapter.blocks:  # the blocks ARR-COC runs are these same modules
            block.compile(dynamic=True)
    images = torch.randn(settings.batch, 3, 224, 224, device=device)

    configs = [("full", 1.0)] + [(m, b) for m in settings.methods for b in settings.budgets]
    times: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    with torch.inference_mode(), autocast(device, settings.dtype):
        fns = {c: forward_fn(adapter, model, images, *c) for c in configs}
        fns[("relevance module", 1.0)] = relevance_module_call(model, images)
        state = adapter.tokens(images)
        scores = torch.rand(images.shape[0], state.num_patch_tokens, device=device)
        fns[("top-K selection", 1.0)] = lambda: keep_top_k(state, scores, LATENCY_BUDGET)
        times.update({c: [] for c in fns if c not in times})
        for fn in fns.values():  # warm-up (and compilation)
            for _ in range(settings.warmup):
                fn()
        order = list(fns)
        for _ in range(settings.repeats):
            random.shuffle(order)  # interleave: drift in machine load hits every config alike
            for config in order:
                times[config].append(timed(fns[config], device))
            if bar is not None:
                bar.update()
        fractions = {c: mean_token_fraction(adapter, images, *c) for c in configs if c[0] != "full"}

    median = {c: statistics.median(t) for c, t in times.items()}
    full = median[("full", 1.0)]
    rows = [
        {
            "method": method,
            "budget": budget,
            "median_ms": 1e3 * median[(method, budget)],
            "speedup": full / median[(method, budget)],
            "mean_token_fraction": fractions[(method, budget)],
        }
        for method, budget in configs[1:]
    ]
    return {
        "timm_model": MODELS[name],
        "full_ms": 1e3 * full,
        "full_images_per_s": settings.batch / full,
        "selection_ms": 1e3 * median[("top-K selection", 1.0)],
        "selection_overhead": median[("top-K selection", 1.0)] / full,
        "module_ms": 1e3 * median[("relevance module", 1.0)],
        "module_overhead": median[("relevance module", 1.0)] / full,
        "rows": rows,
    }


def row(result: dict[str, Any], method: str, budget: float) -> dict[str, Any] | None:
    return next((r for r in result["rows"] if r["method"] == method and r["budget"] == budget), None)


def checks(results: dict[str, Any]) -> list[tuple[str, bool | None]]:
    small = results.get("vit_small")
    if small is None:
        return [("ViT-S targets", None)]
    scores, arr, rand = (row(small, m, 0.25) for m in ("scores", "arrcoc", "random"))
    speed = scores and scores["speedup"]
    lines = [
        (f"ViT-S at 25% tokens >= {TARGET_SPEEDUP}x full throughput (got {speed and round(speed, 2)}x)",
         None if speed is None else speed >= TARGET_SPEEDUP),
        (f"selection overhead <= {TARGET_OVERHEAD:.0%} of the full forward "
         f"(got {small['selection_overhead']:.2%})", small["selection_overhead"] <= TARGET_OVERHEAD),
        (f"relevance module <= {TARGET_OVERHEAD:.0%} of the full forward on ViT-S "
         f"(got {small['module_overhead']:.1%})", small["module_overhead"] <= TARGET_OVERHEAD),
    ]
    if arr and rand:
        ratio = arr["speedup"] / rand["speedup"]
        lines.append((f"ARR-COC's speed-up at 25% >= {TARGET_ARRCOC_VS_RANDOM}x random-K's on ViT-S (got "
                      f"{arr['speedup']:.2f}x vs {rand['speedup']:.2f}x = {ratio:.2f})",
                      ratio >= TARGET_ARRCOC_VS_RANDOM))
    for name in ("vit_small", "deit3_small"):
        if name in results:
            lines += matched_tokens_check(name, results[name])
    return lines


def matched_tokens_check(name: str, result: dict[str, Any]) -> list[tuple[str, bool | None]]:
    """ARR-COC's speed-up at ToMe's mean token fraction (linear between ARR-COC's budgets) >= ToMe's, for the
    ToMe budget whose mean fraction ARR-COC's budgets bracket most tightly."""
    arr = sorted((r["mean_token_fraction"], r["speedup"]) for r in result["rows"] if r["method"] == "arrcoc")
    tome = [r for r in result["rows"] if r["method"] == "tome"]
    inside = [r for r in tome if arr and arr[0][0] <= r["mean_token_fraction"] <= arr[-1][0]]
    if len(arr) < 2 or not inside:
        return [(f"{name}: ARR-COC >= ToMe's speed-up at a matched mean token count", None)]
    row = inside[0]
    fraction = row["mean_token_fraction"]
    speed = float(np.interp(fraction, *zip(*arr)))
    return [(f"{name}: ARR-COC >= ToMe's speed-up at a matched mean token count (ToMe at budget {row['budget']}: "
             f"{fraction:.2f} of the tokens per block, {row['speedup']:.2f}x; ARR-COC there {speed:.2f}x)",
             speed >= row["speedup"])]


def plot(results: dict[str, Any], methods: list[str], budgets: list[float], path: Path, title: str = "") -> None:
    """Speed-up vs. budget per model, one line per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        for method in methods:
            rows = sorted((r for r in res["rows"] if r["method"] == method), key=lambda r: r["budget"])
            ax.plot([r["budget"] for r in rows], [r["speedup"] for r in rows], marker="o", label=method)
        ax.plot(sorted(budgets), [1 / b for b in sorted(budgets)], "k--", lw=1, label="linear ideal (1/budget)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(title=f"{name} {title}".strip(), xlabel="token budget (fraction of patches kept)",
               ylabel="throughput / full model")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


def speedup_table(results: dict[str, Any], methods: list[str], budgets: list[float]) -> list[str]:
    """Markdown rows: every method x budget, a column per model: speed-up (mean token fraction)."""
    names = list(results)
    lines = [
        "| method | budget | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
        "| full | 1.0 | " + " | ".join(f"1.00 ({results[n]['full_images_per_s']:.0f} img/s)" for n in names) + " |",
    ]
    for method in methods:
        for budget in budgets:
            cells = [(r := row(results[n], method, budget)) and f"{r['speedup']:.2f}x ({r['mean_token_fraction']:.2f})"
                     for n in names]
            lines.append(f"| {method} | {budget} | " + " | ".join(c or "-" for c in cells) + " |")
    lines += ["", "Relevance module alone (ARR-COC's scoring), and top-25% selection + gather, as a fraction of "
              "the full forward: " + "; ".join(f"{n} {results[n]['module_overhead']:.1%} and "
                                               f"{results[n]['selection_overhead']:.2%}" for n in names) + "."]
    return lines


def latency_lines(latency: dict[str, Any]) -> list[str]:
    """Markdown rows of the batch-1 latency pass: ms per image, a column per model."""
    names = list(latency)
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| full | " + " | ".join(f"{latency[n]['full_ms']:.1f} ms" for n in names) + " |"]
    for method in LATENCY_METHODS:
        cells = [(r := row(latency[n], method, LATENCY_BUDGET)) and f"{r['median_ms']:.1f} ms ({r['speedup']:.2f}x)"
                 for n in names]
        lines.append(f"| {method} at {LATENCY_BUDGET} | " + " | ".join(c or "-" for c in cells) + " |")
    return lines


def report(results: dict[str, Any], latency: dict[str, Any], meta: dict[str, Any], out: Path) -> str:
    """Draws ``throughput.png`` in ``out``; returns the Markdown report."""
    plot(results, meta["methods"], meta["budgets"], out / "throughput.png")
    lines = [
        f"# Throughput vs. token budget ({meta['mode']})",
        "",
        f"Command: `{meta['command']}`. timm {', '.join(MODELS[n] for n in results)} (random weights), "
        f"224x224, batch {meta['batch']}, {meta['repeats']} interleaved repeats (medians); {meta['device']}, "
        f"{meta['dtype']}, torch {meta['torch']}, timm {meta['timm']}, {meta['threads']} threads"
        f"{', torch.compile' if meta['compile'] else ''}"
        f"{', ARR-COC graph-captured' if meta.get('graphs') else ''}.",
        "",
        "Throughput as a multiple of the full model measured in the same run; in brackets the mean fraction "
        "of the sequence the blocks ran on. Budget = fraction of patch tokens kept (before block 0 for "
        "arrcoc / scores / random / grid; at the last stage for EViT / ATS; after merging for ToMe). "
        "arrcoc includes its relevance module; scores rows are given their scores.",
        "",
        *speedup_table(results, meta["methods"], meta["budgets"]),
    ]
    if latency:
        lines += ["", f"Batch-1 latency (median of {meta['repeats']} interleaved repeats; in brackets the speed-up "
                  "over full):", "", *latency_lines(latency)]
    lines += closing_lines(checks(results), meta["wall_seconds"], "throughput.png", "throughput vs budget")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ViT-S only, batch 8, 3 repeats: a smoke run")
    parser.add_argument("--models", nargs="*", choices=list(MODELS),
                        help=f"default: {' '.join(DEFAULT_MODELS)} (vit_small with --quick)")
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.75, 0.5, 0.25])
    parser.add_argument("--batch", type=int, help="default 32 (8 with --quick)")
    parser.add_argument("--repeats", type=int, help="default 7 (3 with --quick)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-latency", dest="latency", action="store_false",
                        help=f"skip the batch-1 latency pass ({', '.join(LATENCY_METHODS)} at {LATENCY_BUDGET})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default bfloat16 autocast on cuda, float32 on cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--graphs", action="store_true",
                        help="ARR-COC's inference compiled whole and captured in CUDA graphs (its default on CUDA)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, i.e. all cores)")
    parser.add_argument("--out", help="output folder (default: benchmarks/results, or runs/quick with --quick)")
    parser.add_argument("--config", type=config_file,
                        help="YAML of defaults for these options (keys: option names with underscores)")
    args = parse_with_config(parser, argv)
    models = args.models or (["vit_small"] if args.quick else list(DEFAULT_MODELS))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = Settings(
        methods=tuple(args.methods), budgets=tuple(args.budgets), batch=args.batch or (8 if args.quick else 32),
        repeats=args.repeats or (3 if args.quick else 7), warmup=args.warmup, device=str(device),
        dtype=args.dtype or ("bfloat16" if device.type == "cuda" else "float32"), compile=args.compile,
        graphs=args.graphs,
    )
    latency_settings = replace(settings, methods=LATENCY_METHODS, budgets=(LATENCY_BUDGET,), batch=1)
    out = output_dir(args.out, args.quick)

    start = time.perf_counter()
    random.seed(0)
    torch.manual_seed(0)
    with tqdm(total=len(models) * settings.repeats * (1 + args.latency), desc="repeats", unit="rep") as bar:
        results, latency = {}, {}
        for name in models:
            bar.set_postfix(model=name)
            results[name] = measure(name, settings, bar)
            if args.latency:
                latency[name] = measure(name, latency_settings, bar)
    meta = run_metadata(
        command_line("arrcoc.bench.throughput", argv), args.quick,
        models={n: MODELS[n] for n in models}, methods=list(settings.methods), budgets=list(settings.budgets),
        batch=settings.batch, repeats=settings.repeats, warmup=settings.warmup, image_size=224,
        device=device_label(device), dtype=settings.dtype, compile=settings.compile, graphs=settings.graphs,
        timm=timm.__version__,
        machine=platform.machine(), wall_seconds=time.perf_counter() - start,
    )
    return save_results(out, "throughput", {"meta": meta, "results": results, "latency": latency,
                                            "checks": [[t, ok] for t, ok in checks(results)]},
                        report(results, latency, meta, out))


if __name__ == "__main__":
    main()
