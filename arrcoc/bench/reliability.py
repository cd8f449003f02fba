"""Online adaptation on long streams of noise or adversarial images: ``python -m arrcoc.bench.reliability``.

The relevance module first learns (local rules, attention target) on clean training canvases, attached to the
committed canvas ViT; that is the *frozen* module. Then ``adapt`` runs, label-free, on a stream of 10,000
images that carry nothing to learn:

* ``noise``: uniform noise pixels;
* ``adversarial``: canvases of digit fragments over bright photographs, without any whole digit, so that the
  full-token prediction (the adaptation's own signal) hinges on clutter.

with and without the clean-probe guard (:meth:`ARRCOC.set_probe`: 256 unlabelled clean training canvases
whose reduced predictions must keep agreeing with their full-token ones). Measured along the stream: accuracy
on 1,000 labelled clean test canvases (never shown to the adaptation), the weight change of every call, the
distance from the frozen weights, the process's resident memory. Writes ``reliability.{json,md,png}`` to
``benchmarks/results/`` (``runs/quick/`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

import arrcoc
from arrcoc.config import REPO_ROOT, config_file, parse_with_config
from arrcoc.data.canvas import SHIFT_CANVAS, canvas_sources, cluttered_split, make_cluttered
from arrcoc.metrics import resident_bytes
from arrcoc.models.canvas_vit import DEFAULT_CHECKPOINT, load_canvas_vit
from arrcoc.relevance import ARRCOC, AdaptationConfig
from arrcoc.reporting import command_line, output_dir, pyplot, run_metadata, save_figure, save_results
from arrcoc.training import Batch, Trainer, TrainerConfig

STREAMS = ("noise", "adversarial")
# digit fragments over bright photographs; the target digit is drawn 1-1.5 px wide, i.e. absent
ADVERSARIAL_CANVAS = replace(SHIFT_CANVAS, digit_scale=(1.0, 1.5), num_fragments=(8, 12))
NO_CHANGE = 1e-6  # where the plot draws a call that left the weights unchanged
MIB = 2**20


@dataclass(frozen=True)
class ReliabilityConfig:
    stream_images: int = 10_000
    batch_size: int = 32
    budget: float = 0.25
    pretrain_images: int = 2048  # clean training canvases the module learns from before it is frozen
    probe_images: int = 256  # unlabelled clean training canvases: the guard's probe
    eval_images: int = 1000  # labelled clean test canvases, only for measuring
    eval_every: int = 25  # adaptation steps between accuracy measurements
    # also adapt with this many times the default learning rate: an injected fault the guard must catch
    aggressive_lr_scale: float = 20.0
    seed: int = 0
    threads: int = 1


QUICK = ReliabilityConfig(stream_images=640, pretrain_images=512, probe_images=128, eval_images=300, eval_every=5)


def stream_batches(kind: str, config: ReliabilityConfig) -> Iterator[Tensor]:
    """The stream in batches, generated a chunk at a time (memory stays flat)."""
    generator = torch.Generator().manual_seed(config.seed + 17)
    sources = canvas_sources()
    chunk = 20 * config.batch_size
    for start in range(0, config.stream_images, chunk):
        n = min(chunk, config.stream_images - start)
        if kind == "noise":
            images = torch.rand(n, 3, 64, 64, generator=generator)
        else:
            seed = config.seed + 31 + start
            images = make_cluttered(sources.x_test, sources.y_test, n, seed, ADVERSARIAL_CANVAS).images
        yield from images.split(config.batch_size)


def flat_weights(model: ARRCOC) -> Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.relevance.parameters()])


@torch.no_grad()
def accuracy(model: ARRCOC, images: Tensor, labels: Tensor, full: bool = False) -> float:
    predictions = [(model.adapter(chunk) if full else model(chunk)).argmax(-1) for chunk in images.split(100)]
    return (torch.cat(predictions) == labels).float().mean().item()


def frozen_module(config: ReliabilityConfig, checkpoint: Path) -> ARRCOC:
    """The relevance module after learning on clean canvases (local rules, the backbone's attention target)."""
    torch.manual_seed(config.seed)
    model = arrcoc.attach(load_canvas_vit(checkpoint), budget=config.budget, config={"target": "attention"})
    canvases = cluttered_split("train", config.pretrain_images, seed=config.seed + 1)
    batches = [Batch(images) for images in canvases.images.split(config.batch_size)]
    Trainer(model, TrainerConfig(epochs=1, progress=False)).fit(batches)
    return model


def trend(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y over x (0 with fewer than two points)."""
    if len(x) < 2:
        return 0.0
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    xs = xs - xs.mean()
    return float((xs * (ys - ys.mean())).sum() / xs.pow(2).sum().clamp_min(1e-12))


def run_stream(model: ARRCOC, kind: str, guarded: bool, probe: Tensor, evaluation: tuple[Tensor, Tensor],
               config: ReliabilityConfig) -> dict[str, object]:
    """Adapt along one stream; returns the trajectory and its summary."""
    frozen = flat_weights(model)
    frozen_accuracy = accuracy(model, *evaluation)
    bound = model.adaptation.lr * model.adaptation.max_grad_norm
    trajectory = {"images": [0], "accuracy": [frozen_accuracy], "distance": [0.0],
                  "resident_mb": [resident_bytes() / MIB],
                  "probe_agreement": [model.set_probe(probe) if guarded else None]}
    steps: dict[str, list] = {"update_norm": [], "probe_rejected": [], "rolled_back": [], "skipped": []}
    seen, start = 0, time.perf_counter()
    for step, images in enumerate(stream_batches(kind, config), start=1):
        before = flat_weights(model)
        report = model.adapt(images)
        seen += len(images)
        steps["update_norm"].append((flat_weights(model) - before).norm().item())
        steps["probe_rejected"].append(report.probe_rejected)
        steps["rolled_back"].append(report.rolled_back)
        steps["skipped"].append(report.skipped is not None)
        if step % config.eval_every == 0 or seen == config.stream_images:
            trajectory["images"].append(seen)
            trajectory["accuracy"].append(accuracy(model, *evaluation))
            trajectory["distance"].append((flat_weights(model) - frozen).norm().item())
            trajectory["resident_mb"].append(resident_bytes() / MIB)
            trajectory["probe_agreement"].append(report.probe_agreement)
    # calls that made a plain bounded step (no rollback to an older state, which may jump further back)
    stepped = [n for n, back in zip(steps["update_norm"], steps["rolled_back"]) if not back]
    rss = trajectory["resident_mb"]
    summary = {
        "frozen_accuracy": frozen_accuracy,
        "lowest_accuracy": min(trajectory["accuracy"]),
        "final_accuracy": trajectory["accuracy"][-1],
        "worst_drop_points": 100 * (frozen_accuracy - min(trajectory["accuracy"])),
        "largest_step_norm": max(stepped, default=0.0),
        "step_bound": bound,
        "largest_rollback_jump": max((n for n, b in zip(steps["update_norm"], steps["rolled_back"]) if b), default=0.0),
        "probe_rejections": sum(steps["probe_rejected"]),
        "stream_rollbacks": sum(steps["rolled_back"]),
        "skipped_updates": sum(steps["skipped"]),
        "resident_mb_after_first_eval": rss[1] if len(rss) > 1 else rss[0],
        "resident_mb_end": rss[-1],
        "resident_mb_max": max(rss),
        "resident_mb_growth_after_first_eval": rss[-1] - (rss[1] if len(rss) > 1 else rss[0]),
        "resident_mb_per_1000_images": trend(trajectory["images"][1:], rss[1:]) * 1000,
        "seconds": time.perf_counter() - start,
    }
    return {"stream": kind, "guarded": guarded, "lr": model.adaptation.lr, "summary": summary,
            "trajectory": trajectory, "steps": steps}


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# Online adaptation on long noise / adversarial streams",
        "",
        f"Command: `{report['command']}` ({report['device']}, {report['seconds'] / 60:.0f} min). Backbone: the "
        f"committed canvas ViT (`{report['backbone']}`), full-token accuracy "
        f"{100 * report['full_token_accuracy']:.1f}% on the "
        f"{cfg['eval_images']} labelled clean test canvases used for measuring; budget {cfg['budget']:.0%} of the "
        f"patch tokens. The frozen module learned with local rules on {cfg['pretrain_images']} clean training "
        f"canvases. Each stream has {cfg['stream_images']:,} images in batches of {cfg['batch_size']}; "
        f"`adapt()` runs on every batch: SGD with the default lr {report['adaptation']['lr']} and, as an injected "
        f"fault, {cfg['aggressive_lr_scale']:g} times that; gradients are clipped to norm "
        f"{report['adaptation']['max_grad_norm']}, so a step moves the weights by at most lr x "
        f"{report['adaptation']['max_grad_norm']}. Guard: "
        f"{cfg['probe_images']} unlabelled clean training canvases (`set_probe`): an update is kept only if the "
        f"probe shows with confidence z = {report['adaptation']['probe_confidence']} that at most "
        f"{report['adaptation']['probe_max_drop']:.0%} of its agreement with the full-token predictions was lost.",
        "",
        "| stream | adapt lr | guard | frozen acc. (%) | lowest acc. (%) | final acc. (%) | worst drop (points) "
        "| largest step | step bound | rejected by probe | stream rollbacks | skipped | memory (MiB): first, end, max "
        "| memory trend (MiB / 1000 images) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        s = run["summary"]
        lines.append(
            f"| {run['stream']} | {run['lr']:g} | {'probe' if run['guarded'] else 'none'} | "
            f"{100 * s['frozen_accuracy']:.1f} | "
            f"{100 * s['lowest_accuracy']:.1f} | {100 * s['final_accuracy']:.1f} | {s['worst_drop_points']:.1f} | "
            f"{s['largest_step_norm']:.3g} | {s['step_bound']:.3g} | {s['probe_rejections']} | "
            f"{s['stream_rollbacks']} | {s['skipped_updates']} | {s['resident_mb_after_first_eval']:.0f}, "
            f"{s['resident_mb_end']:.0f}, {s['resident_mb_max']:.0f} | {s['resident_mb_per_1000_images']:+.2f} |"
        )
    lines += [
        "",
        "Accuracy is measured every "
        f"{cfg['eval_every']} steps ({cfg['eval_every'] * cfg['batch_size']} images) and at the end; the worst drop "
        "is the frozen accuracy minus the lowest measured one. Largest step: the largest weight change of a call "
        "that was not a rollback (a stream rollback jumps back to an older state and is listed in the JSON); an "
        "update the probe rejected is undone, so its call changes nothing. Memory: the process's resident memory "
        "after the first measurement, at the end, its largest value, and its least-squares trend along the stream "
        "(all runs share one process, so the first run also pays for warming up). The PNG shows accuracy, per-call "
        "weight change and memory along each stream.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in report["runs"]:
        label = f"{run['stream']}, lr {run['lr']:g}, {'probe guard' if run['guarded'] else 'no guard'}"
        t = run["trajectory"]
        axes[0].plot(t["images"], [100 * a for a in t["accuracy"]], label=label)
        images = [report["config"]["batch_size"] * (i + 1) for i in range(len(run["steps"]["update_norm"]))]
        # a call that changed nothing (its update undone by the guard) is drawn at the floor of the log axis
        axes[1].plot(images, [max(n, NO_CHANGE) for n in run["steps"]["update_norm"]], ".", markersize=3,
                     label=label)
        axes[2].plot(t["images"], t["resident_mb"], label=label)
    frozen = report["runs"][0]["summary"]["frozen_accuracy"]
    axes[0].axhline(100 * frozen - 1, color="k", linestyle="--", linewidth=0.8, label="frozen - 1 point")
    for lr in sorted({run["lr"] for run in report["runs"]}):
        bound = lr * report["adaptation"]["max_grad_norm"]
        axes[1].axhline(bound, color="0.6", linestyle="--", linewidth=0.8, zorder=0, label=f"step bound at lr {lr:g}")
    for ax, title in zip(axes, ("clean test accuracy (%)", "weight change per adapt() call", "resident memory (MiB)")):
        ax.set_xlabel("stream images seen")
        ax.set_title(title)
    axes[1].set_yscale("log")
    largest_bound = max(run["lr"] for run in report["runs"]) * report["adaptation"]["max_grad_norm"]
    axes[1].set_ylim(NO_CHANGE / 2, 3 * largest_bound)
    axes[1].set_title(f"weight change per adapt() call ({NO_CHANGE:g}: none)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short streams (a few minutes), writes to runs/quick/")
    parser.add_argument("--streams", nargs="+", choices=STREAMS, default=list(STREAMS))
    parser.add_argument("--images", type=int, help="images per stream")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="canvas ViT (.safetensors)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only rewrite the Markdown and PNG beside a reliability.json from an earlier run")
    parser.add_argument("--config", type=config_file,
                        help="YAML of defaults for these options (keys: option names with underscores)")
    args = parse_with_config(parser, argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(report))
        plot(report, args.render.with_suffix(".png"))
        return
    config = QUICK if args.quick else ReliabilityConfig()
    if args.images is not None:
        config = replace(config, stream_images=args.images)
    out = output_dir(args.out, args.quick)
    torch.set_num_threads(config.threads)

    start = time.perf_counter()
    frozen = frozen_module(config, args.checkpoint)
    probe = cluttered_split("train", config.probe_images, seed=config.seed + 2).images  # labels never used
    test = cluttered_split("test", config.eval_images, seed=config.seed + 3)
    evaluation = (test.images, test.labels)
    runs = []
    default_lr = AdaptationConfig().lr
    for kind in args.streams:
        for lr, guarded in itertools.product((default_lr, default_lr * config.aggressive_lr_scale), (True, False)):
            runs.append(run_stream(frozen.fork(AdaptationConfig(lr=lr)), kind, guarded, probe, evaluation, config))
            s = runs[-1]["summary"]
            print(f"{kind:12s} lr={lr:<5g} guard={guarded!s:5s} frozen {100 * s['frozen_accuracy']:.1f}% lowest "
                  f"{100 * s['lowest_accuracy']:.1f}% final {100 * s['final_accuracy']:.1f}% largest step "
                  f"{s['largest_step_norm']:.3g} rejected {s['probe_rejections']} memory trend "
                  f"{s['resident_mb_per_1000_images']:+.2f} MiB/1000 images ({s['seconds']:.0f} s)", flush=True)
    report = run_metadata(
        command_line("arrcoc.bench.reliability", argv), args.quick,
        config=asdict(config),
        adaptation=asdict(AdaptationConfig()),
        backbone=str(Path(args.checkpoint).relative_to(REPO_ROOT) if Path(args.checkpoint).is_relative_to(REPO_ROOT)
                     else args.checkpoint),
        full_token_accuracy=accuracy(frozen, *evaluation, full=True),
        device=f"cpu ({config.threads} thread)",
        versions={"torch": torch.__version__},
        seconds=time.perf_counter() - start,
        runs=runs,
    )
    plot(report, out / "reliability.png")
    save_results(out, "reliability", report, markdown(report))


if __name__ == "__main__":
    main()
