"""The ARR-COC relevance module: identity at budget 1, local learning only, toy tasks, checkpoints."""

import dataclasses

import pytest
import torch

import arrcoc
from arrcoc.config import find_config
from arrcoc.data.toy_patches import (
    GRID,
    WHITE,
    patch_boxes,
    query_patch_task,
    single_patch_task,
    textured_patch_images,
    word_queries,
)
from arrcoc.models.toy_vit import toy_vit
from arrcoc.relevance import ARRCOC, Ablations, RelevanceConfig
from arrcoc.relevance.field import FieldRelaxation, RelevanceField, grid_distances, grid_positions
from arrcoc.rules.relaxation import Relaxation, RelaxationDiverged, relax


def test_budget_one_is_the_identity():
    model = toy_vit()
    images = torch.rand(3, 3, 32, 32)
    assert torch.equal(arrcoc.attach(model, budget=1.0)(images), model(images))


def test_budget_one_is_the_identity_for_transformers():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=5)).eval()
    images = torch.rand(2, 3, 32, 32)
    wrapped = arrcoc.attach(model, budget=1.0)
    assert torch.equal(wrapped(images), model(pixel_values=images).logits)
    assert arrcoc.attach(model, budget=0.5)(images).shape == (2, 5)


@pytest.mark.parametrize("dropped", ["discard", "fuse", "merge"])
def test_exactly_k_tokens_reach_the_backbone(dropped):
    model = toy_vit()
    wrapped = arrcoc.attach(model, budget=0.25, config={"dropped": dropped})
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    wrapped(torch.rand(2, 3, 32, 32))
    assert seen == [1 + 4 + (dropped == "fuse")]  # CLS + K patches (+ one summary token)
    assert wrapped.relevance_map(torch.rand(2, 3, 32, 32)).kept.shape == (2, 4)


def test_set_budget_changes_k_without_retraining_and_validates():
    model = toy_vit()
    wrapped = arrcoc.attach(model, budget=0.25)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    images = torch.rand(2, 3, 32, 32)
    wrapped.set_budget(0.5)(images)
    assert seen == [1 + 8] and wrapped.relevance.field.budget == 0.5
    assert torch.equal(wrapped.set_budget(1.0)(images), model(images))
    with pytest.raises(ValueError, match="budget"):
        wrapped.set_budget(1.5)


def test_learning_never_touches_the_backbone_and_each_subnetwork_follows_its_rule():
    model = toy_vit()
    backbone_before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"target": "attention", "rules": {"perspectival_readout": {"name": "frozen"},
                                               "perspectival_encoder": {"name": "hebbian-oja", "form": "sanger"}}}
    wrapped = arrcoc.attach(model, budget=0.25, config=config)
    subnets = wrapped.relevance.subnetworks()
    before = {n: [p.detach().clone() for p in s.parameters()] for n, s in subnets.items()}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        images, _ = textured_patch_images(8, [WHITE], g)
        wrapped.learn(images, query=word_queries(torch.randint(0, 2, (8,), generator=g), g))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone_before.items())
    changed = {n: any(not torch.equal(a, b) for a, b in zip(before[n], s.parameters())) for n, s in subnets.items()}
    assert changed == {"perspectival_encoder": True, "perspectival_readout": False, "participatory": True,
                       "field": True, "allocator": True}


def test_field_relaxation_converges_on_random_evidence():
    wrapped = arrcoc.attach(toy_vit(), budget=0.25)
    field = wrapped.relevance.field
    with torch.no_grad():
        field.excitation.fill_(1.5), field.inhibition.fill_(0.5), field.competition.fill_(1.0)
    evidence, allocation = torch.randn(16, GRID * GRID, 3), torch.randn(16, GRID * GRID)
    x = field.pack(evidence, allocation, torch.rand(1, GRID * GRID, 2) * GRID, torch.randn(16, 384))
    _, report = relax(field.as_energy(), x, how=Relaxation(steps=200, step_size=0.3, momentum=0.5, tol=1e-5))
    assert report.converged and report.residual < 1e-5


