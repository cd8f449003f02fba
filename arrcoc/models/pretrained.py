"""Your own backbone, built offline: a timm model name (+ a local weights file) or a transformers folder, with
the preprocessing it was trained with.

    backbone = load_backbone("vit_small_patch16_224", weights="vit_s16.safetensors", num_classes=3)
    backbone = load_backbone("models/my-vit")   # config.json + weights + preprocessor_config.json
    model = arrcoc.attach(backbone.model, config=replace(config, pixel_mean=backbone.pixel_mean, ...))

Nothing is downloaded and nothing but tensors is read from a file: timm models are built with
``pretrained=False`` and take their weights from the file given (safetensors, or a PyTorch state dict read
with ``torch.load(weights_only=True)``); transformers folders are read with ``local_files_only=True`` and never
run code shipped in the folder (``trust_remote_code=False``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import Tensor, nn

from arrcoc.backbones import adapt_backbone
from arrcoc.storage import load_safetensors

__all__ = ["Backbone", "load_backbone", "read_state_dict"]

NESTED_STATE_KEYS = ("state_dict", "model")  # training scripts often save {"model": state_dict, "optimizer": ...}
SHOWN_MISMATCHES = 4


@dataclass
class Backbone:
    """A frozen model, how its inputs are made, and what it outputs."""

    model: nn.Module  # eval mode
    preprocess: Callable[[Image.Image], Tensor]  # a PIL RGB image -> (C, H, W), resized and normalised
    pixel_mean: tuple[float, float, float]  # the normalisation ``preprocess`` applies
    pixel_std: tuple[float, float, float]
    description: str
    num_classes: int | None  # outputs of the classification head; None: a headless model (it returns features)

    def head_mismatch(self, classes: list[str]) -> str | None:
        """Why the model's outputs cannot be read as these classes, or None when the head has one output per class
        (taken to be the classes in the folder's sorted order)."""
        if self.num_classes is None:
            return (f"{self.description} is headless (it outputs features): accuracy is not defined, only the "
                    f"agreement with the full-token prediction is")
        if self.num_classes != len(classes):
            return (f"the head of {self.description} has {self.num_classes} outputs, the folder {len(classes)} "
                    f"classes: accuracy is not defined, only the agreement with the full-token prediction is")
        return None


def load_backbone(name_or_dir: str | Path, weights: str | Path | None = None, num_classes: int | None = None,
                  model_args: dict[str, Any] | None = None) -> Backbone:
    """A timm model or a transformers folder, with its own preprocessing, checked to be one ARR-COC supports.

    Args:
        name_or_dir: an existing folder (a transformers model: config.json, weights, preprocessor_config.json),
            else a timm model name (``timm.list_models()``), optionally with a pretrained tag.
        weights: timm only: a ``.safetensors`` file or a ``.pth`` / ``.pt`` state dict (possibly under
            "state_dict" or "model"); without it the weights are random.
        num_classes: timm only: outputs of the head (e.g. the classes of your folder), unless the weights
            have a head of another size (then theirs) or none (then a headless model).
        model_args: timm only: architecture settings for ``timm.create_model`` (``img_size=384``, ...).

    Raises:
        FileNotFoundError: a missing weights file, or a folder without config.json / preprocessor_config.json.
        ValueError: an unknown timm name, weights that do not fit the architecture, preprocessing that does
            not make images of the model's input size.
        TypeError: an architecture ARR-COC does not support (from :func:`arrcoc.backbones.adapt_backbone`).
    """
    folder = Path(name_or_dir)
    if folder.is_dir():
        if weights is not None or model_args:
            raise ValueError(f"{folder} is a transformers folder: it holds its own weights and architecture; "
                             f"a weights file and model settings are for timm model names, got weights={weights} "
                             f"and settings {model_args or {}}")
        backbone = _transformers_backbone(folder)
    else:
        backbone = _timm_backbone(str(name_or_dir), None if weights is None else Path(weights), num_classes,
                                  model_args or {})
    _check_input_size(backbone)
    return backbone


# ---- weights files -----------------------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file or of a PyTorch state dict (``torch.load(weights_only=True)``
    rebuilds tensors and plain containers only, never an arbitrary object); a training script's checkpoint may
    hold the state dict under "state_dict" or "model"."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found (expected a .safetensors, .pth or .pt file)")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"weights must be a .safetensors, .pth or .pt file, got {path.name}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load's refusal is an UnpicklingError; a truncated file, EOFError or others
        raise ValueError(f"{path} is not a plain PyTorch state dict (read with weights_only=True, which refuses "
                         f"anything but tensors and containers): {_refusal(error)}") from None
    for key in NESTED_STATE_KEYS:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(value, Tensor) for value in data.values()):
        raise ValueError(f"{path} must hold a state dict (parameter name -> tensor), possibly under "
                         f"{' or '.join(NESTED_STATE_KEYS)}, got {type(data).__name__}")
    return data


def _refusal(error: Exception) -> str:
    """The reason in torch.load's refusal, without its advice to load the file with weights_only=False."""
    text = str(error)
    _, found, after = text.partition("Unpickler error:")
    lines = [line.strip() for line in (after if found else text).splitlines() if line.strip()]
    return lines[0].split(". ")[0] if lines else type(error).__name__


