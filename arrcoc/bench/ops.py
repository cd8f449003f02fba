"""The relevance module's cost as a GPU sees it, counted on a CPU: operators and host syncs per inference forward.

    arrcoc bench ops [--out DIR] [--quick]

The module's FLOPs are negligible next to a ViT's; on a GPU its cost is kernel launches and host syncs (every value
read back stalls the queue of kernels). Counted here, under ``torch.no_grad`` as an inference forward runs
(:func:`arrcoc.metrics.count_dispatch`): the aten operators dispatched (views included; "kernels" leaves out the
views, which launch none) and the host syncs of one forward of the unmodified model, of random-K and of ARR-COC at
25% of the patch tokens, batch 8, on ViT-S/16 (random weights, the module untrained) and on the canvas ViT with the
canvas benchmark's ARR-COC models (the query model with its queries). The module's own count is ARR-COC's minus
random-K's (both embed, select and run the same blocks). Also: whether ``torch.compile(model, fullgraph=True)``
traces the inference forward whole, and how often the fixed-step relaxation of inference selects the patches the
monitored relaxation selects, on the canvas test split. Writes ``ops.json``, ``ops.md`` and ``ops.png``
(``benchmarks/results/``, or ``runs/quick`` with ``--quick``). The images' NaN check, which reads back a flag on
an accelerator only where asked (``check_values``), is left out as it is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor

from arrcoc.backbones import top_k
from arrcoc.baselines import make_baseline, run_reduced
from arrcoc.budget import num_kept
from arrcoc.config import REPO_ROOT, config_file, parse_with_config
from arrcoc.data.tasks import task_data
from arrcoc.metrics import count_dispatch
from arrcoc.models.canvas_vit import load_canvas_vit
from arrcoc.relevance import ARRCOC
from arrcoc.reporting import (
    closing_lines,
    command_line,
    format_table,
    output_dir,
    pyplot,
    run_metadata,
    save_figure,
    save_results,
)

BATCH, BUDGET = 8, 0.25
# operators that only re-describe memory: no kernel runs for them on a GPU
VIEWS = frozenset({"aten.view", "aten._unsafe_view", "aten.reshape", "aten.expand", "aten.slice", "aten.select",
                   "aten.unsqueeze", "aten.squeeze", "aten.transpose", "aten.t", "aten.permute", "aten.flatten",
                   "aten.unflatten", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind",
                   "aten.alias", "aten.detach", "aten.as_strided", "aten.view_as", "aten.expand_as"})
METHODS = ("full", "random-K", "ARR-COC")
TARGET_MODULE_OPS = 100  # the module's operators on ViT-S/16 at batch 8 (0.3x a full forward's)
TARGET_SHARE = 0.3  # the module's operators as a share of a full forward's, on the canvas ViT
TARGET_AGREEMENT = 0.99  # test canvases where the fixed-step relaxation selects what the monitored one does


def dispatched(fn: Callable[[], Any]) -> dict[str, int]:
    """Operators, kernels (operators that are not views) and host syncs of one call of ``fn``."""
    count = count_dispatch(fn)
    views = sum(n for name, n in count.by_op.items() if name in VIEWS)
    return {"ops": count.ops, "kernels": count.ops - views, "syncs": count.syncs}


def forwards(model: ARRCOC, images: Tensor, query: Tensor | None) -> dict[str, Callable[[], Any]]:
    """One inference forward of each method: the unmodified model, random-K and ARR-COC at the model's budget."""
    adapter = model.adapter
    random_k = make_baseline("random", model.budget, adapter.depth, adapter.grid(images))
    return {"full": lambda: adapter(images), "random-K": lambda: adapter.head(run_reduced(adapter, images, random_k)),
            "ARR-COC": lambda: model(images, query)}


