"""Feedback alignment and direct feedback alignment train networks without weight transport."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from arrcoc.rules import RuleContext, build_rule, feedback_weight_alignment, update_angles


def regression_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 10))
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
    x = torch.randn(512, 20, generator=g)
    with torch.no_grad():
        return x, teacher(x)


@pytest.mark.parametrize("feedback", ["random", "usf", "frsf"])
def test_fa_trains_a_two_layer_regression_and_aligns_with_the_gradient(feedback):
    x, y = regression_task()
    net = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10))
    rule = build_rule({"name": "fa", "loss": "mse", "feedback": feedback}, net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss0 = F.mse_loss(net(x), y).item()
    hidden_angles = []
    for step in range(1500):
        idx = torch.randint(0, 512, (64,))
        ctx = RuleContext(x[idx], target=y[idx])
        if step % 100 == 0:  # measured on the whole data set, so batch noise does not blur it
            hidden_angles.append(update_angles(rule, RuleContext(x, target=y))["0.weight"])
        opt.zero_grad(set_to_none=True)
        rule.step(ctx)
        opt.step()
    assert F.mse_loss(net(x), y).item() <= 0.1 * loss0  # loss down >= 90%
    assert max(hidden_angles[-5:]) < 60.0  # and it stays aligned
    if feedback == "random":
        assert hidden_angles[0] > 75.0  # starts unaligned: the alignment is learned
        last = feedback_weight_alignment(rule)[-1]
        assert last.angle < 85.0 and last.norm_ratio > 0


def test_fa_update_differs_from_backprop_only_below_the_top_layer():
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    ctx = RuleContext(torch.randn(9, 5), target=torch.randint(0, 3, (9,)))
    angles = update_angles(build_rule("fa", net), ctx)
    assert angles["2.weight"] < 1e-3 and angles["2.bias"] < 1e-3  # the output layer's update is exact
    assert angles["0.weight"] > 1.0


def test_dfa_trains_an_mlp_on_sklearn_digits_to_90_percent():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1350], perm[1350:]
    net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    rule = build_rule("dfa", net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _epoch in range(30):
        for idx in train[torch.randperm(len(train))].split(32):
            opt.zero_grad(set_to_none=True)
            rule.step(RuleContext(x[idx], target=y[idx]))
            opt.step()
    accuracy = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy >= 0.90


def test_dfa_feeds_the_output_error_directly_to_hidden_layers():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    rule = build_rule({"name": "dfa", "loss": "mse"}, net)
    x, t = torch.randn(8, 4), torch.randn(8, 3)
    update = rule.compute_update(RuleContext(x, target=t))
    with torch.no_grad():  # hand-written DFA for the middle layer
        h1 = torch.relu(net[0](x))
        a2 = net[2](h1)
        e = (net(x) - t) / 8
        delta2 = (e @ rule.feedback_2) * (a2 > 0)
    assert torch.allclose(update[net[2].weight], delta2.T @ h1, atol=1e-6)
    assert rule.feedback_1.shape == (3, 6) and rule.feedback_2.shape == (3, 5)
