"""Hebbian rules learn what the theory says they learn."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arrcoc.rules import RuleContext, build_rule


def gaussian_with_known_covariance(dim: int, variances: list[float], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    scale = torch.tensor(variances).sqrt()

    def sample(n: int) -> torch.Tensor:
        return (torch.randn(n, dim, generator=g) * scale) @ basis.T

    return sample, basis  # principal components are the columns of basis, in order


def train_unsupervised(rule_config, layer, sample, steps: int, lr: float, batch: int = 64):
    rule = build_rule(rule_config, layer)
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        rule.step(RuleContext(sample(batch)))
        opt.step()
        sched.step()
    return rule


def test_oja_finds_the_top_principal_component_with_unit_norm():
    sample, basis = gaussian_with_known_covariance(10, [4.0, 2.0, 1.0] + [0.5] * 7)
    layer = nn.Linear(10, 1, bias=False)
    train_unsupervised({"name": "hebbian-oja", "form": "subspace"}, layer, sample, steps=1500, lr=0.02)
    w = layer.weight.detach()[0]
    assert abs(F.cosine_similarity(w, basis[:, 0], dim=0).item()) >= 0.99
    assert abs(w.norm().item() - 1.0) < 0.02


def test_sanger_recovers_the_top_k_components_in_order():
    sample, basis = gaussian_with_known_covariance(12, [6.0, 4.0, 2.5, 1.5] + [0.3] * 8)
    layer = nn.Linear(12, 3, bias=False)
    train_unsupervised({"name": "hebbian-oja", "form": "sanger"}, layer, sample, steps=3000, lr=0.01)
    w = layer.weight.detach()
    for k in range(3):
        assert abs(F.cosine_similarity(w[k], basis[:, k], dim=0).item()) >= 0.98, k
    assert torch.allclose(w @ w.T, torch.eye(3), atol=0.05)  # orthonormal rows


def test_oja_subspace_rule_spans_the_principal_subspace():
    sample, basis = gaussian_with_known_covariance(12, [6.0, 4.0, 2.5] + [0.3] * 9)
    layer = nn.Linear(12, 3, bias=False)
    train_unsupervised({"name": "hebbian-oja", "form": "subspace"}, layer, sample, steps=3000, lr=0.01)
    w = layer.weight.detach()
    projector = basis[:, :3] @ basis[:, :3].T
    assert torch.allclose(w @ projector, w, atol=0.05)  # rows lie in the top-3 subspace


@pytest.mark.parametrize("rule", [
    {"name": "hebbian-oja", "form": "soft-wta", "temperature": 0.05},
    {"name": "hebbian-oja", "form": "rank-wta", "anti_hebbian_rank": 2, "anti_hebbian_strength": 0.2},
])
def test_competitive_units_become_cluster_prototypes(rule):
    g = torch.Generator().manual_seed(1)
    centers = F.normalize(torch.randn(4, 16, generator=g), dim=1)

    def sample(n):
        idx = torch.randint(0, 4, (n,), generator=g)
        return F.normalize(centers[idx] + 0.1 * torch.randn(n, 16, generator=g), dim=1)

    layer = nn.Linear(16, 8, bias=False)  # more units than clusters, as in competitive learning
    train_unsupervised(rule, layer, sample, steps=1500, lr=0.05)
    similarity = F.normalize(layer.weight.detach(), dim=1) @ centers.T
    assert (similarity.max(dim=0).values >= 0.95).all()  # every cluster has a prototype unit


def test_bcm_unit_becomes_selective_to_one_of_two_patterns():
    patterns = torch.tensor([[1.0, 0.3, 0.0, 0.2], [0.2, 0.0, 1.0, 0.3]])
    g = torch.Generator().manual_seed(2)
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.uniform_(0.2, 0.4)
    rule = build_rule({"name": "hebbian-bcm", "threshold_momentum": 0.9, "initial_threshold": 0.1}, layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(3000):
        opt.zero_grad(set_to_none=True)
        rule.step(RuleContext(patterns[torch.randint(0, 2, (1,), generator=g)]))
        opt.step()
    response = torch.relu(layer(patterns)).detach().flatten()
    assert response.max() > 0.5
    assert response.min() < 0.1 * response.max()  # strongly selective to one pattern
    # the threshold is a running mean of y^2: between the two responses' squares
    assert response.min() ** 2 < rule.threshold_0.item() < response.max() ** 2


def test_contrastive_hebbian_is_the_delta_rule_for_a_linear_unit():
    layer = nn.Linear(5, 3)
    x, t = torch.randn(16, 5), torch.randn(16, 3)
    build_rule("contrastive-hebbian", layer).step(RuleContext(x, target=t))
    by_rule = [layer.weight.grad.clone(), layer.bias.grad.clone()]
    layer.zero_grad(set_to_none=True)
    (0.5 * (layer(x) - t).pow(2).sum(1).mean()).backward()
    assert torch.allclose(by_rule[0], layer.weight.grad, atol=1e-6)
    assert torch.allclose(by_rule[1], layer.bias.grad, atol=1e-6)


def infonce(queries_mapped, keys, temperature, symmetric=True):
    scores = keys @ queries_mapped.T / temperature
    labels = torch.arange(len(keys))
    loss = F.cross_entropy(scores, labels)
    return 0.5 * (loss + F.cross_entropy(scores.T, labels)) if symmetric else loss


def test_infonce_hebbian_equals_the_infonce_gradient_of_its_layer():
    for symmetric in (True, False):
        layer = nn.Linear(6, 4)
        q, k = torch.randn(10, 6), torch.randn(10, 4)
        rule = build_rule({"name": "infonce-hebbian", "temperature": 0.2, "symmetric": symmetric}, layer)
        rule.step(RuleContext(q, target=k))
        by_rule = [layer.weight.grad.clone(), layer.bias.grad.clone()]
        layer.zero_grad(set_to_none=True)
        infonce(layer(q), k, 0.2, symmetric).backward()
        assert torch.allclose(by_rule[0], layer.weight.grad, atol=1e-5)
        assert torch.allclose(by_rule[1], layer.bias.grad, atol=1e-5)


def test_infonce_hebbian_learns_to_retrieve_the_paired_key():
    g = torch.Generator().manual_seed(3)
    true_map = torch.randn(16, 12, generator=g)
    layer = nn.Linear(12, 16, bias=False)
    rule = build_rule({"name": "infonce-hebbian", "temperature": 0.1}, layer)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)

    def batch(n):
        q = torch.randn(n, 12, generator=g)
        return q, F.normalize(q @ true_map.T, dim=1) + 0.05 * torch.randn(n, 16, generator=g)

    def retrieval_accuracy():  # which of 64 queries belongs to each key (cosine similarity)
        q, k = batch(64)
        with torch.no_grad():
            similarity = F.normalize(k, dim=1) @ F.normalize(layer(q), dim=1).T
        return (similarity.argmax(1) == torch.arange(64)).float().mean().item()

    before = retrieval_accuracy()
    for _ in range(400):
        q, k = batch(64)
        opt.zero_grad(set_to_none=True)
        rule.step(RuleContext(q, target=k))
        opt.step()
    assert before < 0.2
    assert retrieval_accuracy() > 0.9


def test_modulated_sanger_learns_the_components_of_the_gated_samples_only():
    """A third factor gates which samples a unit learns from: half of the samples vary along one axis and are
    gated in, half along another with more variance and are gated out."""
    g = torch.Generator().manual_seed(0)

    def sample(n):
        gated = torch.rand(n, generator=g) < 0.5
        x = torch.randn(n, 6, generator=g) * 0.1
        x[gated, 0] += 2.0 * torch.randn(int(gated.sum()), generator=g)
        x[~gated, 1] += 3.0 * torch.randn(int((~gated).sum()), generator=g)
        return x, gated.float()

    directions = {}
    for modulated in (False, True):
        layer = nn.Linear(6, 1, bias=False)
        rule = build_rule({"name": "hebbian-oja", "form": "sanger", "modulated": modulated}, layer)
        opt = torch.optim.SGD(layer.parameters(), lr=0.01)
        for _ in range(1500):
            x, gate = sample(64)
            opt.zero_grad(set_to_none=True)
            rule.step(RuleContext(x, target=gate if modulated else None))
            opt.step()
        directions[modulated] = F.normalize(layer.weight.detach()[0], dim=0).abs()
    assert directions[False][1] >= 0.98  # every sample: the axis of largest variance
    assert directions[True][0] >= 0.98  # gated: the axis the gated samples vary along


def test_modulated_oja_says_what_third_factor_it_needs():
    rule = build_rule({"name": "hebbian-oja", "modulated": True}, nn.Linear(4, 2, bias=False))
    with pytest.raises(ValueError, match="one factor per sample"):
        rule.step(RuleContext(torch.randn(8, 4)))
