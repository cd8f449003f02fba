"""Pictures of what ARR-COC keeps, per image and query (the command is :mod:`arrcoc.commands.visualize`).

Three figures (matplotlib, Agg, PNG), one row or column per query:

* overlay: the image with its patch grid, the per-patch relevance over it, and the budget: the kept patches
  outlined and the dropped ones dimmed (with tiers of detail: merged 2x2 regions dimmed, normal patches
  plain, refined regions gridded at the 2x view's resolution);
* ways of knowing: propositional, perspectival and participatory evidence and the balanced relevance the
  field settles into, side by side, with the kept patches;
* queries: the same image under several queries, one column per query, on one colour scale.

    arrcoc visualize --canvas 3                        # a query test canvas, asked about two of its digits
    arrcoc visualize --image photo.jpg --query "which digit is red?" --budget 0.25 --out runs/viz

In Python: ``explain(model, image, queries)``, then ``overlay_figure`` / ``ways_of_knowing_figure`` /
``queries_figure`` and ``save_figure``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from einops import rearrange, repeat
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure, SubFigure
from matplotlib.patches import Patch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from arrcoc.backbones.tiers import MERGED, NORMAL, REFINED
from arrcoc.data import COLORS, POSITIONS, QueryBatch, query_split
from arrcoc.relevance import ARRCOC

__all__ = [
    "Answer",
    "Explanation",
    "answer",
    "canvas_queries",
    "demo_canvases",
    "dim_factors",
    "explain",
    "figure_image",
    "image_tensor",
    "kept_mask",
    "load_image",
    "outline_segments",
    "overlay_figure",
    "queries_figure",
    "ways_of_knowing_figure",
]

WAYS_OF_KNOWING = ("propositional", "perspectival", "participatory")
DIMMED = 0.3  # brightness of the pixels of patches the backbone does not see
DEMO_CANVASES, DEMO_SEED = 64, 5  # the embedded query test canvases `--canvas N` picks from
HEAT = "inferno"
OUTLINE = "#00e5ff"  # kept patches: cyan stands out on the dark canvases and on the heat map's colours


# ---- what the model computed --------------------------------------------------------------------------
@dataclass
class Explanation:
    """What the model computed for one image under one query; every map is (h, w), one value per patch."""

    image: Tensor  # (3, H, W) in [0, 1]
    query: str | None
    maps: dict[str, Tensor]  # the three ways of knowing and "relevance", the balanced field
    kept: Tensor  # (h, w) bool: the patches that get tokens at the budget
    tiers: Tensor | None  # (h, w) MERGED / NORMAL / REFINED of each patch's 2x2 region, for a model with tiers
    tokens: int  # patch tokens the backbone runs on
    patch_size: tuple[int, int]

    @property
    def caption(self) -> str:
        return f'"{self.query}"' if self.query else "(no query)"


@dataclass
class Answer:
    """The backbone's prediction (class index, probability) on the tokens kept at the budget and on all."""

    at_budget: int
    at_budget_probability: float
    all_tokens: int
    all_tokens_probability: float

    def __str__(self) -> str:
        return (f"answer {self.at_budget} ({self.at_budget_probability:.0%}) at the budget, "
                f"{self.all_tokens} ({self.all_tokens_probability:.0%}) with all tokens")


def kept_mask(kept: Tensor, height: int, width: int) -> Tensor:
    """(B, height, width) bool: True at the kept patch indices ``kept`` (B, K) (raster order)."""
    if kept.ndim != 2:
        raise ValueError(f"kept must be (batch, K) patch indices, got shape {tuple(kept.shape)}")
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= height * width):
        raise ValueError(f"kept indices must lie in [0, {height * width}) for a {height}x{width} grid, got "
                         f"{int(kept.min())}..{int(kept.max())}")
    mask = torch.zeros(kept.shape[0], height * width, dtype=torch.bool, device=kept.device)
    return rearrange(mask.scatter_(1, kept, True), "b (h w) -> b h w", h=height)


