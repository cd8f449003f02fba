"""Swap the learning rule of one sub-network and compare with the default rules: accuracy and step time.

    python demos/ablate_rules.py                                            # allocator: backprop vs. fa
    python demos/ablate_rules.py --override "rules.field={name: frozen}"    # any dotted config key
    python demos/ablate_rules.py --smoke --out /tmp/d                       # tiny sizes (what the tests run)

What it shows: every sub-network of the relevance module learns with the rule its config names
(``configs/arrcoc.yaml``, ``rules:``); an override changes one entry, e.g. the allocator's feedback alignment
for backprop confined to the allocator. Both modules train the same steps on the same cluttered canvases
(committed canvas ViT, 25% of the patch tokens, box target); the table and PNG compare test accuracy, box
coverage and the time of one training step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from arrcoc.config import config_file, parse_override
from arrcoc.data.tasks import task_data
from arrcoc.metrics import accuracy, selection_metrics
from arrcoc.models.canvas_vit import load_canvas_vit
from arrcoc.relevance import RelevanceConfig
from arrcoc.reporting import format_table, pyplot, save_figure
from arrcoc.storage import save_json_atomic
from arrcoc.training import train_arrcoc


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    names = [row["rules"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 2.2 + 0.3 * len(rows)))
    for ax, key, label in zip(axes, ("accuracy", "box_coverage", "step_ms"),
                              ("test accuracy (%)", "box coverage (%)", "training step (ms)")):
        ax.barh(names, [row[key] for row in rows])
        ax.set_xlabel(label)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticks([])
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=config_file, default="configs/arrcoc.yaml", help="the default rules")
    parser.add_argument("--override", type=parse_override, action="append", metavar="KEY=YAML",
                        help="the change to compare (repeatable); default: rules.allocator={name: backprop}")
    parser.add_argument("--out", type=Path, default=Path("runs/demos/ablate_rules"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that it runs, not a result")
    args = parser.parse_args(argv)
    overrides = args.override or [parse_override("rules.allocator={name: backprop}")]
    steps, test_images = (5, 64) if args.smoke else (200, 1000)
    args.out.mkdir(parents=True, exist_ok=True)

    backbone = load_canvas_vit()
    train = task_data("cluttered", "train", steps * 32, seed=100)
    test = task_data("cluttered", "test", test_images, seed=1)
    rows = []
    for name, changes in (("default", []), (", ".join(f"{k}={v}" for k, v in overrides), overrides)):
        config = RelevanceConfig.from_yaml(args.config, [("target", "box"), *changes], budget=0.25)
        model, step_ms = train_arrcoc(backbone, config, train, steps, batch_size=32, seed=0, learning="local")
        rows.append({"rules": name, "accuracy": accuracy(lambda b, m=model: m(b.images), test),
                     "box_coverage": selection_metrics(model, test)["box_coverage"], "step_ms": step_ms})
    table = format_table(rows, {"rules": "rules", "accuracy": "test accuracy (%)", "box_coverage": "box coverage (%)",
                                "step_ms": "training step (ms)"})
    print(table)
    save_json_atomic(args.out / "ablation.json", {"config": str(args.config), "train_steps": steps,
                                                  "test_images": test_images, "rows": rows})
    plot(rows, args.out / "ablation.png")
    print(f"wrote {args.out / 'ablation.json'} and {args.out / 'ablation.png'}")


if __name__ == "__main__":
    main()
