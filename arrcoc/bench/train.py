"""Train the relevance module on a canvas task with local rules, on one or many processes.

    python -m arrcoc.bench.train --out runs/train                              # one process
    torchrun --standalone --nproc_per_node 4 -m arrcoc.bench.train --out runs/train   # 4 processes / GPUs
    python -m arrcoc.bench.train --out runs/train --resume                     # continue after a crash

The backbone is the committed canvas ViT (frozen). The task is the cluttered one (find the digit among
clutter) or the query one (a sentence, embedded by all-MiniLM-L6-v2, asks for one of several digits; the
query goes to the relevance module with every image). Under ``torchrun`` every process trains on its
``DistributedSampler`` shard of each global batch (``--batch-size`` is the global batch), the rules' ``.grad``
is all-reduced before each optimizer step (gloo on CPU, NCCL on GPUs) and rank 0 alone writes checkpoints:
``config.json`` + weights after every epoch (``ARRCOC.from_pretrained``), resumable training checkpoints in
``training/``, and ``metrics.json`` (task, test accuracy at the budget and with every token).
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
from tqdm import tqdm

import arrcoc
from arrcoc.bench.canvas import TASKS, TaskData, task_data
from arrcoc.bench.common import budget_fraction, config_file, save_json_atomic
from arrcoc.bench.pretrain import DEFAULT_CHECKPOINT, load_canvas_vit
from arrcoc.bench.sweep import apply_override, parse_override
from arrcoc.relevance import RelevanceConfig
from arrcoc.relevance.trainer import Batch, Trainer, TrainerConfig, distributed_loader, world

EXAMPLES = """examples:
  arrcoc train --out runs/train                                   # cluttered task, configs/arrcoc.yaml
  arrcoc train --task query --budget 0.125 --override target=box --out runs/query
  arrcoc train --override "rules.allocator={name: backprop}" --epochs 1 --images 512
  torchrun --standalone --nproc_per_node 4 -m arrcoc.bench.train --out runs/train --batch-size 64
"""


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
def test_accuracy(model: arrcoc.ARRCOC, data: TaskData, device: torch.device) -> dict[str, float]:
    reduced, full = [], []
    for start in tqdm(range(0, len(data), 200), desc="test", leave=False):
        batch = data.batch(slice(start, start + 200))
        images = batch.images.to(device)
        query = None if batch.queries is None else batch.queries.to(device)
        reduced.append(model(images, query).argmax(-1).cpu())
        full.append(model.adapter(images).argmax(-1).cpu())
    return {"budget": (torch.cat(reduced) == data.labels).float().mean().item(),
            "all_tokens": (torch.cat(full) == data.labels).float().mean().item()}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, default="configs/arrcoc.yaml", help="relevance config (YAML)")
    parser.add_argument("--override", type=parse_override, action="append", default=[], metavar="KEY=YAML",
                        help="change one config key (dotted), e.g. 'rules.allocator={name: backprop}'; repeatable")
    parser.add_argument("--task", choices=TASKS, default="cluttered")
    parser.add_argument("--budget", type=budget_fraction, help="fraction of patch tokens kept (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("runs/train"), help="checkpoint folder and metrics")
    parser.add_argument("--images", type=int, default=4096, help="training canvases (train source digits)")
    parser.add_argument("--test-images", type=int, default=1000, help="test canvases (test source digits)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=20, help="steps between training checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the newest training checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--backbone", type=Path, default=DEFAULT_CHECKPOINT, help="canvas ViT (.safetensors)")
    return parser


def load_relevance_config(path: Path, overrides: list[tuple[str, object]], budget: float | None) -> RelevanceConfig:
    """The YAML config with the dotted ``overrides`` applied and, if given, the budget replaced."""
    config = RelevanceConfig.from_yaml(path).to_dict()
    for dotted, value in overrides:
        apply_override(config, dotted, value)
    if budget is not None:
        config["budget"] = budget
    return RelevanceConfig.from_dict(config)


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.images < args.batch_size or args.test_images < 1:
        parser.error("need --batch-size >= 1, --images >= --batch-size and --test-images >= 1")
    try:
        config = load_relevance_config(args.config, args.override, args.budget)
        backbone = load_canvas_vit(args.backbone)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as error:
        parser.error(str(error))

    torch.set_num_threads(args.threads)
    device = start_processes()
    rank, world_size = world()
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world_size} processes")
    torch.manual_seed(args.seed)
    model = arrcoc.attach(backbone, budget=config.budget, config=config)
    model.to(device)
    train = task_data(args.task, "train", args.images, args.seed)
    columns = [train.images, train.labels, train.boxes] + ([] if train.queries is None else [train.queries])
    dataset = TensorDataset(*columns)

    def collate(items: list[tuple[Tensor, ...]]) -> Batch:
        images, labels, boxes, *query = (torch.stack(column).to(device) for column in zip(*items))
        return Batch(images, query=query[0] if query else None, labels=labels, boxes=boxes)

    loader = distributed_loader(dataset, args.batch_size // world_size, collate, seed=args.seed)
    trainer = Trainer(model, TrainerConfig(epochs=args.epochs, checkpoint_dir=str(args.out),
                                           checkpoint_every=args.checkpoint_every, progress=rank == 0))
    start = time.perf_counter()
    history = trainer.fit(loader, resume=args.resume)
    if rank == 0:
        test = task_data(args.task, "test", args.test_images, args.seed + 1)
        metrics = {
            "command": " ".join([prog or "python -m arrcoc.bench.train", *(sys.argv[1:] if argv is None else argv)]),
            "task": args.task,
            "budget": config.budget,
            "backbone": str(args.backbone),
            "processes": world_size,
            "device": str(device),
            "steps_this_run": len(history),
            "seconds": time.perf_counter() - start,
            "test_accuracy": test_accuracy(model, test, device),
        }
        save_json_atomic(args.out / "metrics.json", metrics)
        accuracy = metrics["test_accuracy"]
        print(f"{args.task} task, {world_size} process(es), {len(history)} steps in {metrics['seconds']:.0f} s; "
              f"test accuracy {100 * accuracy['budget']:.1f}% at budget {config.budget:g} "
              f"({100 * accuracy['all_tokens']:.1f}% with every token)\n"
              f"wrote the checkpoint folder {args.out} (config.json + weights, training/) and "
              f"{args.out / 'metrics.json'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return args.out


if __name__ == "__main__":
    main()
