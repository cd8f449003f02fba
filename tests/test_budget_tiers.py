"""Tiers: merged / normal / refined regions with an exact total, exact against the model's own embedding."""

from __future__ import annotations

import pytest
import torch
from test_backbones import (
    TIMM,  # noqa: I001 - the shared tiny timm config
    build,
    images,
)
from timm.models.vision_transformer import VisionTransformer

from arrcoc.backbones import (
    MERGED,
    NORMAL,
    REFINED,
    TierCounts,
    adapt_backbone,
    assign_tiers,
    region_scores,
    tiered_tokens,
)

TOL = 1e-5
FAMILIES = ["timm-vit", "timm-deit3-layerscale-reg-qknorm", "hf-vit-cls", "hf-clip", "hf-siglip", "hf-dinov2-registers"]


@pytest.mark.parametrize(("regions", "total", "refined", "expected"),
                         [(4, 16, 0, (0, 4, 0)), (4, 4, 0, (4, 0, 0)), (4, 10, 0, (2, 2, 0)), (4, 19, 1, (3, 0, 1)),
                          (4, 28, 1, (0, 3, 1)), (49, 100, 2, (40, 7, 2))])
def test_tier_counts_hit_the_total_exactly(regions, total, refined, expected) -> None:
    counts = TierCounts.for_total(regions, total, refined)
    assert (counts.merged, counts.normal, counts.refined) == expected
    assert counts.total == total and counts.regions == regions


@pytest.mark.parametrize(("total", "refined"), [(11, 0), (17, 0), (3, 0), (200, 1)])
def test_unreachable_totals_are_a_clear_error(total: int, refined: int) -> None:
    with pytest.raises(ValueError, match="steps of 3"):
        TierCounts.for_total(4, total, refined)


def test_assign_tiers_by_score_rank() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.4, 0.6]])
    tiers = assign_tiers(scores, TierCounts(merged=2, normal=1, refined=1))
    assert tiers.tolist() == [[MERGED, REFINED, NORMAL, MERGED], [REFINED, MERGED, MERGED, NORMAL]]
    assert region_scores(torch.arange(16.0)[None], 4, 4).tolist() == [[0 + 1 + 4 + 5, 2 + 3 + 6 + 7,
                                                                         8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]


@pytest.mark.parametrize("name", FAMILIES)
def test_all_normal_tiers_are_the_models_own_tokens(name: str) -> None:
    adapter = adapt_backbone(build(name))
    x = images()
    tiers = torch.full((3, 4), NORMAL)
    with torch.no_grad():
        state = tiered_tokens(adapter, x, tiers)
        embedded = adapter.embed(x)
    p = adapter.num_prefix_tokens
    index = state.patch_index[..., None].expand(-1, -1, embedded.shape[-1])
    reference = torch.cat([embedded[:, :p], embedded[:, p:].gather(1, index)], 1)
    assert sorted(state.patch_index[0].tolist()) == list(range(16))
    assert (state.tokens - reference).abs().max() <= TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_tiers_have_the_exact_total_and_run(name: str) -> None:
    adapter = adapt_backbone(build(name))
    x = images()
    counts = TierCounts(merged=2, normal=1, refined=1)
    tiers = assign_tiers(torch.rand(3, 4), counts)
    with torch.no_grad():
        state = tiered_tokens(adapter, x, tiers, proportional=True)
        out = adapter.head(adapter.run_blocks(state))
    assert state.tokens.shape[1] == adapter.num_prefix_tokens + counts.total == adapter.num_prefix_tokens + 22
    assert torch.allclose(state.size.sum(1), torch.full((3,), 16.0 + adapter.num_prefix_tokens))
    assert torch.isfinite(out).all()
    assert (tiers != tiers[0]).any()  # different regions per image, one batched gather


def test_merged_region_is_the_mean_of_its_patches() -> None:
    adapter = adapt_backbone(build("timm-vit"))
    x = images()
    tiers = torch.tensor([[MERGED, NORMAL, NORMAL, NORMAL]] * 3)
    with torch.no_grad():
        state = tiered_tokens(adapter, x, tiers)
        embedded = adapter.embed(x)
    assert (state.tokens[:, 1] - embedded[:, 1 + torch.tensor([0, 1, 4, 5])].mean(1)).abs().max() <= TOL
    assert state.patch_index[0, 0] == 0 and state.tokens.shape[1] == 1 + 13


@pytest.mark.parametrize("family", ["timm-dynamic", "hf-vit-interpolate"])
def test_refined_tokens_are_the_models_tokens_of_the_2x_view(family: str) -> None:
    # a model that embeds other sizes itself gives the reference: its tokens of the 2x image
    if family == "timm-dynamic":
        torch.manual_seed(0)
        adapter = adapt_backbone(VisionTransformer(**TIMM, dynamic_img_size=True).eval())
    else:
        adapter = adapt_backbone(build("hf-vit-cls"), interpolate_pos_encoding=True)
    x, fine = images(), images(size=64)
    tiers = torch.tensor([[NORMAL, REFINED, MERGED, MERGED]] * 3)
    with torch.no_grad():
        state = tiered_tokens(adapter, x, tiers, fine_images=fine)
        fine_tokens = adapter.embed(fine)[:, 1:].view(3, 8, 8, -1)
    refined = state.tokens[:, -16:].reshape(3, 4, 4, -1)  # region 1: fine rows 0-3, cols 4-7
    assert (refined - fine_tokens[:, 0:4, 4:8]).abs().max() <= TOL
    assert state.patch_index[0, -16:].tolist() == [2, 2, 3, 3] * 2 + [6, 6, 7, 7] * 2


def test_bad_tiers_are_a_clear_error() -> None:
    adapter = adapt_backbone(build("timm-vit"))
    with pytest.raises(ValueError, match="same number of regions per tier"):
        tiered_tokens(adapter, images(batch=2), torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]))
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        tiered_tokens(adapter, images(batch=2), torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="twice the size"):
        tiered_tokens(adapter, images(batch=1), torch.tensor([[2, 1, 1, 1]]), fine_images=images(1, 48))
