"""A short version of ``python -m arrcoc.bench.reliability``: online adaptation on a noise stream, with an
aggressive learning rate as the injected fault. Without the clean-probe guard clean accuracy falls; with it,
it never falls more than a point below the frozen module's, and every step stays within its bound."""

import pytest
import torch

from arrcoc.bench.reliability import ReliabilityConfig, frozen_module, run_stream
from arrcoc.data.canvas import cluttered_split
from arrcoc.models.canvas_vit import DEFAULT_CHECKPOINT
from arrcoc.relevance import AdaptationConfig

CONFIG = ReliabilityConfig(stream_images=80, batch_size=16, pretrain_images=128, probe_images=96, eval_images=200,
                           eval_every=1)
AGGRESSIVE_LR = 3.0  # 60 times the default: a fault the guard must catch


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    frozen = frozen_module(CONFIG, DEFAULT_CHECKPOINT)
    probe = cluttered_split("train", CONFIG.probe_images, seed=2).images  # its labels are never used
    test = cluttered_split("test", CONFIG.eval_images, seed=3)
    return frozen, probe, (test.images, test.labels)


def test_without_the_guard_the_fault_costs_clean_accuracy(setting):
    frozen, probe, evaluation = setting
    run = run_stream(frozen.fork(AdaptationConfig(lr=AGGRESSIVE_LR)), "noise", False, probe, evaluation, CONFIG)
    assert run["summary"]["worst_drop_points"] > 1.0  # the fault is real


def test_with_the_guard_clean_accuracy_never_falls_more_than_a_point(setting):
    frozen, probe, evaluation = setting
    run = run_stream(frozen.fork(AdaptationConfig(lr=AGGRESSIVE_LR)), "noise", True, probe, evaluation, CONFIG)
    summary = run["summary"]
    assert summary["worst_drop_points"] <= 1.0, run["trajectory"]["accuracy"]
    assert summary["probe_rejections"] > 0  # the guard did the work
    assert summary["largest_step_norm"] <= summary["step_bound"] * (1 + 1e-5)
    assert len(run["trajectory"]["accuracy"]) == CONFIG.stream_images // CONFIG.batch_size + 1  # measured each step
