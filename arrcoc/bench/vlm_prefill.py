"""Prefill time and peak memory of a vision-language model vs. the number of visual tokens it keeps.

A LLaVA-architecture model (CLIP tower 336 px / 14 px patches = 576 visual tokens, Llama language model;
random weights, transformers classes) prefills one prompt (image + text) keeping K of its visual tokens.
Every K is measured in the same run as keep-all (repeats interleaved in shuffled order, medians of the
per-repeat ratios), because this machine's speed drifts.

  language-model prefill  the language model (and LM head, last position) on the shortened prompt, images
                          already encoded: what a shorter prompt saves.
  end-to-end prefill      vision tower + projector + the relevance module's allocation + language model, vs.
                          the unmodified model's forward on the full prompt (keep-all row).
  peak memory             most bytes allocated at once during the call above what was allocated before it,
                          from the profiler's allocation events (one profiled call per K; CPU and CUDA).

    python -m arrcoc.bench.vlm_prefill            # benchmarks/results/vlm_prefill.{json,md,png}
    python -m arrcoc.bench.vlm_prefill --quick    # smaller model, 3 repeats, runs/quick/
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

import arrcoc
from arrcoc.budget import num_kept
from arrcoc.config import config_file, parse_with_config
from arrcoc.data.toy_vlm import BOS, IMAGE, ToyVLMSize, toy_prompts, toy_vlm
from arrcoc.metrics import peak_cpu_bytes, timed
from arrcoc.reporting import command_line, device_label, output_dir, pyplot, run_metadata, save_figure, save_results

FULL_SIZE = ToyVLMSize(vision_hidden=256, vision_layers=4, text_hidden=512, text_layers=8, heads=8, kv_heads=8,
                       mlp_ratio=4, image_size=336, patch_size=14, vocab=32064)
QUICK_SIZE = ToyVLMSize(vision_hidden=128, vision_layers=2, text_hidden=256, text_layers=4, heads=4, kv_heads=4,
                        mlp_ratio=4, image_size=336, patch_size=14, vocab=32064)
BUDGETS = (1.0, 0.5, 0.25, 0.125, 0.0625)


@dataclass
class PrefillBenchConfig:
    size: ToyVLMSize
    budgets: tuple[float, ...] = BUDGETS
    text_tokens: int = 32  # prompt text around the image (a question)
    repeats: int = 7
    warmup: int = 1


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Most bytes the call held allocated at once, above what was allocated when it started."""
    if device.type != "cuda":  # without Kineto, whose CUDA device query fails loudly on a machine without one
        return peak_cpu_bytes(fn)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CUDA]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def run(config: PrefillBenchConfig, device: torch.device) -> dict[str, Any]:
    model = toy_vlm("llava", config.size).to(device)
    half = config.text_tokens // 2
    prompt_ids = [BOS, *range(10, 10 + half), IMAGE, *range(100, 100 + config.text_tokens - half - 1)]
    inputs = {k: v.to(device) for k, v in toy_prompts(model, [prompt_ids]).items()}
    wrappers = {b: arrcoc.attach_vlm(model, budget=b) for b in config.budgets}
    adapter = wrappers[1.0].adapter
    with torch.inference_mode():
        prompt = adapter.encode(inputs)
        visual = prompt.num_tokens(0)
        g = torch.Generator().manual_seed(0)
        keeps = {b: [torch.randperm(visual, generator=g)[: num_kept(b, visual)].to(device)] for b in config.budgets}

    def lm_prefill(budget: float) -> Callable[[], Any]:
        return lambda: adapter.forward(prompt, keeps[budget], logits_to_keep=1)

    def end_to_end(budget: float) -> Callable[[], Any]:
        if budget == 1.0:  # the reference: the unmodified model
            return lambda: model(**inputs, logits_to_keep=1)
        return lambda: wrappers[budget](**inputs, logits_to_keep=1)

    def allocation(budget: float) -> Callable[[], Any]:  # the relevance module alone: query, scores, top-K
        wrapped = wrappers[budget]
        return lambda: wrapped.kept_tokens(prompt)

    kinds = {"lm": lm_prefill, "e2e": end_to_end}
    jobs = [(kind, b) for kind in kinds for b in config.budgets] + [("alloc", b) for b in config.budgets if b < 1]
    fns = {(kind, b): (allocation(b) if kind == "alloc" else kinds[kind](b)) for kind, b in jobs}
    times: dict[tuple[str, float], list[float]] = {job: [] for job in jobs}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(config.warmup):
                fn()
        order = list(jobs)
        with tqdm(total=config.repeats * len(jobs), desc="prefills", unit="call") as bar:
            for _ in range(config.repeats):
                random.shuffle(order)  # interleaved: drift in machine load hits every K alike
                for job in order:
                    times[job].append(timed(fns[job], device))
                    bar.update()
        memory = {(kind, b): peak_bytes(fns[(kind, b)], device) for kind in kinds for b in config.budgets}
        lengths = {b: adapter.shorten(prompt, keeps[b]).input_ids.shape[1] for b in config.budgets}

    def ratio(kind: str, budget: float) -> float:  # median over repeats of the per-repeat ratio to keep-all
        return statistics.median(t / f for t, f in zip(times[(kind, budget)], times[(kind, 1.0)]))

    rows = []
    for b in config.budgets:
        row = {"budget": b, "kept_visual_tokens": keeps[b][0].numel(), "prefill_length": lengths[b]}
        for kind in kinds:
            row[f"{kind}_ms"] = 1e3 * statistics.median(times[(kind, b)])
            row[f"{kind}_time_ratio"] = ratio(kind, b)
            row[f"{kind}_peak_mib"] = memory[(kind, b)] / 2**20
            row[f"{kind}_peak_ratio"] = memory[(kind, b)] / max(memory[(kind, 1.0)], 1)
        if b < 1:
            row["allocation_ms"] = 1e3 * statistics.median(times[("alloc", b)])
        rows.append(row)
    return {"visual_tokens": visual, "prompt_length": inputs["input_ids"].shape[1], "rows": rows,
            "times_s": {f"{kind}@{b}": t for (kind, b), t in times.items()}}