def _mismatch_error(path: Path, what: str, rows: list[tuple[str, Any, Any]], total: int, hint: str) -> ValueError:
    """A ValueError naming the first mismatched tensors as ``key: model SHAPE vs file SHAPE``."""
    shown = "; ".join(f"{key}: model {model} vs file {stored}" for key, model, stored in rows[:SHOWN_MISMATCHES])
    return ValueError(f"weights {path} do not fit {what}: {len(rows)} of {total} tensors differ ({shown}); {hint}")


def _shape(tensor: Tensor | None) -> tuple[int, ...] | str:
    return "missing" if tensor is None else tuple(tensor.shape)


# ---- timm --------------------------------------------------------------------------------------------------
def _create_timm(name: str, num_classes: int | None, model_args: dict[str, Any]) -> nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ValueError(
            f"{name!r} is neither a folder nor a timm model name" + (f" (close: {', '.join(close)})" if close else "")
            + "; list the names with `python -c \"import timm; print(timm.list_models('vit_*'))\"` (a weights "
              "file goes in weights / --weights, with the model's name as the backbone)")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=False, **extra, **model_args)
    except TypeError as error:
        raise ValueError(f"timm model {name!r} cannot be built with the settings {model_args}: {error}") from None


def _load_timm_weights(model: nn.Module, name: str, path: Path) -> None:
    """Load the state dict at ``path`` into ``model``: the head follows the file (its size, or no head), every
    other tensor must fit exactly."""
    state = read_state_dict(path)
    head = model.pretrained_cfg.get("classifier", "head")
    head = head[0] if isinstance(head, list | tuple) else head
    head_weight = state.get(f"{head}.weight")
    outputs = 0 if head_weight is None else head_weight.shape[0]
    if outputs != model.num_classes:
        model.reset_classifier(outputs)
    expected = model.state_dict()
    keys = [*expected, *(key for key in state if key not in expected)]  # the model's order: embeddings first
    rows = [(key, _shape(expected.get(key)), _shape(state.get(key))) for key in keys
            if _shape(expected.get(key)) != _shape(state.get(key))]
    if rows:
        raise _mismatch_error(path, f"timm {name}", rows, len(expected), "architecture settings (img_size, "
                              "patch_size, ...) go in model_args / --backbone-arg KEY=VALUE")
    model.load_state_dict(state)


def _timm_backbone(name: str, weights: Path | None, num_classes: int | None, model_args: dict[str, Any]) -> Backbone:
    model = _create_timm(name, num_classes, model_args)
    if weights is not None:
        _load_timm_weights(model, name, weights)
    # timm's pretrained config states the size the weights were published at, not the one this model was
    # built with (img_size=...): the transform must make the model's own input size
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    data = resolve_data_config({} if size is None else {"input_size": (3, *size)}, model=model)
    description = f"timm {name}" + ("" if weights is None else f" with the weights {weights}")
    return Backbone(model.eval(), create_transform(**data), tuple(data["mean"]), tuple(data["std"]), description,
                    model.num_classes or None)


# ---- transformers ------------------------------------------------------------------------------------------
def _transformers_backbone(folder: Path) -> Backbone:
    """``AutoModelForImageClassification`` for a folder saved from a classifier, else ``AutoModel`` (a headless
    vision model), and ``AutoImageProcessor``; from the folder alone, running none of its code."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    for needed in ("config.json", "preprocessor_config.json"):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{folder} is not a transformers model folder: it has no {needed} (expected "
                                    f"what model.save_pretrained and image_processor.save_pretrained write)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    classifier = any(name.endswith("ForImageClassification") for name in config.architectures or [])
    auto = AutoModelForImageClassification if classifier else AutoModel
    model, info = auto.from_pretrained(folder, local_files_only=True, trust_remote_code=False, output_loading_info=True,
                                       ignore_mismatched_sizes=True)  # mismatches are reported below, by name
    rows = [(key, tuple(model_shape), tuple(file_shape)) for key, file_shape, model_shape in info["mismatched_keys"]]
    rows += [(key, "present", "missing") for key in info["missing_keys"]]
    if rows:
        raise _mismatch_error(folder, f"the {type(model).__name__} its config.json describes", sorted(rows),
                              len(model.state_dict()), "save the model and its config together with save_pretrained")
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    normalises = getattr(processor, "do_normalize", False)
    mean = tuple(processor.image_mean) if normalises else (0.0, 0.0, 0.0)
    std = tuple(processor.image_std) if normalises else (1.0, 1.0, 1.0)

    def preprocess(image: Image.Image) -> Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    return Backbone(model.eval(), preprocess, mean, std, f"transformers {type(model).__name__} from {folder}",
                    config.num_labels if classifier else None)


def _check_input_size(backbone: Backbone) -> None:
    """Refuse preprocessing that makes images of another size than a fixed-size model takes (it would fail on
    the first batch); an unsupported architecture fails here too, with adapt_backbone's message."""
    adapter = adapt_backbone(backbone.model)
    made = tuple(backbone.preprocess(Image.new("RGB", (97, 61))).shape[-2:])
    if not adapter.dynamic_size and made != tuple(adapter.image_size):
        raise ValueError(f"the preprocessing of {backbone.description} makes {made[0]}x{made[1]} images, but the "
                         f"model takes {adapter.image_size[0]}x{adapter.image_size[1]}")
