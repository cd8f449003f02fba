"""The field's relaxation before and after issue 21's rewrite (analytic state gradient, checks every few steps),
in one process, interleaved, medians; see docs/decisions.md "The relaxation, made cheap".

    .venv/bin/python benchmarks/relaxation_speed.py [--before REV] [--device cpu|cuda] [--rounds R] [--canvases N]
        [--vit-batches 1 16] [--canvas-batches 1 16 256]

"Before" is ``relax`` and ``RelevanceField.energy`` as of git revision REV (loaded from ``git show``), run on the
same field parameters and inputs as "after" (the working tree). Timed: ``relax`` on the field alone (its inputs
captured from a forward pass) and ``model.relevance_map(images)``, for ``vit_small_patch16_224`` (random weights,
budget 0.25) and the trained cluttered canvas model; host syncs (``item``, ``tolist``, ``bool``, ``float``,
``int`` of a tensor) are counted per relaxation; and the canvas model's accuracy at budget 0.25 both ways.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import arrcoc  # noqa: E402
import arrcoc.relevance.module as module_py  # noqa: E402
from arrcoc.rules.relaxation import relax  # noqa: E402


def load_revision(rev: str) -> tuple[types.ModuleType, types.ModuleType]:
    """energy.py (today's rules/relaxation.py) and field.py as of git revision ``rev`` (or from the folder ``rev``,
    for a copy without .git), as modules whose imports resolve against the working tree's."""
    loaded = []
    for path, name in (("arrcoc/rules/energy.py", "before_energy"), ("arrcoc/relevance/field.py", "before_field")):
        if Path(rev).is_dir():
            source = (Path(rev) / Path(path).name).read_text()
        else:
            source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, check=True, capture_output=True,
                                    text=True).stdout
        module = sys.modules[name] = types.ModuleType(name)  # dataclasses look their module up
        exec(compile(source.replace("from .distributed", "from arrcoc.rules.distributed"), path, "exec"),
             module.__dict__)
        loaded.append(module)
    return loaded[0], loaded[1]


def before_relax(energy_py: types.ModuleType, field_py: types.ModuleType):
    """``relax`` as a drop-in for module.py's: the old loop on the old field energy, same parameters."""

    class BeforeFieldEnergy(field_py.FieldEnergy):
        def energy(self, states, x):
            return field_py.RelevanceField.energy(self.module, states[0], x)

    def run(model, x, how):
        return energy_py.relax(BeforeFieldEnergy(model.module), x, **how.settings())

    return run


@contextlib.contextmanager
def counting_syncs():
    """Counts the tensor-to-host reads (each a device sync on an accelerator)."""
    counts = {"syncs": 0}
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def counted(original):
        def read(self, *args):
            counts["syncs"] += 1
            return original(self, *args)
        return read

    for n in names:
        setattr(torch.Tensor, n, counted(originals[n]))
    try:
        yield counts
    finally:
        for n, original in originals.items():
            setattr(torch.Tensor, n, original)


def timed_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start)


def interleaved(variants: dict, rounds: int, device: torch.device) -> dict[str, float]:
    """Median ms of each variant, run in turn each round (after one warm-up round)."""
    times = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, fn in variants.items():
            t = timed_ms(fn, device)
            if r:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def captured_field_input(model, images: torch.Tensor) -> torch.Tensor:
    captured = []
    original = module_py.RelevanceModule.relax_field
    module_py.RelevanceModule.relax_field = lambda self, x: (captured.append(x), original(self, x))[1]
    try:
        model.relevance_map(images)
    finally:
        module_py.RelevanceModule.relax_field = original
    return captured[0]


def compare(label: str, model, images: torch.Tensor, old_relax, rounds: int, device: torch.device) -> None:
    field = model.relevance.field.as_energy()
    how = model.relevance.config.relaxation
    x = captured_field_input(model, images)
    every_step = functools.partial(relax, check_every=1)  # the checks' default on the CPU, 8 on an accelerator
    every_8 = functools.partial(relax, check_every=8)
    for name, run in (("before", old_relax), ("after, checks every step", every_step), ("after, every 8", every_8)):
        with counting_syncs() as counts:
            _, report = run(field, x, how=how)
        print(f"{label} {name}: {report.steps} steps, converged {report.converged}, "
              f"{counts['syncs']} host syncs per relax")
    relax_ms = interleaved({"before": lambda: old_relax(field, x, how=how),
                            "after": lambda: relax(field, x, how=how)}, rounds, device)

    def relevance_map_with(run):
        def call():
            module_py.relax = run
            try:
                model.relevance_map(images)
            finally:
                module_py.relax = relax
        return call

    map_ms = interleaved({"before": relevance_map_with(old_relax), "after": relevance_map_with(relax)}, rounds, device)
    print(f"{label}: relax {relax_ms['before']:.2f} -> {relax_ms['after']:.2f} ms, "
          f"relevance_map {map_ms['before']:.2f} -> {map_ms['after']:.2f} ms", flush=True)


def canvas_accuracy(model, old_relax, canvases: int) -> None:
    from arrcoc.data.tasks import task_data
    from arrcoc.metrics import accuracy

    test = task_data("cluttered", "test", canvases, 0)
    model.set_budget(0.25)
    predictions = {}
    for name, run in (("before", old_relax), ("after", relax)):
        module_py.relax = run
        try:
            predictions[name] = torch.cat([model(b.images, b.queries).argmax(-1) for b in test.batches(250)])
            acc = accuracy(lambda b: model(b.images, b.queries), test)
        finally:
            module_py.relax = relax
        print(f"canvas accuracy at budget 0.25, {canvases} test canvases, {name}: {acc:.2f}%")
    agree = (predictions["before"] == predictions["after"]).float().mean().item()
    print(f"predictions agreeing: {100 * agree:.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="390d5ee",
                        help="git revision (or a folder holding energy.py and field.py) of the relaxation before")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--canvases", type=int, default=1000, help="canvases for the accuracy check (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vit-batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--canvas-batches", type=int, nargs="*", default=[1, 16, 256])
    args = parser.parse_args()
    import timm

    from arrcoc.data.tasks import task_data
    from arrcoc.models.canvas_vit import load_canvas_vit

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    old_relax = before_relax(*load_revision(args.before))
    torch.manual_seed(0)
    vit = arrcoc.attach(timm.create_model("vit_small_patch16_224", pretrained=False).to(device), budget=0.25)
    canvas = arrcoc.ARRCOC.from_pretrained(REPO / "benchmarks/results/models/cluttered", load_canvas_vit().to(device))
    canvases = task_data("cluttered", "test", max(args.canvas_batches), 0).images.to(device)
    with torch.no_grad():
        for batch in args.vit_batches:
            compare(f"vit_small batch {batch}", vit, torch.rand(batch, 3, 224, 224, device=device), old_relax,
                    args.rounds, device)
        for batch in args.canvas_batches:
            compare(f"canvas batch {batch}", canvas, canvases[:batch], old_relax, args.rounds, device)
        if args.canvases:
            canvas_accuracy(canvas, old_relax, args.canvases)


if __name__ == "__main__":
    main()
