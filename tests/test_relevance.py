"""The ARR-COC relevance module: identity at budget 1, local learning only, toy tasks, checkpoints."""

import pytest
import timm
import torch
import torch.nn.functional as F
from toy_patches import GRID, PATCH, patch_boxes, textured_patch_images

import arrcoc
from arrcoc.relevance import ARRCOC, RelevanceConfig
from arrcoc.rules.energy import RelaxationDiverged, relax

RED, GREEN, WHITE = (1.0, 0.1, 0.1), (0.1, 1.0, 0.1), (1.0, 1.0, 1.0)


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=GRID * PATCH, patch_size=PATCH,
                             embed_dim=32, depth=1, num_heads=2, num_classes=10, **kwargs)


def word_queries(which: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Stand-in sentence embeddings: one direction per word, plus noise (unit norm, 384-d)."""
    words = F.normalize(torch.randn(2, 384, generator=torch.Generator().manual_seed(5)), dim=1)
    return F.normalize(words[which] + 0.15 * torch.randn(len(which), 384, generator=g), dim=1)


def test_budget_one_is_the_identity():
    model = tiny_vit()
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
    model = tiny_vit()
    wrapped = arrcoc.attach(model, budget=0.25, config={"dropped": dropped})
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    wrapped(torch.rand(2, 3, 32, 32))
    assert seen == [1 + 4 + (dropped == "fuse")]  # CLS + K patches (+ one summary token)
    assert wrapped.relevance_map(torch.rand(2, 3, 32, 32)).kept.shape == (2, 4)


def test_learning_never_touches_the_backbone_and_each_subnetwork_follows_its_rule():
    model = tiny_vit()
    backbone_before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"target": "attention", "rules": {"perspectival_readout": {"name": "frozen"}}}
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
    wrapped = arrcoc.attach(tiny_vit(), budget=0.25)
    field = wrapped.relevance.field
    with torch.no_grad():
        field.coherence.fill_(0.3), field.competition.fill_(1.0)
    evidence = torch.randn(16, GRID * GRID, 3)
    x = field.pack(evidence, torch.rand(1, GRID * GRID, 2) * GRID, torch.randn(16, 384), 384)
    _, report = relax(field.as_energy(), x, steps=200, step_size=0.3, momentum=0.5, tol=1e-5)
    assert report.converged and report.residual < 1e-5


def test_one_informative_patch_is_ranked_first():
    wrapped = arrcoc.attach(tiny_vit(), budget=0.25, config={"target": "box"})
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        images, where = textured_patch_images(32, [WHITE], g)
        wrapped.learn(images, boxes=patch_boxes(where[:, 0]))
    images, where = textured_patch_images(200, [WHITE], g)
    first = wrapped.relevance_map(images).logits.flatten(1).argmax(1)
    assert (first == where[:, 0]).float().mean() >= 0.95


def test_the_query_decides_between_two_candidate_patches():
    wrapped = arrcoc.attach(tiny_vit(), budget=0.25, config={"target": "box"})
    g = torch.Generator().manual_seed(1)
    rows = torch.arange(32)
    for _ in range(200):
        images, where = textured_patch_images(32, [RED, GREEN], g)
        which = torch.randint(0, 2, (32,), generator=g)
        wrapped.learn(images, query=word_queries(which, g), boxes=patch_boxes(where[rows, which]))
    images, where = textured_patch_images(200, [RED, GREEN], g)
    which = torch.randint(0, 2, (200,), generator=g)
    first = wrapped.relevance_map(images, word_queries(which, g)).logits.flatten(1).argmax(1)
    assert (first == where[torch.arange(200), which]).float().mean() >= 0.90


def test_save_and_load_round_trip(tmp_path):
    model = tiny_vit()
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


def test_loading_into_a_different_backbone_fails_clearly(tmp_path):
    arrcoc.attach(tiny_vit(), budget=0.5).save_pretrained(tmp_path)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=1, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="does not fit this backbone"):
        ARRCOC.from_pretrained(tmp_path, other)


def test_corrupted_checkpoint_is_detected(tmp_path):
    arrcoc.attach(tiny_vit(), budget=0.5).save_pretrained(tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(ValueError, match="checksum"):
        ARRCOC.from_pretrained(tmp_path, tiny_vit())
    with pytest.raises(FileNotFoundError, match="config.json"):
        ARRCOC.from_pretrained(tmp_path / "nowhere", tiny_vit())


def test_bad_inputs_give_clear_errors():
    wrapped = arrcoc.attach(tiny_vit(), budget=0.25)
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
        arrcoc.attach(tiny_vit(), config={"budgett": 0.5})
    with pytest.raises(KeyError, match="known rules"):
        arrcoc.attach(tiny_vit(), config={"rules": {"field": {"name": "eq-prop"}}})
    with pytest.raises(KeyError, match="unknown sub-networks"):
        arrcoc.attach(tiny_vit(), config={"rules": {"feild": {"name": "ep"}}})
    with pytest.raises(ValueError, match="boxes"):
        arrcoc.attach(tiny_vit(), config={"target": "box"}).learn(images)


def test_a_diverging_field_is_reported_and_changes_nothing():
    wrapped = arrcoc.attach(tiny_vit(), budget=0.25,
                            config={"target": "attention", "relaxation": {"step_size": 50.0, "momentum": 0.0}})
    before = {k: v.clone() for k, v in wrapped.relevance.state_dict().items()}
    with torch.no_grad():
        wrapped.relevance.field.coherence.fill_(5.0)
    before["field.coherence"] = wrapped.relevance.field.coherence.detach().clone()
    with pytest.raises(RelaxationDiverged):
        wrapped.learn(torch.rand(4, 3, 32, 32))
    assert all(p.grad is None for p in wrapped.relevance.parameters())
    after = wrapped.relevance.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if not k.startswith("feature_norm"))
