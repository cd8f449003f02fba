"""The cheap relaxation (issue 21): the field's analytic state gradient, and host-side checks every few steps
that change neither the relaxed states nor the report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arrcoc.relevance.field import FieldEnergy, RelevanceField, grid_positions
from arrcoc.rules.relaxation import Relaxation, RelaxationDiverged, relax

SETTINGS = {"steps": 60, "step_size": 0.3, "momentum": 0.5, "tol": 1e-4}


def plain(**settings) -> Relaxation:
    """A monitored relaxation without undone steps unless ``settings`` say (the tests' starting point)."""
    return Relaxation(**{"step_size": 0.2, "momentum": 0.0, "tol": 1e-5, "backtracks": 0, "gradient_only": False,
                         **settings})


def random_field(budget: float = 0.25, batch: int = 4, query: bool = True) -> tuple[RelevanceField, torch.Tensor]:
    torch.manual_seed(0)
    field = RelevanceField(8, budget, adaptive_balance=query).double()
    with torch.no_grad():  # away from the initial values, so that every term matters
        for p in field.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = RelevanceField.pack(torch.randn(batch, 20, 3), torch.randn(batch, 20), grid_positions(4, 5),
                            torch.randn(batch, 8) if query else None).double()
    return field, x


def docstring_energy(field: RelevanceField, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The field's energy as its module docstring writes it, term by term."""
    rho, n = torch.sigmoid(r), r.shape[-1]
    k = field.budget * n if field.budget <= 1 else field.budget
    evidence, allocation, positions = x[..., :3], x[..., 3], x[0, :, 4:6]
    query = x[:, 0, 6:] if x.shape[-1] > 6 else None
    distance2, others = torch.cdist(positions, positions).pow(2), 1 - torch.eye(n, dtype=x.dtype)
    centre = torch.exp(-distance2 / (2 * torch.exp(field.excitation_width) ** 2))
    surround = torch.exp(-distance2 / (2 * torch.exp(field.inhibition_width) ** 2))
    lateral = (field.excitation * centre - field.inhibition * surround) * others
    coupling = torch.einsum("bi,ij,bj->b", rho, lateral, rho)
    entropy = (rho * r - F.softplus(r)).sum(-1)
    return (entropy - (rho * field.drive(evidence, allocation, query)).sum(-1) - 0.5 * coupling
            + F.softplus(field.competition) / (2 * n) * (rho.sum(-1) - k).pow(2))


class AutogradField(FieldEnergy):
    """The same energy without its analytic gradient: relax differentiates it with autograd."""

    def prepare(self, x):
        return None


@pytest.mark.parametrize("budget, query", [(0.25, True), (5, False)])  # budget as a fraction / a count
def test_the_fields_analytic_gradient_is_autograds(budget, query):
    """The field descends its energy's gradient in the beliefs' metric: the mean-field residual, dE/dr / rho'."""
    field, x = random_field(budget, query=query)
    energy = field.as_energy()
    for scale in (0.1, 1.0, 4.0):  # near zero to saturated sigmoids
        r = (scale * torch.randn(x.shape[0], x.shape[1], dtype=torch.float64)).requires_grad_(True)
        value, (gradient,) = energy.energy_and_gradient([r.detach()], energy.prepare(x))
        expected = docstring_energy(field, r, x)
        (autograd,) = torch.autograd.grad(expected.sum(), r)
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
        slope = torch.sigmoid(r.detach()) * (1 - torch.sigmoid(r.detach()))
        torch.testing.assert_close(gradient * slope, autograd, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nudge", [None, 0.5, -0.5])
def test_relaxing_with_the_analytic_gradient_is_relaxing_with_autograd(nudge):
    """Free and nudged phases (the nudge's cost goes through autograd either way) reach the same states along the
    same path."""
    field, x = random_field()
    target = torch.rand(x.shape[0], x.shape[1], dtype=torch.float64) if nudge else None
    runs = [relax(model, x, nudge or 0.0, target, how=plain(**SETTINGS)) for model in (field.as_energy(),
                                                                                 AutogradField(field))]
    (analytic, fast), (autograd, slow) = runs
    assert fast.converged and fast.steps == slow.steps > 5
    torch.testing.assert_close(analytic[0], autograd[0], rtol=0, atol=1e-12)
    assert fast.energy_trace == pytest.approx(slow.energy_trace, rel=1e-12, abs=1e-12)


def relax_counting_syncs(monkeypatch, *args, **kwargs):
    """relax's result and how many tensors it read to the host (each a device sync on an accelerator)."""
    reads = []

    def counted(read):
        def counting(self, *args):
            reads.append(read)
            return read(self, *args)
        return counting

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    try:
        return relax(*args, **kwargs), len(reads)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_checking_every_few_steps_changes_nothing_but_the_syncs(monkeypatch, momentum):
    field, x = random_field(batch=6)
    settings = {**SETTINGS, "momentum": momentum}
    ((states, report), syncs) = relax_counting_syncs(monkeypatch, field.as_energy(), x, check_every=1,
                                                     how=plain(**settings))
    assert report.converged and report.steps > 8 and syncs == report.steps + 1  # one read per check, none else
    for every in (3, 8, 100):
        ((sparse, sparse_report), sparse_syncs) = relax_counting_syncs(monkeypatch, field.as_energy(), x,
                                                                       check_every=every, how=plain(**settings))
        assert torch.equal(sparse[0], states[0])  # converged states stand still until the check
        assert (sparse_report.steps, sparse_report.energy, sparse_report.residual, sparse_report.energy_trace) == (
            report.steps, report.energy, report.residual, report.energy_trace)
        assert sparse_syncs == min(math.ceil((report.steps + 1) / every), math.ceil((settings["steps"] + 1) / every))
    # the step budget ends a relaxation between checks too
    (_, capped), _ = relax_counting_syncs(monkeypatch, field.as_energy(), x, check_every=8,
                                          how=plain(**{**settings, "steps": 5}))
    assert capped.steps == 5 and not capped.converged and len(capped.energy_trace) == 6


def test_a_divergence_is_raised_where_it_happened_however_rarely_checked():
    field, x = random_field()
    with torch.no_grad():
        field.excitation.fill_(5.0)  # a plain step of 50 overshoots
    raised = []
    for every in (1, 8):
        with pytest.raises(RelaxationDiverged) as info:
            relax(field.as_energy(), x, how=plain(steps=60, step_size=50.0), check_every=every)
        raised.append((info.value.step, info.value.energy_trace))
    assert raised[0] == raised[1] and raised[0][0] >= 1 and len(raised[0][1]) == raised[0][0] + 1
    with pytest.raises(ValueError, match="check_every"):
        relax(field.as_energy(), x, check_every=0)


def test_a_nan_in_the_input_is_raised_at_the_first_step():
    field, x = random_field()
    x[1, 3, 0] = math.nan  # one patch's evidence
    with pytest.raises(RelaxationDiverged, match="non-finite") as info:
        relax(field.as_energy(), x, check_every=8, how=plain(**SETTINGS))
    assert info.value.step == 0


def test_without_a_query_the_field_input_has_no_query_columns_and_the_same_energy() -> None:
    field, _ = random_field()
    evidence, positions = torch.randn(4, 20, 3, dtype=torch.float64), grid_positions(4, 5).double()
    allocation = torch.randn(4, 20, dtype=torch.float64)
    packed = RelevanceField.pack(evidence, allocation, positions, None)
    zeros = RelevanceField.pack(evidence, allocation, positions, torch.zeros(4, 8, dtype=torch.float64))
    assert packed.shape == (4, 20, 6) and zeros.shape == (4, 20, 14)
    r = torch.randn(4, 20, dtype=torch.float64)
    energy, with_zeros = field.as_energy(), field.as_energy()
    assert torch.allclose(energy.energy([r], packed), with_zeros.energy([r], zeros), atol=1e-12)
    params = list(field.parameters())
    grads = [torch.autograd.grad(energy.energy([r], x).sum(), params, allow_unused=True) for x in (packed, zeros)]
    for p, a, b in zip(params, *grads):  # what equilibrium propagation reads: dE/dtheta (unused: zero)
        assert torch.allclose(torch.zeros_like(p) if a is None else a, b, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.3])
def test_a_step_that_raises_the_energy_is_undone_at_half_the_step(momentum):
    """A step of 2.0 overshoots this field (excitation 1.5): with backtracks the relaxation halves the step until it
    descends and converges to the equilibrium a small step reaches; the same states and report however rarely the
    host checks; without backtracks, or with too few, it raises."""
    field, x = random_field()
    with torch.no_grad():
        field.excitation.fill_(1.5)
    reference, _ = relax(field.as_energy(), x, how=plain(steps=2000, step_size=0.05, tol=1e-9))
    runs = [relax(field.as_energy(), x, how=plain(steps=200, step_size=2.0, momentum=momentum, tol=1e-9, backtracks=6),
                  check_every=every) for every in (1, 3, 8)]
    (states, report) = runs[0]
    assert report.converged and report.halvings >= 1
    assert torch.allclose(states[0], reference[0], atol=1e-7)
    trace = report.energy_trace
    assert any(later > earlier for earlier, later in zip(trace, trace[1:]))  # the undone steps are in the trace
    for other_states, other in runs[1:]:
        assert torch.equal(other_states[0], states[0])
        assert (other.steps, other.energy, other.residual, other.halvings, other.energy_trace) == (
            report.steps, report.energy, report.residual, report.halvings, trace)
    for backtracks in (0, report.halvings - 1):
        with pytest.raises(RelaxationDiverged, match="energy rose"):
            relax(field.as_energy(), x, how=plain(steps=200, step_size=2.0, momentum=momentum, tol=1e-9,
                                                  backtracks=backtracks))


def test_the_last_step_undone_returns_the_states_before_it():
    field, x = random_field()
    with torch.no_grad():
        field.excitation.fill_(1.5)
    _, report = relax(field.as_energy(), x, how=plain(steps=200, step_size=2.0, tol=1e-9, backtracks=6))
    undone = next(step for step, (a, b) in enumerate(zip(report.energy_trace, report.energy_trace[1:]), 1) if b > a)
    for every in (1, 8):
        states, capped = relax(field.as_energy(), x, how=plain(steps=undone, step_size=2.0, tol=1e-9, backtracks=6),
                               check_every=every)
        before = (field.as_energy().init_states(x) if undone == 1 else
                  relax(field.as_energy(), x, how=plain(steps=undone - 1, step_size=2.0, tol=1e-9, backtracks=6))[0])
        assert capped.halvings == 1 and capped.energy == capped.energy_trace[-2]
        assert torch.equal(states[0], before[0])


@pytest.mark.parametrize("backtracks", [-1, 1.5, True])
def test_backtracks_must_be_a_count(backtracks):
    with pytest.raises(ValueError, match="backtracks"):
        Relaxation(backtracks=backtracks)


def test_the_fields_gradient_alone_is_the_gradient_of_its_energy():
    field, x = random_field()
    energy = field.as_energy()
    r = torch.randn(x.shape[0], x.shape[1], dtype=torch.float64)
    (alone,) = energy.gradient([r], energy.prepare(x))
    _, (with_energy,) = energy.energy_and_gradient([r], energy.prepare(x))
    assert torch.equal(alone, with_energy)


class CountingField(FieldEnergy):
    """The field's energy, counting how often the energy (not just its gradient) is evaluated."""

    def __init__(self, field):
        super().__init__(field)
        self.energies = 0

    def energy_and_gradient(self, states, prepared):
        self.energies += 1
        return super().energy_and_gradient(states, prepared)


@pytest.mark.parametrize("check_every", [1, 8])
def test_a_gradient_only_relaxation_reaches_the_same_equilibrium_without_the_energy_per_step(check_every):
    field, x = random_field(batch=6)
    monitored, monitored_report = relax(field.as_energy(), x, how=plain(**SETTINGS))
    counting = CountingField(field)
    states, report = relax(counting, x, how=plain(**SETTINGS, gradient_only=True), check_every=check_every)
    assert report.converged and report.residual < SETTINGS["tol"] and report.steps > 5 and report.gradient_only
    assert counting.energies == 1  # once, for the report: none per step
    assert report.energy_trace == [report.energy]
    assert report.energy == pytest.approx(float(field.as_energy().energy(states, x).sum().detach()), rel=1e-12)
    # both are within tol of the one equilibrium (this field's energy is strongly convex near it)
    assert torch.allclose(torch.sigmoid(states[0]), torch.sigmoid(monitored[0]), atol=1e-4)
    assert monitored_report.converged


def test_a_gradient_only_relaxation_that_cannot_converge_starts_over_watching_the_energy():
    """A step of 2.0 overshoots this field: the gradient-only descent does not converge, and the relaxation is then
    the monitored one, bit for bit (backtracking included)."""
    field, x = random_field()
    with torch.no_grad():
        field.excitation.fill_(1.5)
    settings = {"steps": 200, "step_size": 2.0, "momentum": 0.3, "tol": 1e-9, "backtracks": 6}
    monitored, monitored_report = relax(field.as_energy(), x, how=plain(**settings))
    states, report = relax(field.as_energy(), x, how=plain(**settings, gradient_only=True))
    assert monitored_report.converged and monitored_report.halvings >= 1
    assert torch.equal(states[0], monitored[0]) and report == monitored_report and not report.gradient_only
    # and a diverging one still raises, as the monitored relaxation does
    with pytest.raises(RelaxationDiverged, match="energy rose"):
        relax(field.as_energy(), x, how=plain(**{**settings, "backtracks": 0}, gradient_only=True))


def test_nudged_phases_and_autograd_energies_always_watch_the_energy():
    field, x = random_field()
    target = torch.rand(x.shape[0], x.shape[1], dtype=torch.float64)
    for model, beta, nudge in ((field.as_energy(), 0.5, target), (AutogradField(field), 0.0, None)):
        watched, watched_report = relax(model, x, beta, nudge, how=plain(**SETTINGS))
        states, report = relax(model, x, beta, nudge, how=plain(**SETTINGS, gradient_only=True))
        assert torch.equal(states[0], watched[0]) and report == watched_report and len(report.energy_trace) > 2


def test_an_energy_rule_relaxes_with_all_of_its_relaxation_settings(monkeypatch):
    """The EP rule's phases get every setting of its config (backtracks and gradient_only included), as the
    relevance module's own relaxation does."""
    from arrcoc.rules import energy_rule
    from arrcoc.rules.equilibrium_propagation import EquilibriumPropagation, EquilibriumPropagationConfig

    field, x = random_field()
    seen = []
    real = energy_rule.relax
    monkeypatch.setattr(energy_rule, "relax", lambda *args, **kwargs: seen.append(kwargs) or real(*args, **kwargs))
    config = EquilibriumPropagationConfig(steps=60, step_size=0.3, momentum=0.5, tol=1e-4, backtracks=3,
                                          gradient_only=True, beta=0.5)
    rule = EquilibriumPropagation(field, config)
    free = rule.free_phase(x)
    assert free[0].shape == x.shape[:2]
    how = seen[0]["how"]
    assert how.backtracks == 3 and how.gradient_only is True and how.tol == 1e-4


@pytest.mark.parametrize("gradient_only", [1, "yes", None])
def test_gradient_only_must_be_a_boolean(gradient_only):
    with pytest.raises(ValueError, match="gradient_only"):
        Relaxation(gradient_only=gradient_only)
