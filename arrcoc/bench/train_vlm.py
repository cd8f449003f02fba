"""Train the canvas VLM (issue 38): ``python -m arrcoc.bench.train_vlm [--quick]``.

Two stages, both backprop, on VQA canvases of TRAIN source digits (:mod:`arrcoc.data.vqa`):

1. **The tower, per patch.** The canvas ViT's architecture at 128 px (256 patches of 8 px), started from the
   committed canvas ViT (its stem and blocks; the position embedding resampled from 8 x 8 to 16 x 16), learns for
   each patch the digit and colour of the digit whose ink box holds the patch's centre (or background) and whether
   the box's centre is in it (one patch per digit), its own row and column (so that the tokens keep where they are,
   which corner questions read), and how many digits the canvas holds (on every patch, as a large tower's patch
   tokens carry the image's gist: without it the language model counts by the share of the sequence that is digit,
   and any selection that favours digits breaks counting). Without this stage a language model on a small tower
   never binds words to digits (the issue's probe: local questions at chance).
2. **The VQA model.** The tower frozen, its features computed once; the projector (started on them:
   :func:`start_projector`) and a small Llama learn the answer word (cross-entropy on the answer and ``</s>``),
   several questions per canvas.

Writes the model with ``save_pretrained`` (config, weights, tokenizer) and ``training.json`` (command, settings,
accuracies per question kind on canvases of TEST source digits, seconds) to ``benchmarks/checkpoints/canvas_vlm/``
(``runs/quick/canvas_vlm`` with ``--quick``). :func:`load_canvas_vlm` reads it back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

from arrcoc.backbones.vlm import packed_columns
from arrcoc.config import REPO_ROOT, parse_with_config
from arrcoc.data.vqa import LOCAL_KINDS, VQABatch, VQAConfig, ask, content_words, vqa_split
from arrcoc.models.canvas_vit import load_canvas_vit
from arrcoc.models.canvas_vlm import (
    ANSWER,
    IMAGE_TOKEN,
    CanvasVisionConfig,
    CanvasVisionModel,
    CanvasVLMConfig,
    build_canvas_vlm,
    canvas_prompts,
    canvas_tokenizer,
)
from arrcoc.optim import warmup_cosine
from arrcoc.reporting import command_line, run_metadata
from arrcoc.storage import save_json_atomic

from .pretrain import training_parser

DEFAULT_DIR = REPO_ROOT / "benchmarks" / "checkpoints" / "canvas_vlm"
BACKGROUND = -1  # a patch no digit's box holds: its own class after the digits (colours) in each head


@dataclass(frozen=True)
class Phase:
    """One phase of the VQA curriculum: ``epochs`` passes with the visual tokens averaged over ``pool`` x ``pool``
    patches, on a warmup-cosine schedule of its own that peaks at ``lr``, each training question's word (but its
    content words: :func:`arrcoc.data.vqa.content_words`) replaced by ``<unk>`` with chance ``unknown_words`` (so that
    held-out phrasings are read by their content words); with chance ``subsets`` a canvas is seen through its digits'
    visual tokens and a random share of its background's only (:func:`evidence_subsets`)."""

    pool: int
    epochs: int
    lr: float
    unknown_words: float = 0.1
    subsets: float = 0.0


