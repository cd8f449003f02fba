"""The canvas VQA data: every answer follows from what is drawn, held-out phrasings are never trained on, and
local and global questions are asked alike."""

import re

import pytest
import torch

from arrcoc.data.vqa import GLOBAL_KINDS, LOCAL_KINDS, VQAConfig, answer_vocabulary, phrasings, vqa_split, vqa_words


@pytest.fixture(scope="module")
def train():
    return vqa_split("train", 160, seed=0)


def test_answers_follow_from_the_canvas(train):
    names = VQAConfig().canvas.colors
    for i in range(len(train)):
        kind, answer, present = train.kinds[i], train.answers[i], train.present[i]
        digits, colors, relevant = train.digits[i][present], train.colors[i][present], train.relevant[i][present]
        if kind == "count":
            assert answer == str(int(present.sum())) and bool(relevant.all())
        elif kind == "exists":
            asked = int(re.search(r"\b(\d)\b", train.questions[i]).group(1))
            assert answer == ("yes" if asked in digits.tolist() else "no") and bool(relevant.all())
        else:
            assert int(relevant.sum()) == 1
            slot = int(relevant.nonzero()[0, 0])
            if kind == "color":
                assert answer == str(int(digits[slot]))
                assert int((colors == colors[slot]).sum()) == 1 and names[int(colors[slot])] in train.questions[i]
            elif kind == "digit_color":
                assert answer == names[int(colors[slot])] and int((digits == digits[slot]).sum()) == 1
            else:
                assert kind == "position" and answer == str(int(digits[slot]))
        assert answer in answer_vocabulary()
        assert set(train.questions[i].split()) <= set(vqa_words())


def test_splits_are_deterministic_and_test_questions_use_held_out_phrasings(train):
    again = vqa_split("train", 160, seed=0)
    assert torch.equal(again.images, train.images) and again.questions == train.questions
    test = vqa_split("test", 80, seed=0)
    for split, held_out in ((train, False), (test, True)):
        for kind, question in zip(split.kinds, split.questions):
            templates = phrasings(kind, held_out)
            assert any(_matches(t, question) for t in templates), (kind, question)
    assert not set(phrasings("color", True)) & set(phrasings("color", False))


def _matches(template: str, question: str) -> bool:
    slot = {"c": r"\w+", "d": r"\d", "p": r"(top|bottom) (left|right)"}
    pattern = re.sub(r"\\\{(\w)\\\}", lambda m: slot[m.group(1)], re.escape(template))
    return re.fullmatch(pattern, question) is not None


def test_local_and_global_questions_are_asked_alike(train):
    local = train.local.float().mean().item()
    assert 0.35 <= local <= 0.65
    assert set(train.kinds) == {*LOCAL_KINDS, *GLOBAL_KINDS}
    exists = [a for k, a in zip(train.kinds, train.answers) if k == "exists"]
    assert 0.25 <= exists.count("yes") / len(exists) <= 0.75


def test_the_shift_split_changes_the_colours_and_photographs():
    test, shift = vqa_split("test", 16, seed=0), vqa_split("shift", 16, seed=0)
    assert test.images.shape == shift.images.shape == (16, 3, 128, 128)
    assert not torch.allclose(test.images.mean((0, 2, 3)), shift.images.mean((0, 2, 3)), atol=1e-3)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="anywhere"):
        VQAConfig(canvas=VQAConfig().canvas.__class__())
    with pytest.raises(ValueError, match="splits"):
        vqa_split("anywhere", 4)
