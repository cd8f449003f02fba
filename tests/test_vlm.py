"""Vision-language models on the visual tokens ARR-COC allocates: exactness, positions, generate(), learning,
bad input. Tiny random configs of every supported family (real transformers classes, no hub)."""

import pytest
import torch

import arrcoc
from arrcoc.backbones import adapt_vlm
from arrcoc.budget import num_kept
from arrcoc.data.toy_vlm import BOS, IMAGE, IMAGE_TOKEN, TOY_FAMILIES, toy_prompts, toy_vlm
from arrcoc.models.toy_vit import toy_vit

# two prompts of different lengths (left padding), one with two images
PROMPTS = {
    "llava": [[BOS, 5, IMAGE, 6, 7], [BOS, 8, IMAGE, 9, IMAGE, 10, 11, 12]],
    "llava_next": [[BOS, 5, IMAGE, 6, 7], [BOS, 8, IMAGE, 9]],
    "qwen2_vl": [[BOS, 5, IMAGE, 6, 7], [BOS, 8, IMAGE, 9, IMAGE, 10]],
    "qwen2_5_vl": [[BOS, 5, IMAGE, 6, 7], [BOS, 8, IMAGE, 9, IMAGE, 10]],
}
# pixels per image: LLaVA-NeXT any-resolution sizes (wide and tall, both unpadded), Qwen2-VL native sizes
SIZES = {
    "llava": None,
    "llava_next": [(40, 70), (50, 30)],
    "qwen2_vl": [(32, 48), (32, 32), (16, 32)],
    "qwen2_5_vl": [(32, 48), (32, 32), (16, 32)],
}


def family_case(family: str, **config):
    model = toy_vlm(family, **config)
    return model, toy_prompts(model, PROMPTS[family], SIZES[family])