@dataclass(frozen=True)
class VLMTrainConfig:
    """Settings of both stages.

    Args:
        canvases: training canvases (drawn once; the questions are redrawn every VQA epoch).
        tower_epochs, tower_batch, tower_lr: the tower's per-patch stage.
        tower_position_weight, tower_count_weight: the weights of its row and column read-outs' loss and of its
            count read-out's against the digit, colour and centre ones' (at weight 1 the count held the digit
            read-out back: docs/decisions.md, "Sixth session").
        vqa_curriculum: the VQA stage's phases, in turn (16 tokens, then 64, then all 256: at 256 the language model
            does not learn to find the asked digit within the budget, at 16 it does, and it keeps that at 256).
        vqa_batch, vqa_weight_decay: the VQA stage (projector and language model).
        questions_per_canvas: questions asked of each canvas in each VQA epoch (one sequence: the image once).
        eval_canvases: test canvases (TEST source digits, held-out phrasings) the accuracies are measured on.
        probe_canvases: the first of them, answered after each curriculum phase to show progress.
        warmup: the share of the tower stage's steps, and of each VQA phase's, that its step size warms up over.
        weight_decay: the tower stage's.
    """

    seed: int = 0
    canvases: int = 8192
    tower_epochs: int = 10
    tower_batch: int = 64
    tower_lr: float = 1e-3
    tower_position_weight: float = 0.1
    tower_count_weight: float = 0.2
    vqa_curriculum: tuple[Phase, ...] = (Phase(4, 30, 1e-3), Phase(2, 6, 3e-4, subsets=0.5),
                                         Phase(1, 12, 3e-4, unknown_words=0.3, subsets=0.5))
    vqa_batch: int = 32
    vqa_weight_decay: float = 0.0
    questions_per_canvas: int = 4
    eval_canvases: int = 1000
    probe_canvases: int = 200
    warmup: float = 0.05
    weight_decay: float = 0.05
    threads: int = 2
    epochs: int | None = None  # the shared command line's --epochs: the tower's and each curriculum phase's

    def __post_init__(self) -> None:
        if self.epochs is not None:
            object.__setattr__(self, "tower_epochs", self.epochs)
            object.__setattr__(self, "vqa_curriculum",
                               tuple(replace(phase, epochs=self.epochs) for phase in self.vqa_curriculum))

    def overridden(self, **settings: Any) -> VLMTrainConfig:
        return replace(self, **{key: value for key, value in settings.items() if value is not None})


def _step(loss: Tensor, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler) -> float:
    """One backprop step on ``loss``; returns its value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return loss.item()


# ---- stage 1: the tower --------------------------------------------------------------------------------
def patch_targets(batch: VQABatch, grid: int, patch: int) -> dict[str, Tensor]:
    """Per patch (N, grid * grid): ``digit`` and ``color`` of the digit whose ink box holds the patch's centre (the
    one painted last where boxes overlap; 10 and the colour count for none), ``centre``, 1 on the patch holding a
    box's centre, and ``count``, the number of digits on the canvas (the same on every patch)."""
    centres = (torch.arange(grid).float() + 0.5) * patch
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    x, y = x.flatten(), y.flatten()
    n, slots = batch.present.shape
    digit, color = torch.full((n, grid * grid), 10), torch.full((n, grid * grid), BACKGROUND)
    centre = torch.zeros(n, grid * grid)
    for slot in range(slots):  # painting order
        box, present = batch.boxes[:, slot], batch.present[:, slot, None]
        inside = (x >= box[:, 0:1]) & (x < box[:, 2:3]) & (y >= box[:, 1:2]) & (y < box[:, 3:4]) & present
        digit = torch.where(inside, batch.digits[:, slot, None], digit)
        color = torch.where(inside, batch.colors[:, slot, None], color)
        middle = ((box[:, :2] + box[:, 2:]) / 2 / patch).long().clamp(0, grid - 1)
        cell = middle[:, 1] * grid + middle[:, 0]
        centre[torch.arange(n)[present[:, 0]], cell[present[:, 0]]] = 1.0
    count = batch.present.sum(1, keepdim=True).expand(n, grid * grid)
    return {"digit": digit, "color": color, "centre": centre, "count": count}


