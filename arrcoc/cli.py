"""The ``arrcoc`` command line."""

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
    "sweep": "arrcoc.bench.sweep",  # the relevance module under a grid of rule assignments
    "vlm": "arrcoc.bench.vlm_prefill",  # LLaVA prefill time / memory vs. kept visual tokens
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arrcoc", description="ARR-COC: query-aware token budgets for ViTs.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="run a benchmark (writes JSON + Markdown + PNG)",
        description="Run a benchmark; options after the suite name go to it (see `arrcoc bench SUITE --help`).",
    )
    bench.add_argument("suite", nargs="?", default="canvas", choices=sorted(BENCHMARKS))
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        importlib.import_module(BENCHMARKS[args.suite]).main(rest)


if __name__ == "__main__":
    main()
