"""The inference forward shaped for a GPU (issue 37): the field's fixed-step relaxation selects what the monitored
one does, no host sync, few operators, and one graph under ``torch.compile(fullgraph=True)``."""

import dataclasses

import pytest
import torch

import arrcoc
from arrcoc.bench import ops
from arrcoc.data.toy_patches import query_patch_task
from arrcoc.metrics import count_dispatch
from arrcoc.models.canvas_vit import load_canvas_vit
from arrcoc.models.toy_vit import toy_vit
from arrcoc.relevance.field import FieldRelaxation, RelevanceField, grid_distances, grid_positions
from arrcoc.rules.relaxation import Relaxation, relax


def trained_toy(steps: int = 60) -> arrcoc.ARRCOC:
    """A toy model whose field has learned something (coupling and competition away from their start)."""
    torch.manual_seed(0)
    model = arrcoc.attach(toy_vit(), budget=0.25, config={"target": "box"})
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = query_patch_task(16, g)
        model.learn(batch.images, batch.query, boxes=batch.boxes)
    return model


@pytest.mark.parametrize("task", ["cluttered", "query"])
def test_the_fixed_step_relaxation_keeps_what_the_monitored_one_keeps(task):
    """On the canvas benchmark's trained models, at the budgets they trained at: the same top K on >= 99% of test
    canvases (the benchmark measures 1,000; here 200)."""
    model = arrcoc.ARRCOC.from_pretrained(f"benchmarks/results/models/{task}", load_canvas_vit())
    assert ops.agreement(model, task, 200) >= 0.99


def test_many_fixed_steps_reach_the_monitored_equilibrium():
    field = RelevanceField(8, 0.25).double()
    with torch.no_grad():
        field.excitation.fill_(1.5), field.inhibition.fill_(0.7), field.competition.fill_(1.0)
    evidence, query = torch.randn(4, 20, 3, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    allocation = torch.randn(4, 20, dtype=torch.float64)
    positions = grid_positions(4, 5).double()
    tight = Relaxation(steps=2000, step_size=0.5, momentum=0.0, tol=1e-10, backtracks=0, gradient_only=False)
    x = RelevanceField.pack(evidence, allocation, positions, query)
    (monitored,), report = relax(field.as_energy(), x, how=tight)
    assert report.converged
    fixed = field.equilibrium(evidence, allocation, query, grid_distances(4, 5, evidence.device, evidence.dtype),
                              steps=300, step_size=0.6)
    torch.testing.assert_close(fixed, monitored, atol=1e-7, rtol=0)


def test_inference_reads_nothing_back_and_dispatches_few_operators():
    """No host sync in the inference forward (the images' NaN check off, as on an accelerator) and the module's
    operators within a generous bound (the benchmark reports the counts: `arrcoc bench ops`)."""
    model = trained_toy(10)
    model.check_values = False
    batch = query_patch_task(8, torch.Generator().manual_seed(1))
    with torch.no_grad():
        counts = {name: ops.dispatched(fn) for name, fn in ops.forwards(model, batch.images, batch.query).items()}
    assert counts["ARR-COC"]["syncs"] == 0 == counts["random-K"]["syncs"]
    # the field's 40 mean-field steps are 120 of them (docs/decisions.md, "The field decides")
    assert counts["ARR-COC"]["ops"] - counts["random-K"]["ops"] <= 300, counts
    model.check_values = None  # the default: images and queries checked where they are on the CPU (no sync there)
    with torch.no_grad():
        assert count_dispatch(lambda: model(batch.images, batch.query)).syncs == 2


def test_the_inference_forward_compiles_as_one_graph_and_computes_what_eager_does():
    model = trained_toy(10)
    batch = query_patch_task(4, torch.Generator().manual_seed(2))
    with torch.no_grad():
        compiled = ops.compiles_whole(model, batch.images, batch.query)
    assert compiled == {"fullgraph": True, "reason": None}


def test_inference_steps_zero_relaxes_as_training_does_and_bad_settings_are_refused():
    model = trained_toy(10)
    batch = query_patch_task(8, torch.Generator().manual_seed(3))
    config = model.relevance.config
    with torch.no_grad():
        fixed = model.relevance_map(batch.images, batch.query).relevance
        model.relevance.config = dataclasses.replace(config, relaxation=dataclasses.replace(
            config.relaxation, inference_steps=0))
        monitored = model.relevance_map(batch.images, batch.query).relevance
    torch.testing.assert_close(fixed, monitored, atol=5e-3, rtol=0)
    for bad in ({"inference_steps": -1}, {"inference_steps": 2.5}, {"inference_step_size": 1.5}):
        with pytest.raises(ValueError, match="inference_step"):
            FieldRelaxation(**bad)


def test_the_graph_captured_forward_computes_what_eager_does_and_falls_back_with_a_warning():
    """``graphs=True`` (the default on CUDA, where the compiled forward is captured in CUDA graphs; here it is only
    compiled): the same output as the eager forward, compiled once per shape. A forward that fails to compile warns
    once and runs eager from then on."""
    model = trained_toy(10)
    batch = query_patch_task(4, torch.Generator().manual_seed(4))
    assert not model.graphs_wanted(batch.images)  # default: on CUDA only
    model.graphs = True
    with torch.no_grad():
        eager = model.reduced_forward(batch.images, batch.query)
        torch.testing.assert_close(model(batch.images, batch.query), eager, atol=1e-5, rtol=0)
        assert model.graphed.failure is None

    broken = model.fork()
    broken.graphs = True

    def fails(*args):
        raise RuntimeError("no graph today")

    broken.graphed.compiled = fails
    with torch.no_grad(), pytest.warns(UserWarning, match="no graph today"):
        torch.testing.assert_close(broken(batch.images, batch.query), eager)
    assert broken.graphed.failure == "RuntimeError: no graph today"
    with torch.no_grad():
        torch.testing.assert_close(broken(batch.images, batch.query), eager)  # eager, without a second warning
    assert not model.graphs_wanted(batch.images)  # with autograd on (training, the references): eager
