"""Pretrain the small canvas ViT the benchmark runs on: ``python -m arrcoc.bench.pretrain [--quick]``.

A timm ``VisionTransformer`` with a convolutional stem as its patch embedding ("early convolutions":
plain linear-patch ViTs learn slowly from scratch at this scale), trained with backprop on full-token
cluttered canvases composed from the TRAIN source digits, fresh canvases every epoch. Each batch keeps a
random 100 / 50 / 25 / 12.5 % of its patch tokens (run through the library's own backbone adapter and
``select``), so the backbone tolerates the token subsets the relevance module will give it.

Writes ``canvas_vit.safetensors`` + ``canvas_vit.json`` (architecture, seed, command, accuracies per keep
ratio on canvases of TEST source digits, training time, versions) to ``benchmarks/checkpoints/``
(``runs/quick/`` with ``--quick``); :func:`load_canvas_vit` rebuilds the model from that pair.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from tqdm import tqdm

from arrcoc.backbones import BackboneAdapter, adapt_backbone, select, top_k
from arrcoc.bench.common import REPO_ROOT, save_weights_atomic, warmup_cosine
from arrcoc.data.canvas import CanvasConfig, canvas_sources, cluttered_split
from arrcoc.data.digits import DigitSplit
from arrcoc.data.text import TextEncoder
from arrcoc.relevance import ARRCOC

from .common import config_file, parse_with_config

__all__ = [
    "DEFAULT_CHECKPOINT",
    "CanvasViTConfig",
    "ConvStem",
    "PretrainConfig",
    "build_canvas_vit",
    "evaluate_keep_ratios",
    "load_canvas_vit",
    "load_trained_arrcoc",
    "pretrain",
    "save_canvas_vit",
]

DEFAULT_CHECKPOINT = REPO_ROOT / "benchmarks" / "checkpoints" / "canvas_vit.safetensors"
TRAINED_MODELS = REPO_ROOT / "benchmarks" / "results" / "models"  # written by `arrcoc bench canvas`
KEEP_RATIOS = (1.0, 0.5, 0.25, 0.125)


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


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    epochs: int = 16
    canvases_per_epoch: int = 8192  # fresh canvases every epoch (from train source digits only)
    batch_size: int = 64
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    # each batch keeps a random patch subset of one of these sizes (full tokens twice as often)
    train_keep_ratios: tuple[float, ...] = (1.0, 1.0, 0.5, 0.25, 0.125)
    keep_ratios: tuple[float, ...] = KEEP_RATIOS  # reported
    eval_canvases: int = 2000  # from TEST source digits
    threads: int = 2


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


def _logits_on_subset(adapter: BackboneAdapter, images: Tensor, keep: float, generator: torch.Generator) -> Tensor:
    """Logits with a uniformly random ``keep`` fraction of patch tokens (all of them at 1.0)."""
    state = adapter.tokens(images)
    k = max(1, round(keep * state.num_patch_tokens))
    if k < state.num_patch_tokens:
        scores = torch.rand(state.patches.shape[:2], generator=generator).to(images.device)
        state = select(state, top_k(scores, k))
    return adapter.head(adapter.run_blocks(state))


@torch.no_grad()
def evaluate_keep_ratios(
    model: VisionTransformer, images: Tensor, labels: Tensor, keep_ratios: tuple[float, ...] = KEEP_RATIOS,
    seed: int = 0, batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy with a random patch subset of each keep ratio (seeded)."""
    adapter = adapt_backbone(model, trainable=True).eval()  # no requires_grad change; caller restores train mode
    device = next(model.parameters()).device
    accuracy = {}
    for keep in keep_ratios:
        generator = torch.Generator().manual_seed(seed)
        correct = 0
        for start in range(0, len(labels), batch_size):
            batch = images[start : start + batch_size].to(device)
            logits = _logits_on_subset(adapter, batch, keep, generator)
            correct += int((logits.argmax(dim=1).cpu() == labels[start : start + batch_size]).sum())
        accuracy[str(keep)] = correct / len(labels)
    return accuracy


