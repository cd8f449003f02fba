"""Config files, one way: YAML read safely, unknown keys named, dotted overrides, command-line defaults.

Every command and benchmark reads its YAML through :func:`load_yaml_mapping` (``yaml.safe_load``: no Python
object is ever constructed from a file) and changes one key with :func:`apply_override`
(``--override rules.allocator={name: backprop}``); the relevance config itself is
:meth:`arrcoc.relevance.RelevanceConfig.load`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from arrcoc.budget import Budget, check_budget

REPO_ROOT = Path(__file__).resolve().parents[1]
Settings = TypeVar("Settings")


def find_config(path: str | Path) -> Path:
    """A config path as given, else relative to the source checkout (editable installs)."""
    candidate = Path(path)
    for option in (candidate, REPO_ROOT / candidate):
        if option.is_file():
            return option
    raise FileNotFoundError(f"config file {str(path)!r} not found (looked in . and {REPO_ROOT})")


def load_yaml_mapping(path: str | Path, known: Iterable[str] | None = None, what: str = "config") -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (found by :func:`find_config`); with ``known``, any other
    top-level key is an error that names the known ones. An empty file is an empty mapping."""
    found = find_config(path)
    try:
        data = yaml.safe_load(found.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{found} is not valid YAML: {error}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{found}: a {what} is a mapping of keys, got {type(data).__name__}")
    if known is not None:
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise KeyError(f"{found}: unknown {what} key(s) {unknown}; known: {sorted(known)}")
    return data


def from_mapping(cls: type[Settings], data: Mapping[str, Any], what: str) -> Settings:
    """``cls(**data)`` for a dataclass ``cls`` of settings; a key it does not know raises ``KeyError`` naming the
    known ones (``what``: what the settings are, for the message)."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise KeyError(f"unknown {what} key(s) {unknown}; known keys: {known}")
    return cls(**data)


def apply_override(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``config[a][b][c] = value`` for ``dotted = "a.b.c"``, making the mappings on the way."""
    *path, last = dotted.split(".")
    node = config
    for key in path:
        node = node.setdefault(key, {})
    node[last] = copy.deepcopy(value)


# ---- command-line arguments: bad values end in argparse's usage message, not a traceback -----------------
def parse_override(text: str) -> tuple[str, Any]:
    """argparse ``type=``: ``KEY=YAML`` (``rules.allocator={name: backprop}``) as (dotted key, value)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"an override is KEY=VALUE (VALUE in YAML), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"the value of {key.strip()!r} is not valid YAML: {error}") from None


def budget_argument(text: str) -> Budget:
    """argparse ``type=``: a budget, a fraction of the patch tokens in (0, 1] (``0.25``) or a count (``16``)."""
    try:
        value: Budget = int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget must be a fraction in (0, 1] or a whole token count, got {text!r}") from None
    try:
        return check_budget(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def config_file(text: str) -> Path:
    """argparse ``type=``: an existing config file (see :func:`find_config`)."""
    try:
        return find_config(text)
    except FileNotFoundError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, where the YAML file given as ``--config`` (if any) holds defaults for the
    other options (keys: their names with underscores, e.g. ``test_images: 500``); the command line wins."""
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    try:
        values = load_yaml_mapping(args.config, known=actions, what="setting")
    except (KeyError, ValueError) as error:
        parser.error(str(error).strip('"'))
    defaults = {}
    for key, value in values.items():
        convert = actions[key].type or (lambda text: text)
        try:
            defaults[key] = [convert(str(v)) for v in value] if isinstance(value, list) else (
                value if isinstance(value, bool) or value is None else convert(str(value)))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
            parser.error(f"{args.config}: {key}: {error}")
        if actions[key].choices is not None and defaults[key] not in actions[key].choices:
            parser.error(f"{args.config}: {key} must be one of {list(actions[key].choices)}, got {value!r}")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)
