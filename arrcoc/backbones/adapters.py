"""Backbone adapters: one small adapter per ViT family, same interface for all.

An adapter splits a frozen, pretrained ViT into ``embed`` -> blocks -> ``head`` so that the blocks can
run on any :class:`~arrcoc.backbones.tokens.TokenSet` (a subset or merge of the patch tokens). Blocks
are always the library's own modules called through their own ``forward``; the only thing passed in
is the library's additive attention mask, which carries ToMe's ``log(size)`` proportional-attention
bias. Keeping every token therefore reproduces the unwrapped model exactly.

    adapter = adapt_backbone(model)
    state = adapter.tokens(images)                 # TokenSet: prefix + patch tokens, positions added
    state = keep_top_k(state, scores, 0.25)        # any selection / fusion / merge
    out = adapter.head(adapter.run_blocks(state))  # logits / pooled embedding
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from .tokens import TokenSet

__all__ = [
    "AttentionStats",
    "BackboneAdapter",
    "HFViTAdapter",
    "PatchGrid",
    "TimmViTAdapter",
    "adapt_backbone",
    "register_adapter",
    "supported_families",
]


@dataclass(frozen=True)
class PatchGrid:
    """Patch-grid geometry of one input size: ``height`` x ``width`` patches of ``patch_size`` pixels."""

    height: int
    width: int
    patch_size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.height * self.width


@dataclass
class AttentionStats:
    """Queries, keys and values (B, H, N, d) one block computed, and the key bias it used."""

    query: Tensor
    key: Tensor
    value: Tensor
    bias: Tensor | None

    def cls_attention(self) -> Tensor:
        """(B, N) attention of the first (CLS) token's query over all keys, averaged over heads."""
        logits = (self.query[:, :, :1] @ self.key.transpose(-2, -1)).float() * self.query.shape[-1] ** -0.5
        if self.bias is not None:
            logits = logits + self.bias.float()
        return logits.softmax(dim=-1).mean(dim=1)[:, 0]

    def key_metric(self) -> Tensor:
        """(B, N, d) keys averaged over heads: ToMe's similarity features."""
        return self.key.mean(dim=1)

    def value_norm(self) -> Tensor:
        """(B, N) norm of each token's value vector over all heads (ATS significance)."""
        return self.value.float().transpose(1, 2).flatten(2).norm(dim=-1)


EMBED_CHUNK = 32  # images per call of the backbone's embedding