class TowerHeads(nn.Module):
    """Linear read-outs of the tower's patch tokens (row-major over a ``grid`` x ``grid`` image) for stage 1 (dropped
    afterwards)."""

    def __init__(self, width: int, colors: int, grid: int, slots: int, position_weight: float = 1.0,
                 count_weight: float = 1.0):
        super().__init__()
        self.position_weight, self.count_weight = position_weight, count_weight
        self.digit, self.color, self.centre = nn.Linear(width, 11), nn.Linear(width, colors + 1), nn.Linear(width, 1)
        self.count = nn.Linear(width, slots + 1)
        self.row, self.column = nn.Linear(width, grid), nn.Linear(width, grid)

    def _where(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Each patch's row and column (N, T), as the token order gives them."""
        index = torch.arange(patches.shape[1], device=patches.device).expand(patches.shape[:2])
        return index // self.row.out_features, index % self.row.out_features

    def loss(self, patches: Tensor, targets: dict[str, Tensor]) -> Tensor:
        """The heads' summed loss."""
        colors = self.color.out_features
        loss = (F.cross_entropy(self.digit(patches).flatten(0, 1), targets["digit"].flatten())
                + F.cross_entropy(self.color(patches).flatten(0, 1), targets["color"].remainder(colors).flatten())
                + F.binary_cross_entropy_with_logits(self.centre(patches).squeeze(-1), targets["centre"])
                + self.count_weight * F.cross_entropy(self.count(patches).flatten(0, 1), targets["count"].flatten()))
        row, column = self._where(patches)
        loss = loss + self.position_weight * (F.cross_entropy(self.row(patches).flatten(0, 1), row.flatten())
                                              + F.cross_entropy(self.column(patches).flatten(0, 1), column.flatten()))
        return loss

    @torch.no_grad()
    def accuracies(self, patches: Tensor, targets: dict[str, Tensor]) -> dict[str, float]:
        """Accuracy (%) of the digit read-out on the patches a digit's box holds (``digit``) and on the patch at each
        box's centre (``centre_digit``), of the colour read-out on the digit patches (``color``), of the row and
        column read-outs together on every patch (``position``) and of the count read-out on every patch (``count``).
        """
        right = self.digit(patches).argmax(-1) == targets["digit"]
        on_digit, centre = targets["digit"] < 10, targets["centre"] > 0
        color_right = self.color(patches).argmax(-1) == targets["color"].remainder(self.color.out_features)
        row, column = self._where(patches)
        where_right = (self.row(patches).argmax(-1) == row) & (self.column(patches).argmax(-1) == column)
        return {"digit": 100 * right[on_digit].float().mean().item(),
                "centre_digit": 100 * right[centre].float().mean().item(),
                "color": 100 * color_right[on_digit].float().mean().item(),
                "position": 100 * where_right.float().mean().item(),
                "count": 100 * (self.count(patches).argmax(-1) == targets["count"]).float().mean().item()}


def tower_from_canvas_vit(config: CanvasVisionConfig) -> CanvasVisionModel:
    """The tower, its weights the committed canvas ViT's (position embedding resampled to the tower's grid)."""
    tower = CanvasVisionModel(config)
    source = load_canvas_vit().state_dict()
    grid = config.image_size // config.patch_size
    source["pos_embed"] = resample_abs_pos_embed(source["pos_embed"], (grid, grid), num_prefix_tokens=1)
    source = {k: v for k, v in source.items() if not k.startswith("head.")}
    tower.vit.load_state_dict(source)
    return tower


def train_tower(tower: CanvasVisionModel, train: VQABatch, test: VQABatch, config: VLMTrainConfig, colors: int,
                layer: int = -1) -> list[dict[str, float]]:
    """Stage 1: every patch token of the tower's hidden state ``layer`` (what the projector takes) learns what its
    patch shows. Returns each epoch's last loss and the read-outs' accuracies on the ``test`` canvases."""
    vision = tower.config
    grid = vision.image_size // vision.patch_size
    heads = TowerHeads(vision.hidden_size, colors, grid, train.present.shape[1], config.tower_position_weight,
                       config.tower_count_weight)
    parameters = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.tower_lr, weight_decay=config.weight_decay)
    steps = config.tower_epochs * math.ceil(len(train) / config.tower_batch)
    schedule = warmup_cosine(optimizer, steps, config.warmup * steps)
    targets, test_targets = patch_targets(train, grid, vision.patch_size), patch_targets(test, grid, vision.patch_size)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in range(config.tower_epochs):
        tower.train()
        order = torch.randperm(len(train), generator=generator).split(config.tower_batch)
        for rows in tqdm(order, desc=f"tower {epoch + 1}/{config.tower_epochs}", leave=False):
            patches = tower(train.images[rows].float() / 255).hidden_states[layer][:, 1:]
            loss = _step(heads.loss(patches, {k: v[rows] for k, v in targets.items()}), optimizer, schedule)
        tower.eval()
        with torch.no_grad():
            patches = torch.cat([tower(images.float() / 255).hidden_states[layer][:, 1:]
                                 for images in test.images.split(config.tower_batch)])
        history.append({"loss": loss, **{f"test_{k}": v for k, v in heads.accuracies(patches, test_targets).items()}})
        shown = history[-1]
        tqdm.write(f"tower epoch {epoch + 1}: loss {loss:.3f}; on {len(test)} test canvases digit right on "
                   f"{shown['test_digit']:.1f}% of digit patches, {shown['test_centre_digit']:.1f}% of box centres; "
                   f"colour {shown['test_color']:.1f}%; row and column {shown['test_position']:.1f}%; count "
                   f"{shown['test_count']:.1f}%")
    return history


