"""The canvas VLM (issue 38) is a real ``LlavaForConditionalGeneration`` with a tower of its own: it builds from a
config, answers through ``generate``, saves and loads with transformers' own calls, ARR-COC attaches to it, and the
training command runs end to end (on a tiny config)."""

import pytest
import torch

import arrcoc
from arrcoc.backbones.vlm import adapt_vlm
from arrcoc.bench.train_vlm import (
    DEFAULT_DIR,
    QUICK_MODEL,
    TowerHeads,
    as_uint8,
    dialogue_prompts,
    embedded_prompts,
    evidence_subsets,
    load_canvas_vlm,
    main,
    patch_targets,
    pooled_tokens,
    positions,
    tower_features,
    without_dropped,
)
from arrcoc.data.vqa import vqa_split
from arrcoc.models.canvas_vlm import IMAGE_TOKEN, build_canvas_vlm, canvas_prompts, canvas_tokenizer


def test_the_precomputed_features_path_is_the_pixel_path():
    tokenizer = canvas_tokenizer()
    model = build_canvas_vlm(QUICK_MODEL, tokenizer)
    batch = as_uint8(vqa_split("test", 4, seed=0))
    questions = ["is there a 3 ?", *batch.questions[1:]]  # rows of different lengths: left padding
    prompts = canvas_prompts(tokenizer, questions, 256)
    assert (prompts["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum(1).tolist() == [256] * 4
    with torch.no_grad():
        pixels = model(pixel_values=batch.images.float() / 255, **prompts,
                       position_ids=positions(prompts["attention_mask"])).logits[:, -1]
        features = model(inputs_embeds=embedded_prompts(model, tower_features(model, batch.images), prompts),
                         attention_mask=prompts["attention_mask"],
                         position_ids=positions(prompts["attention_mask"])).logits[:, -1]
        generated = model.generate(pixel_values=batch.images.float() / 255, **prompts, max_new_tokens=1,
                                   do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert (features - pixels).abs().max() < 1e-3  # the features are stored in bfloat16
    assert torch.allclose(generated.scores[0], pixels, atol=1e-5)


def test_a_training_subset_keeps_the_digits_and_is_the_pruned_prompt_the_benchmark_runs():
    """A canvas seen through a subset of its tokens in training is what a pruner's shortened prompt gives the model:
    the same tokens at the same positions, so the answer's logits agree."""
    tokenizer = canvas_tokenizer()
    model = build_canvas_vlm(QUICK_MODEL, tokenizer).eval()
    batch = as_uint8(vqa_split("train", 4, seed=0))
    questions, answers = ["is there a 3 ?", "count the digits .", "is there a 4 ?", "what colour is the 7 ?"], "1234"
    on_digit = patch_targets(batch, 16, 8)["digit"] < 10
    keep = evidence_subsets(on_digit, 1.0, torch.Generator().manual_seed(0))
    assert (keep | ~on_digit).all() and (keep.sum(1) < 256).all()  # every digit token, not every token
    assert evidence_subsets(on_digit, 0.0, torch.Generator()).all()
    prompts = dialogue_prompts(tokenizer, [[(q, a)] for q, a in zip(questions, answers)], 256, 0.0, torch.Generator())
    visual = prompts["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    embeds, mask, position_ids, labels = without_dropped(
        embedded_prompts(model, tower_features(model, batch.images), prompts), prompts, visual, keep)
    assert (mask.sum(1) == prompts["attention_mask"].sum(1) - (~keep).sum(1)).all()
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
        adapter = adapt_vlm(model)
        prompt = adapter.encode({**canvas_prompts(tokenizer, questions, 256), "pixel_values": batch.images / 255})
        pruned = adapter.forward(prompt, [k.nonzero()[:, 0] for k in keep], logits_to_keep=1).logits[:, -1]
    before_answer = (labels != -100).int().argmax(1) - 1
    assert (logits[torch.arange(4), before_answer] - pruned).abs().max() < 1e-2  # features stored in bfloat16
    whole = embedded_prompts(model, tower_features(model, batch.images), prompts)
    unchanged = (whole, prompts["attention_mask"], positions(prompts["attention_mask"]), prompts["labels"])
    assert all(t.equal(u) for t, u in zip(without_dropped(whole, prompts, visual, torch.ones_like(keep)), unchanged))


def test_the_tower_heads_ask_each_token_for_its_row_and_column():
    """Stage 1 asks every patch token where it is (token order is row-major), so the tower keeps it for the corner
    questions: tokens that carry their position let the row and column read-outs learn it exactly."""
    torch.manual_seed(0)
    heads = TowerHeads(32, 6, 4, 6)
    patches = torch.eye(16, 32).expand(8, 16, 32)  # token t of a 4 x 4 grid says it is t
    targets = {"digit": torch.full((8, 16), 10), "color": torch.full((8, 16), -1), "centre": torch.zeros(8, 16),
               "count": torch.zeros(8, 16, dtype=torch.long)}
    assert heads.accuracies(patches, targets)["position"] < 50
    optimizer = torch.optim.Adam(heads.parameters(), lr=0.1)
    for _ in range(50):
        optimizer.zero_grad()
        heads.loss(patches, targets).backward()
        optimizer.step()
    assert heads.accuracies(patches, targets)["position"] == 100


def test_patch_targets_mark_each_digits_patches_and_one_centre():
    batch = vqa_split("train", 8, seed=0)
    targets = patch_targets(batch, 16, 8)
    assert torch.equal(targets["centre"].sum(1), batch.present.sum(1).float())
    assert torch.equal(targets["count"], batch.present.sum(1, keepdim=True).expand(8, 256))  # on every patch
    for i in range(8):
        shown = set(batch.digits[i][batch.present[i]].tolist())
        assert set(targets["digit"][i].unique().tolist()) - {10} <= shown
        assert (targets["digit"][i] == 10).sum() > 100  # most of the canvas is background
        assert torch.equal(targets["digit"][i] == 10, targets["color"][i] == -1)


def test_training_saves_a_model_transformers_loads_and_arrcoc_attaches_to(tmp_path):
    out = main(["--quick", "--threads", "1", "--out", str(tmp_path / "vlm")])
    model, tokenizer = load_canvas_vlm(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and len(tokenizer) > 60
    batch = as_uint8(vqa_split("test", 2, seed=0))
    prompts = canvas_prompts(tokenizer, batch.questions, 256)
    wrapped = arrcoc.attach_vlm(model, budget=0.25)
    generated = wrapped.generate(pixel_values=batch.images.float() / 255, **prompts, max_new_tokens=1,
                                 do_sample=False)
    assert generated.shape == (2, prompts["input_ids"].shape[1] + 1)


def test_the_training_command_rebuilds_the_model_bit_for_bit(tmp_path):
    first = main(["--quick", "--threads", "1", "--out", str(tmp_path / "a")])
    second = main(["--quick", "--threads", "1", "--out", str(tmp_path / "b")])
    weights = sorted(p.name for p in first.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in second.glob("*.safetensors"))
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in weights)


def test_a_training_sequence_asks_several_questions_and_supervises_only_the_answers():
    tokenizer = canvas_tokenizer()
    turns = [[("is there a 3 ?", "yes"), ("what colour is the 7 ?", "red")], [("count the digits .", "4")] * 2]
    prompts = dialogue_prompts(tokenizer, turns, 4, 0.0, torch.Generator().manual_seed(0))
    rows = [tokenizer.convert_ids_to_tokens(r) for r in prompts["input_ids"]]
    assert rows[0][:10] == ["<s>", *[IMAGE_TOKEN] * 4, "is", "there", "a", "3", "?"] and rows[0][-1] == "</s>"
    assert rows[0].count(IMAGE_TOKEN) == 4  # the image once, before the questions
    supervised = [[t for t, label in zip(row, labels) if label != -100] for row, labels in zip(rows, prompts["labels"])]
    assert supervised == [["yes", "</s>", "red", "</s>"], ["4", "</s>", "4", "</s>"]]
    assert prompts["attention_mask"][1].tolist()[:2] == [0, 0]  # the shorter row is left padded
    # the first turn is a test prompt exactly: "<s> <image> ... question answer :"
    first = canvas_prompts(tokenizer, ["is there a 3 ?"], 4)["input_ids"][0].tolist()
    assert prompts["input_ids"][0].tolist()[:len(first)] == first
    dropped = dialogue_prompts(tokenizer, turns, 4, 1.0, torch.Generator().manual_seed(0))
    words = [t for t in tokenizer.convert_ids_to_tokens(dropped["input_ids"][0]) if t not in ("<s>", IMAGE_TOKEN)]
    assert words[:7] == ["<unk>"] * 3 + ["3", "<unk>", "answer", ":"]  # the content word stays


@pytest.mark.skipif(not (DEFAULT_DIR / "config.json").is_file(),
                    reason="no canvas VLM in benchmarks/checkpoints/canvas_vlm (python -m arrcoc.bench.train_vlm)")
def test_the_committed_model_reads_local_answers_off_the_asked_digits_tokens():
    """Pruning is measurable on the committed canvas VLM: with every visual token it answers local questions well, and
    without the tokens of the asked digit's patches it falls to near chance (answers come from where they should)."""
    from arrcoc.bench.vqa import _full, evaluate, without_answer

    torch.manual_seed(0)
    model, tokenizer = load_canvas_vlm()
    test = as_uint8(vqa_split("test", 240, seed=0))
    local = test.rows(test.local.nonzero()[:, 0].tolist())
    full = evaluate(_full(model), tokenizer, local, 0, 60)["accuracy"]["local"]
    without = evaluate(without_answer(model), tokenizer, local, 0, 60)["accuracy"]["local"]
    assert full >= 75, full  # 78.8 on these 118 (its position questions 47%: the local target of 90 fails)
    assert without <= 25, without  # chance: 10% for a digit, 12.5% for a colour


def test_the_symbolic_probe_gives_each_patch_its_digit_and_colour_and_corrupts_the_share_asked():
    import importlib.util

    from arrcoc.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("probe", REPO_ROOT / "benchmarks" / "vlm_symbolic_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    batch = as_uint8(vqa_split("train", 4, seed=0))
    truth = patch_targets(batch, 16, 8)
    on_digit = truth["digit"] < 10
    clean = probe.symbolic_features(batch, 0.0, torch.Generator().manual_seed(0))
    assert clean.shape == (4, 256, 128) and torch.equal(clean[..., :11].argmax(-1), truth["digit"])
    assert torch.equal(clean[..., 11:].sum(-1), 1 + truth["centre"])  # one colour class each, and the centre flag
    noisy = probe.symbolic_features(batch, 1.0, torch.Generator().manual_seed(0))[..., :11].argmax(-1)
    assert (noisy[on_digit] != truth["digit"][on_digit]).all() and (noisy[~on_digit] == 10).all()
    pooled = pooled_tokens(clean, 4)
    top_left = clean.view(4, 16, 16, 128)[:, :4, :4].mean((1, 2))
    assert pooled.shape == (4, 16, 128) and torch.allclose(pooled[:, 0], top_left)
