"""The package's layering (README.md, "Where things live"): every module imports on its own (no import
cycles), and the lower layers never import the higher ones."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import arrcoc

PACKAGE = Path(arrcoc.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def test_every_module_imports_alone():
    """Each module is imported first, in a process where no other arrcoc module has been imported yet: an
    import cycle that only bites for some entry points shows up here."""
    script = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'arrcoc' or m.startswith('arrcoc.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *MODULES], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def imported_arrcoc_modules(path: Path) -> set[str]:
    """The arrcoc modules a file imports (absolute or relative), at any depth of its code."""
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("arrcoc")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module and node.module.startswith("arrcoc"):
                found.add(node.module)
    return found


# layer -> the arrcoc packages it must never import
FORBIDDEN = {
    "arrcoc.rules": ("arrcoc.backbones", "arrcoc.relevance", "arrcoc.baselines", "arrcoc.data", "arrcoc.models",
                     "arrcoc.commands", "arrcoc.bench", "arrcoc.cli"),
    "arrcoc.backbones": ("arrcoc.rules", "arrcoc.relevance", "arrcoc.baselines", "arrcoc.commands", "arrcoc.bench",
                         "arrcoc.cli"),
    "arrcoc.relevance": ("arrcoc.baselines", "arrcoc.commands", "arrcoc.bench", "arrcoc.cli"),
    "arrcoc.baselines": ("arrcoc.commands", "arrcoc.bench", "arrcoc.cli"),
    "arrcoc.data": ("arrcoc.relevance", "arrcoc.baselines", "arrcoc.commands", "arrcoc.bench", "arrcoc.cli"),
    "arrcoc.models": ("arrcoc.relevance", "arrcoc.baselines", "arrcoc.commands", "arrcoc.bench", "arrcoc.cli"),
    "arrcoc.commands": ("arrcoc.bench", "arrcoc.cli"),
}


def test_layers_import_only_what_lies_below_them():
    library = ("arrcoc.budget", "arrcoc.config", "arrcoc.storage", "arrcoc.optim", "arrcoc.metrics",
               "arrcoc.reporting", "arrcoc.training", "arrcoc.visualize")
    rules = dict(FORBIDDEN, **dict.fromkeys(library, ("arrcoc.commands", "arrcoc.bench", "arrcoc.cli")))
    broken = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        for layer, forbidden in rules.items():
            if name == layer or name.startswith(layer + "."):
                bad = sorted(m for m in imported_arrcoc_modules(path)
                             if any(m == f or m.startswith(f + ".") for f in forbidden))
                broken += [f"{name} imports {m}" for m in bad]
    assert not broken, broken
