"""Pretrain the small canvas ViT the benchmark runs on: ``arrcoc bench pretrain [--quick]``.

A timm ``VisionTransformer`` with a convolutional stem as its patch embedding ("early convolutions":
plain linear-patch ViTs learn slowly from scratch at this scale), trained with backprop on full-token
cluttered canvases composed from the TRAIN source digits, fresh canvases every epoch. Each batch keeps a
random 100 / 50 / 25 / 12.5 % of its patch tokens (run through the library's own backbone adapter and
``select``), so the backbone tolerates the token subsets the relevance module will give it.

Writes ``canvas_vit.safetensors`` + ``canvas_vit.json`` (architecture, seed, command, accuracies per keep
ratio on canvases of TEST source digits, training time, versions) to ``benchmarks/checkpoints/``
(``runs/quick/`` with ``--quick``); :func:`arrcoc.models.canvas_vit.load_canvas_vit` rebuilds the model
from that pair.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from tqdm import tqdm

from arrcoc.backbones import BackboneAdapter, adapt_backbone, select, top_k
from arrcoc.budget import num_kept
from arrcoc.config import config_file, parse_with_config
from arrcoc.data.canvas import CanvasConfig, canvas_sources, cluttered_split
from arrcoc.data.digits import DigitSplit
from arrcoc.models.canvas_vit import DEFAULT_CHECKPOINT, CanvasViTConfig, build_canvas_vit, save_canvas_vit
from arrcoc.optim import warmup_cosine
from arrcoc.reporting import command_line, output_dir, run_metadata

KEEP_RATIOS = (1.0, 0.5, 0.25, 0.125)


Settings = TypeVar("Settings", bound="CanvasTrainConfig")


@dataclass(frozen=True)
class CanvasTrainConfig:
    """A backprop training run on cluttered canvases: the canvas ViT's pretraining here, the query-fusion
    reference's fine-tuning (:mod:`arrcoc.bench.query_fusion`)."""

    seed: int = 0
    epochs: int = 16
    canvases_per_epoch: int = 8192  # fresh canvases every epoch (from train source digits only)
    batch_size: int = 64
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    eval_canvases: int = 2000  # from TEST source digits
    threads: int = 2

    def overridden(self: Settings, **settings: Any) -> Settings:
        """A copy with those of ``settings`` that are given (an option left off the command line is None)."""
        return replace(self, **{key: value for key, value in settings.items() if value is not None})


@dataclass(frozen=True)
class PretrainConfig(CanvasTrainConfig):
    warmup_epochs: float = 0.5
    # each batch keeps a random patch subset of one of these sizes (full tokens twice as often)
    train_keep_ratios: tuple[float, ...] = (1.0, 1.0, 0.5, 0.25, 0.125)
    keep_ratios: tuple[float, ...] = KEEP_RATIOS  # reported


def _logits_on_subset(adapter: BackboneAdapter, images: Tensor, keep: float, generator: torch.Generator) -> Tensor:
    """Logits with a uniformly random ``keep`` fraction of patch tokens (all of them at 1.0)."""
    state = adapter.tokens(images)
    k = num_kept(keep, state.num_patch_tokens)
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


# ---- command ------------------------------------------------------------------------------------
QUICK_MODEL = CanvasViTConfig(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)
QUICK_TRAIN = PretrainConfig(epochs=2, canvases_per_epoch=1024, batch_size=64, eval_canvases=256)


def training_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options of a command that trains a canvas model: ``--quick``, ``--seed``, ``--epochs``,
    ``--threads``, ``--out`` and ``--config``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 2)")
    parser.add_argument("--out", type=Path, help="checkpoint path (.safetensors)")
    parser.add_argument("--config", type=config_file,
                        help="YAML of defaults for these options (keys: option names with underscores)")
    return parser


def training_run(args: argparse.Namespace, config: Settings, default_out: Path) -> tuple[Settings, Path]:
    """``config`` with the command line's seed, epochs and threads (torch's thread count set to them), and the
    checkpoint path: ``--out``, else ``default_out`` (its name in ``runs/quick/`` with ``--quick``)."""
    config = config.overridden(seed=args.seed, epochs=args.epochs, threads=args.threads)
    torch.set_num_threads(config.threads)
    return config, args.out or (output_dir(None, quick=True) / default_out.name if args.quick else default_out)


def main(argv: list[str] | None = None) -> None:
    parser = training_parser(__doc__, "tiny smoke run (about a minute), writes to runs/quick/")
    args = parse_with_config(parser, argv)
    model_config, train_config = (QUICK_MODEL, QUICK_TRAIN) if args.quick else (CanvasViTConfig(), PretrainConfig())
    train_config, out = training_run(args, train_config, DEFAULT_CHECKPOINT)

    canvas = CanvasConfig()
    model, accuracy, seconds = pretrain(model_config, train_config, canvas)
    metadata = run_metadata(
        command_line("arrcoc.bench.pretrain", argv), args.quick,
        seed=train_config.seed,
        train=asdict(train_config),
        canvas=asdict(canvas),
        test_accuracy_random_keep=accuracy,
        eval=f"{train_config.eval_canvases} cluttered canvases of TEST source digits, random patch subsets",
        train_seconds=round(seconds, 1),
        device="cuda" if torch.cuda.is_available() else f"cpu ({train_config.threads} threads)",
        versions={"torch": torch.__version__, "timm": timm.__version__},
    )
    save_canvas_vit(model, model_config, out, metadata)
    size_mb = out.stat().st_size / 2**20
    print(f"test accuracy per keep ratio: {accuracy}; {seconds:.0f} s; wrote {out} ({size_mb:.1f} MB)")


if __name__ == "__main__":
    main()
