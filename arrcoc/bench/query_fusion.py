"""The query task's upper reference: ``python -m arrcoc.bench.query_fusion [--quick]``.

The canvas ViT with the query's sentence embedding (all-MiniLM-L6-v2) as one extra token after CLS,
every patch token kept, fine-tuned end to end with backprop on query canvases of TRAIN source digits.
It sees the query inside every block, which no token-selection method does: the benchmark asks how
close ARR-COC, keeping 12.5% of the patches before the first block, gets to it.

Writes ``query_fusion.safetensors`` + ``.json`` (seed, command, test accuracy) next to the canvas ViT
(``runs/quick/`` with ``--quick``); :func:`load_query_fusion` rebuilds it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from tqdm import tqdm

from arrcoc.data import TEXT_DIM, TextEncoder, query_split

from .common import REPO_ROOT, config_file, parse_with_config, save_weights_atomic, warmup_cosine
from .pretrain import DEFAULT_CHECKPOINT, load_canvas_vit

DEFAULT_QUERY_FUSION = REPO_ROOT / "benchmarks" / "checkpoints" / "query_fusion.safetensors"


class QueryFusionViT(nn.Module):
    """A timm ViT whose sequence is [CLS, query token, patch tokens]; the head reads CLS."""

    def __init__(self, vit: VisionTransformer, query_dim: int = TEXT_DIM):
        super().__init__()
        if vit.global_pool != "token" or vit.cls_token is None:
            raise ValueError(f"query fusion reads the CLS token: needs global_pool='token', got {vit.global_pool!r}")
        self.vit = vit
        self.query_token = nn.Linear(query_dim, vit.embed_dim)

    def forward(self, images: Tensor, query: Tensor) -> Tensor:
        if query.shape != (images.shape[0], self.query_token.in_features):
            raise ValueError(f"query must be (batch, {self.query_token.in_features}), got {tuple(query.shape)}")
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(images))  # CLS + patches, positions added
        x = torch.cat([x[:, :1], self.query_token(query.to(x.dtype))[:, None], x[:, 1:]], dim=1)
        x = vit.norm(vit.blocks(vit.norm_pre(x)))
        return vit.forward_head(x)


@dataclass(frozen=True)
class QueryFusionConfig:
    seed: int = 0
    epochs: int = 10
    canvases_per_epoch: int = 8192
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    eval_canvases: int = 2000  # TEST source digits, held-out phrasings
    threads: int = 2


@torch.no_grad()
def evaluate(model: QueryFusionViT, images: Tensor, queries: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = sum(
        int((model(images[i:i + batch_size], queries[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum())
        for i in range(0, len(labels), batch_size)
    )
    return correct / len(labels)


def train_query_fusion(config: QueryFusionConfig, backbone: Path = DEFAULT_CHECKPOINT,
                       text: TextEncoder | None = None) -> tuple[QueryFusionViT, float, float]:
    """Fine-tune the canvas ViT with a query token; returns the model, its test accuracy and seconds."""
    torch.manual_seed(config.seed)
    text = text or TextEncoder()
    model = QueryFusionViT(load_canvas_vit(backbone))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = math.ceil(config.canvases_per_epoch / config.batch_size)
    schedule = warmup_cosine(optimizer, config.epochs * steps, 0.2 * steps)
    test = query_split("test", config.eval_canvases, seed=config.seed)
    test_queries = text(test.queries)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        train = query_split("train", config.canvases_per_epoch, seed=config.seed * 1000 + epoch)
        queries = text(train.queries)
        order = torch.randperm(len(train))
        model.train()
        bar = tqdm(range(steps), desc=f"query fusion epoch {epoch + 1}/{config.epochs}", leave=False)
        for step in bar:
            batch = order[step * config.batch_size:(step + 1) * config.batch_size]
            logits = model(train.images[batch], queries[batch])
            loss = F.cross_entropy(logits, train.labels[batch], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    return model.eval(), evaluate(model, test.images, test_queries, test.labels), seconds


def load_query_fusion(path: str | Path | None = None) -> QueryFusionViT:
    path = Path(path) if path is not None else DEFAULT_QUERY_FUSION
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise FileNotFoundError(f"query-fusion checkpoint {path} (+ .json) not found; create it with "
                                "`python -m arrcoc.bench.query_fusion`")
    meta = json.loads(path.with_suffix(".json").read_text())
    model = QueryFusionViT(load_canvas_vit(meta["backbone"]))
    weights = load_file(path)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the query-fusion model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    return model.eval()


QUICK = QueryFusionConfig(epochs=1, canvases_per_epoch=1024, eval_canvases=256)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short epoch (a smoke run), writes to runs/quick/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--backbone", type=Path, default=DEFAULT_CHECKPOINT, help="canvas ViT checkpoint")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--config", type=config_file,
                        help="YAML of defaults for these options (keys: option names with underscores)")
    args = parse_with_config(parser, argv)
    config = QUICK if args.quick else QueryFusionConfig()
    given = {"seed": args.seed, "epochs": args.epochs, "threads": args.threads}
    overrides = {k: v for k, v in given.items() if v is not None}
    config = QueryFusionConfig(**{**asdict(config), **overrides})
    torch.set_num_threads(config.threads)
    quick_out = REPO_ROOT / "runs" / "quick" / "query_fusion.safetensors"
    out = args.out or (quick_out if args.quick else DEFAULT_QUERY_FUSION)
    model, accuracy, seconds = train_query_fusion(config, args.backbone)
    backbone = args.backbone.resolve()
    meta = {
        "backbone": str(backbone.relative_to(REPO_ROOT)) if backbone.is_relative_to(REPO_ROOT) else str(backbone),
        "seed": config.seed,
        "command": " ".join(["python -m arrcoc.bench.query_fusion", *(argv if argv is not None else sys.argv[1:])]),
        "train": asdict(config),
        "test_accuracy": accuracy,
        "eval": f"{config.eval_canvases} query canvases of TEST source digits, held-out phrasings, all tokens",
        "train_seconds": round(seconds, 1),
        "versions": {"torch": torch.__version__},
    }
    save_weights_atomic(model.state_dict(), out, meta)
    print(f"query-fusion test accuracy {accuracy:.3f}; {seconds:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