def language_model_calls(model):
    """Record (sequence length, position_ids, attention_mask) of every language-model call."""
    calls = []

    def hook(_module, _args, kwargs):
        calls.append((kwargs["inputs_embeds"].shape[1], kwargs.get("position_ids"), kwargs.get("attention_mask")))

    return calls, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def expected_columns(inputs, keep):
    """Per prompt, the columns of the full prompt that remain: text, padding, kept placeholders (plain loops)."""
    images = iter(keep)
    rows = []
    for ids in inputs["input_ids"].tolist():
        columns, position = [], 0
        current = None
        for column, token in enumerate(ids):
            if token != IMAGE_TOKEN:
                columns.append(column)
                current = None
                continue
            if current is None:  # the first placeholder of the next image
                current, position = set(next(images).tolist()), 0
            if position in current:
                columns.append(column)
            position += 1
        rows.append(columns)
    return rows


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_keeping_every_token_reproduces_the_model(family):
    model, inputs = family_case(family)
    with torch.no_grad():
        reference = model(**inputs).logits
    wrapped = arrcoc.attach_vlm(model, budget=1.0)
    assert (wrapped(**inputs).logits - reference).abs().max() <= 1e-4
    adapter = adapt_vlm(model)
    prompt = adapter.encode(inputs)
    every = [torch.arange(prompt.num_tokens(i)) for i in range(prompt.num_images)]
    assert (adapter.forward(prompt, every).logits - reference).abs().max() <= 1e-4
    expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(wrapped.generate(**inputs, max_new_tokens=3, do_sample=False), expected)
    beams = dict(max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(wrapped.generate(**inputs, **beams).sequences, model.generate(**inputs, **beams).sequences)


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_dropped_visual_tokens_are_exactly_invisible(family):
    """Running the short prompt equals running the full prompt with the dropped tokens masked out of attention
    and every token at its original position."""
    model, inputs = family_case(family)
    adapter = adapt_vlm(model)
    prompt = adapter.encode(inputs)
    g = torch.Generator().manual_seed(1)
    keep = [torch.randperm(prompt.num_tokens(i), generator=g)[: max(1, prompt.num_tokens(i) // 3)]
            for i in range(prompt.num_images)]
    reduced = adapter.forward(prompt, keep).logits
    masked = inputs["attention_mask"].clone()
    for row, columns in enumerate(expected_columns(inputs, keep)):
        gone = [c for c in range(masked.shape[1]) if c not in set(columns)]
        masked[row, gone] = 0
    with torch.no_grad():
        reference = model(**{**inputs, "attention_mask": masked, "position_ids": prompt.position_ids}).logits
    for row, columns in enumerate(expected_columns(inputs, keep)):
        real = [c for c in columns if inputs["attention_mask"][row, c] == 1]
        short = reduced[row, -len(columns):][[columns.index(c) for c in real]]
        assert (short - reference[row, real]).abs().max() <= 1e-4


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_generate_on_k_tokens_keeps_positions_and_shortens_the_prefill(family):
    model, inputs = family_case(family)
    wrapped = arrcoc.attach_vlm(model, budget=0.25)
    allocation = wrapped.allocate(**inputs)
    prompt = wrapped.adapter.encode(inputs, "generate")
    for i, kept in enumerate(allocation.keep):
        scored = sum(grid.index.numel() for grid in prompt.grids[i])
        assert kept.numel() == num_kept(0.25, scored) + prompt.num_tokens(i) - scored
    calls, handle = language_model_calls(model)
    try:
        out = wrapped.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    length = inputs["input_ids"].shape[1]
    assert out.shape == (2, length + 4) and torch.equal(out[:, :length], inputs["input_ids"])
    assert [c[0] for c in calls] == [calls[0][0], 1, 1, 1]  # one prefill, then one token per step
    columns = expected_columns(inputs, allocation.keep)
    dropped = [length - len(c) for c in columns]
    counts = (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist()
    kept_per_row = [0, 0]
    for i, kept in enumerate(allocation.keep):
        kept_per_row[int(prompt.image_row[i])] += kept.numel()
    assert dropped == [n - k for n, k in zip(counts, kept_per_row)] and min(dropped) > 0
    assert calls[0][0] == length - min(dropped)  # the prefill is shorter by exactly the dropped tokens
    # every token the language model sees sits at its original position (t, h, w for Qwen2-VL)
    full = prompt.position_ids
    rotary, decoded, original = (p if p.ndim == 2 else p[-3:] for p in (calls[0][1], calls[1][1], full))
    for row, kept_columns in enumerate(columns):
        real = [c for c in kept_columns if inputs["attention_mask"][row, c] == 1]
        assert torch.equal(rotary[..., row, -len(real):], original[..., row, real])
        # decoding continues after the original prompt's last position, not after the short prompt's
        assert torch.equal(decoded[..., row, 0], original[..., row, -1] + 1)


def test_inference_mode_works():
    model, inputs = family_case("llava")
    wrapped = arrcoc.attach_vlm(model, budget=0.25)
    with torch.inference_mode():
        out = wrapped(**inputs, logits_to_keep=1)
    assert out.logits.shape == (2, 1, model.config.text_config.vocab_size)


def test_compiled_scoring_allocates_what_eager_scoring_does():
    """``graphs=True`` (the default on CUDA; here only compiled): each grid shape's scores compiled whole, the same
    tokens kept; autograd (learning) stays eager."""
    model, inputs = family_case("qwen2_vl")  # three images, two grid shapes
    wrapped = arrcoc.attach_vlm(model, budget=0.25)
    eager = wrapped.allocate(**inputs)
    assert not wrapped.graphs_wanted(eager.logits[0])  # default: on CUDA only
    wrapped.graphs = True
    compiled = wrapped.allocate(**inputs)
    assert wrapped.graphed.failure is None
    assert all(torch.equal(a, b) for a, b in zip(eager.keep, compiled.keep))
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=0)
    with torch.enable_grad():
        assert not wrapped.graphs_wanted(eager.logits[0])
    wrapped.budget = 0.5  # an input of the compiled graph, not a constant of it: no new compile for a new budget
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = wrapped.allocate(**inputs)
    assert wrapped.graphed.failure is None
    wrapped.graphs = False
    eager = wrapped.allocate(**inputs)
    assert all(torch.equal(a, b) for a, b in zip(eager.keep, compiled.keep))
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=0)


def test_the_scoring_pools_the_prompts_query_itself(monkeypatch):
    """The prompt's query is pooled inside the scoring (inside its compiled graph: a few operators fewer per prefill
    outside it), and it is the same query ``prompt_query`` gives."""
    model, inputs = family_case("llava")
    wrapped = arrcoc.attach_vlm(model, budget=0.25)
    prompt = wrapped.adapter.encode(inputs)
    explicit = wrapped.allocate(query=wrapped.prompt_query(prompt, None), **inputs)

    def refuse(_prompt):
        raise AssertionError("the query was pooled outside the scoring")

    monkeypatch.setattr(wrapped.adapter, "text_embedding", refuse)
    for graphs in (False, True):
        wrapped.graphs = graphs
        pooled = wrapped.allocate(**inputs)
        assert all(torch.equal(a, b) for a, b in zip(explicit.keep, pooled.keep))
        torch.testing.assert_close(pooled.logits, explicit.logits, atol=1e-5, rtol=0)


def test_llava_full_strategy_keeps_the_cls_token_and_scores_the_patches():
    model, inputs = family_case("llava", vision_feature_select_strategy="full")
    allocation = arrcoc.attach_vlm(model, budget=0.25).allocate(**inputs)
    for kept, logits in zip(allocation.keep, allocation.logits):
        assert kept[0] == 0 and kept.numel() == 1 + 4 and torch.isinf(logits[0]) and torch.isfinite(logits[1:]).all()


def test_the_prompt_is_the_query():
    model, inputs = family_case("llava")
    wrapped = arrcoc.attach_vlm(model, budget=0.25)
    prompt = wrapped.adapter.encode(inputs)
    query = wrapped.prompt_query(prompt, None)
    text = (inputs["attention_mask"][0] == 1) & (inputs["input_ids"][0] != IMAGE_TOKEN)
    expected = model.get_input_embeddings()(inputs["input_ids"][0, text]).mean(0)
    assert query.shape == (2, 32) and torch.allclose(query[0], expected, atol=1e-6)
    other = dict(inputs, input_ids=inputs["input_ids"].masked_fill(inputs["input_ids"] == 6, 40))
    assert not torch.allclose(wrapped.prompt_query(wrapped.adapter.encode(other), None)[0], query[0])
    # an explicit query steers the same relevance module
    explicit = wrapped.allocate(query=torch.randn(2, 32), **inputs)
    assert [k.numel() for k in explicit.keep] == [4, 4, 4]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_learning_is_local_and_forward_only(family):
    model, inputs = family_case(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hebbian = {"perspectival_encoder": {"name": "hebbian-oja", "form": "sanger"}}  # every sub-network learns
    wrapped = arrcoc.attach_vlm(model, budget=0.25, config={"relevance": {"target": "perturbation", "rules": hebbian}})
    subnets = wrapped.relevance.subnetworks()
    start = {n: [p.detach().clone() for p in s.parameters()] for n, s in subnets.items()}
    # the answer: the last two prompt tokens (teacher forced); -100 everywhere else
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]
    prompt = wrapped.adapter.encode(inputs)
    prompt.per_token["labels"] = labels
    target = wrapped.relevance_target(prompt)
    assert [t.shape[0] for t in target] == [prompt.num_tokens(i) for i in range(prompt.num_images)]
    assert all(0 <= float(t.min()) and float(t.max()) == 1.0 for t in target)
    for _ in range(2):
        report = wrapped.learn(labels=labels, **inputs)
    assert 0.0 <= report["target_overlap"] <= 1.0
    wrapped.learn(**inputs)  # no labels: the next-token distribution's sensitivity (KL)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    changed = {n: any(not torch.equal(a, b) for a, b in zip(start[n], s.parameters())) for n, s in subnets.items()}
    assert all(changed.values()), changed


def test_a_trained_vlm_module_saves_and_loads_with_its_config(tmp_path):
    model, inputs = family_case("qwen2_vl")
    wrapped = arrcoc.attach_vlm(model, budget=0.25, config={"group": 1, "chunk": 4})
    wrapped.learn(**inputs)
    wrapped.save_pretrained(tmp_path / "vlm")
    loaded = arrcoc.VLMARRCOC.from_pretrained(tmp_path / "vlm", model)
    assert loaded.vlm_config == wrapped.vlm_config and loaded.config.budget == 0.25
    for key, value in wrapped.relevance.state_dict().items():
        assert torch.equal(value, loaded.relevance.state_dict()[key]), key
    assert all(torch.equal(a, b) for a, b in zip(wrapped.allocate(**inputs).keep, loaded.allocate(**inputs).keep))
    # a ViT checkpoint is not a VLM checkpoint, and the other way round: both say so
    vit = arrcoc.attach(toy_vit(), budget=0.25)
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="not a VLM checkpoint"):
        arrcoc.VLMARRCOC.from_pretrained(tmp_path / "vit", model)


def quadrant_hit_rate(participatory: bool, steps: int = 80) -> float:
    """Each prompt names a quadrant of its image with one word; box targets mark that quadrant. Train with the
    local rules, then measure how much of what is kept lies in the named quadrant on new prompts (chance 0.25)."""
    model = toy_vlm("llava")  # 4 x 4 visual tokens per image; a quadrant is 2 x 2 of them
    config = {"relevance": {"target": "box", "ablate": {"participatory": participatory},
                            "optimizer": {"name": "adam", "lr": 0.01}}}
    wrapped = arrcoc.attach_vlm(model, budget=0.25, config=config)
    boxes = torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]]).float()

    def batch(n: int, seed: int):
        quadrant = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed))
        return toy_prompts(model, [[BOS, 20 + int(q), IMAGE, 7, 8] for q in quadrant], seed=seed), quadrant

    for step in range(steps):
        inputs, quadrant = batch(8, step)
        wrapped.learn(boxes=boxes[quadrant], **inputs)
    inputs, quadrant = batch(32, 10_000)
    kept = torch.stack(wrapped.allocate(**inputs).keep)
    in_quadrant = (kept // 4 // 2) * 2 + (kept % 4) // 2 == quadrant[:, None]
    return in_quadrant.float().mean().item()


def test_the_prompt_steers_what_the_local_rules_learn_to_keep():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is several times faster on a loaded machine
    try:
        with_query, without = quadrant_hit_rate(True), quadrant_hit_rate(False)
    finally:
        torch.set_num_threads(threads)
    assert with_query >= 0.6 and without <= 0.4, (with_query, without)


def test_box_target_and_explicit_targets():
    model, inputs = family_case("llava")
    wrapped = arrcoc.attach_vlm(model, budget=0.25, config={"relevance": {"target": "box"}})
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 3)
    wrapped.learn(boxes=boxes, **inputs)
    with pytest.raises(ValueError, match="boxes"):
        wrapped.learn(**inputs)
    with pytest.raises(ValueError, match="one .visual tokens,. tensor per image"):
        wrapped.learn(target=[torch.rand(16)], **inputs)


