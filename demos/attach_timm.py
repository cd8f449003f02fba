"""Attach ARR-COC to a timm ViT, train its relevance module briefly with local rules, and compare accuracy and
speed at several token budgets.

    python demos/attach_timm.py                        # ~1 min on 2 CPU cores; writes runs/demos/attach_timm/
    python demos/attach_timm.py --standard-vit         # also times ViT-Ti/16 at 224 px (random weights)
    python demos/attach_timm.py --smoke --out /tmp/d   # tiny sizes, seconds (what the tests run)

What it shows: the committed canvas ViT (a timm ``VisionTransformer``, 64 px canvases, 8x8 patches, pretrained
on cluttered digit canvases) wrapped by ``arrcoc.attach``; its relevance module learns with local rules (box
target) on training canvases; then, on test canvases, per budget: accuracy next to the full-token accuracy,
agreement with the full-token prediction, box coverage, and speed as a ratio to the unmodified model (the
relevance module's cost included: on a model this small it can outweigh the tokens saved). With
``--standard-vit``, ``vit_tiny_patch16_224`` (196 patches) is timed at the same budgets: random weights, as the
model hubs are offline here (``--pretrained`` loads the real ones where they are reachable), so speed only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

import arrcoc
from arrcoc.commands.evaluate import COLUMNS, evaluate, plot_budgets, speed_at_budgets
from arrcoc.data.tasks import task_data
from arrcoc.models.canvas_vit import load_canvas_vit
from arrcoc.relevance import RelevanceConfig
from arrcoc.reporting import format_table
from arrcoc.storage import save_json_atomic
from arrcoc.training import train_arrcoc

BUDGETS = [1.0, 0.5, 0.25, 0.125]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demos/attach_timm"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that it runs, not a result")
    parser.add_argument("--standard-vit", action="store_true", help="also time vit_tiny_patch16_224 at 224 px")
    parser.add_argument("--pretrained", action="store_true", help="with --standard-vit: load timm's weights")
    args = parser.parse_args(argv)
    steps, test_images, repeats = (5, 64, 2) if args.smoke else (200, 1000, 5)
    args.out.mkdir(parents=True, exist_ok=True)

    config = RelevanceConfig(budget=0.25, target="box")  # the default rules; boxes of the digits as the target
    train = task_data("cluttered", "train", steps * 32, seed=100)
    model, step_ms = train_arrcoc(load_canvas_vit(), config, train, steps, batch_size=32, seed=0, learning="local")
    print(f"trained the relevance module: {steps} local-rule steps of 32 canvases, {step_ms:.0f} ms per step")
    rows = evaluate(model, task_data("cluttered", "test", test_images, seed=1), BUDGETS, repeats=repeats)
    print(format_table(rows, COLUMNS))
    plot_budgets(rows, args.out / "budgets.png", f"canvas ViT (timm) + ARR-COC, {test_images} cluttered test canvases")
    results = {"canvas_vit": {"train_steps": steps, "step_ms": step_ms, "rows": rows}}

    if args.standard_vit:
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=args.pretrained)
        images = torch.rand(2 if args.smoke else 32, 3, 224, 224)
        speed = speed_at_budgets(arrcoc.attach(vit, budget=0.25), images, None, BUDGETS, repeats)
        speed_rows = [{"budget": budget, **timing} for budget, timing in speed.items()]
        print("vit_tiny_patch16_224 at 224 px (relevance module untrained: speed only)")
        print(format_table(speed_rows, {"budget": "budget", "ms": "ms per batch", "speedup": "speed vs full"}))
        results["vit_tiny_patch16_224"] = {"pretrained": args.pretrained, "batch": len(images), "rows": speed_rows}

    save_json_atomic(args.out / "budgets.json", results)
    print(f"wrote {args.out / 'budgets.json'} and {args.out / 'budgets.png'}")


if __name__ == "__main__":
    main()