class BackboneAdapter(nn.Module):
    """Family-independent interface; subclasses fill in embedding, block call, head and q/k/v taps."""

    family: ClassVar[str]
    _dynamic_hint: ClassVar[str] = ""  # how to run image sizes other than the model's

    def __init__(self, model: nn.Module, trainable: bool = False):
        super().__init__()
        self.model = model
        self.trainable = trainable
        if not trainable:
            model.requires_grad_(False)
        self.train(trainable)

    def train(self, mode: bool = True) -> BackboneAdapter:
        # a frozen backbone stays in eval mode (no dropout / drop-path) whatever the caller's mode
        super().train(mode)
        self.model.train(mode and self.trainable)
        return self

    # ---- geometry -------------------------------------------------------------------------------
    patch_size: tuple[int, int]
    image_size: tuple[int, int]
    num_prefix_tokens: int
    in_chans: int
    dynamic_size: bool
    blocks: nn.ModuleList

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def grid(self, images: Tensor | tuple[int, int] | None = None) -> PatchGrid:
        """Patch grid of ``images`` (validated) or of an (H, W) size; the model's own size by default."""
        if images is None:
            height, width = self.image_size
        elif isinstance(images, Tensor):
            self.check_images(images)
            height, width = images.shape[-2:]
        else:
            height, width = images
        return PatchGrid(height // self.patch_size[0], width // self.patch_size[1], self.patch_size)

    def check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a 4-D tensor (batch, channels, height, width), got {got}")
        channels, height, width = images.shape[1:]
        if channels != self.in_chans:
            raise ValueError(f"images must have {self.in_chans} channels, got {channels}")
        weights = next(self.model.parameters()).dtype
        # under autocast the model casts its inputs itself; otherwise they must be in the weights' dtype
        if not images.is_floating_point() or (
            images.dtype != weights and not torch.is_autocast_enabled(images.device.type)
        ):
            raise TypeError(
                f"images must be floating point in the model's dtype {weights} (or run under torch.autocast), "
                f"got {images.dtype}"
            )
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {ph}x{pw}")
        if not self.dynamic_size and (height, width) != tuple(self.image_size):
            raise ValueError(
                f"image size {height}x{width} differs from the model's "
                f"{self.image_size[0]}x{self.image_size[1]}; {self._dynamic_hint}"
            )

    # ---- running --------------------------------------------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        """(B, P + N, D) prefix + patch tokens with positional embeddings (and any pre-block norm)."""
        return self.pre_norm(self.embed_before_norm(images))

    def embed_before_norm(self, images: Tensor) -> Tensor:
        """``embed`` without ``pre_norm``: where tokens can still be pooled linearly.

        Runs :data:`EMBED_CHUNK` images at a time (unless the backbone is training, where batch statistics would
        see each chunk alone): a stem's intermediate activations then exist for one chunk at a time, and a
        convolutional stem runs faster on CPU (docs/decisions.md).
        """
        self.check_images(images)
        if self.model.training or len(images) <= EMBED_CHUNK:
            return self._embed(images)
        return torch.cat([self._embed(chunk) for chunk in images.split(EMBED_CHUNK)])

    def patch_content(self, images: Tensor) -> Tensor:
        """(B, N, D) patch projections of ``images`` of any divisible size, before positions are added."""
        if images.ndim != 4 or images.shape[-2] % self.patch_size[0] or images.shape[-1] % self.patch_size[1]:
            raise ValueError(f"images must be 4-D with sides divisible by {self.patch_size}, got {tuple(images.shape)}")
        return self._patch_content(images)

    def patch_positions(self, height: int, width: int) -> Tensor:
        """(1, height * width, D) positional embeddings of a height x width patch grid (interpolated as the
        library interpolates them)."""
        return self._patch_positions(height, width)

    def tokens(self, images: Tensor) -> TokenSet:
        return TokenSet.from_embedded(self.embed(images), self.num_prefix_tokens)

    def run_blocks(self, state: TokenSet, start: int = 0, end: int | None = None) -> TokenSet:
        """Run blocks ``start`` .. ``end - 1`` (all remaining by default) on the tokens of ``state``."""
        bias = state.attention_bias()
        x = state.tokens
        for block in self.blocks[start:end]:
            x = self._block(block, x, bias)
        return TokenSet(x, state.num_prefix, state.patch_index, state.size)

    def run_block(
        self, index: int, state: TokenSet, capture: bool = False
    ) -> tuple[TokenSet, AttentionStats | None]:
        """Run one block; with ``capture`` also return the q/k/v it computed (read by hooks, no recompute)."""
        if not capture:
            return self.run_blocks(state, index, index + 1), None
        # the taps are forward hooks: a compiled block would run its cached graph without them
        with self._capture(self.blocks[index]) as taps, torch.compiler.set_stance("force_eager"):
            out = self.run_blocks(state, index, index + 1)
        return out, AttentionStats(taps["q"], taps["k"], taps["v"], state.attention_bias())

    def features(self, state: TokenSet) -> Tensor:
        """The model's final token sequence (``last_hidden_state`` / ``forward_features``) for ``state``."""
        return self._features(state.tokens)

    def head(self, state: TokenSet) -> Tensor:
        """The model's output per image (logits, or the pooled embedding of a headless model)."""
        return self._head(state.tokens, state.size)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.run_blocks(self.tokens(images)))

    # ---- family hooks ---------------------------------------------------------------------------
    def _embed(self, images: Tensor) -> Tensor:
        """Prefix + patch tokens with positions, before ``pre_norm``."""
        raise NotImplementedError

    def pre_norm(self, x: Tensor) -> Tensor:
        """The per-token norm some families apply between the embedding and block 0 (else identity)."""
        return x

    def _patch_content(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _patch_positions(self, height: int, width: int) -> Tensor:
        raise NotImplementedError

    def _block(self, block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _head(self, x: Tensor, size: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _qkv_taps(self, block: nn.Module) -> dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]]:
        """Modules whose outputs are q, k, v, and how to reshape each output to (B, H, N, d)."""
        raise NotImplementedError

    @contextmanager
    def _capture(self, block: nn.Module) -> Iterator[dict[str, Tensor]]:
        taps: dict[str, Tensor] = {}
        handles = []
        for name, (module, to_heads) in self._qkv_taps(block).items():
            def hook(_m: nn.Module, _i: Any, out: Tensor, name: str = name, to_heads=to_heads) -> None:
                taps[name] = to_heads(out)
            handles.append(module.register_forward_hook(hook))
        try:
            yield taps
        finally:
            for handle in handles:
                handle.remove()


def _split_heads(num_heads: int) -> Callable[[Tensor], Tensor]:
    return lambda t: t.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _weighted_mean(x: Tensor, size: Tensor | None) -> Tensor:
    if size is None:
        return x.mean(dim=1)
    weights = size / size.sum(dim=1, keepdim=True)
    return torch.einsum("bn,bnd->bd", weights.to(x.dtype), x)


# ---- timm ---------------------------------------------------------------------------------------
class TimmViTAdapter(BackboneAdapter):
    """timm ``VisionTransformer`` and subclasses (DeiT incl. distilled, DeiT-III / LayerScale, registers,
    ``dynamic_img_size``, fused SDPA or eager attention, q/k norm)."""

    family = "timm VisionTransformer (ViT, DeiT, DeiT-distilled, DeiT-III, registers)"
    _dynamic_hint = "build the timm model with dynamic_img_size=True to run other sizes"

    def __init__(self, model: nn.Module, trainable: bool = False):
        super().__init__(model, trainable)
        embed = model.patch_embed
        self.patch_size = tuple(embed.patch_size)
        self.image_size = tuple(embed.img_size)
        self.num_prefix_tokens = model.num_prefix_tokens
        self.in_chans = embed.proj.in_channels
        self.dynamic_size = bool(getattr(model, "dynamic_img_size", False))
        self.blocks = model.blocks
        if model.global_pool in ("avg", "avgmax", "max") and model.pool_include_prefix:
            raise ValueError("timm pooling that includes prefix tokens is not supported")

    def _embed(self, images: Tensor) -> Tensor:
        m = self.model
        return m.patch_drop(m._pos_embed(m.patch_embed(images)))

    def pre_norm(self, x: Tensor) -> Tensor:
        return self.model.norm_pre(x)

    def _patch_content(self, images: Tensor) -> Tensor:
        # PatchEmbed.forward without its fixed-size check: the 2x view of tiers is larger than the model's size
        embed = self.model.patch_embed
        return embed.norm(embed.proj(images).flatten(2).transpose(1, 2))

    def _patch_positions(self, height: int, width: int) -> Tensor:
        m = self.model
        if m.pos_embed is None:
            return m.pos_embed.new_zeros(1, height * width, m.embed_dim)
        patch_pos = m.pos_embed if m.no_embed_class else m.pos_embed[:, self.num_prefix_tokens :]
        return resample_abs_pos_embed(
            patch_pos, new_size=(height, width), old_size=m.patch_embed.grid_size, num_prefix_tokens=0
        )

    def _block(self, block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        return block(x) if bias is None else block(x, attn_mask=bias)

    def _features(self, x: Tensor) -> Tensor:
        return self.model.norm(x)

    def _head(self, x: Tensor, size: Tensor | None) -> Tensor:
        m = self.model
        x = m.norm(x)
        if size is None or m.global_pool != "avg" or m.attn_pool is not None:
            return m.forward_head(x)
        # average pooling of merged tokens: weight each by the patches it stands for
        pooled = _weighted_mean(x[:, self.num_prefix_tokens :], size[:, self.num_prefix_tokens :])
        return m.head(m.head_drop(m.fc_norm(pooled)))

    def _qkv_taps(self, block: nn.Module) -> dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]]:
        attn = block.attn
        if not all(hasattr(attn, name) for name in ("qkv", "q_norm", "k_norm", "num_heads")):
            raise TypeError(f"cannot read q/k/v from timm attention {type(attn).__name__}")
        heads = attn.num_heads
        identity = lambda t: t  # noqa: E731 - q_norm / k_norm already emit (B, H, N, d)
        value = lambda t: t.unflatten(-1, (3, heads, -1))[:, :, 2].transpose(1, 2)  # noqa: E731
        return {"q": (attn.q_norm, identity), "k": (attn.k_norm, identity), "v": (attn.qkv, value)}


