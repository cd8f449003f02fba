"""The all-backprop reference: the field differentiated through its equilibrium, and the relevance module trained
end to end by autograd inside the module (never through the backbone)."""

import pytest
import torch

import arrcoc
from arrcoc.baselines import module_backprop_step
from arrcoc.data.toy_patches import query_patch_task, single_patch_task
from arrcoc.models.toy_vit import toy_vit
from arrcoc.relevance.field import RelevanceField, grid_positions
from arrcoc.rules.relaxation import Relaxation, relax, relax_differentiably

TIGHT = Relaxation(steps=5000, step_size=0.3, momentum=0.5, tol=1e-13, backtracks=0, gradient_only=False)


def test_implicit_gradient_of_the_field_equilibrium_equals_finite_differences():
    """d/dtheta of L(r*(theta)) by the implicit function theorem, against central differences of relaxations."""
    field = RelevanceField(query_dim=4, budget=0.25).double()
    with torch.no_grad():  # away from the initial values, where some of the terms vanish
        field.excitation.fill_(0.5), field.inhibition.fill_(0.2), field.competition.fill_(0.3)
        torch.nn.init.normal_(field.balance.weight, std=0.5)
    evidence = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    allocation = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    query = torch.randn(2, 4, dtype=torch.float64)
    weights = torch.randn(2, 9, dtype=torch.float64)

    def loss(relaxation):
        x = RelevanceField.pack(evidence, allocation, grid_positions(3, 3).double(), query)
        (r,), report = relaxation(field.as_energy(), x, how=TIGHT)
        assert report.converged
        return (weights * torch.sigmoid(r)).sum()

    variables = [evidence, allocation, *field.parameters()]
    implicit = torch.autograd.grad(loss(relax_differentiably), variables)
    eps = 1e-6
    for variable, grad in zip(variables, implicit):
        numeric = torch.zeros_like(variable).view(-1)
        flat = variable.data.view(-1)
        for i in range(flat.numel()):
            value = flat[i].item()
            flat[i] = value + eps
            up = loss(relax).item()
            flat[i] = value - eps
            down = loss(relax).item()
            flat[i] = value
            numeric[i] = (up - down) / (2 * eps)
        assert numeric.abs().max() > 1e-3  # every parameter moves the equilibrium
        assert torch.allclose(grad.reshape(-1), numeric, atol=1e-8, rtol=0), (grad.reshape(-1) - numeric).abs().max()


def test_the_implicit_gradient_holds_where_beliefs_saturate():
    """Drives of +-40 saturate rho in float32, where the energy's Hessian (rho' times the mean-field Jacobian)
    is singular: the gradient goes through the mean-field residual instead, finite and the same where rho is not
    saturated (the all-backprop reference once stopped there)."""
    torch.manual_seed(0)
    field = RelevanceField(query_dim=4, budget=0.25)
    allocation = (15 * torch.randn(2, 16)).requires_grad_(True)
    x = RelevanceField.pack(torch.randn(2, 16, 3), allocation, grid_positions(4, 4), torch.randn(2, 4))
    (r,), report = relax_differentiably(field.as_energy(), x)
    assert report.converged and float(r.detach().abs().max()) > 30
    torch.sigmoid(r).sum().backward()
    assert bool(torch.isfinite(allocation.grad).all()) and float(allocation.grad.abs().max()) > 0
    assert all(bool(torch.isfinite(p.grad).all()) for p in field.parameters() if p.grad is not None)


def test_differentiable_relaxation_returns_the_same_equilibrium():
    field = RelevanceField(query_dim=4, budget=0.25).double()
    x = RelevanceField.pack(torch.randn(3, 16, 3, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64),
                            grid_positions(4, 4).double(), torch.randn(3, 4, dtype=torch.float64))
    (plain,), _ = relax(field.as_energy(), x, how=TIGHT)
    (attached,), _ = relax_differentiably(field.as_energy(), x, how=TIGHT)
    assert attached.requires_grad and torch.equal(plain, attached.detach())


