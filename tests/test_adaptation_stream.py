"""A short version of ``python -m arrcoc.bench.reliability``: online adaptation on a noise stream, with an
aggressive learning rate as the injected fault. Without the clean-probe guard clean accuracy falls; with it,
it never falls more than a point below the frozen module's, and every step stays within its bound. With Adam
at its default learning rate, the guard keeps clean accuracy within 0.3 points of the frozen module's."""

import json

import pytest
import torch

from arrcoc.bench.reliability import ReliabilityConfig, frozen_module, main, run_stream
from arrcoc.data.canvas import cluttered_split
from arrcoc.models.canvas_vit import DEFAULT_CHECKPOINT
from arrcoc.relevance import AdaptationConfig

CONFIG = ReliabilityConfig(stream_images=80, batch_size=16, pretrain_images=128, probe_images=96, eval_images=200,
                           eval_every=1)
AGGRESSIVE_LR = 3.0  # 60 times the default: a fault the guard must catch


def frozen_setting(config: ReliabilityConfig):
    """The frozen module, the guard's probe and the labelled clean test canvases, as the benchmark makes them."""
    torch.manual_seed(0)
    frozen = frozen_module(config, DEFAULT_CHECKPOINT)
    probe = cluttered_split("train", config.probe_images, seed=2).images  # its labels are never used
    test = cluttered_split("test", config.eval_images, seed=3)
    return frozen, probe, (test.images, test.labels)


@pytest.fixture(scope="module")
def setting():
    return frozen_setting(CONFIG)


def test_without_the_guard_the_fault_costs_clean_accuracy(setting):
    frozen, probe, evaluation = setting
    adapting = frozen.fork(AdaptationConfig(lr=AGGRESSIVE_LR, target=CONFIG.target))
    run = run_stream(adapting, "noise", False, probe, evaluation, CONFIG)
    assert run["summary"]["worst_drop_points"] > 1.0  # the fault is real


def test_with_the_guard_clean_accuracy_never_falls_more_than_a_point(setting):
    frozen, probe, evaluation = setting
    adapting = frozen.fork(AdaptationConfig(lr=AGGRESSIVE_LR, target=CONFIG.target))
    run = run_stream(adapting, "noise", True, probe, evaluation, CONFIG)
    summary = run["summary"]
    assert summary["worst_drop_points"] <= 1.0, run["trajectory"]["accuracy"]
    assert summary["probe_rejections"] > 0  # the guard did the work
    assert summary["largest_step"] <= summary["step_bound"] * (1 + 1e-5)
    assert len(run["trajectory"]["accuracy"]) == CONFIG.stream_images // CONFIG.batch_size + 1  # measured each step


# Adam at its default step size on a noise stream, against a module that learned on the benchmark's 2,048 clean
# canvases (one with accuracy to lose). The attention target keeps it fast; on 500 clean test canvases 0.3 points
# is less than two images.
ADAM_CONFIG = ReliabilityConfig(stream_images=160, batch_size=32, pretrain_images=2048, probe_images=256,
                                eval_images=500, eval_every=1)


@pytest.fixture(scope="module")
def trained_setting():
    return frozen_setting(ADAM_CONFIG)


def test_with_the_guard_adam_at_its_default_lr_loses_no_clean_accuracy(trained_setting):
    """Adam's small steps on noise shift the module's clean predictions a little at a time: too little to flip
    the probe's top classes at first, and each of the many probe tests of a stream may pass by chance. Counted
    in flipped classes, at a confidence per update, the guard let them cost 1.4 points here."""
    frozen, probe, evaluation = trained_setting
    adapting = frozen.fork(AdaptationConfig(optimizer="adam", target="attention"))
    run = run_stream(adapting, "noise", True, probe, evaluation, ADAM_CONFIG)
    assert run["summary"]["worst_drop_points"] <= 0.3, run["trajectory"]["accuracy"]


def test_the_benchmark_command_runs_the_target_runs_alone_and_merges_runs_made_side_by_side(tmp_path):
    """``--runs target`` makes just the guarded run at the default lr per stream and optimizer, ``--runs rest`` the
    others; ``--render`` of runs made in processes side by side writes one report with all, in one process's order,
    its target judged."""
    for stream in ("noise", "adversarial"):
        main(["--quick", "--images", "32", "--runs", "target", "--streams", stream, "--optimizers", "sgd",
              "--out", str(tmp_path / stream)])
    report = json.loads((tmp_path / "noise" / "reliability.json").read_text())
    assert [(run["stream"], run["guarded"], run["lr"]) for run in report["runs"]] == [("noise", True, 0.05)]
    main(["--render", str(tmp_path / "noise" / "reliability.json"), str(tmp_path / "adversarial" / "reliability.json"),
          "--out", str(tmp_path / "both")])
    merged = json.loads((tmp_path / "both" / "reliability.json").read_text())
    assert [run["stream"] for run in merged["runs"]] == ["noise", "adversarial"]
    text = (tmp_path / "both" / "reliability.md").read_text()
    assert "`--runs target`" in text and "**Target**" in text
    main(["--quick", "--images", "32", "--runs", "rest", "--streams", "noise", "--optimizers", "sgd",
          "--out", str(tmp_path / "rest")])
    main(["--render", str(tmp_path / "rest" / "reliability.json"), str(tmp_path / "both" / "reliability.json"),
          "--out", str(tmp_path / "all")])
    everything = json.loads((tmp_path / "all" / "reliability.json").read_text())
    assert [(run["stream"], run["lr"], run["guarded"]) for run in everything["runs"]] == [
        ("noise", 0.05, True), ("noise", 0.05, False), ("noise", 1.0, True), ("noise", 1.0, False),
        ("adversarial", 0.05, True)]
    assert "`--runs target`" not in (tmp_path / "all" / "reliability.md").read_text()
    assert (tmp_path / "both" / "reliability.png").stat().st_size > 0


def test_a_run_records_the_commit_it_started_at_not_the_one_it_ended_at(tmp_path, monkeypatch):
    """A long benchmark reads the commit as it starts (:func:`output_dir`): the checkout may move on meanwhile (a
    reliability run recorded the commit made while it ran)."""
    from arrcoc import reporting

    reporting.source_commit.cache_clear()
    reporting.output_dir(tmp_path / "run", quick=False)
    started = reporting.source_commit()

    run = reporting.subprocess.run

    def moved(command, *args, **kwargs):
        if "rev-parse" in command:
            raise AssertionError("the commit is read again after the run started")
        return run(command, *args, **kwargs)

    monkeypatch.setattr(reporting.subprocess, "run", moved)
    assert reporting.run_metadata("python -m x", False)["commit"] == started
