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

# 3: the relevance field last before top-K with a learned lateral kernel, the allocator's logit in its drive (issue
# 36); 2: the ablation switches under `ablate`; 1: at the config's top level
SCHEMA_VERSION = 3


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
    version = meta.get("schema_version")
    if version in (1, 2):
        raise ValueError(f"{config_file}: a checkpoint of schema version {version}, written before the relevance field "
                         f"was redesigned (schema {SCHEMA_VERSION}: a learned lateral kernel, the allocator's logit in "
                         "the field's drive): its field and allocator weights do not fit this version; retrain it "
                         "(`arrcoc bench canvas` writes the benchmark's models)")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{config_file}: checkpoint schema version {version!r}, expected {SCHEMA_VERSION}")
    weights = Path(directory) / str(meta.get("weights", ""))
    return meta, load_verified(weights, meta.get("weights_sha256"), config_file)
