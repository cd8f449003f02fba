"""Checkpoint folders of a relevance module: safetensors weights + ``config.json``, crash-safe and verified.

The weights go to a new file named by their hash; only then is ``config.json`` atomically replaced to point at
it (with the schema version and the weights' sha256), and the old weights removed. A crash at any moment
leaves a ``config.json`` that points at complete weights. Reading checks the schema, the checksum and that the
weights are safetensors: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from arrcoc.storage import atomic_write, load_verified, read_json_object, sha256

from .module import nest_ablation_switches

SCHEMA_VERSION = 2  # 2: the relevance config's ablation switches under `ablate` (1: at its top level; still read)


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
    config_file = Path(directory) / "config.json"
    meta = read_json_object(config_file, "checkpoint folder")
    if meta.get("schema_version") not in (1, SCHEMA_VERSION):
        raise ValueError(
            f"{config_file}: checkpoint schema version {meta.get('schema_version')!r}, expected {SCHEMA_VERSION} (or 1)"
        )
    weights = Path(directory) / str(meta.get("weights", ""))
    tensors = load_verified(weights, meta.get("weights_sha256"), config_file)
    return (_from_schema_1(meta) if meta["schema_version"] == 1 else meta), tensors


def _from_schema_1(meta: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 ``config.json`` in today's form: the relevance config (a VLM config's ``relevance``) nested."""
    config = meta.get("config")
    if not isinstance(config, dict):
        return meta  # the config's own reader says what is wrong with it
    if isinstance(config.get("relevance"), dict):  # a VLMConfig; a relevance config has no such key
        config = {**config, "relevance": nest_ablation_switches(config["relevance"])}
    else:
        config = nest_ablation_switches(config)
    return {**meta, "config": config, "schema_version": SCHEMA_VERSION}
