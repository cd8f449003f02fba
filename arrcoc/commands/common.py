"""What the commands share: the options of a command on a trained checkpoint, and loading the checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from arrcoc.config import REPO_ROOT, config_file, parse_override
from arrcoc.data.tasks import TASKS, shared_text_encoder
from arrcoc.models.canvas_vit import load_canvas_vit
from arrcoc.models.pretrained import Backbone, load_backbone
from arrcoc.relevance import ARRCOC
from arrcoc.storage import read_json_object

TRAINED_MODELS = REPO_ROOT / "benchmarks" / "results" / "models"  # written by `arrcoc bench canvas`


def checkpoint_parser(prog: str | None, doc: str, examples: str, config_example: str) -> argparse.ArgumentParser:
    """The options every command on a trained checkpoint shares (eval, adapt)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="folder written by `arrcoc train`")
    parser.add_argument("--config", type=config_file, help=f"YAML of defaults for these options, e.g. "
                                                            f"{config_example} (the command line wins)")
    parser.add_argument("--task", choices=TASKS, help="default: the task in the checkpoint's metrics.json, "
                                                      "else cluttered")
    return parser


FOLDER_OPTIONS = ("weights", "backbone_arg", "query_file", "max_images")  # meaningful with --images only


def add_image_folder_options(parser: argparse.ArgumentParser, verb: str, default: str) -> None:
    """The options that point a command at your own images and backbone instead of the canvases (train, eval).

    Args:
        parser: the command's parser.
        verb: what the command does with the images ("train on", "score").
        default: where the backbone comes from without ``--backbone`` ("the committed canvas ViT",
            "the checkpoint's").
    """
    parser.add_argument("--images", type=Path, metavar="DIR",
                        help=f"{verb} your own images instead of canvases: a folder with one sub-folder per class")
    parser.add_argument("--max-images", type=int, help="with --images: read at most this many (a random sample)")
    parser.add_argument("--backbone", help=f"default: {default}; a canvas ViT (.safetensors), or with --images a "
                                           "timm model name or a transformers folder")
    parser.add_argument("--weights", type=Path,
                        help="the timm model's weights (.safetensors, or a .pth / .pt state dict read with "
                             f"weights_only=True; default: {default}, else random)")
    parser.add_argument("--backbone-arg", type=parse_override, action="append", default=[], metavar="KEY=YAML",
                        help=f"an architecture setting of the timm model, e.g. img_size=384 (default: {default}); "
                             "repeatable")
    parser.add_argument("--query-file", type=Path,
                        help=f"with --images: query sentences, one a line, taken in turn (default: {default}, "
                             "else none)")


def refuse_folder_options(args: argparse.Namespace) -> None:
    """A ValueError naming the options given that only go with ``--images`` (the canvases take none of them)."""
    given = [f"--{name.replace('_', '-')}" for name in FOLDER_OPTIONS if getattr(args, name)]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --images DIR (your own images); the canvas tasks take none "
                         f"of these options")
    if args.backbone is not None and not str(args.backbone).endswith(".safetensors"):
        raise ValueError(f"the canvas tasks run on a canvas ViT (a .safetensors file), got --backbone "
                         f"{args.backbone}; a timm model name or a transformers folder needs --images DIR")


def training_record(parser: argparse.ArgumentParser, folder: Path) -> dict[str, Any]:
    """What ``arrcoc train`` recorded beside the checkpoint ``folder`` (``metrics.json``, or {})."""
    if not folder.is_dir():
        parser.error(f"checkpoint folder {folder} does not exist (write one with `arrcoc train --out {folder}`)")
    metrics = folder / "metrics.json"
    try:
        return read_json_object(metrics, "training record") if metrics.is_file() else {}
    except ValueError as error:
        parser.error(str(error))


def load_checkpoint(parser: argparse.ArgumentParser, folder: Path, backbone: Path | None
                    ) -> tuple[ARRCOC, dict[str, Any]]:
    """The checkpoint on its canvas ViT, and what ``arrcoc train`` recorded beside it (``metrics.json``, or {}).
    Bad input ends in ``parser.error``: a clear message and exit status 2."""
    trained = training_record(parser, folder)
    if backbone is None and "images" in trained:
        parser.error(f"{folder} was trained on the images in {trained['images']} with the backbone "
                     f"{trained['backbone']}, not on canvases: evaluate it with `arrcoc eval --checkpoint {folder} "
                     f"--images DIR`")
    try:
        model = ARRCOC.from_pretrained(folder, load_canvas_vit(backbone or trained.get("backbone")))
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    return model, trained


def load_folder_checkpoint(parser: argparse.ArgumentParser, folder: Path, backbone: str | None = None,
                           weights: Path | None = None, model_args: dict[str, Any] | None = None
                           ) -> tuple[ARRCOC, Backbone, dict[str, Any]]:
    """A checkpoint of ``arrcoc train --images`` on the backbone its ``metrics.json`` records (name or folder,
    weights, architecture settings), and that record. ``backbone`` replaces the recorded one (with its own
    ``weights`` and ``model_args``); ``weights`` or ``model_args`` alone replace the recorded ones. Bad input ends in
    ``parser.error``."""
    trained = training_record(parser, folder)
    if backbone is None and "images" not in trained:
        parser.error(f"{folder} was not trained on images (no images in its metrics.json): give the backbone to run "
                     f"it on, --backbone NAME_OR_DIR (a timm model name or a transformers folder)")
    if backbone is None:
        backbone, outputs = trained["backbone"], trained.get("outputs")
        weights, model_args = weights or trained.get("weights"), model_args or trained.get("backbone_args")
    else:
        outputs = None  # a new backbone: its weights decide the head
    try:
        loaded = load_backbone(backbone, weights, outputs, model_args)
        model = ARRCOC.from_pretrained(folder, loaded.model)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as error:
        parser.error(str(error))
    return model, loaded, trained


def load_trained_arrcoc(task: str, directory: str | Path | None = None, backbone: str | Path | None = None) -> ARRCOC:
    """The ARR-COC model the canvas benchmark trained for ``task`` ("cluttered" or "query"; its first seed),
    on the canvas ViT at ``backbone`` (default: the committed one). ``directory``: the benchmark's models
    folder (default ``benchmarks/results/models``; ``runs/quick/models`` after ``arrcoc bench --quick``);
    the model is ``directory/task``. The query task's model gets the MiniLM text encoder, so that it takes
    sentences as queries."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    folder = (Path(directory) if directory is not None else TRAINED_MODELS) / task
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained ARR-COC model for the {task} task in {folder}: `arrcoc bench canvas` writes it to "
            f"{TRAINED_MODELS.relative_to(REPO_ROOT)}/{task} (`arrcoc bench --quick` to runs/quick/models/{task})"
        )
    text_encoder = shared_text_encoder() if task == "query" else None
    return ARRCOC.from_pretrained(folder, load_canvas_vit(backbone), text_encoder=text_encoder)
