"""The rule contract: fills .grad of its own sub-network only, from a config, never NaN."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arrcoc.rules import NonFiniteUpdate, RuleContext, available_rules, build_rule


def mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def test_backprop_equals_loss_backward_exactly():
    net = mlp(6, 16, 16, 4)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    rule = build_rule({"name": "backprop"}, net)
    rule.step(RuleContext(x, target=y))
    by_rule = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(by_rule, net.parameters()))


def test_backprop_with_external_output_error_and_mse():
    net = mlp(5, 8, 3)
    x, t = torch.randn(10, 5), torch.randn(10, 3)
    rule = build_rule({"name": "backprop", "loss": "mse"}, net)
    error = net(x).detach() - t  # dC/dy of 0.5*sum((y-t)^2), not batch-averaged
    rule.step(RuleContext(x, output_error=error))
    g1 = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    (0.5 * (net(x) - t).pow(2).sum()).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(g1, net.parameters()))


@pytest.mark.parametrize("name", ["backprop", "fa", "dfa", "hebbian-oja", "hebbian-bcm", "frozen"])
def test_rule_touches_only_its_own_subnetwork(name):
    body, head = mlp(6, 12, 12), nn.Linear(12, 3)
    model = nn.Sequential(body, nn.Tanh(), head)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    head_rule = build_rule("backprop", head)
    body_rule = build_rule(name, body) if name in ("hebbian-oja", "hebbian-bcm", "frozen") else None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if body_rule is None:  # a supervised rule trains the head; the body stays untouched
        rule = build_rule(name, head)
        rule.step(RuleContext(torch.tanh(body(x)).detach(), target=y))
        assert all(p.grad is None for p in body.parameters())
        assert all(p.grad is not None for p in head.parameters())
    else:  # two rules on two sub-networks of one model, same step
        h = torch.tanh(body(x)).detach()
        body_rule.step(RuleContext(x))
        head_rule.step(RuleContext(h, target=y))
        assert all(p.grad is not None for p in head.parameters())
        if name == "frozen":
            assert all(p.grad is None for p in body.parameters())
        else:
            assert all(p.grad is not None for p in (m.weight for m in body if isinstance(m, nn.Linear)))
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    owners = {n for n, p in model.named_parameters() if p.grad is not None}
    assert changed == owners


def test_grad_accumulates_like_autograd():
    net = mlp(4, 4)
    x, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    rule = build_rule("backprop", net)
    rule.step(RuleContext(x, target=y))
    once = net[0].weight.grad.clone()
    rule.step(RuleContext(x, target=y))
    assert torch.allclose(net[0].weight.grad, 2 * once)


def test_unknown_rule_lists_known_ones():
    with pytest.raises(KeyError) as err:
        build_rule({"name": "hebian-oja"}, nn.Linear(2, 2))
    for known in available_rules():
        assert known in str(err.value)


def test_unknown_hyper_parameter_is_named():
    with pytest.raises(TypeError, match="temprature"):
        build_rule({"name": "hebbian-oja", "temprature": 0.5}, nn.Linear(2, 2))


def test_bad_hyper_parameter_value():
    with pytest.raises(ValueError, match="form"):
        build_rule({"name": "hebbian-oja", "form": "pca"}, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="loss"):
        build_rule({"name": "backprop", "loss": "hinge"}, nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["fa", "dfa", "hebbian-oja", "hebbian-bcm", "contrastive-hebbian", "infonce-hebbian"])
def test_rule_without_linear_layers_fails_at_construction(name):
    with pytest.raises(TypeError, match="nn.Linear"):
        build_rule(name, nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_single_layer_rules_reject_stacks():
    with pytest.raises(TypeError, match="exactly one"):
        build_rule("contrastive-hebbian", mlp(3, 4, 5))


def test_missing_target_is_a_clear_error():
    with pytest.raises(ValueError, match="target"):
        build_rule("fa", mlp(3, 4)).step(RuleContext(torch.randn(2, 3)))


@pytest.mark.parametrize("name", ["backprop", "fa", "dfa", "hebbian-oja"])
def test_non_finite_update_raises_and_writes_nothing(name):
    net = mlp(4, 8, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    x[0, 0] = float("nan")
    before = [p.detach().clone() for p in net.parameters()]
    rule = build_rule(name, net)
    with pytest.raises(NonFiniteUpdate) as err:
        rule.step(RuleContext(x, target=y))
    assert name in str(err.value) and "weight" in str(err.value)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))


def test_list_of_modules_is_owned_as_a_chain():
    a, b = nn.Linear(3, 5), nn.Linear(5, 2)
    rule = build_rule("backprop", [a, nn.Tanh(), b])
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    rule.step(RuleContext(x, target=y))
    ref_a, ref_b = a.weight.grad.clone(), b.weight.grad.clone()
    a.zero_grad(set_to_none=True), b.zero_grad(set_to_none=True)
    F.cross_entropy(b(torch.tanh(a(x))), y).backward()
    assert torch.equal(ref_a, a.weight.grad) and torch.equal(ref_b, b.weight.grad)


def test_rule_state_is_in_its_state_dict_not_the_models():
    net = mlp(4, 8, 3)
    rule = build_rule({"name": "fa", "seed": 3}, net)
    assert set(rule.state_dict()) == {"feedback_0", "feedback_1"}
    assert not any(k.startswith("feedback") for k in net.state_dict())
    again = build_rule({"name": "fa", "seed": 3}, mlp(4, 8, 3))
    assert torch.equal(again.feedback_0, rule.feedback_0)  # seeded: reproducible
