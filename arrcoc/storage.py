"""Files that are never half-written and never unpickled: atomic writes, checksummed safetensors, JSON.

Every file arrcoc saves (checkpoints, benchmark results, pretrained backbones) goes through
:func:`atomic_write`: written under a temporary name beside its destination, then renamed over it, so a
process killed at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(temporary name)`` beside ``path``, then rename it over ``path``; nothing is left half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); a saved file gets the usual mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json_atomic(path: Path, data: object) -> None:
    """``data`` as indented JSON in ``path``, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def save_weights_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """``path`` (.safetensors) and its ``.json`` twin (``metadata``), each written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))
    save_json_atomic(path.with_suffix(".json"), metadata)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``, or a clear error naming ``what`` was expected there."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not an arrcoc {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, or a clear error if it is not one (nothing is ever unpickled)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error type for a malformed header
        raise ValueError(f"{path} is not a valid safetensors file: {err}") from err


def load_verified(path: Path, expected_sha256: str | None, named_in: Path) -> dict[str, Tensor]:
    """The tensors of the safetensors file ``path`` that ``named_in`` names, after checking its checksum."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} named in {named_in} is missing")
    if sha256(path) != expected_sha256:
        raise ValueError(f"{path} does not match the checksum in {named_in}: corrupted or replaced")
    return load_safetensors(path)
