"""One image, several queries: where ARR-COC looks for each, side by side.

Runs offline on the embedded data (a query test canvas of real MNIST digits, the MiniLM query encoder that
ships in a pip package) with the canvas benchmark's query-task model, in about 15 s on a CPU:

    python demos/query_relevance.py                       # canvas 1, asked about two of its digits
    python demos/query_relevance.py --canvas 7 --query "which digit is red?" --query "what is the green digit?"
    python demos/query_relevance.py --checkpoint runs/quick/models/query --out runs/demo

The model comes from `arrcoc bench canvas` (benchmarks/results/models/query; `--checkpoint` for another one,
e.g. runs/quick/models/query after `arrcoc bench --quick`). Writes one PNG, one column per query: the
relevance over the image and the patches kept at the model's budget.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from arrcoc.commands.visualize import load_model, pick_canvas
from arrcoc.reporting import save_figure
from arrcoc.visualize import answer, explain, queries_figure


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canvas", type=int, default=1, help="embedded query test canvas, 0-63 (default 1)")
    parser.add_argument("--query", action="append", help="a query; repeat for several (default: the canvas's own)")
    parser.add_argument("--checkpoint", type=Path, help="ARR-COC folder (default: the benchmark's query model)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    args = parser.parse_args(argv)

    try:
        model = load_model(args.checkpoint, None)
        image, asked = pick_canvas(args.canvas)
    except (FileNotFoundError, ValueError) as err:  # no benchmark model yet, a bad canvas index
        parser.error(str(err))
    queries = args.query or asked
    for query in queries:
        print(f'"{query}": {answer(model, image, query)}')
    figure = queries_figure([explain(model, image, queries)], f"canvas {args.canvas}: where ARR-COC looks per query")
    path = save_figure(figure, args.out / "query_relevance.png")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
