"""Vision-language models on a subset of their visual tokens.

A LLaVA-style VLM encodes its images into visual tokens in the language model's embedding space and
scatters them, in order, into the image placeholder tokens of the prompt. Running the language model
on K of them means: remove the other placeholders from the prompt, give every remaining token the
position it had in the full prompt (1-D for LLaVA, the multimodal (t, h, w) rotary positions for
Qwen2-VL, whose text positions then continue after the visual block exactly as before), and hand the
kept visual tokens over as precomputed encoder outputs (``mm_encoder_outputs``), which ``forward`` and
``generate`` of these models accept. Nothing in the model is patched, and ``generate`` continues the
positions of the kept tokens by itself (it extends the ``position_ids`` it is given). Keeping every
token reproduces the model exactly.

    adapter = adapt_vlm(model)                         # frozen, eval
    prompt = adapter.encode(processor_outputs)         # images encoded once
    logits = adapter.forward(prompt, keep).logits      # keep: per image, the visual tokens to keep
    ids = adapter.generate(adapter.encode(inputs, "generate"), keep, max_new_tokens=20)

This module takes token indices, never policies: which tokens to keep is decided elsewhere
(``arrcoc.relevance.vlm``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from .adapters import is_transformers_instance

__all__ = [
    "EncodedPrompt",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "Qwen2VLAdapter",
    "ShortPrompt",
    "TokenGrid",
    "VLMAdapter",
    "adapt_vlm",
    "packed_columns",
    "supported_vlm_families",
]

Mode = Literal["forward", "generate"]
IGNORE_INDEX = -100  # transformers' label value for "no loss here"


@dataclass(frozen=True)
class TokenGrid:
    """Visual tokens of one image that tile a grid of its pixels: which tokens, and what they cover.

    index:  (height * width,) positions of the grid's tokens among the image's visual tokens, raster order.
    pixels: (C, height * cell_h, width * cell_w) the pixels the tokens cover, as given to the vision tower.
    Tokens of an image that lie in none of its grids (a CLS token, LLaVA-NeXT's row-end tokens) are
    not scored; they are always kept.
    """

    index: Tensor
    height: int
    width: int
    pixels: Tensor


@dataclass
class EncodedPrompt:
    """A batch of prompts with its images encoded, before any visual token is dropped.

    position_ids are the positions the unmodified model gives the full prompt in ``mode`` (``forward``
    and ``generate`` differ for left-padded prompts), (B, L) or (R, B, L) for multimodal rotary positions.
    features[i] (N_i, D) are the visual tokens of image i in placeholder order; image_row[i] its prompt.
    per_token holds the other (B, L) inputs that are shortened together with the prompt.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    features: list[Tensor]
    image_row: Tensor
    grids: list[list[TokenGrid]]
    per_token: dict[str, Tensor]
    mode: Mode

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_images(self) -> int:
        return len(self.features)

    def num_tokens(self, image: int) -> int:
        return self.features[image].shape[0]

    def images_of(self, row: int) -> list[int]:
        return (self.image_row == row).nonzero().flatten().tolist()

    def rows(self, rows: Sequence[int] | Tensor) -> EncodedPrompt:
        """The prompts ``rows`` (in that order, repeats allowed), each with its own images."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        images = [i for r in rows.tolist() for i in self.images_of(r)]
        new_row = [new for new, r in enumerate(rows.tolist()) for _ in self.images_of(r)]
        return EncodedPrompt(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            position_ids=self.position_ids.index_select(-2, rows),
            features=[self.features[i] for i in images],
            image_row=torch.tensor(new_row, dtype=torch.long, device=rows.device),
            grids=[self.grids[i] for i in images],
            per_token={k: v[rows] for k, v in self.per_token.items()},
            mode=self.mode,
        )


@dataclass
class ShortPrompt:
    """The model inputs of a prompt that holds only the kept visual tokens (left-padded to one length).

    columns (B, L'): the column of the full prompt each token comes from, -1 for added left padding.
    dropped (B,): visual tokens removed from each prompt.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    kept_features: list[Tensor]
    per_token: dict[str, Tensor]
    columns: Tensor
    dropped: Tensor


def packed_columns(kept: Tensor) -> Tensor:
    """(B, L') the columns that ``kept`` (B, L, bool) keeps, in their order and right-aligned (left padding) to the
    longest row's count; -1 where a row is padded."""
    lengths = kept.sum(1)
    target = (lengths.max() - lengths)[:, None] + kept.long().cumsum(1) - 1
    columns = torch.full((kept.shape[0], int(lengths.max())), -1, dtype=torch.long, device=kept.device)
    rows = torch.arange(kept.shape[0], device=kept.device)[:, None].expand_as(kept)
    source = torch.arange(kept.shape[1], device=kept.device).expand_as(kept)
    columns[rows[kept], target[kept]] = source[kept]
    return columns


class VLMAdapter:
    """Family-independent mechanics; subclasses say how images are encoded and positions computed."""

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    image_inputs: ClassVar[tuple[str, ...]]  # processor outputs that carry the images
    token_inputs: ClassVar[tuple[str, ...]] = ()  # other (B, L) processor outputs, shortened with the prompt
    unsupported_inputs: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module):
        self.model = model
        model.requires_grad_(False)  # frozen: no gradient ever reaches the VLM
        model.eval()
        self.core = model.model
        config = model.config
        self.image_token_id = int(config.image_token_id)
        pad = getattr(config.text_config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0

    # ---- geometry --------------------------------------------------------------------------------
    cell: tuple[int, int]  # pixels per visual token (a patch, or a merged 2x2 patch block)

    @property
    def feature_dim(self) -> int:
        """Width of a visual token: the language model's hidden size."""
        return int(self.model.config.text_config.hidden_size)

    # ---- encoding --------------------------------------------------------------------------------
    def encode(self, inputs: Mapping[str, Any], mode: Mode = "forward") -> EncodedPrompt:
        """Validate processor outputs, encode their images (vision tower + projector, once) and record the
        positions the unmodified model would give the full prompt in ``mode``."""
        if mode not in ("forward", "generate"):
            raise ValueError(f"mode must be 'forward' or 'generate', got {mode!r}")
        inputs = dict(inputs)
        self._check_keys(inputs)
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int):
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, length) integer tensor (the processor's output), got {got}")
        input_ids = input_ids.long()
        missing = [k for k in self.image_inputs if inputs.get(k) is None]
        if missing:
            raise ValueError(
                f"no images: {self.family} needs {list(self.image_inputs)} from the processor, missing {missing}; "
                "for text-only prompts call the model itself"
            )
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        elif tuple(mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(mask.shape)}")
        mask = mask.long()
        placeholders = input_ids == self.image_token_id
        per_row = placeholders.sum(1)
        if bool((per_row == 0).any()):
            rows = (per_row == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"prompt(s) {rows} contain no image placeholder (token id {self.image_token_id}); every prompt "
                "needs its image's placeholder: pass the text and the images through the model's processor together"
            )
        if bool((placeholders & (mask == 0)).any()):
            raise ValueError("image placeholder tokens are masked out by attention_mask")
        with torch.no_grad():
            features = [f.detach() for f in self._image_features(inputs)]
        image_row = self._image_rows(per_row, [f.shape[0] for f in features])
        per_token = {}
        for key in self.token_inputs:
            value = inputs.get(key)
            if value is not None:
                if tuple(value.shape) != tuple(input_ids.shape):
                    raise ValueError(f"{key} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                     f"got {tuple(value.shape)}")
                per_token[key] = value
        positions = inputs.get("position_ids")
        if positions is None:
            with torch.no_grad():
                positions = self._positions(inputs, input_ids, mask, mode)
        elif positions.shape[-2:] != input_ids.shape:
            raise ValueError(f"position_ids must end in the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(positions.shape)}")
        grids = self._grids(inputs, features)
        return EncodedPrompt(input_ids, mask, positions, features, image_row, grids, per_token, mode)

    def _check_keys(self, inputs: Mapping[str, Any]) -> None:
        for key, why in self.unsupported_inputs.items():
            if inputs.get(key) is not None:
                raise ValueError(f"{key} is not supported for {self.family}: {why}")
        known = {"input_ids", "attention_mask", "position_ids", *self.image_inputs, *self.token_inputs}
        unknown = sorted(set(inputs) - known)
        if unknown:
            raise ValueError(f"unexpected model input(s) {unknown} for {self.family}; accepted: {sorted(known)}")

    @staticmethod
    def _image_rows(placeholders_per_row: Tensor, tokens_per_image: list[int]) -> Tensor:
        """The prompt of each image: placeholders are filled image after image, prompt after prompt."""
        row_ends = placeholders_per_row.cumsum(0).tolist()
        image_ends = torch.tensor(tokens_per_image).cumsum(0).tolist()
        if row_ends[-1] != image_ends[-1]:
            raise ValueError(
                f"the prompts hold {row_ends[-1]} image placeholder tokens but the images give {image_ends[-1]} "
                f"visual tokens ({tokens_per_image} per image): each image needs exactly its number of placeholders"
            )
        if not set(row_ends) <= set(image_ends):
            raise ValueError(
                f"image placeholders per prompt {placeholders_per_row.tolist()} do not split into whole images of "
                f"{tokens_per_image} visual tokens"
            )
        starts = [0, *image_ends[:-1]]
        return torch.bucketize(torch.tensor(starts), torch.tensor(row_ends), right=True).to(placeholders_per_row.device)

    def text_embedding(self, prompt: EncodedPrompt) -> Tensor:
        """(B, D) the language model's input embeddings of each prompt's text tokens (not padding, not image
        placeholders), averaged."""
        return self.pooled_text(prompt.input_ids, prompt.attention_mask)

    def pooled_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """:meth:`text_embedding` of the prompts' ``input_ids`` and ``attention_mask``: tensor operations only, so
        that a compiled scoring pools its query inside its own graph."""
        text = (attention_mask == 1) & (input_ids != self.image_token_id)
        with torch.no_grad():
            embedded = self.model.get_input_embeddings()(input_ids).float()
        weights = text.float()
        return torch.einsum("bl,bld->bd", weights, embedded) / weights.sum(1, keepdim=True).clamp_min(1)

    # ---- shortening ------------------------------------------------------------------------------
    def check_keep(self, prompt: EncodedPrompt, keep: Sequence[Tensor]) -> list[Tensor]:
        """Validate per-image kept token indices; return them sorted, as long tensors."""
        if len(keep) != prompt.num_images:
            raise ValueError(f"keep must give one index tensor per image: {prompt.num_images} images, got {len(keep)}")
        checked = []
        for i, index in enumerate(keep):
            n = prompt.num_tokens(i)
            if not isinstance(index, Tensor) or index.ndim != 1 or index.dtype not in (torch.long, torch.int):
                got = f"{tuple(index.shape)} {index.dtype}" if isinstance(index, Tensor) else type(index).__name__
                raise ValueError(f"keep[{i}] must be a 1-D integer tensor of visual-token positions, got {got}")
            if index.numel() > n:  # keeping none of an image's tokens is allowed (a perturbation may drop it)
                raise ValueError(f"image {i} has {n} visual tokens: keep at most {n}, got {index.numel()}")
            index = index.long().sort().values
            if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= n):
                raise ValueError(f"keep[{i}] must hold positions in [0, {n}), got min {int(index[0])}, "
                                 f"max {int(index[-1])}")
            if bool((index[1:] == index[:-1]).any()):
                raise ValueError(f"keep[{i}] holds repeated positions")
            checked.append(index.to(prompt.input_ids.device))
        return checked

    def shorten(self, prompt: EncodedPrompt, keep: Sequence[Tensor] | None = None) -> ShortPrompt:
        """Remove the visual tokens not in ``keep`` (per image, positions among its visual tokens; None: keep
        all). Every remaining token keeps its position; prompts of different length are left-padded."""
        if keep is None:
            keep = [torch.arange(prompt.num_tokens(i)) for i in range(prompt.num_images)]
        keep = self.check_keep(prompt, keep)
        device = prompt.input_ids.device
        placeholders = prompt.input_ids == self.image_token_id
        kept_visual = torch.cat([
            torch.zeros(prompt.num_tokens(i), dtype=torch.bool, device=device).index_fill_(0, index, True)
            for i, index in enumerate(keep)
        ])
        kept = ~placeholders
        kept[placeholders] = kept_visual  # placeholders are filled in row-major order, image after image
        columns = packed_columns(kept)
        padding = columns < 0
        safe = columns.clamp_min(0)

        def take(values: Tensor, fill: int) -> Tensor:
            index = safe.expand(*values.shape[:-2], -1, -1)
            return values.gather(-1, index).masked_fill(padding.expand_as(index), fill)

        fills = {"labels": IGNORE_INDEX}
        return ShortPrompt(
            input_ids=take(prompt.input_ids, self.pad_token_id),
            attention_mask=take(prompt.attention_mask, 0),
            position_ids=self._short_positions(take(prompt.position_ids, 0), take(prompt.attention_mask, 0), prompt),
            kept_features=[f[index] for f, index in zip(prompt.features, keep)],
            per_token={k: take(v, fills.get(k, 0)) for k, v in prompt.per_token.items()},
            columns=columns,
            dropped=(placeholders & ~kept).sum(1),
        )

    def _short_positions(self, positions: Tensor, mask: Tensor, prompt: EncodedPrompt) -> Tensor:
        return positions

    # ---- running ---------------------------------------------------------------------------------
    def model_inputs(self, short: ShortPrompt) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {
            "input_ids": short.input_ids,
            # always explicit: with no mask, transformers reads gaps in position_ids as packed sequences
            "attention_mask": short.attention_mask,
            "position_ids": short.position_ids,
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(short.kept_features))},
            **{k: v for k, v in short.per_token.items() if k != "labels"},
        }

    def forward(self, prompt: EncodedPrompt, keep: Sequence[Tensor] | None = None, **kwargs: Any) -> Any:
        """The model's output (``.logits`` (B, L', V)) on the shortened prompt; ``kwargs`` go to the model."""
        if prompt.mode != "forward":
            raise ValueError("this prompt was encoded for generate(); encode it with mode='forward'")
        short = self.shorten(prompt, keep)
        with torch.no_grad():
            return self.model(**self.model_inputs(short), **kwargs)

    def generate(self, prompt: EncodedPrompt, keep: Sequence[Tensor] | None = None, **generate_kwargs: Any) -> Any:
        """``model.generate`` on the shortened prompt. Returns what ``generate`` returns, with the full
        prompt's ``input_ids`` in front of the new tokens, as the unmodified model would."""
        if prompt.mode != "generate":
            raise ValueError("this prompt was encoded for forward(); encode it with mode='generate'")
        short = self.shorten(prompt, keep)
        self._before_generate(prompt, short)
        output = self.model.generate(**self.model_inputs(short), **generate_kwargs)
        return _restore_prompt(output, prompt.input_ids, short.input_ids.shape[1])

    def _before_generate(self, prompt: EncodedPrompt, short: ShortPrompt) -> None:
        pass

    # ---- family hooks ----------------------------------------------------------------------------
    def _image_features(self, inputs: Mapping[str, Any]) -> list[Tensor]:
        raise NotImplementedError

    def _positions(self, inputs: Mapping[str, Any], input_ids: Tensor, mask: Tensor, mode: Mode) -> Tensor:
        if mode == "forward":  # the language model's default: 0 .. L-1 whatever the padding
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        # what generate() itself computes for a prompt (from the attention mask)
        return self.model._prepare_position_ids_for_generation(input_ids, {"attention_mask": mask})

    def _grids(self, inputs: Mapping[str, Any], features: list[Tensor]) -> list[list[TokenGrid]]:
        raise NotImplementedError


