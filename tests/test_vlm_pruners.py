"""The visual-token pruners keep K distinct tokens of each image, deterministically, and each keeps what its method
says: the oracle the asked digit's patches, the grid an even spread, pooling the cell means, DivPrune the spread-out
features."""

import pytest
import torch

from arrcoc.backbones.vlm import adapt_vlm
from arrcoc.baselines.vlm_pruners import PRUNERS, PruningContext, apply_selection
from arrcoc.bench.train_vlm import QUICK_MODEL
from arrcoc.data.vqa import vqa_split
from arrcoc.models.canvas_vlm import build_canvas_vlm, canvas_prompts, canvas_tokenizer


@pytest.fixture(scope="module")
def case():
    tokenizer = canvas_tokenizer()
    model = build_canvas_vlm(QUICK_MODEL, tokenizer)
    batch = vqa_split("test", 3, seed=0)
    adapter = adapt_vlm(model)
    prompts = canvas_prompts(tokenizer, batch.questions, 256)
    return adapter, adapter.encode({**prompts, "pixel_values": batch.images}, "generate"), batch, model


def context_of(case, kept):
    _, prompt, batch, model = case
    return PruningContext(prompt, kept, batch.boxes, batch.relevant, model=model, pixels=batch.images)


@pytest.mark.parametrize("name", sorted(PRUNERS))
@pytest.mark.parametrize("kept", [64, 8])
def test_every_pruner_keeps_k_distinct_tokens_and_the_model_answers(case, name, kept):
    adapter, prompt, batch, _ = case
    context = context_of(case, kept)
    selection = PRUNERS[name](context)
    again = PRUNERS[name](context)
    for keep, repeat in zip(selection.keep, again.keep):
        assert keep.numel() == kept and keep.unique().numel() == kept and torch.equal(keep, repeat)
        assert int(keep.min()) >= 0 and int(keep.max()) < 256
    out = adapter.generate(apply_selection(prompt, selection), selection.keep, max_new_tokens=1, do_sample=False)
    assert out.shape[0] == 3


