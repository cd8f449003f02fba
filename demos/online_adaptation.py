"""Online adaptation under a distribution shift: a frozen relevance module vs. one that adapts, label-free.

    python demos/online_adaptation.py                        # a few minutes on 2 CPU cores
    python demos/online_adaptation.py --probe-images 128     # guard every update with a clean probe
    python demos/online_adaptation.py --smoke --out /tmp/d   # tiny sizes, seconds (what the tests run)

What it shows: the relevance module learns with local rules on clean cluttered canvases (the committed canvas
ViT, 12.5% of the patch tokens), then a stream of shifted canvases (3x the clutter, larger digits) arrives.
Each batch is predicted by the frozen module and by the adapting one before the adapting one runs
``ARRCOC.adapt`` on it (no labels: the target is how much the backbone's full-token prediction changes when
patches are dropped; Adam steps, rollback when its agreement with the full-token predictions falls). The
labels only measure: the PNG plots the running accuracy of both over the stream, with rollbacks and probe
rejections marked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from arrcoc.commands.adapt import plot_stream, prequential, summarize
from arrcoc.data.tasks import task_data
from arrcoc.models.canvas_vit import load_canvas_vit
from arrcoc.relevance import AdaptationConfig, RelevanceConfig
from arrcoc.storage import save_json_atomic
from arrcoc.training import train_arrcoc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demos/online_adaptation"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that it runs, not a result")
    parser.add_argument("--probe-images", type=int, default=0, help="clean probe guarding every update (0: none)")
    args = parser.parse_args(argv)
    steps, stream_images = (5, 64) if args.smoke else (200, 2048)
    args.out.mkdir(parents=True, exist_ok=True)

    config = RelevanceConfig(budget=0.125, target="box")
    train = task_data("cluttered", "train", steps * 32, seed=100)
    frozen, _ = train_arrcoc(load_canvas_vit(), config, train, steps, batch_size=32, seed=0, learning="local")
    adapting = frozen.fork(AdaptationConfig(lr=3e-3, optimizer="adam", target="perturbation"))
    if args.probe_images:
        probe = task_data("cluttered", "train", args.probe_images, seed=7).images
        reference = adapting.set_probe(probe)
        print(f"clean probe of {args.probe_images} canvases; agreement with full tokens {reference:.3f}")
    log = prequential(frozen, adapting, task_data("cluttered", "shift", stream_images, seed=0), batch_size=32)
    summary = summarize(log)
    print(f"after {summary['images']} shifted canvases: running accuracy {summary['frozen_accuracy']:.1f}% frozen, "
          f"{summary['adapting_accuracy']:.1f}% adapting; {summary['rollbacks']} rollbacks, "
          f"{summary['probe_rejections']} probe rejections")
    save_json_atomic(args.out / "adaptation.json", {"train_steps": steps, "probe_images": args.probe_images,
                                                    "summary": summary, "log": log})
    plot_stream(log, args.out / "adaptation.png", "cluttered canvases, shifted stream: frozen vs. adapting")
    print(f"wrote {args.out / 'adaptation.json'} and {args.out / 'adaptation.png'}")


if __name__ == "__main__":
    main()
