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


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a checkpoint's description), or a clear error naming ``what`` was expected."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not an arrcoc {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_verified(path: Path, expected_sha256: str | None, named_in: Path) -> dict[str, Tensor]:
    """The tensors of the safetensors file ``path`` that ``named_in`` names, after checking its checksum."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} named in {named_in} is missing")
    if sha256(path) != expected_sha256:
        raise ValueError(f"{path} does not match the checksum in {named_in}: corrupted or replaced")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error type for a malformed header
        raise ValueError(f"{path} is not a valid safetensors file: {err}") from err


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``config.json`` and the weights of a checkpoint folder, verified: schema version, checksum, and a
    weights file that is safetensors."""
    config_file = Path(directory) / "config.json"
    meta = read_json_object(config_file, "checkpoint folder")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{config_file}: checkpoint schema version {meta.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    weights = Path(directory) / str(meta.get("weights", ""))
    return meta, load_verified(weights, meta.get("weights_sha256"), config_file)
