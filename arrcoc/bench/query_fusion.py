"""The query task's upper reference: ``arrcoc bench query-fusion [--quick]``.

The canvas ViT with the query's sentence embedding (all-MiniLM-L6-v2) as one extra token after CLS,
every patch token kept, fine-tuned end to end with backprop on query canvases of TRAIN source digits.
It sees the query inside every block, which no token-selection method does: the benchmark asks how
close ARR-COC, keeping 12.5% of the patches before the first block, gets to it.

Writes ``query_fusion.safetensors`` + ``.json`` (seed, command, test accuracy) next to the canvas ViT
(``runs/quick/`` with ``--quick``); :func:`arrcoc.models.query_fusion.load_query_fusion` rebuilds it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from arrcoc.bench.pretrain import CanvasTrainConfig, training_parser, training_run
from arrcoc.config import REPO_ROOT, parse_with_config
from arrcoc.data import TextEncoder, query_split
from arrcoc.models.canvas_vit import DEFAULT_CHECKPOINT, load_canvas_vit
from arrcoc.models.query_fusion import DEFAULT_QUERY_FUSION, QueryFusionViT
from arrcoc.optim import warmup_cosine
from arrcoc.reporting import command_line, run_metadata
from arrcoc.storage import save_weights_atomic


@dataclass(frozen=True)
class QueryFusionConfig(CanvasTrainConfig):
    """The canvas training settings, fewer epochs at a lower step size (the backbone starts trained); the
    evaluation canvases have held-out query phrasings."""

    epochs: int = 10
    lr: float = 1e-3


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


QUICK = QueryFusionConfig(epochs=1, canvases_per_epoch=1024, eval_canvases=256)


def main(argv: list[str] | None = None) -> None:
    parser = training_parser(__doc__, "one short epoch (a smoke run), writes to runs/quick/")
    parser.add_argument("--backbone", type=Path, default=DEFAULT_CHECKPOINT, help="canvas ViT checkpoint")
    args = parse_with_config(parser, argv)
    config, out = training_run(args, QUICK if args.quick else QueryFusionConfig(), DEFAULT_QUERY_FUSION)
    model, accuracy, seconds = train_query_fusion(config, args.backbone)
    backbone = args.backbone.resolve()
    meta = run_metadata(
        command_line("arrcoc.bench.query_fusion", argv), args.quick,
        backbone=str(backbone.relative_to(REPO_ROOT)) if backbone.is_relative_to(REPO_ROOT) else str(backbone),
        seed=config.seed,
        train=asdict(config),
        test_accuracy=accuracy,
        eval=f"{config.eval_canvases} query canvases of TEST source digits, held-out phrasings, all tokens",
        train_seconds=round(seconds, 1),
        versions={"torch": torch.__version__},
    )
    save_weights_atomic(model.state_dict(), out, meta)
    print(f"query-fusion test accuracy {accuracy:.3f}; {seconds:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