def test_the_oracle_keeps_the_asked_digits_patches(case):
    _, prompt, batch, _ = case
    keep = PRUNERS["oracle"](context_of(case, 16)).keep
    for i in range(3):
        box = batch.boxes[i][batch.relevant[i]][0]  # one of the digits the answer depends on
        centres = (torch.stack([keep[i] % 16, keep[i] // 16], -1).float() + 0.5) * 8
        inside = ((centres >= box[:2]) & (centres < box[2:])).all(-1)
        assert inside.any()


def test_the_grid_spreads_evenly_and_pooling_averages_each_cell(case):
    _, prompt, batch, _ = case
    grid = PRUNERS["grid"](context_of(case, 64)).keep[0]
    assert sorted((grid // 16).unique().tolist()) == list(range(1, 16, 2))  # every other row and column
    pooled = PRUNERS["pool"](context_of(case, 64))
    block = prompt.features[0].view(8, 2, 8, 2, -1)[0, :, 0, :].reshape(4, -1).float().mean(0)
    assert pooled.keep[0][0] == 0 and torch.allclose(pooled.features[0][0], block, atol=1e-5)


def test_divprune_keeps_features_farther_apart_than_random(case):
    _, prompt, _, _ = case
    context = context_of(case, 16)

    def spread(keep):
        tokens = torch.nn.functional.normalize(prompt.features[0][keep].float(), dim=-1)
        distance = 1 - tokens @ tokens.T
        return (distance + torch.eye(len(keep)) * 9).amin().item()  # the closest pair

    assert spread(PRUNERS["divprune"](context).keep[0]) > spread(PRUNERS["random"](context).keep[0])


def test_the_greedy_dpp_picks_the_log_determinant_maximiser_step_by_step():
    from arrcoc.baselines.vlm_pruners import greedy_dpp

    features = torch.nn.functional.normalize(torch.randn(12, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    kernel = features @ features.T + 0.1 * torch.eye(12)
    chosen = greedy_dpp(kernel, 4).tolist()
    picked: list[int] = []
    for _ in range(4):  # the brute-force greedy: the index whose addition gives the largest determinant
        best = max((j for j in range(12) if j not in picked),
                   key=lambda j: torch.linalg.det(kernel[picked + [j]][:, picked + [j]]).item())
        picked.append(best)
    assert chosen == picked


def test_visionzip_merges_the_rest_into_contextual_tokens(case):
    _, prompt, _, _ = case
    selection = PRUNERS["visionzip"](context_of(case, 64))
    # the dominant tokens carry their own features (projected again), the 10 contextual ones merged features
    own = prompt.features[0][selection.keep[0][:54]].float()
    assert torch.allclose(selection.features[0][:54], own, atol=1e-4)
    assert not torch.allclose(selection.features[0][54:], prompt.features[0][selection.keep[0][54:]].float(), atol=1e-3)


@pytest.fixture(scope="module")
def deep_case():
    """A canvas VLM with a 4-layer language model, its prompts' input embeddings and positions."""
    from arrcoc.bench.train_vlm import positions

    tokenizer = canvas_tokenizer()
    model = build_canvas_vlm(QUICK_MODEL, tokenizer)
    batch = vqa_split("test", 3, seed=0)
    prompts = canvas_prompts(tokenizer, ["is there a 3 ?", *batch.questions[1:]], 256)  # rows of different lengths
    with torch.no_grad():
        features = torch.cat(list(model.model.get_image_features(pixel_values=batch.images).pooler_output))
        visual = prompts["input_ids"] == model.config.image_token_id
        embeds = model.get_input_embeddings()(prompts["input_ids"]).masked_scatter(visual[..., None], features)
    return model, prompts, batch, embeds, visual, positions(prompts["attention_mask"])


def test_the_pruned_prefill_is_the_model_when_nothing_is_pruned_and_fastv_reads_its_attention(deep_case):
    from arrcoc.baselines.vlm_pruners import fastv, layer_attention, pruned_prefill

    model, prompts, batch, embeds, visual, positions = deep_case
    mask = prompts["attention_mask"]
    with torch.no_grad():
        model.model.language_model.set_attn_implementation("eager")
        out = model(pixel_values=batch.images, **prompts, position_ids=positions, output_attentions=True,
                    output_hidden_states=True)
        model.model.language_model.set_attn_implementation("sdpa")
    reference = out.logits[:, -1]
    assert torch.allclose(pruned_prefill(model, embeds, mask, positions, visual, lambda view: None), reference,
                          atol=1e-5)
    assert torch.allclose(pruned_prefill(model, embeds, mask, positions, visual, fastv(model, 256)), reference,
                          atol=1e-5)
    last = torch.full((3, 1), mask.shape[1] - 1)
    hidden = out.hidden_states[1]  # the input of layer 1
    attention, _ = layer_attention(model, 1, hidden, positions, mask, last)
    assert torch.allclose(attention[:, 0], out.attentions[1][:, :, -1].mean(1), atol=1e-5)


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_the_language_model_pruners_keep_k_visual_tokens_and_every_text_token(deep_case, method):
    from arrcoc.baselines import vlm_pruners

    model, prompts, _, embeds, visual, positions = deep_case
    seen = {}
    prune = getattr(vlm_pruners, method)(model, 16)

    def spy(view):
        keep = prune(view)
        if keep is not None:
            seen[view.layer] = (view.visual.gather(1, keep).sum(1).tolist(), (~view.visual).sum(1) == (
                ~view.visual.gather(1, keep)).sum(1))
        return keep

    logits = vlm_pruners.pruned_prefill(model, embeds, prompts["attention_mask"], positions, visual, spy)
    assert list(seen) == [2] and seen[2][0] == [16, 16, 16] and bool(seen[2][1].all())
    assert torch.isfinite(logits).all()


def test_pyramid_drop_halves_the_visual_tokens_at_each_stage(deep_case):
    from arrcoc.baselines.vlm_pruners import pruned_prefill, pyramid_drop, pyramid_tokens

    model, prompts, _, embeds, visual, positions = deep_case
    counts = {}
    prune = pyramid_drop(model, (1, 2, 3), 0.5)

    def spy(view):
        keep = prune(view)
        counts[view.layer] = int(view.visual.sum(1)[0]) if keep is None else int(view.visual.gather(1, keep).sum(1)[0])
        return keep

    pruned_prefill(model, embeds, prompts["attention_mask"], positions, visual, spy)
    assert counts == {0: 256, 1: 128, 2: 64, 3: 32}
    assert pyramid_tokens(256, 4, (1, 2, 3), 0.5) == (256 + 128 + 64 + 32) / 4
