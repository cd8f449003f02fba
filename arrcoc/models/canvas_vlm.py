"""The canvas VLM: a transformers ``LlavaForConditionalGeneration`` small enough to train on a CPU (issue 38).

Its vision tower is the canvas ViT's architecture (a timm ``VisionTransformer`` with a convolutional stem) at 128 px
in 8-px patches, 256 visual tokens, wrapped as a transformers model of its own (``canvas_vision``, registered with
``AutoConfig`` / ``AutoModel`` here: no remote code), so that ``LlavaForConditionalGeneration`` builds it from its
config like a CLIP tower and ``attach_vlm`` and every pruning baseline run on the real class. The language model is a
small Llama over a closed word-level vocabulary (:func:`canvas_tokenizer`: the VQA questions' and answers' words).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from arrcoc.data.vqa import VQAConfig, vqa_words

from .canvas_vit import CanvasViTConfig, build_canvas_vit

__all__ = ["CanvasVisionConfig", "CanvasVisionModel", "CanvasVLMConfig", "IMAGE_TOKEN", "build_canvas_vlm",
           "canvas_prompts", "canvas_tokenizer"]

PAD, BOS, EOS, UNK, IMAGE_TOKEN = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL = (PAD, BOS, EOS, UNK, IMAGE_TOKEN)
ANSWER = "answer :"  # the prompt ends with it; the answer is the next word


class CanvasVisionConfig(PretrainedConfig):
    """The canvas ViT's architecture as a transformers config (``model_type = "canvas_vision"``)."""

    model_type = "canvas_vision"

    def __init__(self, image_size: int = 128, patch_size: int = 8, hidden_size: int = 128, num_hidden_layers: int = 6,
                 num_attention_heads: int = 4, mlp_ratio: float = 4.0, stem_widths: tuple[int, ...] = (32, 64, 128),
                 stem_refine_from: int = 1, **kwargs):
        self.image_size, self.patch_size, self.hidden_size = image_size, patch_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.stem_widths, self.stem_refine_from = list(stem_widths), stem_refine_from
        super().__init__(**kwargs)

    def vit_config(self) -> CanvasViTConfig:
        return CanvasViTConfig(img_size=self.image_size, patch_size=self.patch_size, embed_dim=self.hidden_size,
                               depth=self.num_hidden_layers, num_heads=self.num_attention_heads,
                               mlp_ratio=self.mlp_ratio, num_classes=0, stem_widths=tuple(self.stem_widths),
                               stem_refine_from=self.stem_refine_from)


class CanvasVisionModel(PreTrainedModel):
    """The tower: ``hidden_states`` are the embedded tokens (CLS first) and every block's output, as a CLIP tower's
    are, so LLaVA's ``vision_feature_layer`` and ``vision_feature_select_strategy`` work as they do there."""

    config_class = CanvasVisionConfig
    base_model_prefix = "canvas_vision"
    main_input_name = "pixel_values"

    def __init__(self, config: CanvasVisionConfig):
        super().__init__(config)
        self.vit = build_canvas_vit(config.vit_config())
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # timm initialised the tower when it was built

    def forward(self, pixel_values: Tensor, output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutputWithPooling:
        vit = self.vit
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(pixel_values.to(vit.cls_token.dtype))))
        hidden = [x]
        for block in vit.blocks:
            x = block(x)
            hidden.append(x)
        last = vit.norm(x)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=last[:, 0], hidden_states=tuple(hidden))


AutoConfig.register(CanvasVisionConfig.model_type, CanvasVisionConfig, exist_ok=True)
AutoModel.register(CanvasVisionConfig, CanvasVisionModel, exist_ok=True)


@dataclass(frozen=True)
class CanvasVLMConfig:
    """The canvas VLM's sizes (the tower's are :class:`CanvasVisionConfig`'s).

    Args:
        vision: the tower.
        text_hidden: the language model's width.
        text_layers: its decoder layers.
        text_heads: attention heads (and key-value heads: ``text_kv_heads``).
        text_mlp: its MLP's width.
        rope_theta: the base of its rotary position embedding.
    """

    vision: CanvasVisionConfig | None = None
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_mlp: int = 512
    rope_theta: float = 10_000.0


def canvas_tokenizer(config: VQAConfig | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the VQA words (:func:`~arrcoc.data.vqa.vqa_words`) and ``answer :``, splitting on
    spaces; ``<image>`` is the image placeholder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [*SPECIAL, *sorted(set(vqa_words(config or VQAConfig())) | set(ANSWER.split()))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   padding_side="left")


def build_canvas_vlm(config: CanvasVLMConfig = CanvasVLMConfig(), tokenizer: PreTrainedTokenizerFast | None = None,
                     seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised canvas VLM (eval mode) whose vocabulary is ``tokenizer``'s."""
    tokenizer = tokenizer or canvas_tokenizer()
    vision = config.vision or CanvasVisionConfig()
    text = LlamaConfig(hidden_size=config.text_hidden, intermediate_size=config.text_mlp,
                       num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                       num_key_value_heads=config.text_kv_heads, vocab_size=len(tokenizer),
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=True, initializer_range=config.text_hidden ** -0.5,
                       rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})
    grid = vision.image_size // vision.patch_size
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(
        IMAGE_TOKEN), image_seq_length=grid * grid, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(llava).eval()


def canvas_prompts(tokenizer: PreTrainedTokenizerFast, questions: list[str], image_tokens: int) -> dict[str, Tensor]:
    """Processor-shaped inputs: ``<s> <image> x image_tokens question answer :`` per question (LLaVA's order, left
    padded); the answer is the next word (training sequences: ``train_vlm.dialogue_prompts``)."""
    texts = [" ".join([BOS, *[IMAGE_TOKEN] * image_tokens, question, ANSWER]) for question in questions]
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