# ---- Hugging Face transformers -------------------------------------------------------------------
@dataclass(frozen=True)
class HFFamily:
    """Where the pieces of one transformers vision model live (dotted attribute paths)."""

    name: str
    classes: tuple[str, ...]
    core: str  # attribute holding the vision transformer in a task wrapper (absent: the model itself)
    layers: str
    attention: str  # attribute of a layer holding q_proj / k_proj / v_proj
    pre_norm: str | None
    final_norm: str
    norm_sequence: bool  # whether last_hidden_state is normalised (CLIP normalises only the pooled CLS)
    interpolate: bool | None  # embeddings accept interpolate_pos_encoding (None: always interpolate)
    patch_conv: str  # the patch-projection convolution inside ``embeddings``


HF_FAMILIES: tuple[HFFamily, ...] = (
    HFFamily("ViT", ("ViTModel", "ViTForImageClassification"), "vit", "layers", "attention", None,
             "layernorm", True, True, "patch_embeddings.projection"),
    HFFamily("CLIP", ("CLIPVisionModel",), "", "encoder.layers", "self_attn", "pre_layrnorm",
             "post_layernorm", False, True, "patch_embedding"),
    HFFamily("SigLIP", ("SiglipVisionModel",), "", "encoder.layers", "self_attn", None,
             "post_layernorm", True, True, "patch_embedding"),
    HFFamily("DINOv2", ("Dinov2Model", "Dinov2WithRegistersModel"), "", "encoder.layer", "attention", None,
             "layernorm", True, None, "patch_embeddings.projection"),
)


