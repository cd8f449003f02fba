"""Train the relevance module with local rules, on a canvas task or on your own images, on one or many processes
(``--learning backprop`` or ``global``: the references the local rules are compared with).

    arrcoc train --out runs/train                              # one process
    torchrun --standalone --nproc_per_node 4 -m arrcoc.commands.train --out runs/train   # 4 processes / GPUs
    arrcoc train --out runs/train --resume                     # continue after a crash
    arrcoc train --images photos/ --backbone vit_small_patch16_224 --weights vit_s16.safetensors --out runs/photos

On canvases the backbone is the committed canvas ViT (frozen). The task is the cluttered one (find the digit
among clutter) or the query one (a sentence, embedded by all-MiniLM-L6-v2, asks for one of several digits; the
query goes to the relevance module with every image). With ``--images DIR`` (one sub-folder per class) the
backbone is yours: a timm model name with a local weights file, or a transformers folder, each with its own
preprocessing; photos have no boxes, so the target is the backbone's CLS attention or perturbation importance,
and ``--query-file`` gives the queries (one sentence a line, taken in turn). Under ``torchrun`` every process
trains on its ``DistributedSampler`` shard of each global batch (``--batch-size`` is the global batch), the
rules' ``.grad`` is all-reduced before each optimizer step (gloo on CPU, NCCL on GPUs) and rank 0 alone writes
checkpoints: ``config.json`` + weights after every epoch (``ARRCOC.from_pretrained``), resumable training
checkpoints in ``training/``, and ``metrics.json`` (canvases: task and test accuracy at the budget and with
every token; images: what rebuilds the backbone for ``arrcoc eval --images``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

import arrcoc
from arrcoc.config import budget_argument, config_file, parse_override
from arrcoc.data.image_folder import (
    FolderImages,
    cyclic_queries,
    folder_classes,
    read_image_folder,
    read_query_file,
)
from arrcoc.data.tasks import TASKS, TaskData, task_data
from arrcoc.models.canvas_vit import DEFAULT_CHECKPOINT, load_canvas_vit
from arrcoc.models.pretrained import Backbone, load_backbone
from arrcoc.relevance import RelevanceConfig
from arrcoc.relevance.module import TARGETS
from arrcoc.storage import save_json_atomic
from arrcoc.training import LEARNING, Batch, Trainer, TrainerConfig, distributed_loader, world

from .common import add_image_folder_options, refuse_folder_options

EXAMPLES = """examples:
  arrcoc train --out runs/train                                   # cluttered task, configs/arrcoc.yaml
  arrcoc train --task query --budget 0.125 --override target=box --out runs/query
  arrcoc train --override "rules.allocator={name: backprop}" --epochs 1 --canvases 512
  torchrun --standalone --nproc_per_node 4 -m arrcoc.commands.train --out runs/train --batch-size 64
  arrcoc train --images photos/train --backbone vit_small_patch16_224 --weights vit_s16.safetensors \\
      --query-file queries.txt --target attention --out runs/photos      # your own images and backbone
  arrcoc train --images photos/train --backbone models/my-hf-vit --out runs/photos-hf   # a transformers folder
"""
PHOTO_TARGETS = ("attention", "perturbation")  # forward-only targets that need no boxes


@dataclass
class Source:
    """What a run trains on: the frozen backbone, the relevance config fitted to it, the training columns
    (``boxes`` and ``queries`` may be absent) and what ``metrics.json`` records about them."""

    backbone: nn.Module
    config: RelevanceConfig
    columns: dict[str, Tensor]  # images, labels, and boxes / queries where there are some
    record: dict[str, Any]


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


def canvas_source(args: argparse.Namespace, config: RelevanceConfig) -> Source:
    """The canvas task's training canvases on the canvas ViT."""
    refuse_folder_options(args)
    backbone = Path(args.backbone) if args.backbone else DEFAULT_CHECKPOINT
    model = load_canvas_vit(backbone)
    train = task_data(args.task, "train", args.canvases, args.seed)
    columns = {"images": train.images, "labels": train.labels, "boxes": train.boxes, "queries": train.queries}
    return Source(model, config, columns, {"task": args.task, "backbone": str(backbone)})


