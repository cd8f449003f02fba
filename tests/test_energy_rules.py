"""Energy-based rules (EP, CHL, PC) and target propagation (DTP, GAIT-prop) against backprop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arrcoc.rules import RuleContext, build_rule
from arrcoc.rules.equilibrium_propagation import EquilibriumPropagation
from arrcoc.rules.layered_energy import HopfieldEnergy, PredictionErrorEnergy
from arrcoc.rules.relaxation import Relaxation, RelaxationDiverged, relax


def make_mlp(sizes=(6, 8, 8, 3), activation=nn.Tanh, dtype=torch.float64) -> nn.Sequential:
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        modules.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            modules.append(activation())
    return nn.Sequential(*modules).to(dtype)


def batch(n=16, features=6, classes=3, dtype=torch.float64):
    return torch.randn(n, features, dtype=dtype), torch.randint(0, classes, (n,))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def backprop_gradient(mlp: nn.Module, x, t) -> torch.Tensor:
    return flat(torch.autograd.grad(F.cross_entropy(mlp(x), t), list(mlp.parameters())))


def rule_update(rule, mlp: nn.Module, ctx: RuleContext) -> torch.Tensor:
    update = rule.compute_update(ctx)
    return flat(update[p] for p in mlp.parameters())


def cosine(a, b) -> float:
    return F.cosine_similarity(a, b, dim=0).item()


def relative_error(update, exact) -> float:
    return ((update - exact).norm() / exact.norm()).item()


# --- relaxation -------------------------------------------------------------------------------
def plain_descent(**settings) -> Relaxation:
    """Gradient descent without momentum, undone steps or the gradient-only free phase, unless ``settings`` say."""
    return Relaxation(**{"momentum": 0.0, "backtracks": 0, "gradient_only": False, **settings})



def test_relax_converges_batched_and_descends():
    mlp = make_mlp()
    with torch.no_grad():  # small weights: a unique, stable fixed point
        for p in mlp.parameters():
            p.mul_(0.5)
    model = HopfieldEnergy(mlp)
    x, _ = batch(8)
    states, report = relax(model, x, how=plain_descent(steps=2000, tol=1e-9, step_size=0.5))
    assert report.converged and report.residual < 1e-9 and report.steps > 0
    assert all(b <= a + 1e-12 for a, b in zip(report.energy_trace, report.energy_trace[1:]))
    # batched: each sample relaxed alone reaches the same state as in the batch
    for i in (0, 5):
        alone, _ = relax(model, x[i : i + 1], how=plain_descent(steps=2000, tol=1e-9, step_size=0.5))
        for s_batch, s_alone in zip(states, alone):
            torch.testing.assert_close(s_batch[i : i + 1], s_alone, atol=1e-8, rtol=0)
    # momentum (with restarts) reaches the same fixed point
    fast, fast_report = relax(model, x, how=plain_descent(steps=2000, tol=1e-9, step_size=0.5, momentum=0.9))
    assert fast_report.converged
    for s_plain, s_fast in zip(states, fast):
        torch.testing.assert_close(s_plain, s_fast, atol=1e-8, rtol=0)


def test_prediction_error_free_equilibrium_is_the_forward_pass():
    mlp = make_mlp()
    x, _ = batch()
    states, report = relax(PredictionErrorEnergy(mlp), x, how=plain_descent(steps=10, tol=1e-12))
    assert report.steps == 0 and report.converged
    torch.testing.assert_close(states[-1], mlp(x).detach())


def test_divergence_raises_and_leaves_weights_and_grads_unchanged():
    mlp = make_mlp()
    x, t = batch()
    rule = build_rule({"name": "ep", "step_size": 50.0}, mlp)
    for p in mlp.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = [p.detach().clone() for p in mlp.parameters()]
    with pytest.raises(RelaxationDiverged) as info:
        rule.step(RuleContext(x, t))
    assert info.value.step >= 1 and len(info.value.energy_trace) == info.value.step + 1
    for p, b in zip(mlp.parameters(), before):
        assert torch.equal(p, b) and torch.equal(p.grad, torch.full_like(p, 0.5))


def test_invalid_relaxation_arguments():
    mlp = make_mlp()
    x, t = batch()
    model = PredictionErrorEnergy(mlp)
    target = torch.zeros(16, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="beta"):
        relax(model, x, beta=0.0, target=target)
    with pytest.raises(ValueError, match="steps"):
        relax(model, x, how=Relaxation(steps=0))
    with pytest.raises(ValueError, match="check_every"):
        relax(model, x, check_every=0)
    with pytest.raises(ValueError, match="beta"):
        relax(model, x, beta=0.1)  # a nudge without a target
    with pytest.raises(ValueError, match="beta"):
        build_rule({"name": "ep", "beta": 0.0}, mlp)
    for name in ("ep", "chl", "pc"):
        with pytest.raises(ValueError, match="steps"):
            build_rule({"name": name, "steps": 0}, mlp)


# --- equilibrium propagation ------------------------------------------------------------------


def ep_error(mlp, x, t, exact, beta: float, nudge: str) -> float:
    rule = build_rule({"name": "ep", "beta": beta, "nudge": nudge, "tol": 1e-9, "steps": 5000}, mlp)
    return relative_error(rule_update(rule, mlp, RuleContext(x, t)), exact)


def test_symmetric_ep_matches_backprop_at_small_beta():
    mlp = make_mlp()
    x, t = batch()
    rule = build_rule({"name": "ep", "beta": 1e-3, "nudge": "symmetric", "tol": 1e-8}, mlp)
    assert cosine(rule_update(rule, mlp, RuleContext(x, t)), backprop_gradient(mlp, x, t)) >= 0.999


def test_ep_error_is_linear_one_sided_and_quadratic_symmetric_in_beta():
    mlp = make_mlp()
    x, t = batch()
    exact = backprop_gradient(mlp, x, t)
    betas = [1e-3, 1e-2, 1e-1]
    log_b = torch.tensor([math.log(b) for b in betas], dtype=torch.float64)

    def slope(nudge: str) -> float:
        log_e = torch.tensor([math.log(ep_error(mlp, x, t, exact, b, nudge)) for b in betas], dtype=torch.float64)
        centred = log_b - log_b.mean()
        return ((centred * (log_e - log_e.mean())).sum() / centred.pow(2).sum()).item()

    assert 0.85 <= slope("one-sided") <= 1.15
    assert 1.7 <= slope("symmetric") <= 2.3


def test_ep_with_an_explicit_output_error_matches_the_target_path():
    mlp = make_mlp()
    x, t = batch()
    output = mlp(x).detach().requires_grad_(True)
    (error,) = torch.autograd.grad(F.cross_entropy(output, t), output)
    rule = build_rule({"name": "ep", "beta": 1e-3, "tol": 1e-8}, mlp)
    via_error = rule_update(rule, mlp, RuleContext(x, output_error=error))
    assert cosine(via_error, backprop_gradient(mlp, x, t)) >= 0.999


def test_ep_on_the_hopfield_energy_follows_the_gradient_at_its_fixed_point():
    """Implicit differentiation: dL/dtheta = -d/dtheta <dE/ds, H^{-1} dC/ds> at the free equilibrium."""
    mlp = make_mlp((4, 5, 3))
    with torch.no_grad():
        for p in mlp.parameters():
            p.mul_(0.5)
    x, t = batch(4, 4)
    config = {"name": "ep", "energy": "hopfield", "beta": 1e-3, "tol": 1e-10, "steps": 5000, "step_size": 0.5}
    rule = build_rule(config, mlp)
    update = rule_update(rule, mlp, RuleContext(x, t))

    model = rule.energy
    free, _ = relax(model, x, how=plain_descent(steps=5000, tol=1e-12, step_size=0.5))
    sizes = [s.numel() for s in free]

    def unflatten(v):
        return [c.view_as(s) for c, s in zip(v.split(sizes), free)]

    def total_energy(v):
        return model.energy(unflatten(v), x).sum()

    v0 = flat(free)
    hessian = torch.autograd.functional.hessian(total_energy, v0)
    s = v0.clone().requires_grad_(True)
    (cost_grad,) = torch.autograd.grad(F.cross_entropy(model.output(unflatten(s)), t), s)
    response = torch.linalg.solve(hessian, cost_grad)
    (energy_grad,) = torch.autograd.grad(total_energy(s), s, create_graph=True)
    exact = flat(torch.autograd.grad(-(energy_grad * response).sum(), list(mlp.parameters())))
    assert cosine(update, exact) >= 0.999
    assert relative_error(update, exact) < 1e-2


def test_persistent_ep_keeps_the_free_states_only_after_a_step():
    mlp = make_mlp()
    x, t = batch()
    rule = build_rule({"name": "ep", "persistent": True}, mlp)
    rule.compute_update(RuleContext(x, t))
    assert rule._free_states is None  # compute_update alone leaves the rule's state alone
    rule.step(RuleContext(x, t))
    torch.testing.assert_close(rule._free_states[-1], mlp(x).detach())


# --- contrastive Hebbian learning -------------------------------------------------------------


def test_chl_with_mse_and_beta_one_clamps_the_output_to_the_target():
    mlp = make_mlp()
    x, _ = batch()
    target = torch.randn(16, 3, dtype=torch.float64)
    rule = build_rule({"name": "chl", "loss": "mse", "beta": 1.0}, mlp)
    free = rule.free_phase(x)
    clamped = rule.clamped_phase(x, free, RuleContext(x, target))
    torch.testing.assert_close(clamped[-1], target)


def test_chl_update_is_a_descent_direction_close_to_backprop():
    mlp = make_mlp()
    x, t = batch()
    rule = build_rule({"name": "chl", "beta": 1e-2, "tol": 1e-8}, mlp)
    # the clamp's pull on the hidden layers preconditions the output error: close, not equal
    assert cosine(rule_update(rule, mlp, RuleContext(x, t)), backprop_gradient(mlp, x, t)) >= 0.9


# --- predictive coding ------------------------------------------------------------------------


def test_fixed_prediction_pc_equals_backprop():
    mlp = make_mlp()
    x, t = batch()
    rule = build_rule({"name": "pc", "variant": "fixed-prediction", "steps": 500, "tol": 1e-12}, mlp)
    assert relative_error(rule_update(rule, mlp, RuleContext(x, t)), backprop_gradient(mlp, x, t)) < 1e-5


def test_strict_pc_approaches_backprop_with_weak_feedback_and_enough_inference():
    mlp = make_mlp()
    x, t = batch()
    exact = backprop_gradient(mlp, x, t)

    def error(beta: float, steps: int) -> float:
        rule = build_rule({"name": "pc", "beta": beta, "steps": steps, "tol": 1e-9}, mlp)
        return relative_error(rule_update(rule, mlp, RuleContext(x, t)), exact)

    assert error(1e-3, 1000) < 1e-2
    assert error(1e-3, 1000) < error(1e-1, 1000) < error(1.0, 1000)
    assert error(1e-3, 1000) < error(1e-3, 10)


# --- target propagation -----------------------------------------------------------------------


@pytest.mark.parametrize("activation", [nn.Tanh, lambda: nn.LeakyReLU(0.2)])
def test_gait_prop_matches_backprop_on_an_orthogonal_invertible_network(activation):
    mlp = make_mlp((8, 8, 8, 8), activation)
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.orthogonal_(m.weight)
    x, t = batch(features=8, classes=8)
    rule = build_rule({"name": "gait-prop", "target_step": 1e-3}, mlp)
    assert cosine(rule_update(rule, mlp, RuleContext(x, t)), backprop_gradient(mlp, x, t)) >= 0.99


def test_gait_prop_rejects_non_invertible_activations():
    with pytest.raises(TypeError, match="invertible"):
        build_rule("gait-prop", make_mlp(activation=nn.ReLU))


def test_tp_inverses_are_rule_state_and_learn_to_reconstruct():
    mlp = make_mlp()
    x, t = batch(64)
    rule = build_rule({"name": "tp", "inverse_lr": 0.1, "noise": 0.0}, mlp)
    assert {"inverse_weight_1", "inverse_bias_1", "inverse_weight_2", "inverse_bias_2"} <= set(rule.state_dict())

    def reconstruction_error() -> float:
        h = rule.forward_activities(x)
        return (rule.inverse(2, h[3]) - h[2]).pow(2).mean().item()

    start = reconstruction_error()
    for _ in range(200):
        rule.compute_update(RuleContext(x, t))
        rule.advance_state()
    assert reconstruction_error() < 0.5 * start


def test_target_propagation_last_layer_update_is_its_gradient():
    mlp = make_mlp()
    x, t = batch()
    exact = torch.autograd.grad(F.cross_entropy(mlp(x), t), [mlp[-1].weight])[0]
    for name in ("tp", "gait-prop"):
        update = build_rule(name, mlp).compute_update(RuleContext(x, t))
        torch.testing.assert_close(update[mlp[-1].weight], exact)


# --- all rules ----------------------------------------------------------------------------------

TRAINING_CONFIGS = [
    {"name": "ep", "beta": 0.1, "tol": 1e-2, "steps": 100},
    {"name": "ep", "beta": 0.2, "nudge": "random-sign", "tol": 1e-2, "steps": 100},
    {"name": "ep", "energy": "hopfield", "beta": 0.5, "tol": 1e-2, "steps": 100},
    {"name": "chl", "beta": 0.5, "tol": 1e-2, "steps": 100},
    {"name": "chl", "energy": "hopfield", "beta": 0.5, "tol": 1e-2, "steps": 100},
    {"name": "pc", "beta": 0.1, "steps": 30},
    {"name": "pc", "variant": "fixed-prediction", "steps": 20},
    {"name": "tp", "target_step": 0.1},
    {"name": "gait-prop", "target_step": 0.01, "orthogonal_penalty": 0.01},
]


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_rule_trains_a_small_mlp_through_a_torch_optimizer(config):
    torch.manual_seed(1)
    mlp = make_mlp((8, 16, 16, 3) if config["name"] != "gait-prop" else (8, 8, 8, 3), dtype=torch.float32)
    teacher = torch.randn(8, 3)
    x = torch.randn(64, 8)
    t = (x @ teacher).argmax(1)
    rule = build_rule(config, mlp)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=0.02)

    def loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(mlp(x), t).item()

    start = loss()
    for _ in range(20):
        optimizer.zero_grad()
        rule.step(RuleContext(x, t))
        optimizer.step()
    assert loss() < 0.6 * start


@pytest.mark.parametrize("name", ["ep", "chl", "pc", "tp", "gait-prop"])
def test_rules_build_from_configs_and_reject_unknown_hyper_parameters(name):
    mlp = make_mlp()
    assert build_rule({"name": name}, mlp).name == name
    with pytest.raises(TypeError, match="unknown hyper-parameter"):
        build_rule({"name": name, "learning_rate_typo": 1.0}, mlp)


def test_ep_builds_with_its_options():
    rule = build_rule({"name": "ep", "beta": 0.1, "nudge": "one-sided", "energy": "hopfield"}, make_mlp())
    assert isinstance(rule, EquilibriumPropagation) and isinstance(rule.energy, HopfieldEnergy)
    with pytest.raises(ValueError, match="nudge"):
        build_rule({"name": "ep", "nudge": "sideways"}, make_mlp())
    with pytest.raises(ValueError, match="energy"):
        build_rule({"name": "ep", "energy": "ising"}, make_mlp())


@pytest.mark.parametrize("name", ["ep", "pc", "tp", "gait-prop"])
def test_rules_accept_nested_blocks_and_a_bare_linear(name):
    flat_mlp = make_mlp()
    nested = nn.Sequential(*(nn.Sequential(flat_mlp[i], flat_mlp[i + 1]) for i in (0, 2)), flat_mlp[4])
    x, t = batch()
    exact = backprop_gradient(flat_mlp, x, t)
    config = {"name": name, **({"beta": 1e-3, "tol": 1e-8} if name == "ep" else {})}
    if name in ("ep", "pc"):
        assert cosine(rule_update(build_rule(config, nested), flat_mlp, RuleContext(x, t)), exact) > 0.95
    readout = nn.Linear(6, 3).double()
    update = build_rule(config, readout).compute_update(RuleContext(x, t))
    exact_readout = torch.autograd.grad(F.cross_entropy(readout(x), t), list(readout.parameters()))
    assert cosine(flat(update[p] for p in readout.parameters()), flat(exact_readout)) > 0.999
