"""Online adaptation on long streams of noise or adversarial images: ``python -m arrcoc.bench.reliability``.

The relevance module first learns (local rules, attention target) on clean training canvases, attached to the
committed canvas ViT; that is the *frozen* module. Then ``adapt`` runs, label-free, on a stream of 10,000
images that carry nothing to learn:

* ``noise``: uniform noise pixels;
* ``adversarial``: canvases of digit fragments over bright photographs, without any whole digit, so that the
  full-token prediction (the adaptation's own signal) hinges on clutter.

with SGD and Adam, each at its default learning rate and at 20 times it (an injected fault), with and without
the clean-probe guard (:meth:`ARRCOC.set_probe`: 256 unlabelled clean training canvases whose reduced
predictions must keep agreeing with their full-token ones). Measured along the stream: accuracy on 1,000
labelled clean test canvases (never shown to the adaptation), the weight change of every call, the distance
from the frozen weights, the process's resident memory. Writes ``reliability.{json,md,png}`` to
``benchmarks/results/`` (``runs/quick/`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
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
from arrcoc.relevance.adaptation import DEFAULT_ADAPTATION_LR
from arrcoc.reporting import command_line, output_dir, pyplot, run_metadata, save_figure, save_results, verdict
from arrcoc.training import Batch, Trainer, TrainerConfig

STREAMS = ("noise", "adversarial")
# digit fragments over bright photographs; the target digit is drawn 1-1.5 px wide, i.e. absent
ADVERSARIAL_CANVAS = replace(SHIFT_CANVAS, digit_scale=(1.0, 1.5), num_fragments=(8, 12))
NO_CHANGE = 1e-6  # where the plot draws a call that left the weights unchanged
MIB = 2**20
OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam"}  # as the report writes them


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
    # the target: guarded, at each optimizer's default lr, clean test accuracy never more than this below the
    # frozen module's (points)
    guarded_max_drop: float = 0.3
    # the teacher: perturbation importance moves the module on any stream, so there is a fault to guard against
    # (the set-level signal, the library's default, moves it little on noise)
    target: str = "perturbation"
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


def step_bound(model: ARRCOC) -> tuple[str, float]:
    """What bounds the weight change of one ``adapt()`` call, and the bound: SGD moves the weights by at most
    lr x max_grad_norm (the clipped gradient's L2 norm); Adam moves each weight by at most lr (1 - beta1) /
    sqrt(1 - beta2) (Kingma & Ba 2015, 2.1; ~3.16 lr with the default betas)."""
    cfg = model.adaptation
    if cfg.optimizer == "sgd":
        return "norm", cfg.lr * cfg.max_grad_norm
    beta1, beta2 = model.online.optimizer.param_groups[0]["betas"]
    return "per weight", cfg.lr * (1 - beta1) / math.sqrt(1 - beta2)


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
    trajectory = {"images": [0], "accuracy": [accuracy(model, *evaluation)], "distance": [0.0],
                  "resident_mb": [resident_bytes() / MIB],
                  "probe_agreement": [model.set_probe(probe) if guarded else None]}
    steps: dict[str, list] = {"update_norm": [], "update_max": [], "probe_rejected": [], "rolled_back": [],
                              "skipped": []}
    seen, start = 0, time.perf_counter()
    for step, images in enumerate(stream_batches(kind, config), start=1):
        before = flat_weights(model)
        report = model.adapt(images)
        seen += len(images)
        change = flat_weights(model) - before
        steps["update_norm"].append(change.norm().item())
        steps["update_max"].append(change.abs().max().item())
        steps["probe_rejected"].append(report.probe_rejected)
        steps["rolled_back"].append(report.rolled_back)
        steps["skipped"].append(report.skipped is not None)
        if step % config.eval_every == 0 or seen == config.stream_images:
            trajectory["images"].append(seen)
            trajectory["accuracy"].append(accuracy(model, *evaluation))
            trajectory["distance"].append((flat_weights(model) - frozen).norm().item())
            trajectory["resident_mb"].append(resident_bytes() / MIB)
            trajectory["probe_agreement"].append(report.probe_agreement)
    summary = summarize(trajectory, steps, step_bound(model))
    summary["seconds"] = time.perf_counter() - start
    cfg = model.adaptation
    return {"stream": kind, "optimizer": cfg.optimizer, "guarded": guarded, "lr": cfg.lr, "summary": summary,
            "trajectory": trajectory, "steps": steps}


def summarize(trajectory: dict[str, list], steps: dict[str, list], bound: tuple[str, float]) -> dict[str, float]:
    """One stream's accuracy, step sizes against their bound, guard and rollback counts, and memory."""
    measure, limit = bound
    sizes = steps["update_norm" if measure == "norm" else "update_max"]
    # calls that made a plain bounded step (no rollback to an older state, which may jump further back)
    stepped = [n for n, back in zip(sizes, steps["rolled_back"]) if not back]
    frozen_accuracy = trajectory["accuracy"][0]
    rss = trajectory["resident_mb"]
    return {
        "frozen_accuracy": frozen_accuracy,
        "lowest_accuracy": min(trajectory["accuracy"]),
        "final_accuracy": trajectory["accuracy"][-1],
        "worst_drop_points": 100 * (frozen_accuracy - min(trajectory["accuracy"])),
        "step_measure": measure,
        "largest_step": max(stepped, default=0.0),
        "step_bound": limit,
        "largest_rollback_jump": max((n for n, b in zip(steps["update_norm"], steps["rolled_back"]) if b), default=0.0),
        "probe_rejections": sum(steps["probe_rejected"]),
        "stream_rollbacks": sum(steps["rolled_back"]),
        "skipped_updates": sum(steps["skipped"]),
        "resident_mb_after_first_eval": rss[1] if len(rss) > 1 else rss[0],
        "resident_mb_end": rss[-1],
        "resident_mb_max": max(rss),
        "resident_mb_growth_after_first_eval": rss[-1] - (rss[1] if len(rss) > 1 else rss[0]),
        "resident_mb_per_1000_images": trend(trajectory["images"][1:], rss[1:]) * 1000,
    }


def guarded_at_default_lr(report: dict) -> list[dict]:
    """The runs the target judges: guarded, at their optimizer's default learning rate."""
    return [run for run in report["runs"]
            if run["guarded"] and run["lr"] == report["adaptation"][run["optimizer"]]["lr"]]


def target_line(judged: list[dict], max_drop: float) -> str:
    claim = (f"**Target** (guarded, at each optimizer's default lr, on every stream: clean test accuracy never more "
             f"than {max_drop:g} points below the frozen module's)")
    if not judged:
        return f"{claim}: not judged, this run has none of those runs."
    worst = max(run["summary"]["worst_drop_points"] for run in judged)
    return f"{claim}: {verdict(worst <= max_drop)}, worst drop {worst:.1f} points."


def markdown(report: dict) -> str:
    cfg, defaults = report["config"], report["adaptation"]
    guard = next(iter(defaults.values()))  # the guard's settings are the same for every optimizer
    judged = guarded_at_default_lr(report)
    lines = [
        "# Online adaptation on long noise / adversarial streams",
        "",
        f"Command: `{report['command']}` ({report['device']}, {report['seconds'] / 60:.0f} min, commit "
        f"{report.get('commit') or 'not recorded'}). Backbone: the committed canvas ViT (`{report['backbone']}`), "
        f"full-token accuracy {100 * report['full_token_accuracy']:.1f}% on the {cfg['eval_images']} labelled clean "
        f"test canvases used for measuring; budget {cfg['budget']:.0%} of the patch tokens. The frozen module "
        f"learned with local rules on {cfg['pretrain_images']} clean training canvases. Each stream has "
        f"{cfg['stream_images']:,} images in batches of {cfg['batch_size']}; `adapt()` runs on every batch, with "
        + ", ".join(f"{OPTIMIZER_NAMES.get(name, name)} at its default lr {d['lr']:g}" for name, d in defaults.items())
        + (" (this run: only the guarded runs, which the target judges, `--runs target`)"
           if len(judged) == len(report["runs"])
           else f" and, as an injected fault, {cfg['aggressive_lr_scale']:g} times that, guarded and not"
           + ("" if judged else " (this run: `--runs rest`, without the guarded runs at the default lr)"))
        + "; gradients are clipped to norm "
        f"{guard['max_grad_norm']}. Guard: {cfg['probe_images']} unlabelled clean training canvases (`set_probe`): "
        f"an update is kept only if the probe shows that the module has lost at most "
        f"{100 * guard['probe_max_drop']:g} points of the frozen module's soft agreement with the full-token "
        f"predictions (the mean probability the reduced prediction gives the full-token class), counted from the "
        f"frozen module however long the stream, at one-sided z {guard['probe_confidence']:g}.",
        "",
        target_line(judged, cfg["guarded_max_drop"]),
        "",
        "| stream | optimizer | adapt lr | guard | frozen acc. (%) | lowest acc. (%) | final acc. (%) | worst drop "
        "(points) | largest step | step bound | rejected by probe | stream rollbacks | skipped | memory (MiB): first, "
        "end, max | memory trend (MiB / 1000 images) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        s = run["summary"]
        lines.append(
            f"| {run['stream']} | {run['optimizer']} | {run['lr']:g} | {'probe' if run['guarded'] else 'none'} | "
            f"{100 * s['frozen_accuracy']:.1f} | {100 * s['lowest_accuracy']:.1f} | {100 * s['final_accuracy']:.1f} | "
            f"{s['worst_drop_points']:.1f} | {s['largest_step']:.3g} | {s['step_bound']:.3g} ({s['step_measure']}) | "
            f"{s['probe_rejections']} | {s['stream_rollbacks']} | {s['skipped_updates']} | "
            f"{s['resident_mb_after_first_eval']:.0f}, {s['resident_mb_end']:.0f}, {s['resident_mb_max']:.0f} | "
            f"{s['resident_mb_per_1000_images']:+.2f} |"
        )
    lines += [
        "",
        "Accuracy is measured every "
        f"{cfg['eval_every']} steps ({cfg['eval_every'] * cfg['batch_size']} images) and at the end; the worst drop "
        "is the frozen accuracy minus the lowest measured one. Largest step: the largest weight change of a call "
        "that was not a rollback (a stream rollback jumps back to an older state and is listed in the JSON), in "
        "the measure its optimizer bounds: for SGD the L2 norm of the change (bound lr x max_grad_norm), for Adam "
        "the largest change of one weight (bound lr (1 - beta1) / sqrt(1 - beta2)); an update the probe rejected "
        "is undone, so its call changes nothing. Memory: the process's resident memory after the first "
        "measurement, at the end, its largest value, and its least-squares trend along the stream (all runs share "
        "one process, so the first run also pays for warming up). The PNG shows accuracy, per-call weight change "
        "(as a share of its bound) and memory along each stream.",
        "",
    ]
    return "\n".join(lines)


def run_label(run: dict) -> str:
    return f"{run['optimizer']} lr {run['lr']:g}, {'probe guard' if run['guarded'] else 'no guard'}"


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    streams = list(dict.fromkeys(run["stream"] for run in report["runs"]))
    fig, axes = plt.subplots(len(streams), 3, figsize=(17, 4.5 * len(streams)), squeeze=False)
    batch = report["config"]["batch_size"]
    # one colour per optimizer, lr and guard, the same on every stream
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(map(run_label, report["runs"])))}
    for run in report["runs"]:
        row, t, s = axes[streams.index(run["stream"])], run["trajectory"], run["summary"]
        style = {"label": run_label(run), "color": colours[run_label(run)]}
        row[0].plot(t["images"], [100 * a for a in t["accuracy"]], **style)
        sizes = run["steps"]["update_norm" if s["step_measure"] == "norm" else "update_max"]
        # a call that changed nothing (its update undone by the guard) is drawn at the floor of the log axis
        row[1].plot([batch * (i + 1) for i in range(len(sizes))], [max(n / s["step_bound"], NO_CHANGE) for n in sizes],
                    ".", markersize=2, **style)
        row[2].plot(t["images"], t["resident_mb"], **style)
    frozen = report["runs"][0]["summary"]["frozen_accuracy"]
    for stream, row in zip(streams, axes):
        row[0].axhline(100 * frozen - report["config"]["guarded_max_drop"], color="k", linestyle="--", linewidth=0.8,
                       label=f"frozen - {report['config']['guarded_max_drop']:g} points")
        row[1].axhline(1.0, color="0.6", linestyle="--", linewidth=0.8, zorder=0, label="the step bound")
        row[1].set_yscale("log")
        row[1].set_ylim(NO_CHANGE / 2, 3)
        titles = (f"{stream}: clean test accuracy (%)", f"{stream}: weight change per adapt() call / its bound "
                  f"({NO_CHANGE:g}: none)", f"{stream}: resident memory (MiB)")
        for ax, title in zip(row, titles):
            ax.set_xlabel("stream images seen")
            ax.set_title(title, fontsize=10)
        row[0].legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def stream_runs(frozen: ARRCOC, kind: str, optimizer: str, probe: Tensor, evaluation: tuple[Tensor, Tensor],
                config: ReliabilityConfig, which: str = "all") -> list[dict]:
    """One stream with one optimizer: at its default and its aggressive lr, guarded and not; ``which``: ``all`` of
    them, only the ``target`` run (guarded at the default lr, the one the target judges) or the ``rest``."""
    runs = []
    default_lr = AdaptationConfig(optimizer=optimizer, target=config.target).lr
    settings = list(itertools.product((default_lr, default_lr * config.aggressive_lr_scale), (True, False)))
    for lr, guarded in {"all": settings, "target": settings[:1], "rest": settings[1:]}[which]:
        adaptation = AdaptationConfig(optimizer=optimizer, lr=lr, target=config.target)
        runs.append(run_stream(frozen.fork(adaptation), kind, guarded, probe, evaluation, config))
        s = runs[-1]["summary"]
        print(f"{kind:12s} {optimizer:4s} lr={lr:<6g} guard={guarded!s:5s} frozen {100 * s['frozen_accuracy']:.1f}% "
              f"lowest {100 * s['lowest_accuracy']:.1f}% final {100 * s['final_accuracy']:.1f}% largest step "
              f"{s['largest_step']:.3g} ({s['step_measure']}, bound {s['step_bound']:.3g}) rejected "
              f"{s['probe_rejections']} memory trend {s['resident_mb_per_1000_images']:+.2f} MiB/1000 images "
              f"({s['seconds']:.0f} s)", flush=True)
    return runs


