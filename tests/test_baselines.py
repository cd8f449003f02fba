"""Baselines: scorers and reducers in the allocator's interface; EViT / ATS / ToMe against references."""

from __future__ import annotations

import pytest
import torch
from test_backbones import build, images
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from arrcoc.backbones import FUSED, PatchGrid, TokenSet, adapt_backbone
from arrcoc.baselines import (
    BASELINES,
    GridScorer,
    ToMe,
    TopK,
    ats_scores,
    cls_attention_scores,
    equal_compute_baseline,
    make_baseline,
    run_reduced,
    tokens_per_block,
)
from arrcoc.budget import num_kept

ATTENTION_FAMILIES = ["timm-vit-eager", "timm-deit3-layerscale-reg-qknorm", "hf-vit-cls", "hf-dinov2-registers"]


def reference_attention(adapter, block_index: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(CLS attention averaged over heads, value norms), recomputed from the block's own weights."""
    block = adapter.blocks[block_index]
    if isinstance(adapter.model, VisionTransformer):
        attn = block.attn
        qkv = attn.qkv(block.norm1(x)).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    else:
        attn = block.attention
        norm = block.layernorm_before if hasattr(block, "layernorm_before") else block.norm1
        h = norm(x)
        heads = adapter.core.config.num_attention_heads
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        q, k, v = (proj(h).unflatten(-1, (heads, -1)).transpose(1, 2) for proj in projections)
    cls = (q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1).mean(1)[:, 0]
    return cls, v.transpose(1, 2).flatten(2).norm(dim=-1)


@pytest.mark.parametrize("name", ATTENTION_FAMILIES)
def test_evit_keeps_exactly_the_top_k_by_cls_attention_and_fuses_the_rest(name: str) -> None:
    adapter = adapt_backbone(build(name))
    x = images()
    with torch.no_grad():
        block_input = adapter.run_blocks(adapter.tokens(x), 0, 1)
        cls, _ = reference_attention(adapter, 1, block_input.tokens)
        after = adapter.run_blocks(block_input, 1, 2)
        reducer = TopK(cls_attention_scores, 5, layers=(1,), dropped="fuse", needs_attention=True)
        _, stats = adapter.run_block(1, block_input, capture=True)
        out = reducer(after, stats, 1)
    p = adapter.num_prefix_tokens
    assert (stats.cls_attention() - cls).abs().max() <= 1e-5
    assert out.num_patch_tokens == 6 and (out.patch_index[:, -1] == FUSED).all()
    patch_attention = cls[:, p:]
    for b in range(x.shape[0]):
        top = set(patch_attention[b].topk(5).indices.tolist())
        assert set(out.patch_index[b, :-1].tolist()) == top
        gone = [i for i in range(patch_attention.shape[1]) if i not in top]
        w = patch_attention[b, gone] / patch_attention[b, gone].sum()
        fused = (w[:, None] * after.patches[b, gone]).sum(0)
        assert (out.tokens[b, -1] - fused).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ATTENTION_FAMILIES)
def test_ats_scores_are_cls_attention_times_value_norm(name: str) -> None:
    adapter = adapt_backbone(build(name))
    x = images()
    with torch.no_grad():
        state = adapter.tokens(x)
        cls, value_norm = reference_attention(adapter, 0, state.tokens)
        _, stats = adapter.run_block(0, state, capture=True)
        scores = ats_scores(state, stats)
    p = adapter.num_prefix_tokens
    assert (scores - cls[:, p:] * value_norm[:, p:]).abs().max() <= 1e-5


def test_cls_scorers_explain_what_they_need() -> None:
    adapter = adapt_backbone(build("hf-siglip"))
    state = adapter.tokens(images())
    _, stats = adapter.run_block(0, state, capture=True)
    with pytest.raises(ValueError, match="class token"):
        cls_attention_scores(state, stats)
    with pytest.raises(ValueError, match="block's attention"):
        cls_attention_scores(adapter.tokens(images()), None)
    with pytest.raises(ValueError, match="unknown baseline 'foo'"):
        make_baseline("foo", 0.5, 2, adapter.grid())


