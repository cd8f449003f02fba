"""Canvas VQA: one-word questions about canvases of coloured MNIST digits (issue 38's benchmark data).

A canvas is a query canvas of the ``anywhere`` layout (:mod:`arrcoc.data.canvas`), larger: 128 px (16 x 16 patches
of 8 px), 3-6 digits of six named colours anywhere, half of them beside another digit. Each canvas gets one question
with a one-word answer, of five kinds:

* local, about one digit: ``color`` ("which digit is red?" -> "7", the colour is unique on the canvas), ``position``
  ("what digit is at the top left?" -> "7": the digit nearest that corner, at least a patch nearer than the next) and
  ``digit_color`` ("what colour is the 7?" -> "red", the digit is unique);
* global, about all of them: ``count`` ("how many digits are there?" -> "4") and ``exists`` ("is there a 3?" ->
  "yes" / "no", as often one as the other).

Local and global kinds are asked equally often (each kind of a scope alike, among those the canvas allows), so a
query-agnostic method is not beaten by construction. ``relevant`` marks the digits an answer depends on (the box
oracle keeps their patches): the asked digit of a local question, every digit of a global one. Test and shift
canvases are asked in held-out phrasings; the ``shift`` split has other photographs and colour shades.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .canvas import COLORS, MORE_COLORS, SHIFT_BACKGROUNDS, QueryConfig, Split, canvas_sources, make_query
from .digits import DigitSplit

__all__ = ["LOCAL_KINDS", "GLOBAL_KINDS", "VQA_COLORS", "VQABatch", "VQAConfig", "answer_vocabulary", "ask",
           "content_words", "make_vqa", "phrasings", "vqa_split", "vqa_words"]

VQA_COLORS = (*COLORS, *MORE_COLORS)
CORNERS = {"top left": (0.0, 0.0), "top right": (1.0, 0.0), "bottom left": (0.0, 1.0), "bottom right": (1.0, 1.0)}
LOCAL_KINDS = ("color", "position", "digit_color")
GLOBAL_KINDS = ("count", "exists")

# Several phrasings per kind; the last two of each are held out (test and shift only). {c} colour, {p} corner,
# {d} digit.
_PHRASINGS: dict[str, tuple[str, ...]] = {
    "color": ("which digit is {c} ?", "what is the {c} digit ?", "what number is written in {c} ?",
              "read the {c} digit .", "tell me the {c} number .", "which number is coloured {c} ?"),
    "position": ("what digit is at the {p} ?", "which digit is nearest the {p} corner ?",
                 "read the digit in the {p} .", "what number is closest to the {p} ?",
                 "name the digit at the {p} .", "which number sits at the {p} ?"),
    "digit_color": ("what colour is the {d} ?", "which colour is the {d} written in ?",
                    "what is the colour of the {d} ?", "tell me the colour of the {d} .",
                    "in what colour is the {d} ?", "name the colour of the {d} ."),
    "count": ("how many digits are there ?", "how many numbers are on the canvas ?", "count the digits .",
              "what is the number of digits ?",
              "how many digits can you see ?", "tell me how many numbers there are ."),
    "exists": ("is there a {d} ?", "does the canvas show a {d} ?", "is a {d} written anywhere ?",
               "can you find a {d} ?",
               "is any digit a {d} ?", "do you see a {d} ?"),
}
_HELD_OUT = 2
_SPLIT_SEED = {"train": 0, "test": 1_000_003, "shift": 2_000_003}


@dataclass(frozen=True)
class VQAConfig:
    """VQA canvases: the canvas statistics (``canvas``, a :class:`QueryConfig` of the ``anywhere`` layout) and how
    questions are drawn.

    Args:
        canvas: size, digit sizes and count, colours, backgrounds (its ``held_out_phrasings`` is not read).
        held_out_phrasings: ask in the held-out phrasings (test and shift) instead of the training ones.
        position_margin: a corner is asked about only if its nearest digit is this much nearer (px) than the next.
        local_share: the chance that a canvas's question is a local one.
    """

    canvas: QueryConfig = QueryConfig(size=128, layout="anywhere", num_digits=(3, 6), digit_scale=(26.0, 36.0),
                                      colors=VQA_COLORS)
    held_out_phrasings: bool = False
    position_margin: float = 8.0
    local_share: float = 0.5

    def __post_init__(self) -> None:
        if self.canvas.layout != "anywhere":
            raise ValueError(f"VQA canvases use the 'anywhere' layout, got {self.canvas.layout!r}")
        if not 0 <= self.local_share <= 1 or self.position_margin < 0:
            raise ValueError(f"local_share must be in [0, 1] and position_margin >= 0, got {self.local_share!r} and "
                             f"{self.position_margin!r}")


SHIFT_VQA = VQAConfig(canvas=replace(VQAConfig().canvas, backgrounds=SHIFT_BACKGROUNDS,
                                     background_brightness=(0.2, 0.4), shifted_colors=True),
                      held_out_phrasings=True)


@dataclass
class VQABatch:
    images: Tensor  # (N, 3, H, W) float in [0, 1]
    questions: list[str]  # words and punctuation separated by spaces
    answers: list[str]  # one word each
    kinds: list[str]  # one of LOCAL_KINDS + GLOBAL_KINDS
    boxes: Tensor  # (N, S, 4) ink box (x0, y0, x1, y1) of each digit slot, px (zeros where empty)
    present: Tensor  # (N, S) bool, the slot holds a digit
    digits: Tensor  # (N, S) int64 class of each slot's digit (-1 where empty)
    colors: Tensor  # (N, S) int64 index into the config's colours (-1 where empty)
    relevant: Tensor  # (N, S) bool, the digits the answer depends on

    def __len__(self) -> int:
        return len(self.images)

    def rows(self, rows: slice | range | list[int]) -> VQABatch:
        """Canvases ``rows`` of the batch, with their questions."""
        index = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.tensor(list(rows))
        picked = index.tolist()
        return replace(self, images=self.images[index], questions=[self.questions[i] for i in picked],
                       answers=[self.answers[i] for i in picked], kinds=[self.kinds[i] for i in picked],
                       boxes=self.boxes[index], present=self.present[index], digits=self.digits[index],
                       colors=self.colors[index], relevant=self.relevant[index])

    @property
    def local(self) -> Tensor:
        """(N,) bool, the question is about one digit."""
        return torch.tensor([kind in LOCAL_KINDS for kind in self.kinds])


def phrasings(kind: str, held_out: bool) -> tuple[str, ...]:
    """The question templates of ``kind``: the training ones, or the held-out ones."""
    templates = _PHRASINGS[kind]
    return templates[-_HELD_OUT:] if held_out else templates[:-_HELD_OUT]


def answer_vocabulary(config: VQAConfig = VQAConfig()) -> tuple[str, ...]:
    """Every answer a question can have: the digits, the colour names, yes and no."""
    return (*(str(d) for d in range(10)), *config.canvas.colors, "yes", "no")


def content_words(config: VQAConfig = VQAConfig()) -> frozenset[str]:
    """The words that make one question differ from another of its kind (digits, colours, corners): what a
    question means rests on them, whatever its phrasing."""
    return frozenset((*answer_vocabulary(config), *(w for corner in CORNERS for w in corner.split())))


def vqa_words(config: VQAConfig = VQAConfig()) -> tuple[str, ...]:
    """Every word of every question (training and held-out phrasings) and answer, sorted: a closed vocabulary."""
    words = set(answer_vocabulary(config))
    for templates in _PHRASINGS.values():
        for template in templates:
            words.update(w for w in template.split() if not w.startswith("{"))
    words.update(w for corner in CORNERS for w in corner.split())
    return tuple(sorted(words))


def _corner_digit(boxes: Tensor, present: Tensor, corner: str, size: int, margin: float) -> int | None:
    """The slot of the digit nearest ``corner`` (by its ink box's centre), if it is ``margin`` px nearer than the
    next one."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    distance = (centre - torch.tensor(CORNERS[corner]) * size).norm(dim=-1).masked_fill(~present, float("inf"))
    nearest = distance.topk(2, largest=False)
    if not bool(present.sum() >= 2 and nearest.values[1] - nearest.values[0] >= margin):
        return None
    return int(nearest.indices[0])


def _question(present: Tensor, digits: Tensor, colors: Tensor, boxes: Tensor, config: VQAConfig,
              generator: torch.Generator) -> tuple[str, str, str, Tensor]:
    """(kind, question, answer, relevant slots) for one canvas, from what its slots hold."""
    names = config.canvas.colors
    slots = present.nonzero()[:, 0].tolist()
    unique_colors = [s for s in slots if int((colors[present] == colors[s]).sum()) == 1]
    unique_digits = [s for s in slots if int((digits[present] == digits[s]).sum()) == 1]
    corners = {c: slot for c in CORNERS
               if (slot := _corner_digit(boxes, present, c, config.canvas.size, config.position_margin)) is not None}
    draw = torch.rand(4, generator=generator).tolist()
    local = draw[0] < config.local_share
    kinds = [k for k, ok in zip(LOCAL_KINDS, (unique_colors, corners, unique_digits)) if ok] if local else list(
        GLOBAL_KINDS)
    kind = kinds[int(draw[1] * len(kinds))]
    templates = phrasings(kind, config.held_out_phrasings)
    template = templates[int(draw[2] * len(templates))]
    relevant = present.clone() if kind in GLOBAL_KINDS else torch.zeros_like(present)
    if kind == "color":
        slot = unique_colors[int(draw[3] * len(unique_colors))]
        question, answer = template.format(c=names[int(colors[slot])]), str(int(digits[slot]))
    elif kind == "position":
        corner = list(corners)[int(draw[3] * len(corners))]
        slot = corners[corner]
        question, answer = template.format(p=corner), str(int(digits[slot]))
    elif kind == "digit_color":
        slot = unique_digits[int(draw[3] * len(unique_digits))]
        question, answer = template.format(d=int(digits[slot])), names[int(colors[slot])]
    elif kind == "count":
        question, answer = template, str(len(slots))
    else:  # exists: a digit on the canvas or one that is not, as often one as the other
        shown = sorted({int(digits[s]) for s in slots})
        absent = [d for d in range(10) if d not in shown]
        asked = shown if draw[3] < 0.5 else absent
        digit = asked[int(torch.randint(len(asked), (), generator=generator))]
        question, answer = template.format(d=digit), "yes" if digit in shown else "no"
    if kind in LOCAL_KINDS:
        relevant[slot] = True
    return kind, question, answer, relevant


def ask(batch: VQABatch, seed: int, config: VQAConfig = VQAConfig()) -> VQABatch:
    """The same canvases (images shared, not copied) with new questions drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    kinds, questions, answers, relevant = zip(*(
        _question(batch.present[i], batch.digits[i], batch.colors[i], batch.boxes[i], config, generator)
        for i in range(len(batch))))
    return VQABatch(batch.images, list(questions), list(answers), list(kinds), batch.boxes, batch.present,
                    batch.digits, batch.colors, torch.stack(relevant))


def make_vqa(digits: Tensor, labels: Tensor, n: int, seed: int, config: VQAConfig = VQAConfig()) -> VQABatch:
    """``n`` VQA canvases from ``digits`` (M, 784) with ``labels`` (M,), one question each."""
    canvas = make_query(digits, labels, n, seed, config.canvas)
    drawn = VQABatch(canvas.images, [], [], [], canvas.all_boxes, canvas.present, canvas.slot_labels,
                     canvas.slot_colors, canvas.present)
    return ask(drawn, seed + 7, config)


def vqa_split(split: Split, n: int, seed: int = 0, config: VQAConfig | None = None,
              sources: DigitSplit | None = None) -> VQABatch:
    """VQA canvases of a named split: ``train`` from training digits in training phrasings; ``test`` and ``shift``
    (other photographs and colour shades, :data:`SHIFT_VQA`) from test digits in held-out phrasings."""
    if split not in _SPLIT_SEED:
        raise ValueError(f"VQA splits are {tuple(_SPLIT_SEED)}, got {split!r}")
    sources = sources or canvas_sources()
    digits, labels = (sources.x_train, sources.y_train) if split == "train" else (sources.x_test, sources.y_test)
    if config is None:
        config = SHIFT_VQA if split == "shift" else VQAConfig(held_out_phrasings=split == "test")
    return make_vqa(digits, labels, n, seed + _SPLIT_SEED[split], config)
