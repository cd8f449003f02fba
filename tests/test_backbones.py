"""Adapters: exact with every token kept, exact against an attention-masked reference on a subset."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
import transformers as hf
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from arrcoc.backbones import TokenSet, adapt_backbone, keep_top_k, select, supported_families

TOL = 1e-5
IMG, PATCH = 32, 8  # a 4 x 4 patch grid
TIMM = dict(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=2, num_heads=2, num_classes=10)
HF = dict(image_size=IMG, patch_size=PATCH, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)

FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "timm-vit": lambda: VisionTransformer(**TIMM),
    "timm-vit-eager": lambda: _eager(VisionTransformer(**TIMM)),
    "timm-deit-distilled": lambda: VisionTransformerDistilled(**TIMM),
    "timm-deit3-layerscale-reg-qknorm": lambda: VisionTransformer(
        **TIMM, init_values=0.1, reg_tokens=2, qk_norm=True, no_embed_class=True
    ),
    "timm-avgpool-noclass": lambda: VisionTransformer(**TIMM, global_pool="avg", class_token=False),
    "hf-vit-cls": lambda: hf.ViTForImageClassification(hf.ViTConfig(**HF, intermediate_size=64, num_labels=5)),
    "hf-vit-eager": lambda: hf.ViTModel(hf.ViTConfig(**HF, intermediate_size=64, attn_implementation="eager")),
    "hf-clip": lambda: hf.CLIPVisionModel(hf.CLIPVisionConfig(**HF, intermediate_size=64)),
    "hf-siglip": lambda: hf.SiglipVisionModel(hf.SiglipVisionConfig(**HF, intermediate_size=64)),
    "hf-dinov2": lambda: hf.Dinov2Model(hf.Dinov2Config(**HF, mlp_ratio=2, layerscale_value=0.5)),
    "hf-dinov2-registers": lambda: hf.Dinov2WithRegistersModel(
        hf.Dinov2WithRegistersConfig(**HF, mlp_ratio=2, num_register_tokens=3)
    ),
}
PREFIX = {"timm-deit-distilled": 2, "timm-deit3-layerscale-reg-qknorm": 3, "timm-avgpool-noclass": 0,
          "hf-siglip": 0, "hf-dinov2-registers": 4}
# whose head reads only prefix tokens, so a masked reference gives the same head output
CLS_HEAD = {"timm-vit", "timm-vit-eager", "timm-deit-distilled", "timm-deit3-layerscale-reg-qknorm",
            "hf-vit-cls", "hf-vit-eager", "hf-clip", "hf-dinov2", "hf-dinov2-registers"}


def _eager(model: VisionTransformer) -> VisionTransformer:
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name]().eval()


def model_output(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(head output, final token sequence) of the unwrapped model, through its own forward."""
    if isinstance(model, VisionTransformer):
        return model(images), model.forward_features(images)
    out = model(pixel_values=images)
    if hasattr(out, "logits"):
        return out.logits, model.vit(pixel_values=images).last_hidden_state
    pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
    return pooled, out.last_hidden_state


