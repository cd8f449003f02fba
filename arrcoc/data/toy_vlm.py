"""Random-weight vision-language models of every supported family, and prompts shaped as their processors
shape them (image placeholders expanded, left padding, ``mm_token_type_ids`` for Qwen2-VL). No hub access:
the architectures are real transformers classes built from small configs. Used by the tests and the
prefill benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["IMAGE", "ToyVLMSize", "toy_prompts", "toy_vlm", "TOY_FAMILIES"]

TOY_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
IMAGE = -1  # marks where an image goes in a prompt given as token ids
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 250, 251, 252, 253  # inside the vocabulary


@dataclass(frozen=True)
class ToyVLMSize:
    """Sizes of a toy VLM. ``image_size`` / ``patch_size`` give the LLaVA tile grid; Qwen2-VL images are
    sized per prompt (``image_sizes`` of :func:`toy_prompts`), in multiples of 2 x ``patch_size``."""

    vision_hidden: int = 32
    vision_layers: int = 2
    text_hidden: int = 32
    text_layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mlp_ratio: int = 2
    image_size: int = 32
    patch_size: int = 8
    vocab: int = 256


def toy_vlm(family: str, size: ToyVLMSize = ToyVLMSize(), seed: int = 0, **config: Any) -> nn.Module:
    """A randomly initialised ``*ForConditionalGeneration`` of ``family`` (one of ``TOY_FAMILIES``), in eval mode;
    ``config`` overrides top-level config fields (e.g. ``vision_feature_select_strategy``)."""
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(hidden_size=size.text_hidden, intermediate_size=size.mlp_ratio * size.text_hidden,
                num_hidden_layers=size.text_layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                vocab_size=size.vocab, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if family in ("llava", "llava_next"):
        vision = tf.CLIPVisionConfig(hidden_size=size.vision_hidden, num_hidden_layers=size.vision_layers,
                                     intermediate_size=size.mlp_ratio * size.vision_hidden,
                                     num_attention_heads=size.heads, image_size=size.image_size,
                                     patch_size=size.patch_size)
        common = dict(vision_config=vision, text_config=tf.LlamaConfig(**text), image_token_index=IMAGE_TOKEN)
        if family == "llava":
            grid = size.image_size // size.patch_size
            return tf.LlavaForConditionalGeneration(tf.LlavaConfig(**common, image_seq_length=grid * grid,
                                                                   **config)).eval()
        s = size.image_size
        pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        return tf.LlavaNextForConditionalGeneration(tf.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints,
                                                                       **config)).eval()
    if family in ("qwen2_vl", "qwen2_5_vl"):
        head_dim = size.text_hidden // size.heads
        section = [head_dim // 8, head_dim // 8, head_dim // 2 - 2 * (head_dim // 8)]  # t, h, w halves of rotary
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}
        vision = dict(depth=size.vision_layers, embed_dim=size.vision_hidden, hidden_size=size.text_hidden,
                      num_heads=size.heads, patch_size=size.patch_size, spatial_merge_size=2, temporal_patch_size=2)
        ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                   vision_end_token_id=VISION_END)
        if family == "qwen2_vl":
            return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(vision_config=vision, text_config=text,
                                                                       **ids, **config)).eval()
        vision.update(out_hidden_size=size.text_hidden, intermediate_size=size.mlp_ratio * size.vision_hidden,
                      window_size=4 * size.patch_size, fullatt_block_indexes=[size.vision_layers - 1])
        return tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text,
                                                                         **ids, **config)).eval()
    raise ValueError(f"family must be one of {TOY_FAMILIES}, got {family!r}")


def _left_pad(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    length = max(map(len, rows))
    ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def toy_prompts(model: nn.Module, prompts: Sequence[Sequence[int]],
                image_sizes: Sequence[tuple[int, int]] | None = None, seed: int = 0) -> dict[str, Tensor]:
    """Processor-shaped inputs for ``model``: ``prompts`` are token ids with ``IMAGE`` where an image goes;
    images are random pixels. ``image_sizes`` (one per image, (height, width) in pixels) for LLaVA-NeXT and
    Qwen2-VL; LLaVA images are the tower's size."""
    g = torch.Generator().manual_seed(seed)
    num_images = sum(p.count(IMAGE) for p in prompts)
    name = type(model).__name__
    config = model.config
    if name.startswith("Qwen2"):
        vision = config.vision_config
        patch, merge = vision.patch_size, vision.spatial_merge_size
        sizes = image_sizes or [(4 * patch, 4 * patch)] * num_images
        grid = torch.tensor([[1, h // patch, w // patch] for h, w in sizes])
        counts = (grid.prod(-1) // merge**2).tolist()
        channels = vision.in_channels * vision.temporal_patch_size * patch * patch
        pixels = torch.randn(int(grid.prod(-1).sum()), channels, generator=g)
        image_tokens = [[VISION_START] + [IMAGE_TOKEN] * n + [VISION_END] for n in counts]
        inputs = {"pixel_values": pixels, "image_grid_thw": grid}
    elif name == "LlavaNextForConditionalGeneration":
        tile = config.vision_config.image_size
        sizes = torch.tensor(image_sizes or [(tile, tile)] * num_images)
        pixels = torch.randn(num_images, 5, 3, tile, tile, generator=g)
        with torch.no_grad():  # the processor counts these from the sizes; the model's own count is the same
            features = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, return_dict=True)
        image_tokens = [[IMAGE_TOKEN] * f.shape[0] for f in features.pooler_output]
        inputs = {"pixel_values": pixels, "image_sizes": sizes}
    else:
        vision = config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2 + int(config.vision_feature_select_strategy == "full")
        pixels = torch.randn(num_images, 3, vision.image_size, vision.image_size, generator=g)
        image_tokens = [[IMAGE_TOKEN] * n] * num_images
        inputs = {"pixel_values": pixels}
    rows, images = [], iter(image_tokens)
    for prompt in prompts:
        rows.append([t for token in prompt for t in (next(images) if token == IMAGE else [token])])
    ids, mask = _left_pad(rows)
    inputs = {"input_ids": ids, "attention_mask": mask, **inputs}
    if name.startswith("Qwen2"):
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return inputs
