"""The DynamicViT-style baseline: a perturbed top-K keeps exactly K patches forward and passes the gradient of
the expected selection backward; its step learns a selection through the frozen backbone."""

import math

import pytest
import torch
import torch.nn.functional as F

import arrcoc
from arrcoc.backbones import select, top_k
from arrcoc.baselines import GlobalBackpropConfig, global_backprop_step
from arrcoc.baselines.global_backprop import perturbed_top_k
from arrcoc.data.toy_patches import single_patch_task
from arrcoc.models.toy_vit import toy_vit


def test_every_draw_keeps_exactly_k_patches_and_a_small_perturbation_is_the_top_k():
    torch.manual_seed(0)
    scores = torch.randn(5, 16)
    slots = perturbed_top_k(scores, 4, sigma=1.0, samples=50)
    assert slots.shape == (5, 4, 16)
    assert torch.allclose(slots.sum(2), torch.ones(5, 4))  # each slot holds one patch per draw
    assert slots.sum(1).max() <= 1 + 1e-6  # no draw puts one patch in two slots
    hard = perturbed_top_k(scores, 4, sigma=1e-6, samples=10)
    assert torch.allclose(hard, F.one_hot(top_k(scores, 4), 16).float())  # the inference selection, in raster order


def test_the_gradient_is_that_of_the_probability_of_selection():
    # two patches, K = 1: P(patch 0 kept) = Phi((s0 - s1) / (sigma sqrt 2)), slope 1 / (sigma sqrt(4 pi)) at s0 = s1
    torch.manual_seed(0)
    scores = torch.zeros(1, 2, requires_grad=True)
    sigma = 0.5
    perturbed_top_k(scores, 1, sigma, samples=200_000)[0, 0, 0].backward()
    slope = 1 / (sigma * math.sqrt(4 * math.pi))
    assert scores.grad[0, 0].item() == pytest.approx(slope, rel=0.05)
    assert scores.grad[0, 1].item() == pytest.approx(-slope, rel=0.05)


def test_the_step_learns_the_selection_the_labels_need_and_never_touches_the_backbone():
    # labels: per image, the class that keeping its one textured patch favours over keeping another patch, so
    # that the loss at a budget of one patch falls only if the module learns to keep the textured one
    torch.manual_seed(0)
    backbone = toy_vit(num_classes=2)
    with torch.no_grad():
        backbone.head.weight.mul_(10)  # a random head is nearly uniform: make the selection matter to the loss
    model = arrcoc.attach(backbone, budget=1 / 16)
    batch = single_patch_task(32, torch.Generator().manual_seed(0))
    adapter = model.adapter
    with torch.no_grad():
        tokens = adapter.tokens(batch.images)
        textured = adapter.head(adapter.run_blocks(select(tokens, batch.answer[:, None])))
        other = adapter.head(adapter.run_blocks(select(tokens, (batch.answer[:, None] + 5) % 16)))
    labels = (textured - other).argmax(-1)
    losses = [global_backprop_step(model, batch.images, labels, config=GlobalBackpropConfig(samples=50))["loss"]
              for _ in range(20)]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert (model.relevance_map(batch.images).kept[:, 0] == batch.answer).float().mean() >= 0.9
    assert all(p.grad is None for p in backbone.parameters())  # the gradient passed through, the weights kept none


@pytest.mark.parametrize("settings", [{"sigma": 0.0}, {"samples": 1}, {"max_grad_norm": -1.0}])
def test_bad_settings_are_refused(settings):
    with pytest.raises(ValueError):
        GlobalBackpropConfig(**settings)
