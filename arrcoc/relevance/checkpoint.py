"""Checkpoint folders of a relevance module: safetensors weights + ``config.json``, crash-safe and verified.

The weights go to a new file named by their hash; only then is ``config.json`` atomically replaced to point at
it (with the schema version and the weights' sha256), and the old weights removed. A crash at any moment
leaves a ``config.json`` that points at complete weights. Reading checks the schema, the checksum and that the
weights are safetensors: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

SCHEMA_VERSION = 1


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


def write_checkpoint(directory: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and ``meta`` (plus schema version, weights file name and checksum) into ``directory``."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    staging = path / "relevance.safetensors.partial"
    atomic_write(staging, lambda tmp: save_file(tensors, tmp))
    digest = sha256(staging)
    weights = path / f"relevance-{digest[:16]}.safetensors"
    os.replace(staging, weights)
    config_file = path / "config.json"
    previous = json.loads(config_file.read_text()).get("weights") if config_file.is_file() else None
    meta = {"schema_version": SCHEMA_VERSION, **meta, "weights": weights.name, "weights_sha256": digest}
    atomic_write(config_file, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    if previous and previous != weights.name and (path / previous).is_file():
        (path / previous).unlink()


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``config.json`` and the weights of a checkpoint folder, verified: schema version, checksum, and a
    weights file that is safetensors."""
    path = Path(directory)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: not an arrcoc checkpoint folder")
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{config_file}: checkpoint schema version {meta.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    weights = path / str(meta.get("weights", ""))
    if not weights.is_file():
        raise FileNotFoundError(f"weights file {weights} named in {config_file} is missing")
    if sha256(weights) != meta.get("weights_sha256"):
        raise ValueError(f"{weights} does not match the checksum in {config_file}: corrupted or replaced")
    try:
        tensors = load_file(weights)
    except Exception as err:  # safetensors raises its own error type for a malformed header
        raise ValueError(f"{weights} is not a valid safetensors file: {err}") from err
    return meta, tensors