def merged(reports: list[dict]) -> dict:
    """Runs of the same settings made in processes side by side (e.g. one per stream or optimizer), as one report:
    their commands joined, their commits (a run made later to complete a report may be at a later one), the longest
    one's time, every optimizer's settings, every run in the order of one process's."""
    same = ("config", "backbone", "full_token_accuracy")
    adaptation: dict[str, dict] = {}
    for report in reports:
        differing = [key for key in same if report.get(key) != reports[0].get(key)]
        differing += [name for name, settings in report["adaptation"].items()
                      if adaptation.setdefault(name, settings) != settings]
        if differing:
            raise SystemExit(f"reliability runs to merge must share their settings; these differ: {differing}")
    commits = dict.fromkeys(report.get("commit") or "not recorded" for report in reports)
    return {**reports[0], "command": " & ".join(report["command"] for report in reports), "adaptation": adaptation,
            "commit": " and ".join(commits),
            "seconds": max(report["seconds"] for report in reports),
            "runs": sorted(({"commit": report.get("commit"), **run} for report in reports for run in report["runs"]),
                           key=run_order)}


def run_order(run: dict) -> tuple:
    """Streams, then optimizers, in the command's order; the default lr before the aggressive one; guarded first."""
    return (list(STREAMS).index(run["stream"]), list(DEFAULT_ADAPTATION_LR).index(run["optimizer"]), run["lr"],
            not run["guarded"])


