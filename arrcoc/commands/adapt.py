"""Online adaptation of a trained relevance module over a stream of images, next to the frozen module.

    arrcoc adapt --checkpoint runs/train                      # the task's shift split
    arrcoc adapt --checkpoint runs/train --probe-images 256   # guarded by a clean probe

Prequential: each batch of the stream is first predicted by the frozen module and by the adapting one, then
the adapting one runs ``ARRCOC.adapt`` on it (label-free; bounded steps, rollback when its running agreement
with the full-token predictions falls, and with ``--probe-images`` the clean-probe guard of ``set_probe``).
The labels only measure. The progress bar shows the running accuracy of both, the label-free proxy
(``running_agreement``), rollbacks and probe rejections. Writes ``adapt.json`` (per-batch log and summary)
and ``adapt.png`` (running accuracy over the stream), and with ``--save-adapted`` the adapted checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from arrcoc.config import parse_with_config
from arrcoc.data.tasks import TaskData, task_data
from arrcoc.relevance import ARRCOC, AdaptationConfig
from arrcoc.relevance.adaptation import ADAPTATION_TARGETS, DEFAULT_ADAPTATION_LR
from arrcoc.reporting import pyplot, save_figure
from arrcoc.storage import save_json_atomic

from .common import checkpoint_parser, load_checkpoint

EXAMPLES = """examples:
  arrcoc adapt --checkpoint runs/train                                  # 2048 shift canvases, batches of 32
  arrcoc adapt --checkpoint runs/train --probe-images 256 --save-adapted runs/train-adapted
  arrcoc adapt --checkpoint runs/query --task query --split shift --images 512 --lr 0.02
  arrcoc adapt --checkpoint runs/train --config configs/adapt.yaml      # settings from YAML
"""


def prequential(frozen: ARRCOC, adapting: ARRCOC, stream: TaskData, batch_size: int,
                progress: bool = True) -> dict[str, list[Any]]:
    """Predict each batch with both modules, then adapt ``adapting`` on it. Per batch: images seen so far,
    running accuracy (%) of each module, the adaptation's report (running agreement, rollback, probe)."""
    log: dict[str, list[Any]] = {key: [] for key in ("images", "frozen_accuracy", "adapting_accuracy",
                                                     "running_agreement", "rolled_back", "probe_rejected",
                                                     "probe_agreement", "skipped")}
    seen = frozen_correct = adapting_correct = 0
    bar = tqdm(range(0, len(stream), batch_size), desc="adapting", unit="batch", disable=not progress)
    for start in bar:
        batch = stream.batch(slice(start, start + batch_size))
        with torch.no_grad():
            frozen_correct += int((frozen(batch.images, batch.queries).argmax(-1) == batch.labels).sum())
            adapting_correct += int((adapting(batch.images, batch.queries).argmax(-1) == batch.labels).sum())
        report = adapting.adapt(batch.images, batch.queries)
        seen += len(batch)
        log["images"].append(seen)
        log["frozen_accuracy"].append(100.0 * frozen_correct / seen)
        log["adapting_accuracy"].append(100.0 * adapting_correct / seen)
        log["running_agreement"].append(report.running_agreement)
        log["rolled_back"].append(report.rolled_back)
        log["probe_rejected"].append(report.probe_rejected)
        log["probe_agreement"].append(report.probe_agreement)
        log["skipped"].append(report.skipped is not None)
        bar.set_postfix(frozen=f"{log['frozen_accuracy'][-1]:.1f}%", adapting=f"{log['adapting_accuracy'][-1]:.1f}%",
                        agreement=f"{report.running_agreement:.3f}", rollbacks=sum(log["rolled_back"]),
                        rejected=sum(log["probe_rejected"]))
    return log


def summarize(log: dict[str, list[Any]]) -> dict[str, float | int]:
    return {"images": log["images"][-1], "frozen_accuracy": log["frozen_accuracy"][-1],
            "adapting_accuracy": log["adapting_accuracy"][-1], "running_agreement": log["running_agreement"][-1],
            "rollbacks": sum(log["rolled_back"]), "probe_rejections": sum(log["probe_rejected"]),
            "skipped_updates": sum(log["skipped"])}