def resolved(path: str | Path | None) -> str | None:
    """An absolute path for metrics.json: ``arrcoc eval`` may run from another folder."""
    return None if path is None else str(Path(path).resolve())


def folder_source(args: argparse.Namespace, config: RelevanceConfig) -> Source:
    """The images of ``--images`` through the preprocessing of ``--backbone`` (a timm name or a transformers
    folder), towards a target that needs no boxes, with the queries of ``--query-file`` (if any)."""
    if config.target not in PHOTO_TARGETS:
        raise ValueError(f"photos have no boxes: training on --images takes target {' or '.join(PHOTO_TARGETS)} "
                         f"(--target), got {config.target!r}")
    if args.backbone is None or args.backbone.endswith(".safetensors"):
        raise ValueError(f"with --images, --backbone is a timm model name (its weights file as --weights) or a "
                         f"transformers folder, got {args.backbone or 'none'}")
    sentences = None if args.query_file is None else read_query_file(args.query_file)
    classes = folder_classes(args.images)
    model_args = timm_settings(args, classes)
    backbone = load_backbone(args.backbone, args.weights, len(classes), model_args)
    folder = read_image_folder(args.images, backbone.preprocess, args.max_images, args.seed)
    columns = {"images": folder.images, "labels": folder.labels}
    if sentences is not None:
        columns["queries"] = cyclic_queries(sentences, len(folder))
    record = {
        "images": resolved(args.images), "classes": folder.classes, "train_images": len(folder),
        "backbone": resolved(args.backbone) if Path(args.backbone).is_dir() else args.backbone,
        "backbone_args": model_args, "weights": resolved(args.weights), "outputs": backbone.num_classes,
        "description": backbone.description, "query_file": resolved(args.query_file), "target": config.target,
        "skipped_files": folder.skipped, "notes": folder_notes(args, backbone, folder, config.target),
    }
    # the texture stack undoes the backbone's normalisation to see the pixels' real RGB
    config = dataclasses.replace(config, pixel_mean=backbone.pixel_mean, pixel_std=backbone.pixel_std)
    return Source(backbone.model, config, columns, record)


def timm_settings(args: argparse.Namespace, classes: list[str]) -> dict[str, Any]:
    """The ``--backbone-arg`` settings for the timm model. Its head has one output per class of the folder (or
    as many as the weights file's head): ``num_classes`` may say so again, and is then left out (the folder
    gives it, also to ``arrcoc eval``), but not say otherwise. A transformers folder takes no settings at all
    (``load_backbone`` says so)."""
    settings = dict(args.backbone_arg)
    if "num_classes" in settings and not Path(args.backbone).is_dir():
        asked = settings.pop("num_classes")
        if asked != len(classes):
            raise ValueError(f"--backbone-arg num_classes={asked}: the head has one output per class of the folder "
                             f"({len(classes)} in {args.images}), or as many as the weights file's head; leave "
                             f"num_classes out")
    return settings


