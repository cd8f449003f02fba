"""A small web demo of ARR-COC (Gradio): upload an image or pick an embedded query canvas, type a query, choose a
budget, and see the patches the model keeps, the three ways of knowing with the balanced relevance, and its
answer at the budget next to the answer with all tokens.

    pip install -e ".[web]"
    python -m arrcoc.web                     # http://127.0.0.1:7860, the canvas benchmark's query model
    python -m arrcoc.web --port 8080 --checkpoint runs/quick/models/query --host 0.0.0.0

Runs offline; Gradio's usage analytics are switched off.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from arrcoc.commands.visualize import load_model
from arrcoc.relevance import ARRCOC
from arrcoc.visualize import (
    answer,
    canvas_queries,
    demo_canvases,
    explain,
    figure_image,
    image_tensor,
    overlay_figure,
    ways_of_knowing_figure,
)

__all__ = ["build_app", "main", "relevance_views", "serve"]

CANVAS_CHOICES = 8  # embedded canvases offered in the app
# the 64 px input drawn large, its pixels sharp
CSS = "#input-image img {min-width: 192px; min-height: 192px; object-fit: contain; image-rendering: pixelated}"


def require_gradio() -> ModuleType:
    """Gradio, imported only for the web demo (an optional extra)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports
    try:
        import gradio
    except ImportError as err:
        raise ImportError("the web demo needs Gradio, the 'web' extra: pip install 'arrcoc[web]' "
                          "(in a checkout: pip install -e '.[web]')") from err
    return gradio


def relevance_views(model: ARRCOC, image: np.ndarray, query: str, tokens: int
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """What the app shows for an RGB image (H, W, 3), a query ("" for none) and a budget of ``tokens`` patch
    tokens: the overlay and the ways-of-knowing figures as images, and the answers as Markdown."""
    if image is None:
        raise ValueError("no image: upload one or pick an embedded canvas")
    pixels, note = image_tensor(Image.fromarray(np.asarray(image, dtype=np.uint8)), model.adapter.image_size)
    total = model.adapter.grid().num_patches
    model.budget = int(tokens)  # a count of patch tokens (arrcoc.budget): all of them runs the model unmodified
    query = query.strip() or None
    explanations = explain(model, pixels, [query])
    result = answer(model, pixels, query)
    text = (f"**Answer at {explanations[0].tokens} of {total} patch tokens: {result.at_budget}** "
            f"({result.at_budget_probability:.0%})  \nWith all {total} tokens: {result.all_tokens} "
            f"({result.all_tokens_probability:.0%})")
    if note:
        text += f"  \n*Note: {note}.*"
    return (figure_image(overlay_figure(explanations, [result])), figure_image(ways_of_knowing_figure(explanations)),
            text)


def _canvas(index: int) -> tuple[np.ndarray, str]:
    canvases = demo_canvases()
    pixels = (canvases.images[index].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return pixels, canvas_queries(canvases, index)[0]


def build_app(model: ARRCOC) -> object:
    """The Gradio ``Blocks`` app around ``model`` (not launched)."""
    gr = require_gradio()
    total = model.adapter.grid().num_patches
    start = explain(model, demo_canvases().images[0])[0].tokens  # the model's own budget, in tokens
    first_image, first_query = _canvas(0)

    def show(image: np.ndarray, query: str, tokens: float) -> tuple[np.ndarray, np.ndarray, str]:
        try:
            return relevance_views(model, image, query, int(tokens))
        except ValueError as err:  # an infeasible budget (tiers), no image: shown in the app
            raise gr.Error(str(err)) from err

    with gr.Blocks(title="ARR-COC relevance") as app:
        gr.Markdown("# ARR-COC: which patches get tokens for this query?\nUpload an image or pick an embedded "
                    "canvas, type a query, choose the budget, and press the button.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(value=first_image, type="numpy", label="image (resized to the backbone's input)",
                                 elem_id="input-image", height=256)
                canvas = gr.Dropdown([f"canvas {i}" for i in range(CANVAS_CHOICES)], value="canvas 0",
                                     label="or an embedded query canvas")
                query = gr.Textbox(value=first_query, label="query", elem_id="query")
                budget = gr.Slider(1, total, value=start, step=1, label=f"budget: patch tokens kept (of {total})")
                run = gr.Button("Show relevance", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                answer_text = gr.Markdown(elem_id="answer")
                # the figures carry their own titles
                overlay = gr.Image(elem_id="overlay", interactive=False, show_label=False)
        ways = gr.Image(elem_id="ways", interactive=False, show_label=False)
        canvas.change(lambda choice: _canvas(int(choice.split()[-1])), canvas, [image, query])
        run.click(show, [image, query, budget], [overlay, ways, answer_text])
    return app


def serve(model: ARRCOC, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> object:
    """Build the app around ``model`` and serve it at http://host:port/; returns the app (``block=False``: at
    once, serving from a thread until ``app.close()``)."""
    app = build_app(model)
    app.launch(server_name=host, server_port=port, css=CSS, prevent_thread_lock=not block, quiet=not block)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m arrcoc.web", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--checkpoint", type=Path,
                        help="ARR-COC folder (default: the canvas benchmark's query model, "
                             "benchmarks/results/models/query)")
    parser.add_argument("--backbone", type=Path, help="canvas ViT .safetensors (default: the committed one)")
    args = parser.parse_args(argv)
    try:
        require_gradio()
        model = load_model(args.checkpoint, args.backbone)
    except (ImportError, FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    serve(model, args.host, args.port)


if __name__ == "__main__":
    main()