def train_on(task, steps: int, **config) -> float:
    torch.manual_seed(0)
    wrapped = arrcoc.attach(toy_vit(), budget=0.25, config={"target": "box", **config})
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = task(32, g)
        wrapped.learn(batch.images, query=batch.query, boxes=batch.boxes)
    test = task(200, g)
    first = wrapped.relevance_map(test.images, test.query).logits.flatten(1).argmax(1)
    return (first == test.answer).float().mean().item()


def test_one_informative_patch_is_ranked_first():
    assert train_on(single_patch_task, 150) >= 0.95


def test_the_query_decides_between_two_candidate_patches():
    assert train_on(query_patch_task, 300) >= 0.90


def test_the_kept_set_is_the_targets_top_k_ties_going_nearest_its_centre():
    from arrcoc.relevance.targets import kept_set

    target = torch.zeros(2, 8, 8)
    target[0, 2:5, 1:5] = 1.0  # a 3 x 4 box of whole patches, its centre between rows 3 and columns 2-3
    target[0, 1, 1:5] = 0.25  # a strip of it in the row above
    target[1, 6, 6], target[1, 0, 0] = 0.9, 0.4
    kept = kept_set(target.flatten(1), grid_positions(8, 8), 4).view(2, 8, 8)
    assert kept.sum((1, 2)).tolist() == [4.0, 4.0] and set(kept.unique().tolist()) == {0.0, 1.0}
    assert kept[0, 3, 2:4].tolist() == [1.0, 1.0] and kept[0, 2:5, 1:5].sum() == 4  # the box's middle first
    assert kept[1, 6, 6] == 1 and kept[1, 0, 0] == 1  # then by value, whatever the distance


class _SummingBackbone:
    """A transparent stand-in for a backbone: the prediction is the sum of the kept patch tokens (2 classes)."""

    def run_blocks(self, state):
        return state

    def head(self, state):
        return state.tokens[:, state.num_prefix:].sum(1)