def patch_tiers(model: ARRCOC, logits: Tensor) -> Tensor:
    """(B, h, w) the tier of every patch's 2x2 region, from the budget logits (B, h, w)."""
    _, h, w = logits.shape
    regions = model.tiers(rearrange(logits, "b h w -> b (h w)"), h, w)
    return repeat(regions, "b (h w) -> b (h i) (w j)", h=h // 2, i=2, j=2)


@torch.no_grad()
def explain(model: ARRCOC, image: Tensor, queries: Sequence[str | None] = (None,),
            embeddings: Tensor | None = None) -> list[Explanation]:
    """One :class:`Explanation` of ``image`` (3, H, W) per query: sentences (the model's text encoder embeds
    them) or None; or captions with their ``embeddings`` (len(queries), query_dim)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be one (3, H, W) RGB image, got shape {tuple(image.shape)}")
    if not queries:
        raise ValueError("give at least one query (None: no query)")
    if embeddings is not None and len(embeddings) != len(queries):
        raise ValueError(f"{len(embeddings)} query embeddings for {len(queries)} queries")
    explanations = []
    for i, query in enumerate(queries):
        maps = model.relevance_map(image[None], query if embeddings is None else embeddings[i:i + 1])
        _, h, w = maps.relevance.shape
        tiers = patch_tiers(model, maps.logits)[0] if model.config.tiers else None
        tokens = model.tier_counts(h, w).total if tiers is not None else maps.kept.shape[1]
        explanations.append(Explanation(
            image=image.detach().cpu().float(),
            query=query,
            maps={name: getattr(maps, name)[0].cpu() for name in (*WAYS_OF_KNOWING, "relevance")},
            kept=kept_mask(maps.kept, h, w)[0].cpu(),
            tiers=None if tiers is None else tiers.cpu(),
            tokens=tokens,
            patch_size=tuple(model.adapter.patch_size),
        ))
    return explanations


@torch.no_grad()
def answer(model: ARRCOC, image: Tensor, query: str | Tensor | None = None) -> Answer:
    """The prediction on the tokens the model keeps at its budget and on every token, for comparison."""
    reduced = model(image[None], query).softmax(-1)[0]
    full = model.adapter(image[None]).softmax(-1)[0]
    return Answer(int(reduced.argmax()), float(reduced.max()), int(full.argmax()), float(full.max()))


# ---- drawing -------------------------------------------------------------------------------------------
def to_pixels(grid: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """(h, w) per-patch values -> (h * ph, w * pw) per-pixel values (each patch a constant block)."""
    return repeat(grid, "h w -> (h ph) (w pw)", ph=patch_size[0], pw=patch_size[1])


def dim_factors(explanation: Explanation) -> Tensor:
    """(h, w) brightness of each patch in the budget panel: 1 where the backbone sees the patch in full detail
    or finer (a kept patch; with tiers, a normal or refined region), ``DIMMED`` where it does not."""
    seen = explanation.kept if explanation.tiers is None else explanation.tiers != MERGED
    return torch.where(seen, 1.0, DIMMED)


def outline_segments(mask: Tensor, cell: tuple[int, int]) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Pixel-coordinate line segments ((x0, y0), (x1, y1)) that outline the True cells of ``mask`` (h, w) of
    ``cell`` (height, width) pixels: every cell edge between a True cell and a False one or the border."""
    padded = torch.nn.functional.pad(mask.bool(), (1, 1, 1, 1))  # False all around: the border is an edge
    ch, cw = cell
    segments = []
    for r, c in mask.nonzero().tolist():
        x0, y0, x1, y1 = c * cw, r * ch, (c + 1) * cw, (r + 1) * ch
        if not padded[r, c + 1]:  # above
            segments.append(((x0, y0), (x1, y0)))
        if not padded[r + 2, c + 1]:  # below
            segments.append(((x0, y1), (x1, y1)))
        if not padded[r + 1, c]:  # left
            segments.append(((x0, y0), (x0, y1)))
        if not padded[r + 1, c + 2]:  # right
            segments.append(((x1, y0), (x1, y1)))
    return segments


def cell_lines(mask: Tensor, cell: tuple[int, int], step: tuple[float, float]
               ) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The lines of a grid of ``step`` (height, width) px inside each True cell of ``mask`` (h, w) of ``cell``
    (height, width) px; ``cell_lines(torch.ones(1, 1), (H, W), patch)`` is an H x W image's patch grid."""
    segments = []
    for r, c in mask.nonzero().tolist():
        x0, y0, x1, y1 = c * cell[1], r * cell[0], (c + 1) * cell[1], (r + 1) * cell[0]
        segments += [((x0, y), (x1, y)) for y in np.arange(y0 + step[0], y1, step[0])]
        segments += [((x, y0), (x, y1)) for x in np.arange(x0 + step[1], x1, step[1])]
    return segments


def _show(ax: Axes, pixels: np.ndarray | Tensor, **kwargs) -> object:
    """imshow with pixel edges on integer coordinates, so that patch lines fall on patch borders."""
    height, width = pixels.shape[:2]
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.imshow(pixels, extent=(0, width, height, 0), interpolation="nearest", **kwargs)


def _rgb(image: Tensor) -> np.ndarray:
    return rearrange(image.clamp(0, 1), "c h w -> h w c").numpy()


def draw_image(ax: Axes, explanation: Explanation) -> None:
    """The image with its patch grid."""
    _, height, width = explanation.image.shape
    _show(ax, _rgb(explanation.image))
    grid = cell_lines(torch.ones(1, 1), (height, width), explanation.patch_size)
    ax.add_collection(LineCollection(grid, colors="white", linewidths=0.4, alpha=0.5))
    h, w = explanation.kept.shape
    ax.set_title(f"image: {h}x{w} patches of {explanation.patch_size[0]} px", fontsize=9)


def draw_heat(ax: Axes, explanation: Explanation, name: str, vmin: float | None = None,
              vmax: float | None = None) -> object:
    """A per-patch map over the image (greyed, so that the colours read as the map's); returns the artist for a
    colour bar."""
    grey = repeat(explanation.image.mean(0), "h w -> h w c", c=3)
    _show(ax, grey.clamp(0, 1).numpy())
    return _show(ax, to_pixels(explanation.maps[name], explanation.patch_size).numpy(), cmap=HEAT, alpha=0.6,
                 vmin=vmin, vmax=vmax)


def draw_allocation(ax: Axes, explanation: Explanation) -> None:
    """The image as the backbone gets it: dropped (or merged) patches dimmed, the rest outlined; with tiers,
    every 2x2 region outlined, normal ones with their patch grid, refined ones with the 2x view's sub-patches."""
    _, height, width = explanation.image.shape
    patch = explanation.patch_size
    _show(ax, _rgb(explanation.image * to_pixels(dim_factors(explanation), patch)))
    total = explanation.kept.numel()
    if explanation.tiers is None:
        ax.add_collection(LineCollection(outline_segments(explanation.kept, patch), colors=OUTLINE, linewidths=1.6))
        ax.set_title(f"kept: {explanation.tokens} of {total} patch tokens", fontsize=9)
        return
    regions, region = explanation.tiers[::2, ::2], (2 * patch[0], 2 * patch[1])  # one tier per 2x2 region
    lines = [(cell_lines(torch.ones(1, 1), (height, width), region), "white", 0.8),
             (cell_lines(regions == NORMAL, region, patch), "white", 0.5),
             (cell_lines(regions == REFINED, region, (patch[0] / 2, patch[1] / 2)), OUTLINE, 0.5),
             (outline_segments(regions != MERGED, region), OUTLINE, 1.6)]
    for segments, color, width_pt in lines:
        ax.add_collection(LineCollection(segments, colors=color, linewidths=width_pt))
    ax.set_title(f"tiers: {explanation.tokens} patch tokens (all: {total})", fontsize=9)
    handles = [Patch(facecolor=(DIMMED,) * 3, edgecolor="white", label="merged: 1 token per 2x2"),
               Patch(facecolor="white", edgecolor=OUTLINE, label="normal: 1 token per patch"),
               Patch(facecolor="white", edgecolor=OUTLINE, hatch="++", label="refined: 4 tokens per patch")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7, frameon=False)


# ---- figures -------------------------------------------------------------------------------------------
def _figure(rows: int, cols: int, panel: float = 2.3) -> tuple[Figure, np.ndarray]:
    """A figure of rows x cols panels with its own Agg canvas: no pyplot, no global state (the web app draws
    from several threads)."""
    fig = Figure(figsize=((panel + 0.6) * cols, panel * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _query_rows(explanations: Sequence[Explanation], cols: int, title: str, answers: Sequence[Answer] | None = None,
                panel: float = 2.3) -> tuple[Figure, list[tuple[SubFigure, np.ndarray]]]:
    """A figure with one row of ``cols`` panels per query, each row titled with its query (and answer)."""
    fig = Figure(figsize=((panel + 0.6) * cols, (panel + 0.6) * len(explanations) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12)
    rows = []
    for row, subfigure in enumerate(np.atleast_1d(fig.subfigures(len(explanations), 1))):
        heading = explanations[row].caption
        if answers:
            heading += f"  -  answer {answers[row].at_budget} at the budget (all tokens: {answers[row].all_tokens})"
        subfigure.suptitle(heading, fontsize=10, fontweight="bold")
        rows.append((subfigure, subfigure.subplots(1, cols)))
    return fig, rows


def _shared_range(explanations: Sequence[Explanation], name: str) -> tuple[float, float]:
    values = torch.stack([e.maps[name] for e in explanations])
    return float(values.min()), float(values.max())


def overlay_figure(explanations: Sequence[Explanation], answers: Sequence[Answer] | None = None) -> Figure:
    """One row per query: the image with its patch grid, the relevance over it, and the patches kept at the
    budget (or the tiers); the relevance on one colour scale for every row."""
    fig, rows = _query_rows(explanations, 3, "ARR-COC: per-patch relevance and the patches that get tokens",
                            answers)
    vmin, vmax = _shared_range(explanations, "relevance")
    for explanation, (subfigure, axes) in zip(explanations, rows):
        draw_image(axes[0], explanation)
        heat = draw_heat(axes[1], explanation, "relevance", vmin, vmax)
        axes[1].set_title("relevance", fontsize=9)
        subfigure.colorbar(heat, ax=axes[1], shrink=0.85)
        draw_allocation(axes[2], explanation)
    return fig


MAP_TITLES = {
    "propositional": "propositional\n(lightness entropy)",
    "perspectival": "perspectival\n(learned salience)",
    "participatory": "participatory\n(query-patch coupling)",
    "relevance": "relevance\n(balanced field)",
}


def ways_of_knowing_figure(explanations: Sequence[Explanation]) -> Figure:
    """One row per query: the three ways of knowing, the relevance they settle into, and the kept patches;
    each map on its own colour scale (they have different units)."""
    fig, rows = _query_rows(explanations, 5, "The three ways of knowing, the balanced relevance and the kept patches")
    for explanation, (subfigure, axes) in zip(explanations, rows):
        for ax, (name, title) in zip(axes, MAP_TITLES.items()):
            heat = draw_heat(ax, explanation, name)
            ax.set_title(title, fontsize=9)
            subfigure.colorbar(heat, ax=ax, shrink=0.85)
        draw_allocation(axes[4], explanation)
    return fig


def queries_figure(images: Sequence[Sequence[Explanation]], title: str | None = None) -> Figure:
    """Each image under several queries, one column per query (the query as caption): its relevance (one
    colour scale per image) above the patches kept at the budget."""
    cols = max(len(row) for row in images)
    fig, axes = _figure(2 * len(images), cols)
    for i, explanations in enumerate(images):
        vmin, vmax = _shared_range(explanations, "relevance")
        heat_axes, kept_axes = axes[2 * i], axes[2 * i + 1]
        for col in range(cols):
            if col >= len(explanations):
                heat_axes[col].set_visible(False)
                kept_axes[col].set_visible(False)
                continue
            heat = draw_heat(heat_axes[col], explanations[col], "relevance", vmin, vmax)
            heat_axes[col].set_title(textwrap.fill(explanations[col].caption, 26), fontsize=9)
            draw_allocation(kept_axes[col], explanations[col])
        heat_axes[0].set_ylabel("relevance", fontsize=9)
        kept_axes[0].set_ylabel("kept at the budget", fontsize=9)
        fig.colorbar(heat, ax=list(heat_axes[:len(explanations)]), shrink=0.85)
    fig.suptitle(title or "ARR-COC under different queries: relevance and kept patches", fontsize=11)
    return fig


def figure_image(fig: Figure, dpi: int = 100) -> np.ndarray:
    """(H, W, 3) uint8 RGB rendering of ``fig``."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# ---- inputs --------------------------------------------------------------------------------------------
@cache
def demo_canvases() -> QueryBatch:
    """The embedded query test canvases that ``--canvas N``, the demo and the web app pick from."""
    return query_split("test", DEMO_CANVASES, seed=DEMO_SEED)


def canvas_queries(canvases: QueryBatch, index: int, digits: int = 2) -> list[str]:
    """Questions about the first ``digits`` digits of canvas ``index``: by colour, then by position."""
    slots = [s for s in range(len(POSITIONS)) if bool(canvases.present[index, s])][:digits]
    colors = list(COLORS)  # ``slot_colors`` index the default QueryConfig colours, COLORS' order
    return ([f"which digit is {colors[int(canvases.slot_colors[index, s])]}?" for s in slots]
            + [f"what number is in the {POSITIONS[s]}?" for s in slots])


def image_tensor(image: Image.Image, size: tuple[int, int], name: str = "image") -> tuple[Tensor, str | None]:
    """(3, H, W) in [0, 1] of ``size`` (H, W), and a note when it had to be resized (None otherwise)."""
    rgb = image.convert("RGB")
    note = None
    if rgb.size != (size[1], size[0]):
        note = (f"{name} resized from {rgb.width}x{rgb.height} to {size[1]}x{size[0]} px, the backbone's input size"
                + ("" if rgb.width * size[0] == rgb.height * size[1] else " (aspect ratio not kept)"))
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return rearrange(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0), "h w c -> c h w"), note


def load_image(path: str | Path, size: tuple[int, int]) -> tuple[Tensor, str | None]:
    """An image file as :func:`image_tensor`; a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found (expected a PNG, JPEG, BMP, ... file)")
    try:
        with Image.open(path) as image:
            return image_tensor(image, size, path.name)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image (expected a PNG, JPEG, BMP, ... file): {err}") from err