def _get(module: nn.Module, path: str) -> Any:
    for name in filter(None, path.split(".")):
        module = getattr(module, name)
    return module


def is_transformers_instance(model: nn.Module, class_names: Sequence[str]) -> bool:
    """Whether ``model`` is an instance of one of the transformers classes named (names this transformers
    version lacks are skipped); transformers is imported only when asked."""
    import transformers

    classes = tuple(c for c in (getattr(transformers, name, None) for name in class_names) if c is not None)
    return bool(classes) and isinstance(model, classes)


def _hf_family(model: nn.Module) -> HFFamily | None:
    return next((family for family in HF_FAMILIES if is_transformers_instance(model, family.classes)), None)


class HFViTAdapter(BackboneAdapter):
    """transformers ``ViTModel`` / ``ViTForImageClassification``, ``CLIPVisionModel``,
    ``SiglipVisionModel``, ``Dinov2Model`` / ``Dinov2WithRegistersModel``."""

    family = "transformers ViT, CLIP vision, SigLIP vision, DINOv2 (+registers)"
    _dynamic_hint = "pass interpolate_pos_encoding=True to adapt_backbone to run other sizes"

    def __init__(self, model: nn.Module, trainable: bool = False, interpolate_pos_encoding: bool = False):
        super().__init__(model, trainable)
        spec = _hf_family(model)
        if spec is None:
            raise TypeError(f"{type(model).__name__} is not a supported transformers vision model")
        self.spec = spec
        self.core = getattr(model, spec.core, model) if spec.core else model
        config = self.core.config
        size, patch = config.image_size, config.patch_size
        self.image_size = tuple(size) if isinstance(size, list | tuple) else (size, size)
        self.patch_size = tuple(patch) if isinstance(patch, list | tuple) else (patch, patch)
        self.in_chans = config.num_channels
        has_cls = spec.name != "SigLIP"
        self.num_prefix_tokens = int(has_cls) + getattr(config, "num_register_tokens", 0)
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.dynamic_size = spec.interpolate is None or interpolate_pos_encoding
        self.blocks = _get(self.core, spec.layers)

    def _embed(self, images: Tensor) -> Tensor:
        embeddings = self.core.embeddings
        dtype = next(embeddings.parameters()).dtype
        if self.spec.interpolate is None:
            return embeddings(images.to(dtype))
        return embeddings(images.to(dtype), interpolate_pos_encoding=self.interpolate_pos_encoding)

    def pre_norm(self, x: Tensor) -> Tensor:
        return x if self.spec.pre_norm is None else _get(self.core, self.spec.pre_norm)(x)

    def _patch_content(self, images: Tensor) -> Tensor:
        conv = _get(self.core.embeddings, self.spec.patch_conv)
        return conv(images.to(conv.weight.dtype)).flatten(2).transpose(1, 2)

    def _patch_positions(self, height: int, width: int) -> Tensor:
        # the library's own interpolation; it reads only the length and width of the tokens passed in
        embeddings = self.core.embeddings
        has_cls = int(self.spec.name != "SigLIP")
        dim = self.core.config.hidden_size
        like = torch.zeros(1, has_cls + height * width, dim, device=next(embeddings.parameters()).device)
        pos = embeddings.interpolate_pos_encoding(like, height * self.patch_size[0], width * self.patch_size[1])
        return pos[:, has_cls:]

    def _block(self, block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        return block(x, bias)

    def _features(self, x: Tensor) -> Tensor:
        return _get(self.core, self.spec.final_norm)(x) if self.spec.norm_sequence else x

    def _head(self, x: Tensor, size: Tensor | None) -> Tensor:
        model, core, name = self.model, self.core, self.spec.name
        norm = _get(core, self.spec.final_norm)
        if name == "CLIP":
            return norm(x[:, 0])
        x = norm(x)
        if name == "SigLIP":
            return _siglip_pool(core, x, size)
        if name == "ViT":
            if hasattr(model, "classifier"):
                return model.classifier(x[:, 0])
            return core.pooler(x) if core.pooler is not None else x[:, 0]
        return x[:, 0]  # DINOv2 pooler_output: the normalised CLS token

    def _qkv_taps(self, block: nn.Module) -> dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]]:
        attn = _get(block, self.spec.attention)
        to_heads = _split_heads(self.core.config.num_attention_heads)
        return {"q": (attn.q_proj, to_heads), "k": (attn.k_proj, to_heads), "v": (attn.v_proj, to_heads)}