def images(batch: int = 3, size: int = IMG) -> Tensor:
    return torch.randn(batch, 3, size, size)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_keeping_every_token_reproduces_the_model(name: str) -> None:
    model = build(name)
    adapter = adapt_backbone(model)
    x = images()
    with torch.no_grad():
        ref_head, ref_features = model_output(model, x)
        state = adapter.run_blocks(adapter.tokens(x))
        head, features = adapter.head(state), adapter.features(state)
    assert adapter.num_prefix_tokens == PREFIX.get(name, 1)
    assert adapter.grid(x).num_patches == (IMG // PATCH) ** 2
    assert head.shape == ref_head.shape and features.shape == ref_features.shape
    assert (head - ref_head).abs().max() <= TOL
    assert (features - ref_features).abs().max() <= TOL


def masked_reference(adapter, x: Tensor, keep: Tensor, from_layer: int) -> Tensor:
    """The full-length model with dropped tokens masked out of attention (an additive -inf key mask through
    the library's own attention-mask argument) from block ``from_layer`` on; returns final features."""
    tokens = adapter.embed(x)
    bias = torch.zeros(keep.shape[0], 1, 1, keep.shape[1], dtype=tokens.dtype)
    bias.masked_fill_(~keep[:, None, None, :], float("-inf"))
    for i, block in enumerate(adapter.blocks):
        if isinstance(adapter.model, VisionTransformer):
            tokens = block(tokens, attn_mask=bias if i >= from_layer else None)
        else:
            tokens = block(tokens, bias if i >= from_layer else None)
    return adapter.features(TokenSet.from_embedded(tokens, adapter.num_prefix_tokens))


def random_index(batch: int, num_patches: int, k: int) -> Tensor:
    return torch.rand(batch, num_patches).argsort(dim=1)[:, :k].sort(dim=1).values


@pytest.mark.parametrize("from_layer", [0, 1])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_subset_equals_attention_masked_model(name: str, from_layer: int) -> None:
    model = build(name)
    adapter = adapt_backbone(model)
    x = images()
    n, p = adapter.grid(x).num_patches, adapter.num_prefix_tokens
    index = random_index(x.shape[0], n, k=6)
    assert not (index[0] == index[1]).all()  # different patches per image
    keep = torch.ones(x.shape[0], p + n, dtype=torch.bool)
    keep[:, p:] = False
    keep[:, p:].scatter_(1, index, True)
    with torch.no_grad():
        state = adapter.run_blocks(adapter.tokens(x), 0, from_layer)
        state = adapter.run_blocks(select(state, index), from_layer)
        reference = masked_reference(adapter, x, keep, from_layer)
        kept_reference = reference[keep].view(x.shape[0], p + 6, -1)
        assert (adapter.features(state) - kept_reference).abs().max() <= TOL
        if name in CLS_HEAD and from_layer == 0:
            assert (adapter.head(state) - library_masked_head(model, x, keep, reference)).abs().max() <= TOL


def library_masked_head(model: nn.Module, x: Tensor, keep: Tensor, reference: Tensor) -> Tensor:
    """Head output of the library's own full forward with its own attention-mask argument."""
    if isinstance(model, VisionTransformer):
        bias = torch.zeros(keep.shape[0], 1, 1, keep.shape[1]).masked_fill_(~keep[:, None, None, :], float("-inf"))
        return model.forward_head(model.forward_features(x, attn_mask=bias))
    if isinstance(model, hf.CLIPVisionModel):  # no mask argument on the model: pool the masked encoder output
        return model.post_layernorm(reference[:, 0])
    out = model(pixel_values=x, attention_mask=keep.long())
    if hasattr(out, "logits"):
        return out.logits
    return out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]


@pytest.mark.parametrize("name", ["timm-vit", "hf-clip", "hf-dinov2"])
def test_proportional_attention_equals_duplicated_tokens(name: str) -> None:
    # a token of size 2 must act in attention exactly like two identical copies of it
    adapter = adapt_backbone(build(name))
    x = images(batch=2)
    with torch.no_grad():
        full = adapter.tokens(x)
        p = full.num_prefix
        dup = full.tokens.clone()
        dup[:, p + 1] = dup[:, p]  # patch 1 := copy of patch 0
        out_dup = adapter.run_blocks(TokenSet.from_embedded(dup, p))
        keep = [i for i in range(dup.shape[1]) if i != p + 1]
        size = torch.ones(2, len(keep))
        size[:, p] = 2.0
        merged = TokenSet(dup[:, keep], p, full.patch_index[:, [i - p for i in keep[p:]]], size)
        out_merged = adapter.run_blocks(merged)
    assert (out_merged.tokens - out_dup.tokens[:, keep]).abs().max() <= TOL


def test_merge_and_fuse_run_through_every_family() -> None:
    for name in FAMILIES:
        adapter = adapt_backbone(build(name))
        x = images(batch=2)
        state = adapter.tokens(x)
        scores = torch.rand(2, state.num_patch_tokens)
        for dropped, expected in (("discard", 4), ("fuse", 5), ("merge", 4)):
            with torch.no_grad():
                out = adapter.run_blocks(keep_top_k(state, scores, 0.25, dropped))
                head = adapter.head(out)
            assert out.num_patch_tokens == expected, (name, dropped)
            assert torch.isfinite(head).all(), (name, dropped)


def test_timm_dynamic_img_size_is_exact() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(**TIMM, dynamic_img_size=True).eval()
    adapter = adapt_backbone(model)
    x = torch.randn(2, 3, 48, 32)
    assert adapter.grid(x).num_patches == 6 * 4
    with torch.no_grad():
        assert (adapter(x) - model(x)).abs().max() <= TOL


def test_hf_interpolated_positions_are_exact() -> None:
    model = build("hf-vit-cls")
    adapter = adapt_backbone(model, interpolate_pos_encoding=True)
    x = images(size=48)
    with torch.no_grad():
        ref = model(pixel_values=x, interpolate_pos_encoding=True).logits
        assert (adapter(x) - ref).abs().max() <= TOL


def test_backbone_is_frozen_unless_asked() -> None:
    model = build("timm-vit").train()
    adapter = adapt_backbone(model)
    assert not any(p.requires_grad for p in model.parameters())
    adapter.train()
    assert not model.training  # a frozen backbone stays in eval mode
    trainable = adapt_backbone(build("timm-vit"), trainable=True)
    assert all(p.requires_grad for p in trainable.model.parameters()) and trainable.model.training


