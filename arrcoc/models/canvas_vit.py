"""The canvas ViT every canvas method shares: a timm ``VisionTransformer`` with a convolutional stem.

Its patch embedding is a small CNN ("early convolutions", Xiao et al. 2021): plain linear-patch ViTs learn
slowly from scratch at this scale. ``arrcoc bench pretrain`` trains it (:mod:`arrcoc.bench.pretrain`);
:func:`load_canvas_vit` rebuilds it from a ``.safetensors`` file and the ``.json`` beside it (architecture,
seed, command, accuracies), checking both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from arrcoc.config import REPO_ROOT
from arrcoc.storage import load_safetensors, read_json_object, save_weights_atomic

__all__ = ["DEFAULT_CHECKPOINT", "CanvasViTConfig", "ConvStem", "build_canvas_vit", "load_canvas_vit",
           "save_canvas_vit"]

DEFAULT_CHECKPOINT = REPO_ROOT / "benchmarks" / "checkpoints" / "canvas_vit.safetensors"


class _StemLayers(nn.Sequential):
    """The stem's layers; ``in_channels`` is read by the backbone adapter like a ``Conv2d`` projection's."""

    def __init__(self, in_channels: int, layers: list[nn.Module]):
        super().__init__(*layers)
        self.in_channels = in_channels


class ConvStem(PatchEmbed):
    """timm ``PatchEmbed`` whose projection is a small CNN (Xiao et al. 2021, "Early convolutions help
    transformers see better"): log2(patch) 3x3 stride-2 conv-BN-ReLU stages of ``widths`` channels, the
    stages from ``refine_from`` on followed by a 3x3 stride-1 conv-BN-ReLU, then a 1x1 conv to the width.

    Usable as ``VisionTransformer(embed_layer=partial(ConvStem, widths=...), ...)``: it keeps
    ``PatchEmbed``'s attributes (``patch_size``, ``img_size``, ``grid_size``, ``num_patches``, ``proj``,
    ``norm``) and forward. The stride-1 convs widen each token's receptive field beyond its patch (39 px
    for 8-px patches with the defaults), which is what lets a small ViT learn digits quickly on a CPU.
    """

    def __init__(self, img_size: int = 64, patch_size: int = 8, in_chans: int = 3, embed_dim: int = 192,
                 widths: tuple[int, ...] = (32, 64, 128), refine_from: int = 1, **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        if 2 ** len(widths) != patch_size:
            raise ValueError(f"ConvStem needs log2(patch size) = {math.log2(patch_size):g} stage widths, got {widths}")

        def conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        layers: list[nn.Module] = []
        channels = in_chans
        for stage, width in enumerate(widths):
            layers += conv_bn_relu(channels, width, 2)
            if stage >= refine_from:
                layers += conv_bn_relu(width, width, 1)
            channels = width
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.proj = _StemLayers(in_chans, layers)


@dataclass(frozen=True)
class CanvasViTConfig:
    """Architecture of the canvas ViT (stored in the checkpoint's JSON and checked on load)."""

    img_size: int = 64
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    stem_widths: tuple[int, ...] = (32, 64, 128)  # channels of the stride-2 conv stages
    stem_refine_from: int = 1  # stages from this one on add a stride-1 conv (a larger receptive field)
    global_pool: str = "token"  # CLS pooling: the CLS attention EViT / ATS read is then what the head uses


def build_canvas_vit(config: CanvasViTConfig = CanvasViTConfig()) -> VisionTransformer:
    return VisionTransformer(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=config.num_classes,
        class_token=True,
        global_pool=config.global_pool,
        embed_layer=partial(ConvStem, widths=tuple(config.stem_widths), refine_from=config.stem_refine_from),
    )



def save_canvas_vit(model: VisionTransformer, model_config: CanvasViTConfig, path: Path, metadata: dict) -> None:
    """``path`` (.safetensors) and its JSON twin (architecture + ``metadata``), written atomically."""
    save_weights_atomic(model.state_dict(), path, {"architecture": asdict(model_config), **metadata})


def load_canvas_vit(path: str | Path | None = None, device: str | torch.device = "cpu") -> VisionTransformer:
    """The pretrained canvas ViT (eval mode) from ``path`` (.safetensors; its ``.json`` beside it)."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    config_path = path.with_suffix(".json")
    if not path.is_file() or not config_path.is_file():
        raise FileNotFoundError(
            f"canvas ViT checkpoint {path} (+ {config_path.name}) not found; create it with "
            "`arrcoc bench pretrain`"
        )
    architecture = read_json_object(config_path, "canvas ViT description").get("architecture")
    if not isinstance(architecture, dict):
        raise ValueError(f"{config_path}: no 'architecture' mapping (the canvas ViT's settings)")
    known = {f.name for f in fields(CanvasViTConfig)}
    if set(architecture) != known:
        raise ValueError(f"{config_path}: architecture keys {sorted(architecture)} differ from {sorted(known)}")
    model_config = CanvasViTConfig(**architecture)
    model = build_canvas_vit(model_config)
    weights = load_safetensors(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != stored:
        mismatched = sorted(k for k in expected.keys() | stored.keys() if expected.get(k) != stored.get(k))
        details = ", ".join(f"{k}: model {expected.get(k)} vs file {stored.get(k)}" for k in mismatched[:5])
        raise ValueError(
            f"checkpoint {path} does not match its architecture {model_config} "
            f"({len(mismatched)} mismatched tensors: {details})"
        )
    model.load_state_dict(weights)
    return model.to(device).eval()