# ---- stage 2: the VQA model ----------------------------------------------------------------------------
@torch.no_grad()
def tower_features(model: LlavaForConditionalGeneration, images: Tensor, chunk: int = 128) -> Tensor:
    """(N, T, D) what the tower gives the projector (the layer and strategy the config names), bfloat16; ``images``
    uint8."""
    core = model.model
    layer, strategy = model.config.vision_feature_layer, model.config.vision_feature_select_strategy
    out = []
    for start in range(0, len(images), chunk):
        hidden = core.vision_tower(images[start:start + chunk].float() / 255).hidden_states[layer]
        out.append((hidden[:, 1:] if strategy == "default" else hidden).to(torch.bfloat16))
    return torch.cat(out)


@torch.no_grad()
def start_projector(model: LlavaForConditionalGeneration, features: Tensor, sample: int = 256) -> None:
    """A data-dependent start of the projector (as LSUV's): its first layer sees the tower's ``features``
    standardised per channel, and its output has the word embeddings' mean norm. The tower's raw block outputs are
    about 25 times larger than a word's embedding with a large offset shared by all patches, which leaves the
    language model no room to mark a visual token by what the question asks."""
    projector = model.model.multi_modal_projector
    tokens = features[:sample].float().flatten(0, 1)
    mean, std = tokens.mean(0), tokens.std(0).clamp_min(1e-6)
    projector.linear_1.weight.div_(std)
    projector.linear_1.bias.sub_(projector.linear_1.weight @ mean)
    scale = model.get_input_embeddings().weight.norm(dim=-1).mean() / projector(tokens).norm(dim=-1).mean()
    projector.linear_2.weight.mul_(scale)
    projector.linear_2.bias.mul_(scale)


def pooled_tokens(features: Tensor, pool: int) -> Tensor:
    """Visual tokens (N, G * G, D) of a G x G grid averaged over ``pool`` x ``pool`` cells: (N, (G / pool)^2, D)."""
    n, tokens, width = features.shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens or grid % pool:
        raise ValueError(f"pooling {pool} x {pool} needs a square grid of tokens divisible by it, got {tokens} tokens")
    side = grid // pool
    return features.view(n, side, pool, side, pool, width).mean((2, 4)).view(n, side * side, width)


def evidence_subsets(on_digit: Tensor, share: float, generator: torch.Generator) -> Tensor:
    """(N, T) the visual tokens each canvas is seen through: all of them, or with chance ``share`` those on its digits
    and each background one with a chance drawn for the canvas as the square of a uniform draw in [0, 1) (a fifth
    of these canvases keep under 5% of their background). The questions' evidence stays; how much of the sequence is
    background stops saying how many digits there are (so that a selection keeping only digits keeps the count:
    docs/decisions.md, "Seventh session" and "Eighth session")."""
    subset = torch.rand(len(on_digit), 1, generator=generator) < share
    background = torch.rand(len(on_digit), 1, generator=generator).square()
    return ~subset | on_digit | (torch.rand(on_digit.shape, generator=generator) < background)