def plot_stream(log: dict[str, list[Any]], path: Path, title: str) -> None:
    """Running accuracy of the frozen and the adapting module over the stream; rollbacks and probe
    rejections marked; the label-free proxy on a second axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(log["images"], log["frozen_accuracy"], label="frozen module")
    ax.plot(log["images"], log["adapting_accuracy"], label="adapting module")
    for key, marker, name in (("rolled_back", "v", "rollback"), ("probe_rejected", "x", "probe rejection")):
        events = [i for i, event in enumerate(log[key]) if event]
        if events:
            ax.scatter([log["images"][i] for i in events], [log["adapting_accuracy"][i] for i in events],
                       marker=marker, color="red", zorder=3, label=name)
    ax.set(xlabel="stream images seen", ylabel="running accuracy (%)", title=title)
    proxy = ax.twinx()
    proxy.plot(log["images"], log["running_agreement"], color="gray", linestyle=":", label="running agreement")
    proxy.set_ylabel("running agreement with full tokens (label-free)", fontsize=8)
    lines, names = ax.get_legend_handles_labels()
    more_lines, more_names = proxy.get_legend_handles_labels()
    ax.legend(lines + more_lines, names + more_names, fontsize=8, loc="lower right")
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    parser = checkpoint_parser(prog, __doc__, EXAMPLES, "configs/adapt.yaml")
    parser.add_argument("--split", choices=("train", "test", "shift"), default="shift", help="the stream's canvases")
    parser.add_argument("--images", type=int, default=2048, help="stream length")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--probe-images", type=int, default=0,
                        help="clean unlabelled training canvases guarding every update (set_probe); 0: no probe")
    defaults = AdaptationConfig()
    parser.add_argument("--target", choices=ADAPTATION_TARGETS, default=defaults.target,
                        help="self-supervised target: the set-level signal (does each kept patch, and each next "
                             "candidate, move the reduced prediction towards the full-token one), perturbation "
                             "importance (reduced forwards with patch groups dropped), the backbone's CLS attention "
                             "(one forward) or reward (does the module's choice agree with all tokens)")
    parser.add_argument("--optimizer", choices=tuple(DEFAULT_ADAPTATION_LR), default=defaults.optimizer,
                        help="sgd: every update moves the weights by at most lr * max-grad-norm; adam (lr ~3e-3): "
                             "adapts faster, each weight moves at most ~3.2 lr per update")
    parser.add_argument("--lr", type=float, help="step size (default: sgd 0.05, adam 3e-3)")
    parser.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    parser.add_argument("--rollback-drop", type=float, default=defaults.rollback_drop)
    parser.add_argument("--seed", type=int, default=0, help="the stream's seed")
    parser.add_argument("--backbone", type=Path, help="canvas ViT (.safetensors); default: the checkpoint's")
    parser.add_argument("--out", type=Path, help="output folder (default: CHECKPOINT/adapt)")
    parser.add_argument("--save-adapted", type=Path, metavar="FOLDER", help="write the adapted checkpoint here")
    args = parse_with_config(parser, argv)
    if args.images < 1 or args.batch_size < 1 or args.probe_images < 0:
        parser.error("need --images >= 1, --batch-size >= 1 and --probe-images >= 0")
    frozen, trained = load_checkpoint(parser, args.checkpoint, args.backbone)
    adapting, _ = load_checkpoint(parser, args.checkpoint, args.backbone)
    adapting.adaptation = AdaptationConfig(optimizer=args.optimizer, lr=args.lr, max_grad_norm=args.max_grad_norm,
                                           rollback_drop=args.rollback_drop, target=args.target)
    task = args.task or trained.get("task", "cluttered")
    out = args.out or args.checkpoint / "adapt"
    out.mkdir(parents=True, exist_ok=True)
    stream = task_data(task, args.split, args.images, args.seed)
    if args.probe_images:
        probe = task_data(task, "train", args.probe_images, args.seed + 7)
        print(f"clean probe: {args.probe_images} training canvases, agreement with full tokens "
              f"{adapting.set_probe(probe.images, probe.queries):.3f}")
    log = prequential(frozen, adapting, stream, args.batch_size)
    summary = summarize(log)
    meta = {"checkpoint": str(args.checkpoint), "task": task, "split": args.split, "batch_size": args.batch_size,
            "probe_images": args.probe_images, "adaptation": vars(adapting.adaptation), "seed": args.seed}
    save_json_atomic(out / "adapt.json", {"meta": meta, "summary": summary, "log": log})
    plot_stream(log, out / "adapt.png", f"{task} task, {args.split} stream: frozen vs. adapting")
    print(f"{summary['images']} {args.split} images: running accuracy {summary['frozen_accuracy']:.1f}% frozen, "
          f"{summary['adapting_accuracy']:.1f}% adapting; running agreement {summary['running_agreement']:.3f}; "
          f"{summary['rollbacks']} rollbacks, {summary['probe_rejections']} probe rejections")
    written = [out / "adapt.json", out / "adapt.png"]
    if args.save_adapted:
        adapting.save_pretrained(args.save_adapted)
        written.append(args.save_adapted)
    print("wrote " + ", ".join(map(str, written)))
    return out


if __name__ == "__main__":
    main()
