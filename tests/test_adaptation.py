"""Label-free online adaptation: it helps under a shift, its updates are bounded, rollback is exact."""

import copy

import pytest
import torch
import torch.nn.functional as F

import arrcoc
from arrcoc.data.toy_patches import coloured_patch_stream
from arrcoc.models.toy_vit import toy_vit
from arrcoc.relevance import AdaptationConfig


@pytest.fixture(scope="module")
def backbone():
    """A toy ViT trained (by ordinary backprop, as a pretrained backbone would be) to name the colour
    of the one smooth patch: its prediction depends on that patch, and only on it."""
    model = toy_vit(num_classes=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        images, labels, _ = coloured_patch_stream(64, g, noise=0.2 * torch.rand(1, generator=g).item())
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()
    images, labels, _ = coloured_patch_stream(200, g)
    assert (model(images).argmax(1) == labels).float().mean() > 0.95
    return model


def ranking(wrapped, images, where) -> float:
    return (wrapped.relevance_map(images).logits.flatten(1).argmax(1) == where).float().mean().item()


def test_online_adaptation_improves_ranking_without_labels(backbone):
    wrapped = arrcoc.attach(backbone, budget=0.25)
    probe, _, where = coloured_patch_stream(200, torch.Generator().manual_seed(99))
    frozen = ranking(wrapped, probe, where)
    g = torch.Generator().manual_seed(7)
    for _ in range(80):
        images, _, _ = coloured_patch_stream(32, g)  # labels are never used
        report = wrapped.adapt(images)
        assert not report.rolled_back
    assert ranking(wrapped, probe, where) >= frozen + 0.5
    assert report.running_agreement > 0.8  # the reduced prediction now matches the full one


def test_each_online_update_is_bounded(backbone):
    wrapped = arrcoc.attach(backbone, budget=0.25)
    g = torch.Generator().manual_seed(3)
    bound = wrapped.adaptation.lr * wrapped.adaptation.max_grad_norm
    for _ in range(5):
        before = torch.cat([p.detach().flatten().clone() for p in wrapped.relevance.parameters()])
        wrapped.adapt(coloured_patch_stream(16, g)[0])
        after = torch.cat([p.detach().flatten() for p in wrapped.relevance.parameters()])
        assert (after - before).norm() <= bound * (1 + 1e-5)


def test_adam_updates_move_each_weight_a_bounded_step_and_help(backbone):
    wrapped = arrcoc.attach(backbone, budget=0.25, adaptation=AdaptationConfig(optimizer="adam"))
    assert wrapped.adaptation.lr == 3e-3  # the optimizer's own default step size
    probe, _, where = coloured_patch_stream(200, torch.Generator().manual_seed(99))
    frozen = ranking(wrapped, probe, where)
    g = torch.Generator().manual_seed(3)
    largest = 0.0
    for _ in range(80):
        before = torch.cat([p.detach().flatten().clone() for p in wrapped.relevance.parameters()])
        wrapped.adapt(coloured_patch_stream(32, g)[0])
        after = torch.cat([p.detach().flatten() for p in wrapped.relevance.parameters()])
        largest = max(largest, (after - before).abs().max().item())
    # Adam's step per weight is at most lr (1 - beta1) / sqrt(1 - beta2) ~ 3.16 lr (Kingma & Ba 2015, 2.1)
    assert 0 < largest <= 3.2 * wrapped.adaptation.lr
    assert ranking(wrapped, probe, where) >= frozen + 0.5
    moments = wrapped.online.optimizer
    wrapped.adaptation = AdaptationConfig(optimizer="adam", lr=1e-3)  # a new config starts afresh
    wrapped.adapt(coloured_patch_stream(8, g)[0])
    assert wrapped.online.optimizer is not moments


def test_rollback_restores_the_last_good_weights_exactly(backbone):
    wrapped = arrcoc.attach(backbone, budget=0.25)
    g = torch.Generator().manual_seed(5)
    for _ in range(60):
        before = copy.deepcopy(wrapped.relevance.state_dict())
        if wrapped.adapt(coloured_patch_stream(32, g)[0]).snapshot:
            rollback_point = before
    with torch.no_grad():  # a harmful drift that blinds the module: every learned weight lost
        for p in wrapped.relevance.parameters():
            p.zero_()
    wrapped.adaptation.lr = 0.0  # and no relearning, so only the rollback can repair it
    for _ in range(20):  # the label-free proxy falls and the module rolls back
        report = wrapped.adapt(coloured_patch_stream(32, g)[0])
        if report.rolled_back:
            break
    assert report.rolled_back
    state = wrapped.relevance.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in rollback_point.items())


def test_adaptation_can_learn_from_the_backbones_attention_and_refuses_unknown_targets(backbone):
    from arrcoc.relevance import AdaptationConfig

    wrapped = arrcoc.attach(backbone, budget=0.25, adaptation=AdaptationConfig(target="attention"))
    images, _, _ = coloured_patch_stream(16, torch.Generator().manual_seed(3))
    before = copy.deepcopy(wrapped.relevance.state_dict())
    report = wrapped.adapt(images)
    assert not report.rolled_back
    assert any(not torch.equal(before[k], v) for k, v in wrapped.relevance.state_dict().items())
    with pytest.raises(ValueError, match="adaptation target"):
        AdaptationConfig(target="labels")


def test_cheaper_adaptation_updates_every_nth_call_on_part_of_the_batch(backbone):
    """``every`` skips the calls between updates entirely; ``images_per_update`` learns on the batch's first
    images only, so the update equals one made on those images alone."""
    g = torch.Generator().manual_seed(5)
    batches = [coloured_patch_stream(16, g)[0] for _ in range(3)]
    sparse = arrcoc.attach(backbone, budget=0.25, adaptation=AdaptationConfig(every=2, images_per_update=4))
    alone = arrcoc.attach(backbone, budget=0.25)
    alone.relevance.load_state_dict(sparse.relevance.state_dict())
    weights = lambda m: torch.cat([p.detach().flatten().clone() for p in m.relevance.parameters()])  # noqa: E731
    sparse.adapt(batches[0])
    alone.adapt(batches[0][:4])
    assert torch.allclose(weights(sparse), weights(alone))
    before = weights(sparse)
    report = sparse.adapt(batches[1])  # the second call: no update, no work
    assert report.skipped == "updates every 2 calls" and torch.equal(weights(sparse), before)
    sparse.adapt(batches[2])
    assert not torch.equal(weights(sparse), before)
    with pytest.raises(ValueError, match="every >= 1"):
        AdaptationConfig(every=0)


def test_the_probe_guard_keeps_updates_that_lose_nothing_on_clean_images(backbone):
    """An update that barely moves the probe's predictions is kept: the module keeps learning where it does no
    harm. With no loss allowed at all, each of the same updates would have to show a gain, and none is kept."""
    g = torch.Generator().manual_seed(3)
    wrapped = arrcoc.attach(backbone, budget=0.25, adaptation=AdaptationConfig(optimizer="adam"))
    for _ in range(80):  # unguarded, until the module agrees with the full-token predictions
        wrapped.adapt(coloured_patch_stream(32, g)[0])
    strict = wrapped.fork(AdaptationConfig(optimizer="adam", probe_max_drop=0.0))
    probe = coloured_patch_stream(128, torch.Generator().manual_seed(11))[0]
    assert wrapped.set_probe(probe) == strict.set_probe(probe) == 1.0
    stream = [coloured_patch_stream(32, g)[0] for _ in range(10)]
    assert not any(wrapped.adapt(images).probe_rejected for images in stream)
    assert all(strict.adapt(images).probe_rejected for images in stream)