def without_dropped(embeds: Tensor, prompts: dict[str, Tensor], visual: Tensor, keep: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sequences (embeddings, attention mask, position ids, labels) without the visual tokens ``keep`` (N, T)
    drops, left padded again; every token keeps the position it had in the whole prompt, as the visual-token pruners'
    shortened prompts do (:meth:`arrcoc.backbones.vlm.VLMAdapter.shorten`)."""
    kept = prompts["attention_mask"].bool()
    kept[visual] = keep.flatten()
    columns = packed_columns(kept)
    real, index = columns >= 0, columns.clamp_min(0)
    shortened = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    return (shortened, real.long(), positions(prompts["attention_mask"]).gather(1, index).masked_fill(~real, 0),
            prompts["labels"].gather(1, index).masked_fill(~real, -100))


def embedded_prompts(model: LlavaForConditionalGeneration, features: Tensor, prompts: dict[str, Tensor]) -> Tensor:
    """The language model's input embeddings: the prompt's, with the tower ``features`` through the projector at the
    image placeholders (what ``LlavaForConditionalGeneration`` builds from pixels)."""
    return input_embeddings(model, prompts["input_ids"], model.model.multi_modal_projector(features.float()))


def input_embeddings(model: LlavaForConditionalGeneration, input_ids: Tensor, projected: Tensor) -> Tensor:
    """The embeddings of ``input_ids`` with the ``projected`` visual tokens (in placeholder order) at the image
    placeholders."""
    embeds = model.get_input_embeddings()(input_ids)
    image = (input_ids == model.config.image_token_id)[..., None]
    return embeds.masked_scatter(image, projected.to(embeds.dtype))


def positions(mask: Tensor) -> Tensor:
    """Position ids of left-padded prompts: counted from each row's first token, as ``generate`` counts them."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def dialogue_prompts(tokenizer: PreTrainedTokenizerFast, turns: list[list[tuple[str, str]]], image_tokens: int,
                     unknown: float, generator: torch.Generator) -> dict[str, Tensor]:
    """Training sequences, one per canvas: ``<s>``, the image's ``<image> x image_tokens``, then each (question,
    answer) turn as ``question answer : ANSWER </s>`` (left padded), ``labels`` on each answer word and its ``</s>``
    (-100 elsewhere); each question word becomes ``<unk>`` with probability ``unknown`` (words a test phrasing brings
    are new to the model; a question's content words never do: with them gone it has no answer). Every turn reads
    the image as a test prompt does (the first is one exactly), the image encoded once."""
    ids_of = tokenizer.convert_tokens_to_ids
    answer_ids = ids_of(ANSWER.split())
    content = set(ids_of(sorted(content_words())))
    rows, labels = [], []
    for conversation in turns:
        ids = [tokenizer.bos_token_id] + [ids_of(IMAGE_TOKEN)] * image_tokens
        wanted = [-100] * len(ids)
        for question, reply in conversation:
            words = ids_of(question.split())
            dropped = (torch.rand(len(words), generator=generator) < unknown).tolist()
            asked = [tokenizer.unk_token_id if d and w not in content else w for w, d in zip(words, dropped)]
            asked += answer_ids
            said = [ids_of(reply), tokenizer.eos_token_id]
            ids, wanted = ids + asked + said, wanted + [-100] * len(asked) + said
        rows.append(ids)
        labels.append(wanted)
    length = max(map(len, rows))
    pad = [length - len(r) for r in rows]
    return {"input_ids": torch.tensor([[tokenizer.pad_token_id] * p + r for p, r in zip(pad, rows)]),
            "attention_mask": torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pad, rows)]),
            "labels": torch.tensor([[-100] * p + w for p, w in zip(pad, labels)])}