def render(paths: list[Path], out: Path | None) -> None:
    """The Markdown and PNG of one earlier run beside its JSON, or of several merged, with their JSON, in ``out``."""
    if len(paths) == 1:
        report = json.loads(paths[0].read_text())
        paths[0].with_suffix(".md").write_text(markdown(report))
        plot(report, paths[0].with_suffix(".png"))
        return
    if out is None:
        raise SystemExit("merging several runs (--render A.json B.json) needs --out")
    report = merged([json.loads(path.read_text()) for path in paths])
    out.mkdir(parents=True, exist_ok=True)
    plot(report, out / "reliability.png")
    save_results(out, "reliability", report, markdown(report))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short streams (a few minutes), writes to runs/quick/")
    parser.add_argument("--streams", nargs="+", choices=STREAMS, default=list(STREAMS))
    parser.add_argument("--optimizers", nargs="+", choices=tuple(DEFAULT_ADAPTATION_LR),
                        default=list(DEFAULT_ADAPTATION_LR))
    parser.add_argument("--images", type=int, help="images per stream")
    parser.add_argument("--runs", choices=("all", "target", "rest"), default="all",
                        help="target: only the runs the target judges (guarded, at each optimizer's default lr); "
                             "rest: the others (merge the two with --render)")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="canvas ViT (.safetensors)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="only rewrite the Markdown and PNG beside a reliability.json from an earlier run; given "
                             "several (runs of the same settings side by side, e.g. one per stream), write them "
                             "merged, JSON included, to --out")
    parser.add_argument("--config", type=config_file,
                        help="YAML of defaults for these options (keys: option names with underscores)")
    args = parse_with_config(parser, argv)
    if args.render is not None:
        render(args.render, args.out)
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
    runs = [run for kind in args.streams for optimizer in args.optimizers
            for run in stream_runs(frozen, kind, optimizer, probe, evaluation, config, args.runs)]
    report = run_metadata(
        command_line("arrcoc.bench.reliability", argv), args.quick,
        config=asdict(config),
        adaptation={optimizer: asdict(AdaptationConfig(optimizer=optimizer, target=config.target))
                    for optimizer in args.optimizers},
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
