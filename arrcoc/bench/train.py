"""Train the relevance module on cluttered canvases with local rules, on one or many processes.

    python -m arrcoc.bench.train --out runs/train                              # one process
    torchrun --standalone --nproc_per_node 4 -m arrcoc.bench.train --out runs/train   # 4 processes / GPUs
    python -m arrcoc.bench.train --out runs/train --resume                     # continue after a crash

The backbone is the committed canvas ViT (frozen). Under ``torchrun`` every process trains on its
``DistributedSampler`` shard of each global batch (``--batch-size`` is the global batch), the rules' ``.grad``
is all-reduced before each optimizer step (gloo on CPU, NCCL on GPUs) and rank 0 alone writes checkpoints:
``config.json`` + weights after every epoch, resumable training checkpoints in ``training/``, and
``metrics.json`` (test accuracy at the budget and with every token).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import TensorDataset

import arrcoc
from arrcoc.bench.common import find_config, save_json_atomic
from arrcoc.bench.pretrain import DEFAULT_CHECKPOINT, load_canvas_vit
from arrcoc.data.canvas import cluttered_split
from arrcoc.relevance import RelevanceConfig
from arrcoc.relevance.trainer import Batch, Trainer, TrainerConfig, distributed_loader, world


def start_processes() -> torch.device:
    """Join the process group torchrun describes (if any); the device this process trains on."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


@torch.no_grad()
def test_accuracy(model: arrcoc.ARRCOC, images: Tensor, labels: Tensor, device: torch.device) -> dict[str, float]:
    reduced, full = [], []
    for chunk in images.split(200):
        chunk = chunk.to(device)
        reduced.append(model(chunk).argmax(-1).cpu())
        full.append(model.adapter(chunk).argmax(-1).cpu())
    return {"budget": (torch.cat(reduced) == labels).float().mean().item(),
            "all_tokens": (torch.cat(full) == labels).float().mean().item()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/arrcoc.yaml", help="relevance config (YAML)")
    parser.add_argument("--out", type=Path, default=Path("runs/train"), help="checkpoints and metrics")
    parser.add_argument("--images", type=int, default=4096, help="training canvases (train source digits)")
    parser.add_argument("--test-images", type=int, default=1000, help="test canvases (test source digits)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=20, help="steps between training checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the newest training checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--backbone", type=Path, default=DEFAULT_CHECKPOINT, help="canvas ViT (.safetensors)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = start_processes()
    rank, world_size = world()
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world_size} processes")
    torch.manual_seed(args.seed)
    config = RelevanceConfig.from_yaml(find_config(args.config))
    model = arrcoc.attach(load_canvas_vit(args.backbone), budget=config.budget, config=config)
    model.to(device)
    canvases = cluttered_split("train", args.images, seed=args.seed)
    dataset = TensorDataset(canvases.images, canvases.labels, canvases.boxes)

    def collate(items: list[tuple[Tensor, ...]]) -> Batch:
        images, labels, boxes = (torch.stack(column).to(device) for column in zip(*items))
        return Batch(images, labels=labels, boxes=boxes)

    loader = distributed_loader(dataset, args.batch_size // world_size, collate, seed=args.seed)
    trainer = Trainer(model, TrainerConfig(epochs=args.epochs, checkpoint_dir=str(args.out),
                                           checkpoint_every=args.checkpoint_every, progress=rank == 0))
    start = time.perf_counter()
    history = trainer.fit(loader, resume=args.resume)
    if rank == 0:
        test = cluttered_split("test", args.test_images, seed=args.seed + 1)
        metrics = {
            "command": " ".join(["python -m arrcoc.bench.train", *(argv if argv is not None else sys.argv[1:])]),
            "processes": world_size,
            "device": str(device),
            "steps_this_run": len(history),
            "seconds": time.perf_counter() - start,
            "test_accuracy": test_accuracy(model, test.images, test.labels, device),
        }
        save_json_atomic(args.out / "metrics.json", metrics)
        print(f"{world_size} process(es), {len(history)} steps in {metrics['seconds']:.0f} s; test accuracy "
              f"{metrics['test_accuracy']}; wrote {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