def train_vqa(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, train: VQABatch,
              features: Tensor, config: VLMTrainConfig, on_phase: Callable[[int], None] | None = None) -> list[float]:
    """Stage 2: the projector and the language model learn the answers (the tower frozen), each canvas asked
    ``questions_per_canvas`` questions in one sequence, new ones every epoch, phase by phase of the curriculum
    (``features`` are the tower's 256 tokens). Returns each epoch's last loss; ``on_phase(epoch)`` runs after each
    phase (in eval mode)."""
    model.model.vision_tower.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    vision = model.config.vision_config
    on_digit = patch_targets(train, vision.image_size // vision.patch_size, vision.patch_size)["digit"] < 10
    generator = torch.Generator().manual_seed(config.seed + 1)
    epochs = sum(phase.epochs for phase in config.vqa_curriculum)
    losses: list[float] = []
    for phase in config.vqa_curriculum:
        optimizer = torch.optim.AdamW(parameters, lr=phase.lr, weight_decay=config.vqa_weight_decay)
        steps = phase.epochs * math.ceil(len(train) / config.vqa_batch)
        schedule = warmup_cosine(optimizer, steps, config.warmup * steps)
        for _ in range(phase.epochs):
            epoch = len(losses)
            losses.append(_vqa_epoch(model, tokenizer, train, (features, on_digit), config, phase, epoch, optimizer,
                                     schedule, generator))
            tqdm.write(f"vqa epoch {epoch + 1}/{epochs} ({features.shape[1] // phase.pool ** 2} visual tokens): "
                       f"loss {losses[-1]:.3f}")
        if on_phase is not None:
            on_phase(len(losses) - 1)
    return losses


def _vqa_epoch(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, train: VQABatch,
               patches: tuple[Tensor, Tensor], config: VLMTrainConfig, phase: Phase, epoch: int,
               optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
               generator: torch.Generator) -> float:
    """One pass over the training canvases with new questions (``patches``: the tower's features and which patches
    lie on a digit); leaves the model in eval mode, returns the last step's loss."""
    features, on_digit = patches
    model.train()
    asked = [ask(train, config.seed * 1000 + epoch * config.questions_per_canvas + q)
             for q in range(config.questions_per_canvas)]
    for rows in tqdm(torch.randperm(len(train), generator=generator).split(config.vqa_batch),
                     desc=f"vqa {epoch + 1}", leave=False):
        turns = [[(a.questions[r], a.answers[r]) for a in asked] for r in rows.tolist()]
        visual = pooled_tokens(features[rows].float(), phase.pool)
        prompts = dialogue_prompts(tokenizer, turns, visual.shape[1], phase.unknown_words, generator)
        sequence = (embedded_prompts(model, visual, prompts), prompts["attention_mask"],
                    positions(prompts["attention_mask"]), prompts["labels"])
        if phase.subsets:
            digits = pooled_tokens(on_digit[rows, :, None].float(), phase.pool)[..., 0] > 0
            sequence = without_dropped(sequence[0], prompts, prompts["input_ids"] == model.config.image_token_id,
                                       evidence_subsets(digits, phase.subsets, generator))
        embeds, mask, position_ids, labels = sequence
        loss = _step(model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, labels=labels).loss,
                     optimizer, schedule)
    model.eval()
    return loss


@torch.no_grad()
def answer(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, images: Tensor,
           questions: list[str], chunk: int = 64) -> list[str]:
    """The model's answers with all visual tokens, by ``generate`` (greedy, one word)."""
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    out = []
    for start in range(0, len(questions), chunk):
        prompts = canvas_prompts(tokenizer, questions[start:start + chunk], grid * grid)
        generated = model.generate(pixel_values=images[start:start + chunk].float() / 255, **prompts,
                                   max_new_tokens=1, do_sample=False)
        out += tokenizer.batch_decode(generated[:, prompts["input_ids"].shape[1]:])
    return [a.strip() for a in out]


def accuracy_by_kind(answers: list[str], batch: VQABatch) -> dict[str, float]:
    """Accuracy (%) per question kind, over local and global questions, and over all."""
    right = torch.tensor([a == b for a, b in zip(answers, batch.answers)], dtype=torch.float)
    kinds = torch.tensor([LOCAL_KINDS.__contains__(k) for k in batch.kinds])
    result = {kind: 100 * right[[k == kind for k in batch.kinds]].mean().item() for kind in sorted(set(batch.kinds))}
    return {**result, "local": 100 * right[kinds].mean().item(), "global": 100 * right[~kinds].mean().item(),
            "all": 100 * right.mean().item()}


def as_uint8(batch: VQABatch) -> VQABatch:
    """The batch with its images as uint8 (a quarter of the memory; what the camera would give)."""
    return replace(batch, images=(batch.images * 255).round().to(torch.uint8))