# ---- bad input ------------------------------------------------------------------------------------
def test_a_prompt_without_an_image_placeholder_is_refused():
    model, inputs = family_case("llava")
    wrapped = arrcoc.attach_vlm(model, budget=0.25)
    text_only = toy_prompts(model, [[BOS, 5, 6], [BOS, 8, IMAGE, 9]])
    with pytest.raises(ValueError, match=r"prompt\(s\) \[0\] contain no image placeholder"):
        wrapped.generate(**text_only, max_new_tokens=2)
    no_images = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="no images"):
        wrapped(**no_images)
    short = dict(inputs, pixel_values=inputs["pixel_values"][:2])  # 3 images' placeholders, 2 images
    with pytest.raises(ValueError, match="placeholder tokens but the images give"):
        wrapped(**short)


def test_more_tokens_than_an_image_has_is_refused():
    model, inputs = family_case("qwen2_vl")  # images of 6, 4 and 2 visual tokens
    wrapped = arrcoc.attach_vlm(model, budget=4)
    with pytest.raises(ValueError, match=r"image 2 has 2 visual tokens to allocate: token count budget K must be "
                                         r"in \[1, 2\]"):
        wrapped.generate(**inputs, max_new_tokens=2)
    assert [k.numel() for k in arrcoc.attach_vlm(model, budget=2).allocate(**inputs).keep] == [2, 2, 2]
    # a ratio gives each image of a mixed batch its own K; prompts of different length are re-padded
    assert [k.numel() for k in arrcoc.attach_vlm(model, budget=0.5).allocate(**inputs).keep] == [3, 2, 1]


