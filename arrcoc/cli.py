"""The ``arrcoc`` command line: a dispatcher; each command's work and options live in its module."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "canvas": "arrcoc.bench.canvas",  # the main job: every method x budget on real-digit canvases (default)
    "pretrain": "arrcoc.bench.pretrain",  # trains the canvas ViT every canvas method shares
    "query-fusion": "arrcoc.bench.query_fusion",  # trains the query task's full-token reference
    "rules": "arrcoc.bench.rules_mnist",  # every learning rule on 5,000 real MNIST digits
    "alignment": "arrcoc.bench.alignment",  # energy-based rules vs. backprop as the nudge shrinks
    "throughput": "arrcoc.bench.throughput",  # token budgets vs. speed on timm ViTs
    "ablate": "arrcoc.bench.ablate",  # variants of the relevance module paired against a base, on one canvas task
    "sweep": "arrcoc.commands.sweep",  # the relevance module under a grid of rule assignments (= arrcoc sweep)
    "vlm": "arrcoc.bench.vlm_prefill",  # LLaVA prefill time / memory vs. kept visual tokens
    "vqa": "arrcoc.bench.vqa",  # every visual-token pruner and ARR-COC on the trained canvas VLM (canvas VQA)
    "gpu": "arrcoc.bench.gpu",  # the one-shot GPU run: throughput, canvas timing and VLM prefill on CUDA
    "ops": "arrcoc.bench.ops",  # the relevance module's operators and host syncs per forward (a GPU's cost, on CPU)
}

# command: (module with main(argv, prog), one-line summary); imported only when its command runs
COMMANDS = {
    "train": ("arrcoc.commands.train", "train the relevance module on canvases or your own images"),
    "eval": ("arrcoc.commands.evaluate", "accuracy, box coverage and speed of a checkpoint at several budgets"),
    "adapt": ("arrcoc.commands.adapt", "online adaptation over a stream of images, frozen vs. adapting"),
    "visualize": ("arrcoc.commands.visualize", "relevance maps and kept patches of a checkpoint"),
    "sweep": ("arrcoc.commands.sweep", "the rule-ablation grid of a sweep file (configs/sweep.yaml)"),
}

EXAMPLES = """examples:
  arrcoc train --out runs/train                       # cluttered canvases, local rules
  arrcoc eval --checkpoint runs/train --budgets 0.5 0.25 0.125
  arrcoc adapt --checkpoint runs/train --probe-images 256
  arrcoc visualize --help
  arrcoc sweep --config configs/sweep.yaml
  arrcoc bench --quick                                # the canvas benchmark's smoke run
Every command takes --config; `arrcoc COMMAND --help` describes its options.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arrcoc", description="ARR-COC: query-aware token budgets for ViTs.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        # no help option of its own: --help goes on to the command's module, which knows the options
        commands.add_parser(name, help=summary, add_help=False)
    bench = commands.add_parser(
        "bench",
        help="run a benchmark (writes JSON + Markdown + PNG)",
        description="Run a benchmark; options after the suite name go to it (see `arrcoc bench SUITE --help`). "
                    "--config names the suite's config: canvas (the default suite) configs/canvas_bench.yaml, "
                    "rules configs/rules_mnist.yaml, sweep configs/sweep.yaml.",
        epilog="examples:\n  arrcoc bench --quick\n  arrcoc bench canvas --config configs/canvas_bench.yaml\n"
               "  arrcoc bench sweep --quick --out runs/sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    bench.add_argument("suite", nargs="?", choices=sorted(BENCHMARKS))
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        if args.suite is None and {"-h", "--help"} & set(rest):
            bench.print_help()
            bench.exit()
        importlib.import_module(BENCHMARKS[args.suite or "canvas"]).main(rest)
        return
    module_name = COMMANDS[args.command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        parser.exit(2, f"arrcoc {args.command}: not available in this installation ({module_name} is missing)\n")
    if args.command == "visualize":
        module.main(rest)
    else:
        module.main(rest, prog=f"arrcoc {args.command}")


if __name__ == "__main__":
    main()