def test_grid_scores_pick_an_even_strided_lattice() -> None:
    adapter = adapt_backbone(build("timm-vit"))  # 4 x 4 patches
    reducer = make_baseline("grid", 0.25, adapter.depth, adapter.grid())
    state = reducer(adapter.tokens(images()), None, -1)
    assert (state.patch_index == torch.tensor([0, 2, 8, 10])).all()
    # ViT-B/16 at 224: a quarter of the 14 x 14 grid is every other row and column
    grid = PatchGrid(14, 14, (16, 16))
    scores = GridScorer(grid)(TokenSet.from_embedded(torch.zeros(1, 197, 1), 1))
    kept = scores.topk(num_kept(0.25, 196)).indices[0]
    assert kept.numel() == 49 and ((kept // 14) % 2 == 0).all() and ((kept % 14) % 2 == 0).all()


@pytest.mark.parametrize("family", ["timm-vit", "timm-deit-distilled", "hf-clip", "hf-dinov2-registers"])
@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_runs_with_its_budget(family: str, method: str) -> None:
    torch.manual_seed(0)
    model = build(family)
    adapter = adapt_backbone(model)
    x = images()
    n, p = adapter.grid(x).num_patches, adapter.num_prefix_tokens
    reducer = make_baseline(method, 0.5, adapter.depth, adapter.grid(x))
    trace: list[int] = []
    with torch.no_grad():
        state = run_reduced(adapter, x, reducer, trace)
        out = adapter.head(state)
    assert len(trace) == adapter.depth and torch.isfinite(out).all()
    if method in ("full", "random", "grid"):
        assert trace == [p + (n if method == "full" else num_kept(0.5, n))] * adapter.depth
    if method == "tome":
        assert state.num_patch_tokens == num_kept(0.5, n)
        assert torch.allclose(state.size.sum(1), torch.full((3,), float(n + p)))
    if method == "full":
        with torch.no_grad():
            assert (out - adapter(x)).abs().max() == 0


def test_random_scores_differ_per_image() -> None:
    adapter = adapt_backbone(build("timm-vit"))
    state = run_reduced(adapter, images(batch=4), make_baseline("random", 0.25, 2, adapter.grid()))
    rows = {tuple(r) for r in state.patch_index.tolist()}
    assert len(rows) > 1


def test_tome_schedule_reaches_the_budget() -> None:
    reducer = make_baseline("tome", 0.25, 12, PatchGrid(14, 14, (16, 16)))
    assert isinstance(reducer, ToMe)
    assert sum(reducer.r) == 196 - 49 and reducer.r[-1] == 0 and max(reducer.r) - min(reducer.r[:-1]) <= 1


def test_throughput_benchmark_command_writes_its_results(tmp_path) -> None:
    import json

    from arrcoc.bench import throughput

    threads = torch.get_num_threads()
    try:
        out = throughput.main(["--models", "vit_tiny", "--methods", "arrcoc", "scores", "evit", "tome",
                               "--budgets", "0.5", "--batch", "1", "--repeats", "1", "--warmup", "0",
                               "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((out / "throughput.json").read_text())
    measured = result["results"]["vit_tiny"]
    assert {r["method"] for r in measured["rows"]} == {"arrcoc", "scores", "evit", "tome"}
    assert all(r["speedup"] > 0 and 0 < r["mean_token_fraction"] <= 1 for r in measured["rows"])
    assert measured["module_ms"] > 0 and measured["module_overhead"] > 0
    latency = result["latency"]["vit_tiny"]  # the batch-1 pass: full and each latency method at its budget
    assert {(r["method"], r["budget"]) for r in latency["rows"]} == {
        (m, throughput.LATENCY_BUDGET) for m in throughput.LATENCY_METHODS}
    assert {"device", "torch", "timm", "threads"} <= result["meta"].keys()
    markdown = (out / "throughput.md").read_text()
    assert "Batch-1 latency" in markdown and "| arrcoc | 0.5 |" in markdown
    assert (out / "throughput.png").is_file()


def test_capturing_attention_works_on_compiled_blocks() -> None:
    """EViT / ATS read q/k/v through forward hooks, which a compiled block's cached graph would skip."""
    adapter = adapt_backbone(build("timm-vit-eager"))
    x = images()
    state = adapter.tokens(x)
    _, eager = adapter.run_block(0, state, capture=True)
    adapter.blocks[0].compile(backend="eager")
    adapter.run_blocks(state, 0, 1)  # compiled and cached without the hooks
    out, compiled = adapter.run_block(0, state, capture=True)
    assert torch.allclose(compiled.query, eager.query)
    assert torch.allclose(out.tokens, adapter.run_blocks(state, 0, 1).tokens)


@pytest.mark.parametrize("name", ["evit", "ats", "tome", "random"])
def test_tokens_per_block_matches_the_tokens_the_blocks_run_on(name: str) -> None:
    adapter = adapt_backbone(build("timm-vit-eager"))
    x = images()
    grid = adapter.grid(x)
    reducer = make_baseline(name, 0.25, adapter.depth, grid)
    trace: list[int] = []
    with torch.no_grad():
        run_reduced(adapter, x, reducer, trace)
    assert [t - adapter.num_prefix_tokens for t in trace] == tokens_per_block(reducer, grid.num_patches, adapter.depth)


def test_equal_compute_baselines_run_on_the_requested_mean_token_count_or_report_infeasible() -> None:
    grid, depth = PatchGrid(8, 8, (8, 8)), 6
    for name in ("evit", "ats", "tome"):
        reducer = equal_compute_baseline(name, 32, depth, grid)
        assert abs(sum(tokens_per_block(reducer, 64, depth)) / depth - 32) <= 1.6
        # blocks before the first reduction see all 64 tokens: a mean of 8 is out of reach at depth 6
        assert equal_compute_baseline(name, 8, depth, grid) is None
    with pytest.raises(ValueError, match="progressive"):
        equal_compute_baseline("random", 8, depth, grid)


@pytest.mark.parametrize("name", ["evit", "ats", "tome"])
def test_an_early_schedule_is_a_progressive_baseline_at_its_fastest(name: str) -> None:
    """The early schedule reaches the budget's K as soon as the method can (EViT / ATS after block 0, ToMe at
    half the tokens per block), runs fewer tokens per block than the method's own schedule, and really runs so."""
    adapter = adapt_backbone(build("timm-vit-eager"))
    x = images()
    grid = adapter.grid(x)
    n, k = grid.num_patches, num_kept(0.25, grid.num_patches)
    early = make_baseline(name, 0.25, adapter.depth, grid, early=True)
    per_block = tokens_per_block(early, n, adapter.depth)
    halvings = [max(k, n // 2 ** i) for i in range(adapter.depth)]
    assert per_block == (halvings if name == "tome" else [n] + [k + (name == "evit")] * (adapter.depth - 1))
    assert sum(per_block) <= sum(tokens_per_block(make_baseline(name, 0.25, adapter.depth, grid), n, adapter.depth))
    deep, depth = PatchGrid(8, 8, (8, 8)), 6  # deeper than the test model: there the own schedule starts later
    assert (sum(tokens_per_block(make_baseline(name, 0.0625, depth, deep, early=True), 64, depth))
            < sum(tokens_per_block(make_baseline(name, 0.0625, depth, deep), 64, depth)))
    trace: list[int] = []
    with torch.no_grad():
        run_reduced(adapter, x, early, trace)
    assert [t - adapter.num_prefix_tokens for t in trace] == per_block
    with pytest.raises(ValueError, match="progressive"):
        make_baseline("grid", 0.25, adapter.depth, grid, early=True)