def train_canvas_vlm(model_config: CanvasVLMConfig, config: VLMTrainConfig
                     ) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, dict[str, Any]]:
    """Both stages; returns the model, its tokenizer and what the run measured."""
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    vqa = VQAConfig()
    train = as_uint8(vqa_split("train", config.canvases, seed=config.seed))
    test = as_uint8(vqa_split("test", config.eval_canvases, seed=config.seed))
    tokenizer = canvas_tokenizer(vqa)
    model = build_canvas_vlm(model_config, tokenizer, seed=config.seed)
    vision = model.config.vision_config
    if (vision.hidden_size, vision.num_hidden_layers) == (128, 6):  # the canvas ViT's: start from it
        model.model.vision_tower.load_state_dict(tower_from_canvas_vit(vision).state_dict())
    few = slice(0, config.probe_canvases)  # a progress probe, not a measurement: the full test set is
    tower_history = train_tower(model.model.vision_tower, train, test.rows(few), config, len(vqa.canvas.colors),
                                model.config.vision_feature_layer)
    tower_seconds = time.perf_counter() - start
    features = tower_features(model, train.images)
    start_projector(model, features)
    probes = []

    def probe(epoch: int) -> None:
        probed = test.rows(few)
        probes.append(accuracy_by_kind(answer(model, tokenizer, probed.images, probed.questions), probed))
        shown = ", ".join(f"{kind} {value:.0f}" for kind, value in probes[-1].items())
        tqdm.write(f"  {config.probe_canvases} test canvases: {shown}")

    vqa_losses = train_vqa(model, tokenizer, train, features, config, probe)
    seconds = time.perf_counter() - start
    accuracy = accuracy_by_kind(answer(model, tokenizer, test.images, test.questions), test)
    return model, tokenizer, {"tower": tower_history, "vqa_losses": vqa_losses, "probes": probes,
                              "test_accuracy": accuracy, "tower_seconds": round(tower_seconds, 1),
                              "train_seconds": round(seconds, 1)}


def load_canvas_vlm(directory: str | Path = DEFAULT_DIR) -> tuple[LlavaForConditionalGeneration,
                                                                    PreTrainedTokenizerFast]:
    """The trained canvas VLM (eval mode) and its tokenizer from ``directory``."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no canvas VLM in {directory}; train it with `python -m arrcoc.bench.train_vlm`")
    model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(directory)


# ---- command ------------------------------------------------------------------------------------
QUICK_MODEL = CanvasVLMConfig(vision=CanvasVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        stem_widths=(8, 16, 32)),
                              text_hidden=32, text_layers=4, text_heads=2, text_kv_heads=1, text_mlp=64)
QUICK_TRAIN = VLMTrainConfig(canvases=64, tower_epochs=1,
                             vqa_curriculum=(Phase(4, 1, 1e-3), Phase(1, 1, 1e-3, subsets=0.5)), tower_batch=32,
                             vqa_batch=32, questions_per_canvas=2, eval_canvases=32, probe_canvases=8)


def main(argv: list[str] | None = None) -> Path:
    parser = training_parser(__doc__, "tiny smoke run (seconds), writes to runs/quick/canvas_vlm")
    args = parse_with_config(parser, argv)
    model_config, config = (QUICK_MODEL, QUICK_TRAIN) if args.quick else (CanvasVLMConfig(), VLMTrainConfig())
    config = config.overridden(seed=args.seed, epochs=args.epochs, threads=args.threads)
    torch.set_num_threads(config.threads)
    out = args.out or (REPO_ROOT / "runs" / "quick" / "canvas_vlm" if args.quick else DEFAULT_DIR)
    model, tokenizer, measured = train_canvas_vlm(model_config, config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_json_atomic(out / "training.json", run_metadata(
        command_line("arrcoc.bench.train_vlm", argv), args.quick, train=asdict(config),
        model={k: v for k, v in asdict(model_config).items() if k != "vision"},
        vision=model.config.vision_config.to_dict(), **measured))
    print(f"test accuracy {measured['test_accuracy']}; {measured['train_seconds']:.0f} s; wrote {out}")
    return out


if __name__ == "__main__":
    main()
