"""``arrcoc visualize``: draw what ARR-COC keeps for an image under one or more text queries.

Writes ``overlay.png`` (relevance and the kept patches over the image), ``ways_of_knowing.png`` (the three
ways of knowing and the balanced relevance) and ``queries.png`` (one column per query); the figures
themselves are :mod:`arrcoc.visualize`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import Tensor

from arrcoc.budget import num_kept
from arrcoc.config import budget_argument, load_yaml_mapping
from arrcoc.data.tasks import shared_text_encoder
from arrcoc.models.canvas_vit import load_canvas_vit
from arrcoc.relevance import ARRCOC
from arrcoc.reporting import save_figure
from arrcoc.visualize import (
    DEMO_CANVASES,
    answer,
    canvas_queries,
    demo_canvases,
    explain,
    load_image,
    overlay_figure,
    queries_figure,
    ways_of_knowing_figure,
)

from .common import load_trained_arrcoc


def pick_canvas(index: int) -> tuple[Tensor, list[str]]:
    """Embedded query test canvas ``index`` and its questions."""
    canvases = demo_canvases()
    if not 0 <= index < len(canvases):
        raise ValueError(f"canvas must be an index from 0 to {len(canvases) - 1} (the embedded query test "
                         f"canvases), got {index}")
    return canvases.images[index], canvas_queries(canvases, index)



DEFAULT_CONFIG = "configs/visualize.yaml"
SETTINGS = ("checkpoint", "backbone", "canvas", "queries", "budget", "out")


def load_settings(path: str | Path) -> dict:
    """The defaults of ``arrcoc visualize`` from a YAML file of ``SETTINGS`` keys (all optional)."""
    return load_yaml_mapping(path, known=SETTINGS, what="visualize setting")


def load_model(checkpoint: str | Path | None, backbone: str | Path | None) -> ARRCOC:
    """``checkpoint`` (a ``save_pretrained`` folder) on the canvas ViT ``backbone``, with the MiniLM text encoder;
    without a checkpoint, the canvas benchmark's query-task model."""
    if checkpoint is None:
        return load_trained_arrcoc("query", backbone=backbone)
    if not (Path(checkpoint) / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} is not an ARR-COC checkpoint folder (expected the "
                                "config.json and weights that ARRCOC.save_pretrained writes)")
    return ARRCOC.from_pretrained(checkpoint, load_canvas_vit(backbone), text_encoder=shared_text_encoder())


def parser() -> argparse.ArgumentParser:
    described = argparse.ArgumentParser(
        prog="arrcoc visualize",
        description="Draw what ARR-COC keeps for an image under one or more text queries: writes overlay.png "
                    "(relevance and the budget over the image), ways_of_knowing.png (the three ways of knowing "
                    "and the balanced relevance) and queries.png (one column per query).",
        epilog=f"Defaults come from --config ({DEFAULT_CONFIG}: keys {', '.join(SETTINGS)}); options given "
               "here override them.",
    )
    described.add_argument("--config", default=DEFAULT_CONFIG,
                           help=f"YAML of defaults for the options below (default {DEFAULT_CONFIG})")
    source = described.add_mutually_exclusive_group()
    source.add_argument("--image", type=Path, help="an image file (resized to the backbone's input size)")
    source.add_argument("--canvas", type=int,
                        help=f"index of an embedded query test canvas, 0-{DEMO_CANVASES - 1}, used without --image")
    # the config's `queries` stay a separate default: argparse would append --query to a list default
    described.add_argument("--query", action="append",
                           help="a text query; repeat for several (default: the config's queries, else for a "
                                "canvas its own questions, for an image no query)")
    described.add_argument("--budget", type=budget_argument,
                           help="patch tokens kept: a fraction in (0, 1] or a count (default: the checkpoint's)")
    described.add_argument("--checkpoint", type=Path,
                           help="ARR-COC folder written by save_pretrained (default: the canvas benchmark's query "
                                "model, benchmarks/results/models/query)")
    described.add_argument("--backbone", type=Path,
                           help="canvas ViT .safetensors the checkpoint runs on (default: the committed one)")
    described.add_argument("--out", type=Path, help="output folder (default runs/visualize)")
    return described


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """``arrcoc visualize``: writes the three figures and returns their paths by kind."""
    command = parser()
    known, _ = command.parse_known_args(argv)
    try:
        command.set_defaults(**{"out": "runs/visualize", "queries": [], **load_settings(known.config)})
    except (FileNotFoundError, KeyError, ValueError) as err:
        command.error(str(err).strip('"'))
    args = command.parse_args(argv)
    try:
        return visualize(args)
    except (FileNotFoundError, ValueError) as err:  # bad input: a message, not a traceback
        command.error(str(err))


def visualize(args: argparse.Namespace) -> dict[str, Path]:
    model = load_model(args.checkpoint, args.backbone)
    if args.budget is not None:
        num_kept(args.budget, model.adapter.grid().num_patches)  # a count beyond the patches: a clear error
        model.budget = args.budget
    if args.image is not None:
        image, note = load_image(args.image, model.adapter.image_size)
        if note:
            print(f"note: {note}")
        queries = args.query or args.queries or [None]
    else:
        image, asked = pick_canvas(args.canvas or 0)
        queries = args.query or args.queries or asked
    explanations = explain(model, image, queries)
    answers = [answer(model, image, query) for query in queries]
    for explanation, result in zip(explanations, answers):
        print(f"{explanation.caption}: {result}")
    out = Path(args.out)
    figures = {"overlay": overlay_figure(explanations, answers),
               "ways_of_knowing": ways_of_knowing_figure(explanations),
               "queries": queries_figure([explanations])}
    paths = {kind: save_figure(fig, out / f"{kind}.png") for kind, fig in figures.items()}
    for kind, path in paths.items():
        print(f"wrote {kind.replace('_', ' ')}: {path}")
    return paths


if __name__ == "__main__":
    main()
