"""The one-shot GPU run: what a lent GPU should measure, in one command that fits in a few minutes.

In order of priority, each part saved as soon as it is done (a run cut short keeps what it measured):

1. timm ViT-S/B/L at 224: full / random / EViT / ToMe / ARR-COC (its relevance module included) at two budgets,
   bfloat16 autocast, eager, with the batch-1 latency of full / ARR-COC / EViT / ToMe;
2. the same with ARR-COC graph-captured (its inference compiled whole and replayed from CUDA graphs, its default
   on CUDA; the other methods eager), batch 256 and batch-1 latency;
3. the VLM prefill benchmark (LLaVA architecture) on CUDA;
4. the canvas benchmark's timing (the committed canvas ViT and trained ARR-COC), float32 and bfloat16, ARR-COC
   eager and graph-captured;
5. the timm throughput again in float32, then compiled (``torch.compile`` of each block) in bfloat16 and float32.

Parts that would start after ``--minutes`` are skipped and listed as not measured.
Writes ``gpu_throughput.json``, ``gpu_canvas.json``, ``gpu_vlm_prefill.json``, ``gpu.md`` and two PNGs; the canvas
report (``benchmarks/REPORT.md``) picks up ``gpu_canvas.json`` when it is redrawn.

    arrcoc bench gpu                       # on a GPU machine: benchmarks/results/gpu_*
    bash benchmarks/gpu.sh OUT             # the same from a bare checkout (no install), results in OUT
    arrcoc bench gpu --quick --device cpu  # a smoke run of every part (tiny sizes), runs/quick/
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from arrcoc.config import config_file, parse_with_config
from arrcoc.models.canvas_vit import DEFAULT_CHECKPOINT, load_canvas_vit
from arrcoc.relevance import ARRCOC
from arrcoc.reporting import command_line, device_label, output_dir, run_metadata
from arrcoc.storage import save_json_atomic

from . import canvas, throughput, vlm_prefill
from .canvas_report import speed_lines

CANVAS_MODEL = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "models" / "cluttered"


@dataclass(frozen=True)
class GPUSuite:
    """Sizes of one run; :data:`FULL` fits in about 8 minutes on one H100/H200-class GPU."""

    models: tuple[str, ...] = ("vit_small", "vit_base", "vit_large")
    methods: tuple[str, ...] = ("arrcoc", "random", "evit", "tome")
    budgets: tuple[float, ...] = (0.5, 0.25)
    batch: int = 256  # smaller batches leave an H200 waiting on kernel launches (ViT-S at 64: 6 ms a forward)
    repeats: int = 10
    warmup: int = 3
    canvas_batch: int = 256
    canvas_budgets: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
    canvas_baselines: tuple[str, ...] = ("random", "grid", "evit", "ats", "tome")
    canvas_graphs: tuple[bool, ...] = (False, True)  # ARR-COC eager, graph-captured
    vlm_size: str = "full"  # vlm_prefill's FULL_SIZE or QUICK_SIZE


FULL = GPUSuite()
QUICK = GPUSuite(models=("vit_tiny",), budgets=(0.25,), batch=2, repeats=1, warmup=0, canvas_batch=4,
                 canvas_budgets=(1.0, 0.25), canvas_baselines=("random",), canvas_graphs=(False,), vlm_size="quick")
# (dtype, mode) of the timm throughput runs, in order of priority: "eager"; "graphs", ARR-COC compiled whole and
# graph-captured (the other methods eager); "compiled", each transformer block compiled (ARR-COC's module eager)
THROUGHPUT_RUNS = (("bfloat16", "eager"), ("bfloat16", "graphs"), ("float32", "eager"), ("bfloat16", "compiled"),
                   ("float32", "compiled"))
LATENCY_RUNS = {("bfloat16", "eager"), ("bfloat16", "graphs"), ("bfloat16", "compiled")}  # also at batch 1


class Deadline:
    """Says whether another part may start; remembers the parts it turned away."""

    def __init__(self, minutes: float):
        self.start, self.seconds, self.skipped = time.perf_counter(), 60 * minutes, []

    def allows(self, part: str) -> bool:
        if time.perf_counter() - self.start < self.seconds:
            return True
        self.skipped.append(part)
        print(f"not measured (past the {self.seconds / 60:g}-minute limit): {part}")
        return False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def run_label(dtype: str, mode: str) -> str:
    return f"{dtype}, {'ARR-COC graph-captured' if mode == 'graphs' else mode}"


def timm_throughput(suite: GPUSuite, device: str, deadline: Deadline, save: Callable[[], None],
                    kinds: tuple[tuple[str, str], ...], runs: list[dict[str, Any]]) -> None:
    """Appends one run per (dtype, mode) of ``kinds`` to ``runs``, saving after each model."""
    for dtype, mode in kinds:
        settings = throughput.Settings(methods=suite.methods, budgets=suite.budgets, batch=suite.batch,
                                       repeats=suite.repeats, warmup=suite.warmup, device=device, dtype=dtype,
                                       compile=mode == "compiled", graphs=mode == "graphs")
        run = {"dtype": dtype, "mode": mode, "settings": asdict(settings), "results": {}, "latency": {}}
        runs.append(run)
        for name in suite.models:
            label = f"timm {name}, {run_label(dtype, mode)}"
            if not deadline.allows(label):
                continue
            with tqdm(total=suite.repeats * 2, desc=label, unit="rep", leave=False) as bar:
                run["results"][name] = throughput.measure(name, settings, bar)
                if (dtype, mode) in LATENCY_RUNS:
                    latency = replace(settings, methods=throughput.LATENCY_METHODS,
                                      budgets=(throughput.LATENCY_BUDGET,), batch=1)
                    run["latency"][name] = throughput.measure(name, latency, bar)
            save()


def canvas_timing(suite: GPUSuite, device: str, deadline: Deadline, save: Callable[[], None],
                  runs: list[dict[str, Any]]) -> None:
    """Appends the canvas benchmark's timing in float32 and bfloat16, ARR-COC eager and graph-captured, to
    ``runs``."""
    bench = {"backbone": str(DEFAULT_CHECKPOINT), "budgets": list(suite.canvas_budgets),
             "baselines": list(suite.canvas_baselines)}
    for dtype in ("float32", "bfloat16"):
        for graphs in suite.canvas_graphs:
            label = f"canvas timing, {dtype}, ARR-COC {'graph-captured' if graphs else 'eager'}"
            if deadline.allows(label):
                model = ARRCOC.from_pretrained(CANVAS_MODEL, load_canvas_vit(DEFAULT_CHECKPOINT), graphs=graphs)
                runs.append({**canvas.throughput(bench, {"cluttered": model}, threads=torch.get_num_threads(),
                                                 batch=suite.canvas_batch, repeats=suite.repeats, device=device,
                                                 dtype=dtype), "graphs": graphs})
                save()


def report(throughput_runs: list[dict[str, Any]], canvas_runs: list[dict[str, Any]], vlm: dict[str, Any] | None,
           meta: dict[str, Any], out: Path) -> str:
    """Draws ``gpu_throughput.png`` (and ``gpu_vlm_prefill.png``) in ``out``; returns ``gpu.md``'s text."""
    lines = [f"# GPU benchmarks ({meta['mode']})", "",
             f"Command: `{meta['command']}`; {meta['device']}, torch {meta['torch']}, commit "
             f"{meta.get('commit') or 'unknown'}; {meta['wall_seconds'] / 60:.1f} min in all. Random-weight models "
             "(speed does not depend on the weights) except the canvas ViT and its trained ARR-COC. Every "
             "speed-up is a ratio to the full model measured in the same run (interleaved repeats, medians).", ""]
    if meta["skipped"]:
        lines += ["Not measured (past the time limit): " + "; ".join(meta["skipped"]) + ".", ""]
    measured = [run for run in throughput_runs if run["results"]]
    for i, run in enumerate(measured):
        settings = run["settings"]
        lines += [f"## timm ViTs, {run_label(run['dtype'], run['mode'])}", "",
                  f"224x224, batch {settings['batch']}, {settings['repeats']} repeats. In brackets: the mean fraction "
                  "of the sequence the blocks ran on. arrcoc includes its relevance module (untrained).", "",
                  *throughput.speedup_table(run["results"], list(settings["methods"]), list(settings["budgets"]))]
        if run["latency"]:
            lines += ["", "Batch-1 latency (in brackets the speed-up over full):", "",
                      *throughput.latency_lines(run["latency"])]
        if i == 0:
            throughput.plot(run["results"], list(settings["methods"]), list(settings["budgets"]),
                            out / "gpu_throughput.png", run_label(run["dtype"], run["mode"]))
            lines += ["", f"![throughput on the GPU, {run_label(run['dtype'], run['mode'])}](gpu_throughput.png)"]
        lines.append("")
    if canvas_runs:
        budgets = sorted({r["budget"] for r in canvas_runs[0]["rows"]}, reverse=True)
        lines += ["## Canvas benchmark timing", "",
                  "The committed canvas ViT (64 px canvases, 8 px patches: 64 tokens) and the trained cluttered-task "
                  "ARR-COC, on cluttered test canvases.", ""]
        for run in canvas_runs:
            lines += [f"**{run['dtype']}, ARR-COC {'graph-captured' if run.get('graphs') else 'eager'}**", "",
                      *speed_lines(run, budgets)]
    if vlm is not None:
        markdown = vlm_prefill.report(vlm["result"], vlm["meta"], out, name="gpu_vlm_prefill")
        lines += [line.replace("# ", "## ", 1) if line.startswith("# ") else line for line in markdown.splitlines()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run of every part")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=7.0, help="no part starts after this many minutes")
    parser.add_argument("--out", help="output folder (default: benchmarks/results, or runs/quick with --quick)")
    parser.add_argument("--config", type=config_file,
                        help="YAML of defaults for these options (keys: option names with underscores)")
    args = parse_with_config(parser, argv)
    suite = QUICK if args.quick else FULL
    device = torch.device(args.device)
    out = output_dir(args.out, args.quick)
    deadline = Deadline(args.minutes)
    torch.manual_seed(0)
    command = command_line("arrcoc.bench.gpu", argv)
    results: dict[str, Any] = {"throughput": [], "canvas": [], "vlm": None}

    def meta() -> dict[str, Any]:
        return run_metadata(command, args.quick, device=device_label(device), suite=asdict(suite),
                            skipped=deadline.skipped, wall_seconds=deadline.elapsed)

    def save() -> None:
        info = meta()
        save_json_atomic(out / "gpu_throughput.json", {"meta": info, "runs": results["throughput"]})
        save_json_atomic(out / "gpu_canvas.json", {"meta": info, "runs": results["canvas"]})
        if results["vlm"] is not None:
            save_json_atomic(out / "gpu_vlm_prefill.json", results["vlm"])
        (out / "gpu.md").write_text(report(results["throughput"], results["canvas"], results["vlm"], info, out))

    timm_throughput(suite, str(device), deadline, save, THROUGHPUT_RUNS[:2], results["throughput"])
    if deadline.allows("VLM prefill"):
        config = vlm_prefill.PrefillBenchConfig(vlm_prefill.FULL_SIZE if suite.vlm_size == "full"
                                                else vlm_prefill.QUICK_SIZE, repeats=suite.repeats)
        start = time.perf_counter()
        result = vlm_prefill.run(config, device)
        import transformers

        results["vlm"] = {"result": result, "meta": run_metadata(
            command, args.quick, device=device_label(device), size=asdict(config.size), budgets=list(config.budgets),
            repeats=config.repeats, warmup=config.warmup, transformers=transformers.__version__,
            wall_seconds=time.perf_counter() - start)}
        save()
    canvas_timing(suite, str(device), deadline, save, results["canvas"])
    timm_throughput(suite, str(device), deadline, save, THROUGHPUT_RUNS[2:], results["throughput"])
    save()
    print(f"wrote {out}/gpu_throughput.json, gpu_canvas.json, gpu_vlm_prefill.json, gpu.md ({deadline.elapsed:.0f} s)")
    return out


if __name__ == "__main__":
    main()
