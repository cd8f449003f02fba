"""Throughput vs. token budget for every token-reduction method on timm ViTs (random weights).

Each model's full forward is measured in the same run as every method (repeats interleaved, medians),
and every method is reported as a throughput ratio to it. "scores" rows are the learned allocator's
path: per-patch scores (random here; the allocator's cost is not included) consumed by ``keep_top_k``
before block 0, with the dropped tokens discarded, fused (EViT-style) or merged (ToMe-style).
Baselines: random-K, uniform grid, EViT, ATS, ToMe (``arrcoc.baselines``).

    python -m arrcoc.bench.throughput            # ViT-Ti/S/B, 224x224, batch 32, all threads
    python -m arrcoc.bench.throughput --quick    # ViT-S only, batch 8, few repeats (smoke run)
    python -m arrcoc.bench.throughput --device cuda --compile
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
from tqdm import tqdm

from arrcoc.backbones import adapt_backbone, keep_top_k
from arrcoc.backbones.adapters import BackboneAdapter
from arrcoc.baselines import make_baseline, run_reduced
from arrcoc.config import config_file, parse_with_config
from arrcoc.metrics import timed
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

MODELS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}
ALLOCATOR_MODES = {"scores": "discard", "scores+fuse": "fuse", "scores+merge": "merge"}
METHODS = (*ALLOCATOR_MODES, "random", "grid", "evit", "ats", "tome")
TARGET_SPEEDUP = 3.4  # ViT-S at 25% of the tokens; most of the 4x a quarter of the tokens allows (docs/decisions.md)
TARGET_OVERHEAD = 0.05  # selection cost as a fraction of the full forward


def forward_fn(adapter: BackboneAdapter, images: torch.Tensor, method: str, budget: float) -> Callable[[], Any]:
    if method == "full":
        return lambda: adapter(images)
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
    if method in ALLOCATOR_MODES:
        state = adapter.tokens(images[:1])
        scores = torch.rand(1, state.num_patch_tokens, device=images.device)
        return keep_top_k(state, scores, budget, ALLOCATOR_MODES[method]).tokens.shape[1] / full
    trace: list[int] = []
    run_reduced(adapter, images[:1], make_baseline(method, budget, adapter.depth, adapter.grid(images)), trace)
    return statistics.mean(trace) / full


def bench_model(name: str, args: argparse.Namespace, device: torch.device, bar: tqdm) -> dict[str, Any]:
    model = timm.create_model(MODELS[name], pretrained=False).to(device)
    adapter = adapt_backbone(model)
    if args.compile:
        for block in adapter.blocks:
            block.compile(dynamic=True)
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    configs = [("full", 1.0)] + [(m, b) for m in args.methods for b in args.budgets]
    times: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    with torch.inference_mode(), autocast:
        fns = {c: forward_fn(adapter, images, *c) for c in configs}
        for fn in fns.values():  # warm-up (and compilation)
            for _ in range(args.warmup):
                fn()
        order = list(configs)
        for _ in range(args.repeats):
            random.shuffle(order)  # interleave: drift in machine load hits every config alike
            for config in order:
                times[config].append(timed(fns[config], sync))
                bar.update()
        state = adapter.tokens(images)
        scores = torch.rand(images.shape[0], state.num_patch_tokens, device=device)
        selection = statistics.median(
            timed(lambda: keep_top_k(state, scores, 0.25), sync) for _ in range(max(5, args.repeats))
        )
        fractions = {c: mean_token_fraction(adapter, images, *c) for c in configs if c[0] != "full"}

    full = statistics.median(times[("full", 1.0)])
    rows = [
        {
            "method": method,
            "budget": budget,
            "median_ms": 1e3 * statistics.median(times[(method, budget)]),
            "speedup": full / statistics.median(times[(method, budget)]),
            "mean_token_fraction": fractions[(method, budget)],
        }
        for method, budget in configs[1:]
    ]
    return {
        "timm_model": MODELS[name],
        "full_ms": 1e3 * full,
        "full_images_per_s": args.batch / full,
        "selection_ms": 1e3 * selection,
        "selection_overhead": selection / full,
        "rows": rows,
    }


def checks(results: dict[str, Any]) -> list[tuple[str, bool | None]]:
    small = results.get("vit_small")
    if small is None:
        return [("ViT-S targets", None)]
    at_quarter = [r for r in small["rows"] if r["method"] == "scores" and r["budget"] == 0.25]
    speed = at_quarter[0]["speedup"] if at_quarter else None
    return [
        (f"ViT-S at 25% tokens >= {TARGET_SPEEDUP}x full throughput (got {speed and round(speed, 2)}x)",
         None if speed is None else speed >= TARGET_SPEEDUP),
        (f"selection overhead <= {TARGET_OVERHEAD:.0%} of the full forward "
         f"(got {small['selection_overhead']:.2%})", small["selection_overhead"] <= TARGET_OVERHEAD),
    ]


def report(results: dict[str, Any], meta: dict[str, Any], out: Path) -> str:
    """Draws ``throughput.png`` in ``out``; returns the Markdown report."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        for method in meta["methods"]:
            rows = sorted((r for r in res["rows"] if r["method"] == method), key=lambda r: r["budget"])
            ax.plot([r["budget"] for r in rows], [r["speedup"] for r in rows], marker="o", label=method)
        budgets = sorted(meta["budgets"])
        ax.plot(budgets, [1 / b for b in budgets], "k--", lw=1, label="linear ideal (1/budget)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(title=name, xlabel="token budget (fraction of patches kept)", ylabel="throughput / full model")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, out / "throughput.png")

    names = list(results)
    lines = [
        f"# Throughput vs. token budget ({meta['mode']})",
        "",
        f"Command: `{meta['command']}`. timm {', '.join(MODELS[n] for n in names)} (random weights), "
        f"224x224, batch {meta['batch']}, {meta['repeats']} interleaved repeats (medians); {meta['device']}, "
        f"{meta['dtype']}, torch {meta['torch']}, timm {meta['timm']}, {meta['threads']} threads"
        f"{', torch.compile' if meta['compile'] else ''}.",
        "",
        "Throughput as a multiple of the full model measured in the same run; in brackets the mean fraction "
        "of the sequence the blocks ran on. Budget = fraction of patch tokens kept (before block 0 for "
        "scores / random / grid; at the last stage for EViT / ATS; after merging for ToMe).",
        "",
        "| method | budget | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
        "| full | 1.0 | " + " | ".join(f"1.00 ({results[n]['full_images_per_s']:.0f} img/s)" for n in names) + " |",
    ]
    for method in meta["methods"]:
        for budget in meta["budgets"]:
            cells = []
            for n in names:
                row = next(r for r in results[n]["rows"] if r["method"] == method and r["budget"] == budget)
                cells.append(f"{row['speedup']:.2f}x ({row['mean_token_fraction']:.2f})")
            lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    lines += ["", "Selection overhead (top-25% of scores + gather, as a fraction of the full forward): "
              + ", ".join(f"{n} {results[n]['selection_overhead']:.2%}" for n in names) + "."]
    lines += closing_lines(checks(results), meta["wall_seconds"], "throughput.png", "throughput vs budget")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ViT-S only, batch 8, 3 repeats: a smoke run")
    parser.add_argument("--models", nargs="*", choices=list(MODELS), help="default: all (ViT-S with --quick)")
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.75, 0.5, 0.25])
    parser.add_argument("--batch", type=int, help="default 32 (8 with --quick)")
    parser.add_argument("--repeats", type=int, help="default 7 (3 with --quick)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (cuda runs under bf16 autocast)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, i.e. all cores)")
    parser.add_argument("--out", help="output folder (default: benchmarks/results, or runs/quick with --quick)")
    parser.add_argument("--config", type=config_file,
                        help="YAML of defaults for these options (keys: option names with underscores)")
    args = parse_with_config(parser, argv)
    args.models = args.models or (["vit_small"] if args.quick else list(MODELS))
    args.batch = args.batch or (8 if args.quick else 32)
    args.repeats = args.repeats or (3 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = output_dir(args.out, args.quick)

    start = time.perf_counter()
    random.seed(0)
    torch.manual_seed(0)
    per_model = 1 + len(args.methods) * len(args.budgets)
    with tqdm(total=len(args.models) * per_model * args.repeats, desc="forwards", unit="fwd") as bar:
        results = {}
        for name in args.models:
            bar.set_postfix(model=name)
            results[name] = bench_model(name, args, device, bar)
    meta = run_metadata(
        command_line("arrcoc.bench.throughput", argv), args.quick,
        models={n: MODELS[n] for n in args.models}, methods=args.methods, budgets=args.budgets, batch=args.batch,
        repeats=args.repeats, warmup=args.warmup, image_size=224, device=device_label(device),
        dtype="bf16 autocast" if device.type == "cuda" else "float32", compile=args.compile, timm=timm.__version__,
        machine=platform.machine(), wall_seconds=time.perf_counter() - start,
    )
    return save_results(out, "throughput", {"meta": meta, "results": results,
                                     "checks": [[t, ok] for t, ok in checks(results)]}, report(results, meta, out))


if __name__ == "__main__":
    main()