def _siglip_pool(core: nn.Module, x: Tensor, size: Tensor | None) -> Tensor:
    if not core.use_head:
        return _weighted_mean(x, size)
    head = core.head
    if size is None:
        return head(x)
    # the attention-pooling head with proportional attention over merged tokens
    probe = head.probe.expand(x.shape[0], -1, -1)
    bias = size.log().to(x.dtype)[:, None, :].repeat_interleave(head.attention.num_heads, dim=0)
    pooled = head.attention(probe, x, x, attn_mask=bias, need_weights=False)[0]
    return (pooled + head.mlp(head.layernorm(pooled)))[:, 0]


# ---- registry -----------------------------------------------------------------------------------
def _is_timm_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


_REGISTRY: list[tuple[Callable[[nn.Module], bool], type[BackboneAdapter]]] = [
    (_is_timm_vit, TimmViTAdapter),
    (lambda model: _hf_family(model) is not None, HFViTAdapter),
]


def register_adapter(matches: Callable[[nn.Module], bool], adapter: type[BackboneAdapter]) -> None:
    """Add a family: ``adapt_backbone`` uses the first registered adapter whose ``matches(model)`` holds."""
    _REGISTRY.append((matches, adapter))


def supported_families() -> list[str]:
    return [adapter.family for _, adapter in _REGISTRY]


def adapt_backbone(model: nn.Module, trainable: bool = False, **options: Any) -> BackboneAdapter:
    """Wrap ``model`` in its family's adapter: ``embed`` / ``run_blocks`` / ``head`` on any subset of tokens.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, registers, LayerScale, q/k norm) or a transformers
            ViT / CLIP / SigLIP / DINOv2 vision model (see :func:`supported_families`).
        trainable: leave the parameters as they are; by default the backbone is frozen (no grad, eval mode).
        **options: passed to the adapter (``interpolate_pos_encoding=True`` for transformers models).

    Returns:
        The family's :class:`BackboneAdapter`, exact on every token: ``adapter(images)`` equals the model's output.

    Raises:
        TypeError: an unsupported model (the message lists the supported families).
    """
    for matches, adapter in _REGISTRY:
        if matches(model):
            return adapter(model, trainable=trainable, **options)
    raise TypeError(
        f"unsupported backbone {type(model).__module__}.{type(model).__name__}; supported families: "
        + "; ".join(supported_families())
    )