def compiles_whole(model: ARRCOC, images: Tensor, query: Tensor | None) -> dict[str, Any]:
    """Whether dynamo traces the inference forward as one graph (``fullgraph=True``) and the graph computes what
    eager does; why not, if not."""
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        same = bool(torch.allclose(compiled(images, query), model(images, query), atol=1e-5))
        return {"fullgraph": same, "reason": None if same else "the compiled forward computes something else"}
    except Exception as error:  # dynamo's errors say where the graph broke
        return {"fullgraph": False, "reason": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    finally:
        torch._dynamo.reset()


def compiled_kernels(model: ARRCOC, images: Tensor) -> int:
    """Kernels inductor generates for the relevance module compiled whole (on this CPU: C++ loops; the matrix
    products it leaves to a library are not among them): what the compiled, graph-captured path launches."""
    from torch._inductor import metrics

    grid = model.adapter.grid(images)
    with torch.no_grad():
        patches = model.adapter.tokens(images).patches
        module = torch.compile(lambda: model.relevance(images, patches, (grid.height, grid.width), None).logits,
                               fullgraph=True)
        metrics.reset()
        module()
    torch._dynamo.reset()
    return metrics.generated_kernel_count


def measure(model: ARRCOC, images: Tensor, query: Tensor | None) -> dict[str, Any]:
    """Every method's counts, the module's (ARR-COC minus random-K), and whether the forward compiles whole."""
    model.check_values = False  # as on an accelerator
    with torch.no_grad():
        counts = {name: dispatched(fn) for name, fn in forwards(model, images, query).items()}
        compiled = compiles_whole(model, images, query)
    module = {key: counts["ARR-COC"][key] - counts["random-K"][key] for key in ("ops", "kernels")}
    return {"counts": counts, "module": module, "module_share": module["ops"] / counts["full"]["ops"], **compiled}


@torch.no_grad()
def agreement(model: ARRCOC, task: str, canvases: int) -> float:
    """Share of the task's test canvases on which the fixed-step relaxation keeps the patches the monitored
    relaxation keeps (the same top K, at the model's budget)."""
    how = model.relevance.config.relaxation
    kept = []
    for steps in (how.inference_steps, 0):  # 0: monitored
        model.relevance.config.relaxation = dataclasses.replace(how, inference_steps=steps)
        choices = []
        for batch in task_data(task, "test", canvases, 0).batches(250):
            out, _, (h, w) = model.relevance_pass(batch.images, batch.queries)
            choices.append(top_k(out.logits, num_kept(model.budget, h * w)))
        kept.append(torch.cat(choices))
    model.relevance.config.relaxation = how
    return (kept[0] == kept[1]).all(-1).float().mean().item()


def canvas_models(models: Path) -> dict[str, tuple[ARRCOC, str]]:
    """The canvas benchmark's ARR-COC models (trained by ``arrcoc bench canvas``), by name, with their task."""
    return {f"canvas ViT, {task} model": (ARRCOC.from_pretrained(models / task, load_canvas_vit()), task)
            for task in ("cluttered", "query")}


def run(models: Path, canvases: int) -> dict[str, Any]:
    """Every model's counts at 25% of the tokens; the canvas models' agreement at the budget they trained at."""
    torch.manual_seed(0)
    vit = ARRCOC(timm.create_model("vit_small_patch16_224", pretrained=False)).set_budget(BUDGET)
    images = torch.rand(BATCH, 3, 224, 224)
    rows = {"ViT-S/16": {**measure(vit, images, None), "compiled_kernels": compiled_kernels(vit, images)}}
    for name, (model, task) in canvas_models(models).items():
        trained = model.budget
        batch = task_data(task, "test", BATCH, 0)
        rows[name] = measure(model.set_budget(BUDGET), batch.images, batch.queries)
        rows[name].update(task=task, trained_budget=trained,
                          agreement=agreement(model.set_budget(trained), task, canvases))
    return rows


def targets(rows: dict[str, Any]) -> list[tuple[str, bool]]:
    """(what was asked, with the measurement; passed) pairs."""
    vit, canvas = rows["ViT-S/16"], {name: row for name, row in rows.items() if name != "ViT-S/16"}
    checks = [(f"ViT-S/16, batch {BATCH}, {BUDGET:.0%}: the module <= {TARGET_MODULE_OPS} operators "
               f"({vit['module']['ops']}; {vit['module']['kernels']} not views)",
               vit["module"]["ops"] <= TARGET_MODULE_OPS)]
    for name, row in rows.items():
        syncs = row["counts"]["ARR-COC"]["syncs"], row["counts"]["random-K"]["syncs"]
        checks.append((f"{name}: ARR-COC's host syncs <= random-K's ({syncs[0]} vs {syncs[1]})", syncs[0] <= syncs[1]))
        checks.append((f"{name}: the inference forward compiles whole (`fullgraph=True`)"
                       + (f": {row['reason']}" if row["reason"] else ""), row["fullgraph"]))
    for name, row in canvas.items():
        checks.append((f"{name}: the module <= {TARGET_SHARE}x a full forward's operators "
                       f"({row['module_share']:.2f}x)", row["module_share"] <= TARGET_SHARE))
        checks.append((f"{name}: the fixed-step relaxation keeps what the monitored one keeps on >= "
                       f"{TARGET_AGREEMENT:.0%} of the test canvases at {row['trained_budget']:.1%} "
                       f"({row['agreement']:.1%})", row["agreement"] >= TARGET_AGREEMENT))
    return checks


def plot(rows: dict[str, Any], path: Path) -> None:
    """Operators per forward, by model and method; the kernels (operators that are not views) solid."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        counts = [row["counts"][method] for row in rows.values()]
        bars = ax.bar(xs, [c["kernels"] for c in counts], width, label=f"{method}: kernels", color=f"C{i}")
        ax.bar(xs, [c["ops"] - c["kernels"] for c in counts], width, bottom=[c["kernels"] for c in counts],
               color=bars[0].get_facecolor(), alpha=0.35, label=f"{method}: views")
    ax.set_xticks(range(len(rows)), list(rows), fontsize=8)
    ax.set(ylabel="aten operators per forward",
           title=f"One inference forward, batch {BATCH}, {BUDGET:.0%} of the tokens")
    ax.legend(fontsize=7, ncol=3)
    save_figure(fig, path)


def report(rows: dict[str, Any], meta: dict[str, Any], png: str) -> str:
    table = [{"model": name, "method": method, **row["counts"][method]} for name, row in rows.items()
             for method in METHODS]
    modules = [{"model": name, "ops": row["module"]["ops"], "kernels": row["module"]["kernels"],
                "share": row["module_share"], "compiles": row["fullgraph"],
                "agreement": f"{row['agreement']:.1%}" if "agreement" in row else "–"} for name, row in rows.items()]
    lines = [f"# The relevance module's operators and host syncs per inference forward ({meta['mode']})", "",
             f"Command: `{meta['command']}` (torch {meta['torch']}, code at commit "
             f"{(meta.get('commit') or 'unknown')[:7]}). Operators dispatched in one inference forward (under "
             f"`torch.no_grad`), batch {BATCH}, {BUDGET:.0%} of the patch tokens; kernels: the operators that are not "
             "views; the module: ARR-COC minus random-K (both embed, select and run the same blocks). ViT-S/16 has "
             "random weights and an untrained module; the canvas models are the canvas benchmark's. The NaN check of "
             "the images is off, as on an accelerator (`check_values`).", "",
             format_table(table, {"model": "model", "method": "method", "ops": "operators", "kernels": "kernels",
                                  "syncs": "host syncs"}), "",
             "The module (ARR-COC minus random-K):", "",
             format_table(modules, {"model": "model", "ops": "operators", "kernels": "kernels",
                                    "share": "share of a full forward's operators", "compiles": "fullgraph compiles",
                                    "agreement": "fixed-step selections = monitored"}), "",
             f"Compiled whole by inductor (`torch.compile(fullgraph=True)`), ViT-S/16's module is "
             f"{rows['ViT-S/16']['compiled_kernels']} generated kernels on this CPU, plus the matrix products it "
             "leaves to a library."]
    return "\n".join(lines + closing_lines(targets(rows), meta["wall_seconds"], png, "operators per forward"))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 test canvases for the agreement (default 1,000)")
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "benchmarks/results/models",
                        help="the canvas benchmark's ARR-COC models (cluttered/, query/)")
    parser.add_argument("--out", help="output folder (default: benchmarks/results, or runs/quick with --quick)")
    parser.add_argument("--config", type=config_file,
                        help="YAML of defaults for these options (keys: option names with underscores)")
    args = parse_with_config(parser, argv)
    out = output_dir(args.out, args.quick)
    start = time.perf_counter()
    rows = run(args.models, 200 if args.quick else 1000)
    meta = run_metadata(command_line("arrcoc.bench.ops", argv), args.quick, batch=BATCH, budget=BUDGET,
                        wall_seconds=time.perf_counter() - start)
    plot(rows, out / "ops.png")
    return save_results(out, "ops", {"meta": meta, "rows": rows}, report(rows, meta, "ops.png"))


if __name__ == "__main__":
    main()
