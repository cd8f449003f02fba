"""The package's layering (README.md, "Where things live"): every module imports on its own, no module
imports itself through others (no import cycle), and the lower layers never import the higher ones."""

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


MODULE_FILES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
MODULES = sorted(MODULE_FILES)


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


def import_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of what ``from <base> import ...`` names, in a module of ``package``."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[:len(parts) - node.level + 1]  # one dot is the package itself, each further dot its parent
    return ".".join(parts + ([node.module] if node.module else []))


def imported_arrcoc_modules(path: Path) -> set[str]:
    """The arrcoc modules a file imports, absolute or relative, at any depth of its code (``if TYPE_CHECKING:``
    included). ``from P import name`` imports the submodule ``P.name`` where there is one, else the package
    ``P`` (its __init__.py). The packages above an imported module, which Python imports first on its own,
    are not counted: they are not what the file asked for."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = import_base(node, package)
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULE_FILES else base
                      for alias in node.names}
    return {m for m in found if m == "arrcoc" or m.startswith("arrcoc.")}


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the import graph as its chain of modules (the first one again at the end), or None."""
    finished: set[str] = set()
    chain: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in chain:
            return chain[chain.index(module):] + [module]
        if module in finished:
            return None
        chain.append(module)
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported):
                return cycle
        chain.pop()
        finished.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def test_no_module_imports_itself_through_others():
    """No import cycle, not even one under ``if TYPE_CHECKING:`` or through a package's __init__.py (e.g.
    ``arrcoc.relevance.attach`` importing ``from arrcoc.relevance import X``): the import order of any
    entry point then cannot matter, and each layer reads from the bottom up."""
    graph = {name: imported_arrcoc_modules(path) for name, path in MODULE_FILES.items()}
    unknown = sorted({m for imported in graph.values() for m in imported} - set(MODULE_FILES))
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    cycle = import_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


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