def folder_notes(args: argparse.Namespace, backbone: Backbone, folder: FolderImages, target: str) -> list[str]:
    """What a reader of metrics.json should know about a run on a folder: it trained anyway, but these limit
    what its evaluation can mean."""
    notes = [backbone.head_mismatch(folder.classes)]
    if args.weights is None and not Path(args.backbone).is_dir():
        notes.append("no --weights: the backbone has random weights")
    if len(folder.classes) < 2:
        notes.append(f"{len(folder.classes)} class: the labels say nothing (the {target} target needs none)")
    if folder.skipped:
        notes.append(f"{len(folder.skipped)} file(s) could not be read and were skipped")
    return [note for note in notes if note]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, default="configs/arrcoc.yaml", help="relevance config (YAML)")
    parser.add_argument("--override", type=parse_override, action="append", default=[], metavar="KEY=YAML",
                        help="change one config key (dotted), e.g. 'rules.allocator={name: backprop}'; repeatable")
    parser.add_argument("--task", choices=TASKS, default="cluttered", help="the canvas task (without --images)")
    parser.add_argument("--budget", type=budget_argument,
                        help="fraction of patch tokens kept, or their count (default: the config's)")
    parser.add_argument("--target", choices=TARGETS,
                        help=f"what the module learns to keep (default: the config's); with --images "
                             f"{' or '.join(PHOTO_TARGETS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/train"), help="checkpoint folder and metrics")
    parser.add_argument("--canvases", type=int, default=4096, help="training canvases (train source digits)")
    parser.add_argument("--test-images", type=int, default=1000, help="test canvases (test source digits)")
    add_image_folder_options(parser, "train on", "the committed canvas ViT")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning", choices=LEARNING, default="local",
                        help="local: each sub-network's own rule (the design); backprop: autograd inside the module "
                             "(the all-backprop reference); global: through the frozen backbone (DynamicViT-style)")
    parser.add_argument("--max-grad-norm", type=float, help="clip the module's gradient norm to this in every step")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="steps between training checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the newest training checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.images is None and args.canvases < args.batch_size) or args.test_images < 1:
        parser.error("need --batch-size >= 1, --canvases >= --batch-size and --test-images >= 1")
    torch.set_num_threads(args.threads)
    try:
        config = RelevanceConfig.from_yaml(args.config, args.override, args.budget)
        if args.target is not None:
            config = dataclasses.replace(config, target=args.target)
        source = folder_source(args, config) if args.images is not None else canvas_source(args, config)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as error:
        parser.error(str(error))

    device = start_processes()
    rank, world_size = world()
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world_size} processes")
    torch.manual_seed(args.seed)
    model = arrcoc.attach(source.backbone, config=source.config)
    model.to(device)
    names = [name for name, column in source.columns.items() if column is not None]
    dataset = TensorDataset(*(source.columns[name] for name in names))

    def collate(items: list[tuple[Tensor, ...]]) -> Batch:
        batch = {name: torch.stack(column).to(device) for name, column in zip(names, zip(*items))}
        return Batch(batch["images"], query=batch.get("queries"), labels=batch["labels"], boxes=batch.get("boxes"))

    loader = distributed_loader(dataset, args.batch_size // world_size, collate, seed=args.seed)
    trainer = Trainer(model, TrainerConfig(epochs=args.epochs, learning=args.learning, max_grad_norm=args.max_grad_norm,
                                           checkpoint_dir=str(args.out), checkpoint_every=args.checkpoint_every,
                                           progress=rank == 0))
    start = time.perf_counter()
    history = trainer.fit(loader, resume=args.resume)
    if rank == 0:
        metrics = {
            "command": " ".join([prog or "python -m arrcoc.commands.train", *(sys.argv[1:] if argv is None else argv)]),
            **source.record,
            "budget": source.config.budget,
            "processes": world_size,
            "device": str(device),
            "steps_this_run": len(history),
            "seconds": time.perf_counter() - start,
        }
        if args.images is None:
            metrics["test_accuracy"] = test_accuracy(model, task_data(args.task, "test", args.test_images,
                                                                      args.seed + 1), device)
        save_json_atomic(args.out / "metrics.json", metrics)
        print(summary(args, metrics))
    if dist.is_initialized():
        dist.destroy_process_group()
    return args.out


def summary(args: argparse.Namespace, metrics: dict[str, Any]) -> str:
    """What the run did and wrote, for the terminal."""
    done = f"{metrics['processes']} process(es), {metrics['steps_this_run']} steps in {metrics['seconds']:.0f} s"
    wrote = (f"wrote the checkpoint folder {args.out} (config.json + weights, training/) and "
             f"{args.out / 'metrics.json'}")
    if args.images is None:
        accuracy = metrics["test_accuracy"]
        return (f"{args.task} task, {done}; test accuracy {100 * accuracy['budget']:.1f}% at budget "
                f"{metrics['budget']:g} ({100 * accuracy['all_tokens']:.1f}% with every token)\n{wrote}")
    notes = "".join(f"\nnote: {note}" for note in metrics["notes"])
    return (f"{metrics['train_images']} images of {args.images} ({len(metrics['classes'])} classes) on "
            f"{metrics['description']}, {metrics['target']} target, {done}{notes}\n{wrote}\n"
            f"evaluate it: arrcoc eval --checkpoint {args.out} --images DIR")


if __name__ == "__main__":
    main()