def report(result: dict[str, Any], meta: dict[str, Any], out: Path, name: str = "vlm_prefill") -> str:
    """Draws ``NAME.png`` in ``out``; returns the Markdown report."""
    plt = pyplot()
    rows = result["rows"]
    fractions = [r["kept_visual_tokens"] / result["visual_tokens"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "time_ratio", "prefill time"), (axes[1], "peak_ratio", "peak memory")):
        ax.plot(fractions, [r[f"lm_{metric}"] for r in rows], "o-", label="language-model prefill")
        ax.plot(fractions, [r[f"e2e_{metric}"] for r in rows], "s-", label="end-to-end (tower + allocation + LM)")
        ideal = [r["prefill_length"] / rows[0]["prefill_length"] for r in rows]
        ax.plot(fractions, ideal, "k--", lw=1, label="prefill length ratio")
        ax.set(title=f"{title} / keep-all", xlabel="fraction of visual tokens kept", ylabel="ratio to keep-all",
               xscale="log", ylim=(0, 1.1))
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    axes[0].legend(fontsize=8)
    fig.suptitle(f"LLaVA-architecture prefill ({meta['device']})", fontsize=9)
    save_figure(fig, out / f"{name}.png")

    size = meta["size"]
    lines = [
        f"# VLM prefill vs. kept visual tokens ({meta['mode']})",
        "",
        f"Command: `{meta['command']}`; {meta['device']}, {meta['threads']} threads, float32, torch {meta['torch']}, "
        f"transformers {meta['transformers']}. Wall time {meta['wall_seconds']:.0f} s.",
        "",
        f"Model: `LlavaForConditionalGeneration`, random weights. CLIP vision tower {size['image_size']} px / "
        f"{size['patch_size']} px patches ({result['visual_tokens']} visual tokens), {size['vision_layers']} layers "
        f"x {size['vision_hidden']}; Llama language model {size['text_layers']} layers x {size['text_hidden']}, "
        f"vocabulary {size['vocab']}. One prompt of {result['prompt_length']} tokens "
        f"({result['prompt_length'] - result['visual_tokens']} text). Prefill = forward with `logits_to_keep=1`.",
        "",
        f"Times: medians of {meta['repeats']} interleaved repeats; ratios are medians of the per-repeat ratio to "
        "keep-all measured in the same repeat. Peak memory: most bytes allocated at once during the call "
        "(profiler allocation events, one call). End-to-end keep-all is the unmodified model's own forward; "
        "the other end-to-end rows include the relevance module's allocation (untrained: timing only); "
        "*allocation ms* is that allocation alone (prompt query, relevance module, top-K).",
        "",
        "| kept visual tokens | prefill length | LM prefill ms | LM time ratio | LM peak MiB | LM memory ratio "
        "| end-to-end ms | e2e time ratio | e2e peak MiB | e2e memory ratio | allocation ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        alloc = f"{r['allocation_ms']:.1f}" if "allocation_ms" in r else "-"
        lines.append(
            f"| {r['kept_visual_tokens']} ({r['budget']:g}) | {r['prefill_length']} | {r['lm_ms']:.1f} | "
            f"{r['lm_time_ratio']:.3f} | {r['lm_peak_mib']:.1f} | {r['lm_peak_ratio']:.3f} | {r['e2e_ms']:.1f} | "
            f"{r['e2e_time_ratio']:.3f} | {r['e2e_peak_mib']:.1f} | {r['e2e_peak_ratio']:.3f} | {alloc} |"
        )
    lines += ["", f"![prefill time and peak memory vs kept visual tokens]({name}.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller language model, 3 repeats: a smoke run")
    parser.add_argument("--repeats", type=int, help="default 7 (3 with --quick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="output folder (default: benchmarks/results, or runs/quick with --quick)")
    parser.add_argument("--config", type=config_file,
                        help="YAML of defaults for these options (keys: option names with underscores)")
    args = parse_with_config(parser, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = PrefillBenchConfig(QUICK_SIZE if args.quick else FULL_SIZE,
                                repeats=args.repeats or (3 if args.quick else 7))
    out = output_dir(args.out, args.quick)
    random.seed(0)
    torch.manual_seed(0)
    start = time.perf_counter()
    result = run(config, device)
    import transformers

    meta = run_metadata(
        command_line("arrcoc.bench.vlm_prefill", argv), args.quick,
        device=device_label(device), size=asdict(config.size), budgets=list(config.budgets), repeats=config.repeats,
        warmup=config.warmup, transformers=transformers.__version__, machine=platform.machine(),
        wall_seconds=time.perf_counter() - start,
    )
    return save_results(out, "vlm_prefill", {"meta": meta, "result": result}, report(result, meta, out))


if __name__ == "__main__":
    main()
