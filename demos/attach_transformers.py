"""Attach ARR-COC to a transformers ViT (``ViTForImageClassification``) and measure it at several token budgets.

    python demos/attach_transformers.py                        # ~1 min on 2 CPU cores
    python demos/attach_transformers.py --model path/to/vit    # a local from_pretrained folder instead
    python demos/attach_transformers.py --smoke --out /tmp/d   # tiny sizes, seconds (what the tests run)

What it shows: ``arrcoc.attach`` works on a transformers vision model as on a timm one. The model is built from
a small ``ViTConfig`` (64 px, 8x8 patches) with random weights, as the model hubs are offline here; ``--model``
loads real weights from a local folder (``ViTForImageClassification.from_pretrained``). With random weights the
class predictions mean nothing, so there is no accuracy here: the demo checks that budget 1.0 gives exactly
the unmodified model's logits, trains the relevance module briefly with local rules (box target: the digit's
patches of cluttered canvases), and reports per budget the agreement with the full-token prediction, the box
coverage and the speed ratio to the unmodified model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

import arrcoc
from arrcoc.commands.evaluate import evaluate, plot_budgets
from arrcoc.data.tasks import TaskData, task_data
from arrcoc.relevance import RelevanceConfig
from arrcoc.reporting import format_table
from arrcoc.storage import save_json_atomic
from arrcoc.training import train_arrcoc

BUDGETS = [1.0, 0.5, 0.25, 0.125]
# initializer_range 0.3 instead of 0.02: at 0.02 the random model gives every canvas the same class (measured),
# which would make any agreement trivially 100%; at 0.3 its predictions spread over the classes
SMALL_VIT = ViTConfig(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                      intermediate_size=768, num_labels=10, initializer_range=0.3)
COLUMNS = {"budget": "budget", "agreement": "agrees with full (%)", "box_coverage": "box coverage (%)",
           "ms": "ms per batch", "speedup": "speed vs full"}


def resized(data: TaskData, side: int) -> TaskData:
    """The canvases (64 px) at the model's input size; boxes scaled alike."""
    if side == data.images.shape[-1]:
        return data
    scale = side / data.images.shape[-1]
    images = F.interpolate(data.images, size=(side, side), mode="bilinear", align_corners=False)
    return TaskData(images, data.labels, data.boxes * scale, data.queries, data.sentences)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demos/attach_transformers"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that it runs, not a result")
    parser.add_argument("--model", help="a local ViTForImageClassification folder (default: random weights)")
    args = parser.parse_args(argv)
    steps, test_images, repeats = (5, 64, 2) if args.smoke else (200, 1000, 5)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    vit = ViTForImageClassification.from_pretrained(args.model) if args.model else ViTForImageClassification(SMALL_VIT)
    vit.eval()
    side = vit.config.image_size
    test = resized(task_data("cluttered", "test", test_images, seed=1), side)

    full_logits = vit(pixel_values=test.images[:16]).logits
    identical = torch.equal(arrcoc.attach(vit, budget=1.0)(test.images[:16]), full_logits)
    print(f"budget 1.0 gives the unmodified model's logits exactly: {identical}")

    train = resized(task_data("cluttered", "train", steps * 32, seed=100), side)
    config = RelevanceConfig(budget=0.25, target="box")
    model, step_ms = train_arrcoc(vit, config, train, steps, batch_size=32, seed=0, learning="local")
    print(f"trained the relevance module: {steps} local-rule steps of 32 canvases, {step_ms:.0f} ms per step")
    rows = evaluate(model, test, BUDGETS, repeats=repeats)
    print("random weights: accuracy means nothing, so agreement with the full-token prediction instead")
    print(format_table(rows, COLUMNS))
    weights = args.model or "random weights"
    plot_budgets(rows, args.out / "budgets.png", f"ViTForImageClassification ({weights}) + ARR-COC",
                 metric="agreement", metric_label="agrees with full-token prediction (%)")
    save_json_atomic(args.out / "budgets.json", {"model": args.model or "random ViTConfig", "image_size": side,
                                                 "budget_1_identical": identical, "train_steps": steps,
                                                 "step_ms": step_ms, "rows": rows})
    print(f"wrote {args.out / 'budgets.json'} and {args.out / 'budgets.png'}")


if __name__ == "__main__":
    main()
