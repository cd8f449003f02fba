"""Budget mechanics: exact K, batched per-image selection, fusion, merging with size tracking, errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from arrcoc.backbones import FUSED, TokenSet, bipartite_merge, keep_top_k, select, top_k
from arrcoc.budget import num_kept

B, P, T, D = 3, 2, 16, 8


def state(size: bool = False) -> TokenSet:
    tokens = torch.randn(B, P + T, D)
    s = TokenSet.from_embedded(tokens, P)
    if size:
        s.size = torch.randint(1, 4, (B, P + T)).float()
    return s


@pytest.mark.parametrize(("budget", "k"), [(1.0, 16), (0.25, 4), (0.01, 1), (0.5, 8), (5, 5), (16, 16), (1, 1)])
def test_num_kept_from_ratio_or_count(budget: float | int, k: int) -> None:
    assert num_kept(budget, T) == k


@pytest.mark.parametrize(
    ("budget", "error", "match"),
    [
        (0.0, ValueError, r"ratio must be in \(0, 1\], got 0.0"),
        (1.5, ValueError, r"ratio must be in \(0, 1\], got 1.5"),
        (-0.2, ValueError, r"\(0, 1\]"),
        (0, ValueError, r"count budget must be >= 1, got 0"),
        (17, ValueError, r"K must be in \[1, 16\].*got 17"),
        (True, TypeError, "ratio"),
        ("half", TypeError, "ratio"),
    ],
)
def test_budget_outside_its_range_is_a_clear_error(budget, error, match) -> None:
    with pytest.raises(error, match=match):
        num_kept(budget, T)


def test_select_gathers_different_patches_per_image_and_keeps_the_prefix() -> None:
    s = state(size=True)
    index = torch.stack([torch.randperm(T)[:5] for _ in range(B)])
    out = select(s, index)
    for b in range(B):  # reference: per-image Python indexing
        rows = [*range(P), *(P + i for i in index[b].tolist())]
        assert torch.equal(out.tokens[b], s.tokens[b, rows])
        assert torch.equal(out.size[b], s.size[b, rows])
        assert torch.equal(out.patch_index[b], index[b])
    assert out.num_prefix == P and out.num_patch_tokens == 5


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        (torch.zeros(B, 4), TypeError, "int64 or int32"),
        (torch.zeros(B, 4, 1, dtype=torch.long), ValueError, r"shape \(batch=3, K\), got \(3, 4, 1\)"),
        (torch.zeros(B + 1, 4, dtype=torch.long), ValueError, r"shape \(batch=3, K\), got \(4, 4\)"),
        (torch.zeros(B, 0, dtype=torch.long), ValueError, "K in"),
        (torch.zeros(B, T + 1, dtype=torch.long), ValueError, "K in"),
        (torch.full((B, 4), T), ValueError, r"in \[0, 16\), got min 16, max 16"),
        (torch.full((B, 4), -1), ValueError, r"in \[0, 16\)"),
        ([0, 1], TypeError, "torch.Tensor"),
    ],
)
def test_bad_index_is_a_clear_error(index, error, match) -> None:
    with pytest.raises(error, match=match):
        select(state(), index)


def test_bad_scores_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"shape \(batch, patch tokens\) = \(3, 16\), got \(3, 18\)"):
        keep_top_k(state(), torch.rand(B, P + T), 0.5)
    with pytest.raises(ValueError, match="dropped must be one of"):
        keep_top_k(state(), torch.rand(B, T), 0.5, dropped="pool")
    with pytest.raises(ValueError, match="non-negative"):
        keep_top_k(state(), torch.randn(B, T), 0.5, dropped="fuse")


def test_keep_top_k_discard_keeps_exactly_the_k_best() -> None:
    s, scores = state(), torch.rand(B, T)
    out = keep_top_k(s, scores, 0.25)
    assert out.num_patch_tokens == 4
    for b in range(B):
        assert set(out.patch_index[b].tolist()) == set(scores[b].topk(4).indices.tolist())
    assert (out.patch_index.diff(dim=1) > 0).all()  # raster order is kept
    assert torch.equal(top_k(scores, 4), out.patch_index)


def test_fuse_appends_the_score_weighted_mean_of_the_dropped_tokens() -> None:
    s, scores = state(), torch.rand(B, T)
    out = keep_top_k(s, scores, 6, dropped="fuse")
    assert out.num_patch_tokens == 7 and (out.patch_index[:, -1] == FUSED).all()
    for b in range(B):
        kept = set(scores[b].topk(6).indices.tolist())
        gone = [i for i in range(T) if i not in kept]
        w = scores[b, gone] / scores[b, gone].sum()
        expected = (w[:, None] * s.patches[b, gone]).sum(0)
        assert torch.allclose(out.tokens[b, -1], expected, atol=1e-6)
        assert torch.equal(out.tokens[b, : P + 6], select(s, top_k(scores, 6)).tokens[b])


def one_hot_state(batch: int = B, prefix: int = P, tokens: int = T) -> TokenSet:
    # token j = e_j: after merging, token * size counts how many of each original token it absorbed
    eye = torch.eye(prefix + tokens).expand(batch, -1, -1).clone()
    return TokenSet.from_embedded(eye, prefix)


def assert_size_weighted_partition(out: TokenSet, n: int) -> None:
    counts = out.tokens * out.size[..., None]  # (B, tokens, n): each original token in exactly one output
    assert torch.allclose(counts, counts.round(), atol=1e-5)
    assert torch.allclose(counts.sum(dim=1), torch.ones(out.tokens.shape[0], n), atol=1e-5)
    assert torch.allclose(counts.sum(dim=2), out.size, atol=1e-5)  # size = number of sources
    assert torch.allclose(out.size.sum(dim=1), torch.full((out.tokens.shape[0],), float(n)))


def test_merge_folds_each_dropped_token_into_its_most_similar_kept_token() -> None:
    s = one_hot_state()
    metric = torch.randn(B, T, 4)
    scores = torch.rand(B, T)
    out = keep_top_k(s, scores, 5, dropped="merge", metric=metric)
    assert out.num_patch_tokens == 5
    assert_size_weighted_partition(out, P + T)
    assert torch.equal(out.tokens[:, :P], s.tokens[:, :P])  # prefix untouched
    unit = torch.nn.functional.normalize(metric, dim=-1)
    for b in range(B):
        kept = out.patch_index[b]
        for j in range(T):
            owner = (out.tokens[b, P:, P + j] > 0).nonzero().item()
            if j not in kept.tolist():  # destination = most similar kept token
                assert owner == (unit[b, kept] @ unit[b, j]).argmax().item()
            else:
                assert kept[owner] == j


def test_merge_with_existing_sizes_is_a_size_weighted_mean() -> None:
    s = state(size=True)
    out = keep_top_k(s, torch.rand(B, T), 4, dropped="merge")
    assert torch.allclose(out.size.sum(1), s.size.sum(1))
    total_before = (s.tokens * s.size[..., None]).sum(1)
    total_after = (out.tokens * out.size[..., None]).sum(1)
    assert torch.allclose(total_before, total_after, atol=1e-4)  # mass is conserved


@pytest.mark.parametrize("r", [1, 3, 8, 20])
def test_tome_invariants(r: int) -> None:
    s = one_hot_state()
    out = s
    for _ in range(3):  # repeated merging keeps the invariants
        out = bipartite_merge(out, torch.randn(B, out.num_patch_tokens, 4), r)
    expected = T
    for _ in range(3):
        expected -= min(r, expected // 2)
    assert out.num_patch_tokens == expected
    assert_size_weighted_partition(out, P + T)
    assert torch.equal(out.tokens[:, :P], s.tokens[:, :P])


def test_tome_merges_the_most_similar_pairs() -> None:
    # tokens 2 and 5 (even -> odd) are identical, every other pair is far apart: r=1 merges exactly them
    metric = torch.eye(T)[None].repeat(1, 1, 1)
    metric[0, 2] = metric[0, 5]
    out = bipartite_merge(TokenSet.from_embedded(torch.randn(1, P + T, D), P), metric, 1)
    merged = (out.size[0, P:] == 2).nonzero().flatten()
    assert merged.numel() == 1 and out.patch_index[0, merged].item() == 5
    assert 2 not in out.patch_index[0].tolist()


def test_attention_bias_is_log_size() -> None:
    s = state(size=True)
    bias: Tensor = s.attention_bias()
    assert bias.shape == (B, 1, 1, P + T)
    assert torch.allclose(bias.exp()[:, 0, 0], s.size)
    assert state().attention_bias() is None


# ---- the budget: one definition (arrcoc.budget) ----------------------------------------------------------
def test_a_budget_is_a_ratio_or_a_count_and_int_one_is_one_token():
    from arrcoc.budget import check_budget, keeps_all

    assert num_kept(1, 16) == 1  # a count of one token, not "all"
    assert num_kept(1.0, 16) == 16 and keeps_all(1.0, 16)
    assert num_kept(16, 16) == 16 and keeps_all(16, 16)
    assert num_kept(0.25, 16) == 4 and not keeps_all(0.25, 16)
    assert num_kept(0.01, 16) == 1  # a ratio keeps at least one token
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        num_kept(17, 16)
    with pytest.raises(ValueError, match="give the int 2"):
        check_budget(2.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_budget(0.0)
    with pytest.raises(TypeError, match="ratio"):
        check_budget(True)


def test_attached_model_budget_int_one_keeps_one_token_and_float_one_is_the_identity():
    import arrcoc
    from arrcoc.models.toy_vit import toy_vit

    backbone = toy_vit()
    images = torch.rand(2, 3, 32, 32)
    one = arrcoc.attach(backbone, budget=1)
    assert one.budget == 1 and one.relevance_map(images).kept.shape == (2, 1)
    assert not torch.equal(one(images), backbone(images))
    assert torch.equal(arrcoc.attach(backbone, budget=1.0)(images), backbone(images))
    assert torch.equal(arrcoc.attach(backbone, budget=16)(images), backbone(images))  # every one of 16 patches


def test_assigning_model_budget_applies_it_or_raises_and_changes_nothing():
    import arrcoc
    from arrcoc.models.toy_vit import toy_vit

    model = arrcoc.attach(toy_vit(), budget=0.25)
    images = torch.rand(2, 3, 32, 32)
    model.budget = 0.5
    assert model.config.budget == 0.5 and model.relevance.field.budget == 0.5
    assert model.relevance_map(images).kept.shape == (2, 8)
    model.budget = 3
    assert model.relevance_map(images).kept.shape == (2, 3)
    for bad, error in ((1.5, ValueError), (0, ValueError), ("half", TypeError)):
        with pytest.raises(error):
            model.budget = bad
        assert model.budget == 3
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        model.budget = 17
        model(images)  # a count beyond the grid: refused when the grid is known
    model.budget = 3
    config = model.config
    model.budget = 3  # the same budget again (a caller may set it before every call): nothing is rebuilt
    assert model.config is config
    model.budget = 1.0  # a ratio, not the count 1 or 3: every token
    assert model.config.budget == 1.0 and isinstance(model.config.budget, float)
    assert model.relevance_map(images).kept.shape == (2, 16)