def pretrain(
    model_config: CanvasViTConfig, config: PretrainConfig, canvas: CanvasConfig | None = None,
    sources: DigitSplit | None = None,
) -> tuple[VisionTransformer, dict[str, float], float]:
    """Train a canvas ViT; returns it, its test accuracy per keep ratio and the training seconds."""
    canvas = canvas or CanvasConfig()
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sources = sources or canvas_sources()
    model = build_canvas_vit(model_config).to(device)
    adapter = adapt_backbone(model, trainable=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(config.canvases_per_epoch / config.batch_size)
    schedule = warmup_cosine(optimizer, config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    test = cluttered_split("test", config.eval_canvases, seed=config.seed, config=canvas, sources=sources)
    start_time = time.perf_counter()
    for epoch in range(config.epochs):
        train = cluttered_split("train", config.canvases_per_epoch, seed=config.seed * 1000 + epoch, config=canvas,
                                sources=sources)
        order = torch.randperm(len(train), generator=generator)
        model.train()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False)
        for step in bar:
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            choice = int(torch.randint(len(config.train_keep_ratios), (1,), generator=generator))
            keep = config.train_keep_ratios[choice]
            logits = _logits_on_subset(adapter, train.images[batch].to(device), keep, generator)
            loss = F.cross_entropy(logits, train.labels[batch].to(device), label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", keep=keep)
        if epoch % 3 == 2:
            accuracy = evaluate_keep_ratios(model, test.images, test.labels, (1.0,), seed=config.seed)
            tqdm.write(f"epoch {epoch + 1}: test accuracy {accuracy} ({time.perf_counter() - start_time:.0f} s)")
    seconds = time.perf_counter() - start_time
    model.eval()
    accuracy = evaluate_keep_ratios(model, test.images, test.labels, config.keep_ratios, seed=config.seed)
    return model, accuracy, seconds


# ---- checkpoint ---------------------------------------------------------------------------------
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
            "`python -m arrcoc.bench.pretrain`"
        )
    import json

    architecture = json.loads(config_path.read_text())["architecture"]
    known = {f.name for f in fields(CanvasViTConfig)}
    if set(architecture) != known:
        raise ValueError(f"{config_path}: architecture keys {sorted(architecture)} differ from {sorted(known)}")
    model_config = CanvasViTConfig(**architecture)
    model = build_canvas_vit(model_config)
    weights = load_file(path)
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


def load_trained_arrcoc(task: str, directory: str | Path | None = None, backbone: str | Path | None = None) -> ARRCOC:
    """The ARR-COC model the canvas benchmark trained for ``task`` ("cluttered" or "query"; its first seed),
    on the canvas ViT at ``backbone`` (default: the committed one). ``directory``: the benchmark's models
    folder (default ``benchmarks/results/models``; ``runs/quick/models`` after ``arrcoc bench --quick``);
    the model is ``directory/task``. The query task's model gets the MiniLM text encoder, so that it takes
    sentences as queries."""
    tasks = ("cluttered", "query")
    if task not in tasks:
        raise ValueError(f"task must be one of {tasks}, got {task!r}")
    folder = (Path(directory) if directory is not None else TRAINED_MODELS) / task
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained ARR-COC model for the {task} task in {folder}: `arrcoc bench canvas` writes it to "
            f"{TRAINED_MODELS.relative_to(REPO_ROOT)}/{task} (`arrcoc bench --quick` to runs/quick/models/{task})"
        )
    text_encoder = TextEncoder() if task == "query" else None
    return ARRCOC.from_pretrained(folder, load_canvas_vit(backbone), text_encoder=text_encoder)


# ---- command ------------------------------------------------------------------------------------
QUICK_MODEL = CanvasViTConfig(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)
QUICK_TRAIN = PretrainConfig(epochs=2, canvases_per_epoch=1024, batch_size=64, eval_canvases=256)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (about a minute), writes to runs/quick/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 2)")
    parser.add_argument("--out", type=Path, help="checkpoint path (.safetensors)")
    parser.add_argument("--config", type=config_file,
                        help="YAML of defaults for these options (keys: option names with underscores)")
    args = parse_with_config(parser, argv)

    model_config, train_config = (QUICK_MODEL, QUICK_TRAIN) if args.quick else (CanvasViTConfig(), PretrainConfig())
    overrides = {"seed": args.seed}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.threads is not None:
        overrides["threads"] = args.threads
    train_config = PretrainConfig(**{**asdict(train_config), **overrides})
    out = args.out or (REPO_ROOT / "runs" / "quick" / "canvas_vit.safetensors" if args.quick else DEFAULT_CHECKPOINT)
    torch.set_num_threads(train_config.threads)

    canvas = CanvasConfig()
    model, accuracy, seconds = pretrain(model_config, train_config, canvas)
    metadata = {
        "seed": train_config.seed,
        "command": " ".join(["python -m arrcoc.bench.pretrain", *(argv if argv is not None else sys.argv[1:])]),
        "train": asdict(train_config),
        "canvas": asdict(canvas),
        "test_accuracy_random_keep": accuracy,
        "eval": f"{train_config.eval_canvases} cluttered canvases of TEST source digits, random patch subsets",
        "train_seconds": round(seconds, 1),
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({train_config.threads} threads)",
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    save_canvas_vit(model, model_config, out, metadata)
    size_mb = out.stat().st_size / 2**20
    print(f"test accuracy per keep ratio: {accuracy}; {seconds:.0f} s; wrote {out} ({size_mb:.1f} MB)")


if __name__ == "__main__":
    main()