def test_gradients_reach_the_tokens_through_a_frozen_backbone() -> None:
    adapter = adapt_backbone(build("timm-vit"))
    state = adapter.tokens(images(batch=2))
    scores = torch.rand(2, state.num_patch_tokens, requires_grad=True)
    out = adapter.head(adapter.run_blocks(keep_top_k(state, scores, 0.5, "fuse")))
    out.sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0  # the fusion weights are differentiable


def test_bf16_autocast_runs() -> None:
    adapter = adapt_backbone(build("timm-deit3-layerscale-reg-qknorm"))
    x = images(batch=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        state = adapter.tokens(x)
        state = keep_top_k(state, torch.rand(2, state.num_patch_tokens), 0.5, "merge")
        out = adapter.head(adapter.run_blocks(state))
        low = adapter(x)
    with torch.no_grad():
        full = adapter(x)
    assert out.dtype == low.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (low.float() - full).abs().max() <= 0.05 * full.abs().max()


def test_unsupported_model_names_the_supported_families() -> None:
    with pytest.raises(TypeError, match="supported families") as err:
        adapt_backbone(nn.Linear(3, 3))
    assert "Linear" in str(err.value)
    for family in supported_families():
        assert family in str(err.value)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.randn(3, IMG, IMG), "4-D tensor"),
        (torch.randn(1, 1, IMG, IMG), "3 channels"),
        (torch.randn(1, 3, 36, 36), "not divisible by the patch size 8x8"),
        (torch.randn(1, 3, 48, 48), "differs from the model's 32x32"),
    ],
)
@pytest.mark.parametrize("name", ["timm-vit", "hf-siglip"])
def test_bad_images_raise_clear_errors(name: str, x: Tensor, match: str) -> None:
    adapter = adapt_backbone(build(name))
    with pytest.raises(ValueError, match=match):
        adapter(x)


def test_timm_real_weights_path(tmp_path) -> None:
    kwargs = dict(img_size=IMG, depth=2, num_classes=7)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    path = tmp_path / "vit_tiny.pth"
    torch.save(source.state_dict(), path)
    loaded = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=7), **kwargs
    )
    adapter = adapt_backbone(loaded)
    x = images(batch=2)
    with torch.no_grad():
        assert (adapter(x) - source(x)).abs().max() <= TOL


def test_transformers_real_weights_path(tmp_path) -> None:
    source = build("hf-dinov2-registers")
    source.save_pretrained(tmp_path)
    adapter = adapt_backbone(hf.Dinov2WithRegistersModel.from_pretrained(tmp_path))
    x = images(batch=2)
    with torch.no_grad():
        assert (adapter(x) - source(pixel_values=x).pooler_output).abs().max() <= TOL


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unit_sizes_change_nothing(name: str) -> None:
    # proportional attention (blocks, size-weighted pooling, SigLIP's pooling head) reduces to the model
    # when every token stands for one patch
    adapter = adapt_backbone(build(name))
    x = images()
    with torch.no_grad():
        state = adapter.tokens(x)
        state.size = torch.ones(state.tokens.shape[:2])
        assert (adapter.head(adapter.run_blocks(state)) - adapter(x)).abs().max() <= TOL


def test_transformers_users_may_pass_pixel_values_by_keyword():
    import arrcoc

    model = arrcoc.attach(build("hf-vit-cls"), budget=0.5)
    x = images()
    assert torch.equal(model(pixel_values=x), model(x))
    assert torch.equal(model.relevance_map(pixel_values=x).kept, model.relevance_map(x).kept)
    with pytest.raises(TypeError, match="give the images once"):
        model(x, pixel_values=x)
    with pytest.raises(TypeError, match="give the images once"):
        model()


@pytest.mark.parametrize("name", ["timm-vit", "hf-dinov2-registers"])
def test_a_large_batch_is_embedded_in_chunks_with_the_same_tokens(name: str, monkeypatch) -> None:
    from arrcoc.backbones import adapters

    adapter = adapt_backbone(build(name))
    x = images(batch=7)
    with torch.no_grad():
        whole = adapter.embed(x)
        calls = []
        embed = adapter._embed
        monkeypatch.setattr(adapter, "_embed", lambda chunk: calls.append(len(chunk)) or embed(chunk))
        monkeypatch.setattr(adapters, "EMBED_CHUNK", 3)
        assert (adapter.embed(x) - whole).abs().max() <= TOL and calls == [3, 3, 1]
        trainable = adapt_backbone(build(name), trainable=True).train()  # batch statistics see the whole batch
        calls.clear()
        monkeypatch.setattr(trainable, "_embed", lambda chunk: calls.append(len(chunk)) or embed(chunk))
        trainable.embed(x)
        assert calls == [7]