def test_bad_kept_indices_are_refused():
    model, inputs = family_case("llava")
    adapter = adapt_vlm(model)
    prompt = adapter.encode(inputs)
    good = [torch.arange(4)] * 3
    for keep, message in [
        (good[:2], "one index tensor per image: 3 images, got 2"),
        ([torch.arange(17), *good[1:]], "image 0 has 16 visual tokens: keep at most 16, got 17"),
        ([torch.tensor([0, 16]), *good[1:]], r"positions in \[0, 16\)"),
        ([torch.tensor([3, 3]), *good[1:]], "repeated"),
        ([torch.zeros(2, 2, dtype=torch.long), *good[1:]], "1-D integer tensor"),
    ]:
        with pytest.raises(ValueError, match=message):
            adapter.shorten(prompt, keep)


def test_unsupported_models_and_inputs_are_refused():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with pytest.raises(TypeError, match="unsupported vision-language model .*LlavaForConditionalGeneration"):
        arrcoc.attach_vlm(CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=4, image_size=32, patch_size=8)))
    model, inputs = family_case("qwen2_vl")
    wrapped = arrcoc.attach_vlm(model, budget=0.5)
    with pytest.raises(ValueError, match="pixel_values_videos is not supported"):
        wrapped(**inputs, pixel_values_videos=torch.zeros(8, 384))
    with pytest.raises(ValueError, match="mm_token_type_ids is missing"):
        wrapped(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
    with pytest.raises(ValueError, match="unexpected model input"):
        wrapped(**inputs, pixel_values_images=torch.zeros(1))
    with pytest.raises(ValueError, match=r"unexpected model input\(s\) \['inputs_embeds'\]"):
        wrapped.generate(**inputs, inputs_embeds=torch.zeros(2, 3, 32), max_new_tokens=2)
    with pytest.raises(ValueError, match="relevance target must be one of"):
        arrcoc.attach_vlm(model, config={"relevance": {"target": "attention"}})
    labels = inputs["input_ids"].clone()
    with pytest.raises(ValueError, match="-100 on image placeholder tokens"):
        wrapped.learn(labels=labels, **inputs)
    with pytest.raises(ValueError, match=r"query embeddings must be \(batch, 32\)"):
        wrapped(query=torch.zeros(2, 7), **inputs)