@pytest.mark.parametrize("with_query", [False, True])
def test_every_subnetwork_in_use_learns_and_the_backbone_gets_no_gradient(with_query):
    backbone = toy_vit()
    config = {"target": "box"}
    if with_query:  # as the canvas query task: the queried patches against the image's other patches
        config |= {"participatory_contrast": "patches", "rules": {"participatory": {"name": "contrastive-hebbian"}}}
    model = arrcoc.attach(backbone, budget=0.25, config=config)
    g = torch.Generator().manual_seed(0)
    batch = query_patch_task(16, g) if with_query else single_patch_task(16, g)
    module_backprop_step(model, batch.images, batch.query, boxes=batch.boxes)
    assert all(p.grad is None for p in backbone.parameters())
    used = set(model.relevance.subnetworks()) - (set() if with_query else {"participatory"})
    unused = set() if with_query else {model.relevance.field.balance.weight}  # reads the query alone
    for name, subnet in model.relevance.subnetworks().items():
        grads = [p.grad for p in subnet.parameters() if p not in unused]
        if name in used:
            assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), name
            assert sum(float(g.abs().sum()) for g in grads) > 0, name
        else:  # no query: the participatory coupling takes no part
            assert all(g is None for g in grads), name
    # the field's every energy parameter gets a gradient through its equilibrium (its balance's weight reads the
    # query: none without one)
    field = model.relevance.field
    moved = [field.evidence_weight, field.evidence_bias, field.excitation, field.inhibition, field.excitation_width,
             field.inhibition_width, field.competition, field.balance.bias]
    assert all(float(p.grad.abs().sum()) > 0 for p in moved + ([field.balance.weight] if with_query else []))


def test_the_backprop_reference_lowers_its_loss_on_a_toy_task():
    model = arrcoc.attach(toy_vit(), budget=0.25, config={"target": "box", "optimizer": {"name": "adam", "lr": 1e-2}})
    batch = single_patch_task(32, torch.Generator().manual_seed(0))
    losses = [module_backprop_step(model, batch.images, boxes=batch.boxes)["loss"] for _ in range(10)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_training_runs_the_backprop_reference_with_the_local_rules_optimizer_and_schedule():
    from arrcoc.data.tasks import TaskData
    from arrcoc.training import LEARNING, train_arrcoc

    assert "backprop" in LEARNING
    batch = single_patch_task(16, torch.Generator().manual_seed(0))
    data = TaskData(batch.images, torch.zeros(16, dtype=torch.long), batch.boxes)
    config = arrcoc.RelevanceConfig(target="box", budget=0.25)
    model, _ = train_arrcoc(toy_vit(), config, data, steps=3, batch_size=8, seed=0, learning="backprop")
    assert model.optimizer.param_groups[0]["lr"] == 0  # the cosine schedule ran to its end
    assert model.optimizer.state  # the module's own optimizer took the steps


@pytest.mark.parametrize("learning", ["local", "backprop", "global"])
def test_the_trainer_makes_the_steps_of_each_way_of_learning(learning):
    """One loop for every way the module learns: its steps equal the wrapper's and the baselines' own (same
    seed, same batches), the gradient clipped as each clips it."""
    from arrcoc.baselines import GlobalBackpropConfig, global_backprop_step
    from arrcoc.training import Batch, Trainer, TrainerConfig

    data = [single_patch_task(8, torch.Generator().manual_seed(i)) for i in range(2)]
    batches = [Batch(b.images, boxes=b.boxes, labels=b.answer % 10) for b in data]
    config = arrcoc.RelevanceConfig(target="box", budget=0.25)
    torch.manual_seed(0)
    trained = arrcoc.attach(toy_vit(), config=config)
    Trainer(trained, TrainerConfig(learning=learning, max_grad_norm=1.0, schedule="constant", progress=False)
            ).fit(batches)
    torch.manual_seed(0)
    stepped = arrcoc.attach(toy_vit(), config=config)
    for b in batches:
        if learning == "local":
            stepped.learn(b.images, boxes=b.boxes, max_grad_norm=1.0)
        elif learning == "backprop":
            module_backprop_step(stepped, b.images, boxes=b.boxes, max_grad_norm=1.0)
        else:
            global_backprop_step(stepped, b.images, b.labels, config=GlobalBackpropConfig(max_grad_norm=1.0))
    for name, value in stepped.relevance.state_dict().items():
        assert torch.equal(trained.relevance.state_dict()[name], value), name
    with pytest.raises(ValueError, match="learning must be one of"):
        TrainerConfig(learning="hebbian")