def test_the_set_target_swaps_a_useless_kept_patch_for_a_candidate_that_helps():
    """Patches 0 and 1 carry the class (the full prediction), patch 2 nothing, patch 3 a little against it. The
    module keeps 0 and 2 (K = 2) and would keep 1 and 3 next: the target keeps 0 and 1, drops 2 and 3 and leaves
    every other patch at the module's own relevance."""
    from arrcoc.backbones import TokenSet
    from arrcoc.relevance.targets import set_target

    tokens = torch.zeros(1, 6, 2)
    tokens[0, 0], tokens[0, 1], tokens[0, 3] = torch.tensor([3.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor(
        [0.0, 0.5])
    state = TokenSet(tokens, 0, torch.arange(6)[None])
    logits = torch.tensor([[4.0, 2.0, 3.0, 1.0, -1.0, -2.0]])
    target = set_target(_SummingBackbone(), state, logits, kept=2)
    assert target[0, :4].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert torch.allclose(target[0, 4:], torch.sigmoid(logits[0, 4:]))
    with_labels = set_target(_SummingBackbone(), state, logits, kept=2, labels=torch.tensor([0]))
    assert with_labels[0, :4].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_the_ranking_learns_the_kept_set_and_the_ways_of_knowing_the_target():
    """The field's nudged phases and the allocator's error use the box target's kept set at the budget; the ways
    of knowing the box itself. With ``ablate.kept_set`` off the ranking learns the box too."""
    batch = query_patch_task(8, torch.Generator().manual_seed(0))
    for switch in (True, False):
        wrapped = arrcoc.attach(toy_vit(), budget=0.25, config={"target": "box", "ablate": {"kept_set": switch}})
        out, _, _ = wrapped.relevance_pass(batch.images, batch.query)
        box = wrapped.relevance_target(batch.images, batch.boxes).to(out.logits.dtype)
        contexts = wrapped.rule_contexts(out, box)
        ranking = contexts["field"].target
        assert torch.equal(contexts["perspectival_readout"].target[..., 0], box)
        if switch:  # the K patches with most of the box (the rest of the set: nearest to it), and only those
            assert ranking.sum(1).tolist() == [4.0] * 8 and set(ranking.unique().tolist()) == {0.0, 1.0}
            assert bool((box.masked_fill(ranking == 0, 2).amin(1) >= box.masked_fill(ranking == 1, -1).amax(1)).all())
        else:
            assert torch.equal(ranking, box)


def test_without_lateral_terms_the_allocators_error_is_the_cross_entropy_gradient():
    """The allocator learns from the difference of the field's nudged equilibria; with no lateral weights the
    field's equilibrium is its drive, and that difference is sigmoid(r) - target, the BCE gradient in the logits."""
    from arrcoc.relevance.field import nudged_error

    field = RelevanceField(8, 0.25).double()
    with torch.no_grad():
        field.excitation.zero_(), field.inhibition.zero_(), field.competition.fill_(-30.0)
    evidence, allocation = torch.randn(3, 16, 3, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    x = field.pack(evidence, allocation, grid_positions(4, 4).double(), torch.randn(3, 8, dtype=torch.float64))
    target = torch.rand(3, 16, dtype=torch.float64)
    how = Relaxation(steps=500, step_size=0.5, momentum=0.0, tol=1e-10, backtracks=0, gradient_only=False)
    (free,), _ = relax(field.as_energy(), x, how=how)
    error = nudged_error(field, x, free, target, 1e-3, how)
    drive = field.drive(evidence, allocation, x[:, 0, 6:]).detach()
    torch.testing.assert_close(error, torch.sigmoid(drive) - target, atol=1e-5, rtol=0)


def test_ablation_switches_live_under_ablate_and_old_keys_say_where_they_went():
    config = RelevanceConfig.from_dict({"ablate": {"field": False, "texture": False}})
    assert config.ablate == Ablations(field=False, texture=False)
    assert RelevanceConfig.from_yaml(find_config("configs/arrcoc.yaml"), {"ablate.perspectival": False}).ablate \
        == Ablations(perspectival=False)
    with pytest.raises(KeyError, match=r"ablation switches now.*ablate\.field"):
        RelevanceConfig.from_dict({"field": False})
    with pytest.raises(KeyError, match="were removed.*propositional_measure: 'entropy'"):
        RelevanceConfig.from_dict({"propositional_measure": "self-information"})
    with pytest.raises(KeyError, match="unknown ablate switch"):
        RelevanceConfig.from_dict({"ablate": {"feild": False}})
    with pytest.raises(ValueError, match="true or false"):
        Ablations(field="no")
    with pytest.raises(ValueError, match="needs patch features"):
        Ablations(backbone_tokens=False, texture=False)


def test_save_and_load_round_trip(tmp_path):
    model = toy_vit()
    wrapped = arrcoc.attach(model, budget=0.5, config={"target": "attention"})
    images = torch.rand(4, 3, 32, 32)
    wrapped.learn(images)
    wrapped.save_pretrained(tmp_path)
    wrapped.learn(images)  # a second save replaces the first, leaving one weights file
    wrapped.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    loaded = ARRCOC.from_pretrained(tmp_path, model)
    assert not loaded.training and not wrapped.training
    assert torch.equal(loaded(images), wrapped(images))
    assert torch.equal(loaded.rules["allocator"].feedback_0, wrapped.rules["allocator"].feedback_0)


def test_loading_into_a_different_backbone_fails_clearly(tmp_path, tiny_vit):
    arrcoc.attach(tiny_vit(), budget=0.5).save_pretrained(tmp_path)
    other = tiny_vit(embed_dim=48)
    with pytest.raises(ValueError, match="does not fit this backbone"):
        ARRCOC.from_pretrained(tmp_path, other)


def test_corrupted_checkpoint_is_detected(tmp_path):
    arrcoc.attach(toy_vit(), budget=0.5).save_pretrained(tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(ValueError, match="checksum"):
        ARRCOC.from_pretrained(tmp_path, toy_vit())
    with pytest.raises(FileNotFoundError, match="config.json"):
        ARRCOC.from_pretrained(tmp_path / "nowhere", toy_vit())


def test_bad_inputs_give_clear_errors():
    wrapped = arrcoc.attach(toy_vit(), budget=0.25)
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="one query per image"):
        wrapped(images, query=torch.randn(3, 384))
    with pytest.raises(ValueError, match="text encoder"):
        wrapped(images, query=["which digit is red?", "what is left?"])
    with pytest.raises(ValueError, match=r"\(batch, 384\)"):
        wrapped(images, query=torch.randn(2, 16))
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        wrapped(bad)
    with pytest.raises(ValueError, match="divisible"):
        wrapped(torch.rand(2, 3, 30, 30))
    with pytest.raises(ValueError, match="budget"):
        RelevanceConfig(budget=1.5)
    with pytest.raises(KeyError, match="budgett"):
        arrcoc.attach(toy_vit(), config={"budgett": 0.5})
    with pytest.raises(KeyError, match="known rules"):
        arrcoc.attach(toy_vit(), config={"rules": {"field": {"name": "eq-prop"}}})
    with pytest.raises(KeyError, match="unknown sub-networks"):
        arrcoc.attach(toy_vit(), config={"rules": {"feild": {"name": "ep"}}})
    with pytest.raises(ValueError, match="boxes"):
        arrcoc.attach(toy_vit(), config={"target": "box"}).learn(images)


def test_a_diverging_field_is_reported_and_changes_nothing():
    wrapped = arrcoc.attach(toy_vit(), budget=0.25,
                            config={"target": "attention", "relaxation": {"step_size": 50.0, "momentum": 0.0}})
    before = {k: v.clone() for k, v in wrapped.relevance.state_dict().items()}
    with torch.no_grad():
        wrapped.relevance.field.excitation.fill_(5.0)
    before["field.excitation"] = wrapped.relevance.field.excitation.detach().clone()
    with pytest.raises(RelaxationDiverged):
        wrapped.learn(torch.rand(4, 3, 32, 32))
    assert all(p.grad is None for p in wrapped.relevance.parameters())
    after = wrapped.relevance.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if not k.startswith("feature_norm"))


def test_default_yaml_config_is_the_default_config():
    """configs/arrcoc.yaml shows the defaults; their one home is the dataclasses (the relaxation's included)."""
    config = RelevanceConfig.from_yaml(find_config("configs/arrcoc.yaml"))
    assert config == RelevanceConfig()
    assert config.relaxation == FieldRelaxation() and config.ablate == Ablations()


def test_yaml_with_a_python_tag_is_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("relevance: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="is not valid YAML: could not determine a constructor"):
        RelevanceConfig.from_yaml(evil)


def test_trainer_runs_epochs_with_a_schedule_and_checkpoints(tmp_path):
    from arrcoc.training import Batch, Trainer, TrainerConfig

    wrapped = arrcoc.attach(toy_vit(), budget=0.25, config={"target": "box"})
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        images, where = textured_patch_images(8, [WHITE], g)
        batches.append(Batch(images, boxes=patch_boxes(where[:, 0])))
    history = Trainer(wrapped, TrainerConfig(epochs=2, checkpoint_dir=str(tmp_path), progress=False)).fit(batches)
    assert len(history) == 6 and history[-1]["lr"] < history[0]["lr"]  # cosine decay
    assert (tmp_path / "config.json").is_file()


def test_tiers_keep_the_token_total_within_the_budget(tiny_vit):
    from arrcoc.backbones import REFINED

    model = tiny_vit(img_size=64)  # an 8 x 8 grid: 16 regions of 2 x 2
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    images = torch.rand(2, 3, 64, 64)
    wrapped = arrcoc.attach(model, budget=0.5, config={"tiers": True, "refined_regions": 1})
    counts = wrapped.tier_counts(8, 8)
    assert (counts.refined, counts.regions) == (1, 16) and 30 <= counts.total <= 32
    assert wrapped(images).shape == (2, 10)
    assert seen == [1 + counts.total]  # CLS + exactly the tiered total
    tiers = wrapped.tiers(wrapped.relevance_map(images).logits.flatten(1), 8, 8)
    assert (tiers == REFINED).sum(1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="infeasible for tiers"):
        arrcoc.attach(model, budget=0.25, config={"tiers": True, "refined_regions": 1})(images)


def test_reward_modulated_target_follows_the_outcome_of_the_choice():
    wrapped = arrcoc.attach(toy_vit(), budget=0.25, config={"target": "reward"})
    g = torch.Generator().manual_seed(0)
    batch = single_patch_task(16, g)
    labels = torch.randint(0, 10, (16,), generator=g)
    before = [p.detach().clone() for p in wrapped.relevance.parameters()]
    wrapped.learn(batch.images, labels=labels)
    wrapped.learn(batch.images)  # label-free: rewarded for agreeing with the full-token prediction
    assert any(not torch.equal(b, p) for b, p in zip(before, wrapped.relevance.parameters()))
    with pytest.raises(ValueError, match="inside learn"):
        wrapped.relevance_target(batch.images)


def test_within_image_contrast_is_the_gradient_of_the_patch_softmax_cross_entropy():
    """participatory_contrast 'patches': the contrastive Hebbian update towards the clamped output equals the
    gradient of the cross-entropy between the coupling's softmax over an image's patches and its target."""
    from arrcoc.relevance.knowing import ParticipatoryKnowing
    from arrcoc.rules import RuleContext, build_rule

    torch.manual_seed(0)
    knowing = ParticipatoryKnowing(query_dim=5, feature_dim=7, temperature=0.1).double()
    torch.nn.init.normal_(knowing.query_map.weight, std=0.3)
    features, query = torch.randn(4, 9, 7, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    target = (torch.rand(4, 9, dtype=torch.float64) > 0.6).double()
    target[:, 0] = 1.0  # every image has a queried patch

    rule = build_rule("contrastive-hebbian", knowing.query_map)
    rule.step(RuleContext(query, target=knowing.clamped_output(features, query, target)))
    local = knowing.query_map.weight.grad.clone()

    knowing.query_map.weight.grad = None
    wanted = target / target.sum(-1, keepdim=True)
    loss = -(wanted * torch.log_softmax(knowing(features, query), dim=-1)).sum(-1).mean()
    (true,) = torch.autograd.grad(loss, knowing.query_map.weight)
    assert torch.allclose(local, true, atol=1e-12), (local - true).abs().max()


def test_within_image_contrast_needs_a_rule_that_moves_towards_a_clamped_output():
    with pytest.raises(ValueError, match="contrastive-hebbian"):
        RelevanceConfig(participatory_contrast="patches")
    with pytest.raises(ValueError, match="participatory_contrast must be one of"):
        RelevanceConfig(participatory_contrast="images")
    config = RelevanceConfig(participatory_contrast="patches", rules={"participatory": {"name": "contrastive-hebbian"}})
    model = arrcoc.attach(toy_vit(), budget=0.25, config=config)
    images = torch.rand(4, 3, 32, 32)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 4)
    model.config = dataclasses.replace(model.config, target="box")
    before = model.relevance.participatory.query_map.weight.clone()
    model.learn(images, query=torch.randn(4, config.query_dim), boxes=boxes)
    assert not torch.equal(before, model.relevance.participatory.query_map.weight)


def test_inference_standardises_features_with_the_statistics_of_training():
    # The texture features vary ~0.01 where the normaliser's running variance starts at 1: with an exponential
    # average the inference-time features came out several times too small after a few hundred steps.
    wrapped = arrcoc.attach(toy_vit(), budget=0.25, config={"target": "attention"})
    g = torch.Generator().manual_seed(0)
    batches = [textured_patch_images(8, [WHITE], g)[0] for _ in range(5)]
    for images in batches:
        wrapped.learn(images)
    relevance = wrapped.relevance.eval()
    raw = []
    hook = relevance.feature_norm.register_forward_pre_hook(lambda _, args: raw.append(args[0]))
    with torch.no_grad():
        images = torch.cat(batches)
        features, _ = relevance.patch_features(images, wrapped.adapter.tokens(images).patches)
    hook.remove()
    std = features.flatten(0, 1).std(0)
    varying = raw[0].var(0) > 1e-3  # well above the normaliser's eps (1e-5), which shrinks the others
    assert varying.sum() > 20
    assert ((std[varying] - 1).abs() < 0.05).all(), std[varying]


def test_place_code_singles_out_the_region_of_each_field():
    from arrcoc.relevance.texture import PLACE_FIELDS, place_code

    # patch centres of an 8 x 8 grid in [-1, 1]
    centres = (torch.arange(8.0) + 0.5) / 4 - 1
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"))[None]
    code = place_code(grid)[0]  # (fields, 8, 8)
    assert code.shape == (PLACE_FIELDS**2, 8, 8) and bool(((code > 0) & (code <= 1)).all())
    best_field = code.argmax(0)  # row-major fields: a 2 x 2 block of patches per field on this grid
    expected = (torch.arange(8)[:, None] // 2) * PLACE_FIELDS + torch.arange(8)[None, :] // 2
    assert torch.equal(best_field, expected)


def test_a_subnetwork_can_have_its_own_step_size():
    optimizer = {"name": "adam", "lr": 2e-3, "subnetwork_lr": {"field": 0.05}}
    wrapped = arrcoc.attach(toy_vit(), budget=0.25, config={"optimizer": optimizer})
    field = {id(p) for p in wrapped.relevance.field.parameters()}
    lrs = {id(p): group["lr"] for group in wrapped.optimizer.param_groups for p in group["params"]}
    assert set(lrs) == {id(p) for p in wrapped.relevance.parameters()}  # every parameter exactly once
    assert all(lr == (0.05 if key in field else 2e-3) for key, lr in lrs.items())


def test_lateral_excitation_ranks_a_compact_object_above_a_lone_confident_patch():
    """The field's learned difference of Gaussians does what a hand-set neighbourhood pooling did: neighbours that
    excite each other outrank a lone, more confident fragment of a look-alike; the lateral weights are symmetric and
    zero from a patch to itself."""
    from arrcoc.backbones import top_k

    probability = torch.full((1, 8, 8), 0.05)
    probability[0, 1, 6] = 0.95  # a lone, confident patch: a fragment of a look-alike distractor
    probability[0, 4:6, 1:3] = 0.8  # a 2 x 2 object of fairly confident patches
    allocation, evidence = torch.logit(probability).flatten(1), torch.zeros(1, 64, 3)
    field = RelevanceField(8, 4, adaptive_balance=False)
    distance2 = grid_distances(8, 8, allocation.device, allocation.dtype)
    kept = {}
    with torch.no_grad():
        field.evidence_weight.zero_(), field.competition.fill_(-30.0)
        for excitation, inhibition in ((0.0, 0.0), (1.0, 0.0), (3.0, 1.0)):  # alone, excitation, centre-surround
            field.excitation.fill_(excitation), field.inhibition.fill_(inhibition)
            equilibrium = field.equilibrium(evidence, allocation, None, distance2, 30, 0.6)
            kept[excitation, inhibition] = set(top_k(equilibrium, 4)[0].tolist())
        lateral = field.lateral(distance2)
    assert 14 in kept[0.0, 0.0]  # ranked alone, the fragment takes a token
    assert kept[1.0, 0.0] == kept[3.0, 1.0] == {33, 34, 41, 42}
    assert torch.equal(lateral, lateral.T) and bool((lateral.diagonal() == 0).all())


def test_perspectival_gain_control_makes_each_unit_work_at_the_same_range_in_every_image():
    from arrcoc.relevance.knowing import PerspectivalKnowing

    torch.manual_seed(0)
    context = torch.randn(2, 16, 8)
    context = context - context.mean(1, keepdim=True)  # centre-surround: zero mean over each image's patches
    context[1] *= 5.0  # a busy image: every feature varies five times more
    plain, controlled = PerspectivalKnowing(8, 4), PerspectivalKnowing(8, 4, gain_control=True)
    controlled.load_state_dict(plain.state_dict())
    responses = controlled.responses(context)
    torch.testing.assert_close(responses[1], controlled.responses(context[1:] / 5.0)[0])  # the image's scale cancels
    assert not torch.allclose(plain.responses(context)[1], plain.responses(context[1:] / 5.0)[0])
    drive = torch.atanh(responses.clamp(-1 + 1e-6, 1 - 1e-6))
    torch.testing.assert_close(drive.std(1, correction=0), torch.ones(2, 4), atol=1e-3, rtol=0)
