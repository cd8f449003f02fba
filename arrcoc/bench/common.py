"""Small helpers shared by the benchmark commands."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def find_config(path: str | Path) -> Path:
    """A config path as given, else relative to the source checkout (editable installs)."""
    candidate = Path(path)
    for option in (candidate, REPO_ROOT / candidate):
        if option.is_file():
            return option
    raise FileNotFoundError(f"config file {str(path)!r} not found (looked in . and {REPO_ROOT})")


def save_json_atomic(path: Path, data: object) -> None:
    """Write to a temporary file beside ``path`` and rename it over: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