def _restore_prompt(output: Any, input_ids: Tensor, short_length: int) -> Any:
    def restore(sequences: Tensor) -> Tensor:
        full = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        return torch.cat([full, sequences[:, short_length:]], dim=1)

    if isinstance(output, Tensor):
        return restore(output)
    output.sequences = restore(output.sequences)
    return output


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, Sequence) else (int(value), int(value))


# ---- LLaVA ---------------------------------------------------------------------------------------
class LlavaAdapter(VLMAdapter):
    """transformers ``LlavaForConditionalGeneration`` (one fixed-size image per placeholder block)."""

    family = "transformers LlavaForConditionalGeneration"
    model_classes = ("LlavaForConditionalGeneration",)
    image_inputs = ("pixel_values",)
    unsupported_inputs = {"image_sizes": "variable-size (Pixtral-style) LLaVA towers are not supported"}

    def __init__(self, model: nn.Module):
        super().__init__(model)
        vision = model.config.vision_config
        self.cell = _pair(vision.patch_size)
        self.image_size = _pair(vision.image_size)

    def _image_features(self, inputs: Mapping[str, Any]) -> list[Tensor]:
        pixels = inputs["pixel_values"]
        if pixels.ndim != 4 or tuple(pixels.shape[-2:]) != self.image_size:
            raise ValueError(f"pixel_values must be (images, channels, {self.image_size[0]}, {self.image_size[1]}), "
                             f"got {tuple(pixels.shape)}")
        return list(self.core.get_image_features(pixel_values=pixels, return_dict=True).pooler_output)

    def _grids(self, inputs: Mapping[str, Any], features: list[Tensor]) -> list[list[TokenGrid]]:
        height, width = (s // c for s, c in zip(self.image_size, self.cell))
        grids = []
        for pixels, image in zip(inputs["pixel_values"], features):
            # "default" drops the tower's CLS token; with "full" it is the first visual token (kept, not scored)
            first = image.shape[0] - height * width
            index = torch.arange(first, first + height * width, device=image.device)
            grids.append([TokenGrid(index, height, width, pixels)])
        return grids


# ---- LLaVA-NeXT ----------------------------------------------------------------------------------
class LlavaNextAdapter(VLMAdapter):
    """transformers ``LlavaNextForConditionalGeneration`` (any-resolution: a base view and high-resolution
    tiles, unpadded, with a row-end token after every row of the high-resolution grid)."""

    family = "transformers LlavaNextForConditionalGeneration"
    model_classes = ("LlavaNextForConditionalGeneration",)
    image_inputs = ("pixel_values", "image_sizes")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        vision = model.config.vision_config
        self.cell = _pair(vision.patch_size)
        self.tile = _pair(vision.image_size)

    def _image_features(self, inputs: Mapping[str, Any]) -> list[Tensor]:
        pixels, sizes = inputs["pixel_values"], inputs["image_sizes"]
        if pixels.ndim != 5 or tuple(pixels.shape[-2:]) != self.tile:
            raise ValueError(f"pixel_values must be (images, tiles, channels, {self.tile[0]}, {self.tile[1]}), "
                             f"got {tuple(pixels.shape)}")
        if len(sizes) != pixels.shape[0]:
            raise ValueError(f"image_sizes must give one (height, width) per image: {pixels.shape[0]} images, "
                             f"got {len(sizes)}")
        return list(self.core.get_image_features(pixel_values=pixels, image_sizes=sizes, return_dict=True)
                    .pooler_output)

    def _grids(self, inputs: Mapping[str, Any], features: list[Tensor]) -> list[list[TokenGrid]]:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        config = self.model.config
        height, width = (s // c for s, c in zip(self.tile, self.cell))
        first = int(config.vision_feature_select_strategy == "full")  # the base view's CLS: kept, not scored
        grids = []
        for tiles, size, image in zip(inputs["pixel_values"], inputs["image_sizes"], features):
            device = image.device
            base = TokenGrid(torch.arange(first, first + height * width, device=device), height, width, tiles[0])
            tiles_h, tiles_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, self.tile[0])
            if image.shape[0] == first + height * width + 1:  # no tiles: base view + one row-end token
                grids.append([base])
                continue
            # which cells of the stitched tile grid survive the model's unpadding: unpad a grid of cell ids
            cells = torch.arange(tiles_h * height * tiles_w * width, dtype=torch.float32)
            cells = rearrange(cells, "(h w) -> 1 h w", h=tiles_h * height)
            kept_cells = unpad_image(cells, size)[0].long()
            rows, cols = kept_cells.shape
            # the model's order after the base view: each row of the unpadded grid, then a row-end token
            index = rearrange(torch.arange(rows * (cols + 1), device=device), "(r c) -> r c", r=rows)[:, :cols]
            index = index.flatten() + first + height * width
            top, left = int(kept_cells[0, 0]) // (tiles_w * width), int(kept_cells[0, 0]) % (tiles_w * width)
            stitched = rearrange(tiles[1:1 + tiles_h * tiles_w], "(th tw) c h w -> c (th h) (tw w)", th=tiles_h)
            ch, cw = self.cell
            pixels = stitched[:, top * ch:(top + rows) * ch, left * cw:(left + cols) * cw]
            grids.append([base, TokenGrid(index, rows, cols, pixels)])
        return grids


# ---- Qwen2-VL / Qwen2.5-VL -----------------------------------------------------------------------
class Qwen2VLAdapter(VLMAdapter):
    """transformers ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``: visual
    tokens are merged 2x2 patch blocks with multimodal rotary (t, h, w) positions; text after an image
    continues from the image's largest position. Kept tokens keep their (t, h, w) positions and every text
    position stays what it was (the visual block's extent is not shrunk)."""

    family = "transformers Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    image_inputs = ("pixel_values", "image_grid_thw")
    token_inputs = ("mm_token_type_ids",)
    unsupported_inputs = {
        "pixel_values_videos": "video tokens are not allocated (images only)",
        "video_grid_thw": "video tokens are not allocated (images only)",
    }

    def __init__(self, model: nn.Module):
        super().__init__(model)
        vision = model.config.vision_config
        self.patch = int(vision.patch_size)
        self.merge = int(vision.spatial_merge_size)
        self.temporal_patch = int(vision.temporal_patch_size)
        self.channels = int(vision.in_channels)
        self.cell = (self.patch * self.merge, self.patch * self.merge)

    def encode(self, inputs: Mapping[str, Any], mode: Mode = "forward") -> EncodedPrompt:
        if inputs.get("input_ids") is not None and inputs.get("mm_token_type_ids") is None:
            raise ValueError("mm_token_type_ids is missing: Qwen2-VL needs it (returned by its processor) to compute "
                             "the multimodal rotary positions")
        return super().encode(inputs, mode)

    def _image_features(self, inputs: Mapping[str, Any]) -> list[Tensor]:
        grid = inputs["image_grid_thw"]
        if grid.ndim != 2 or grid.shape[-1] != 3:
            raise ValueError(f"image_grid_thw must be (images, 3), got {tuple(grid.shape)}")
        if bool((grid[:, 0] != 1).any()):
            raise ValueError(f"images must have one temporal patch (t = 1), got image_grid_thw {grid.tolist()}")
        patches = int(grid.prod(-1).sum())
        if inputs["pixel_values"].shape[0] != patches:
            raise ValueError(f"pixel_values holds {inputs['pixel_values'].shape[0]} patches but image_grid_thw "
                             f"describes {patches}")
        return list(self.core.get_image_features(inputs["pixel_values"], grid, return_dict=True).pooler_output)

    def _positions(self, inputs: Mapping[str, Any], input_ids: Tensor, mask: Tensor, mode: Mode) -> Tensor:
        kwargs = {"attention_mask": mask, "mm_token_type_ids": inputs["mm_token_type_ids"],
                  "image_grid_thw": inputs["image_grid_thw"]}
        if mode == "forward":  # (3, B, L) as the model's forward computes them
            return self.core.get_rope_index(input_ids, **kwargs)[0]
        # (4, B, L): text positions (for the attention mask) on top of the (t, h, w) ones, as generate() builds them
        return self.model._prepare_position_ids_for_generation(input_ids, {"input_ids": input_ids, **kwargs})

    def _short_positions(self, positions: Tensor, mask: Tensor, prompt: EncodedPrompt) -> Tensor:
        if positions.shape[0] == 4:
            # row 0 only builds the attention mask: it must count the tokens that are there (gaps would read
            # as packed sequences); rows 1-3, the rotary positions, keep their original values
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            positions = torch.cat([text[None], positions[1:]], dim=0)
        return positions

    def _before_generate(self, prompt: EncodedPrompt, short: ShortPrompt) -> None:
        # the model caches "rotary position - sequence index" to continue positions; generate() reads it only
        # when it computes positions itself, but keep it right for the shortened prompt
        last = prompt.position_ids[1:].amax(dim=(0, 2))
        self.core.rope_deltas = (last + 1 - short.attention_mask.sum(1))[:, None]

    def _grids(self, inputs: Mapping[str, Any], features: list[Tensor]) -> list[list[TokenGrid]]:
        grids, start = [], 0
        for (_, h, w), image in zip(inputs["image_grid_thw"].tolist(), features):
            rows = inputs["pixel_values"][start:start + h * w]
            start += h * w
            # invert the processor's patch layout: (blocks of merge x merge patches, raster) x (c, t, p, p)
            pixels = rearrange(rows, "(hb wb mh mw) (c t ph pw) -> t c (hb mh ph) (wb mw pw)",
                               hb=h // self.merge, wb=w // self.merge, mh=self.merge, mw=self.merge,
                               c=self.channels, t=self.temporal_patch, ph=self.patch)[0]
            hm, wm = h // self.merge, w // self.merge
            grids.append([TokenGrid(torch.arange(hm * wm, device=image.device), hm, wm, pixels)])
        return grids


# ---- registry ------------------------------------------------------------------------------------
_ADAPTERS: tuple[type[VLMAdapter], ...] = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter)


def supported_vlm_families() -> list[str]:
    return [adapter.family for adapter in _ADAPTERS]


def adapt_vlm(model: nn.Module) -> VLMAdapter:
    """The adapter of ``model``'s family; the model is frozen (no grad, eval)."""
    for adapter in _ADAPTERS:
        if is_transformers_instance(model, adapter.model_classes):
            return adapter(model)
    raise TypeError(
        f"unsupported vision-language model {type(model).__module__}.{type(model).__name__}; supported: "
        + "; ".join(supported_vlm_families())
    )
