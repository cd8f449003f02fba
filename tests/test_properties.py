"""Property-based tests: over image sizes, batch sizes, budgets (fractions and token counts, valid or not),
tiers, query presence, dropped-token handling and float32 / bfloat16, the only failures are the documented
errors (docs/bad_inputs.md), and the backbone always receives exactly the promised number of tokens."""

import sys
from functools import cache
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import arrcoc
from arrcoc.budget import keeps_all, num_kept
from arrcoc.models.toy_vit import toy_vit

sys.path.insert(0, str(Path(__file__).parent))
from bad_inputs import templates  # noqa: E402

PATCH = 8
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@cache
def backbone(dtype: torch.dtype) -> torch.nn.Module:
    # built once per dtype for hundreds of examples, so the toy ViT itself, not the (per-test) tiny_vit fixture
    return toy_vit(num_classes=5, dynamic_img_size=True).to(dtype).eval()


def assert_documented(error: Exception) -> None:
    documented = templates()
    text = str(error)[1:-1] if isinstance(error, KeyError) else str(error)
    assert any(type(error).__name__ == name and pattern.fullmatch(" ".join(text.split()))
               for name, pattern in documented), f"undocumented error {type(error).__name__}: {error}"


def mostly(common: st.SearchStrategy, rare: st.SearchStrategy, share: int = 6) -> st.SearchStrategy:
    """``common`` about ``share`` times as often as ``rare``."""
    return st.sampled_from([True] * share + [False]).flatmap(lambda usual: common if usual else rare)


# whole patches, mostly an even number of them (as tiers need), or not whole patches
side = mostly(st.sampled_from([16, 32, 48]), st.one_of(st.sampled_from([8, 24, 40]), st.integers(9, 47)), share=3)
budget = mostly(
    st.one_of(st.floats(0.01, 1.0), st.integers(1, 40)),  # a fraction; a token count (maybe more than patches)
    st.sampled_from([0, -1, 1.5, float("nan")]),  # out of range
)


@SETTINGS
@given(height=side, width=side, batch=mostly(st.integers(1, 3), st.just(0)), budget=budget, tiers=st.booleans(),
       refined=st.integers(0, 2), query=st.booleans(), dropped=st.sampled_from(["discard", "fuse", "merge"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_forward_keeps_exactly_the_promised_tokens_or_raises_a_documented_error(
        height, width, batch, budget, tiers, refined, query, dropped, dtype):
    model = backbone(dtype)
    config = {"tiers": tiers, "refined_regions": refined if tiers else 0, "dropped": dropped}
    images = torch.rand(batch, 3, height, width).to(dtype)
    queries = torch.randn(batch, 384) if query else None
    seen: list[int] = []
    hook = model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    try:
        wrapped = arrcoc.attach(model, budget=budget, config=config)
        logits = wrapped(images, queries)
        kept = wrapped.relevance_map(images, queries).kept
    except Exception as error:  # noqa: BLE001 - only documented errors may come out
        assert_documented(error)
        event(f"documented {type(error).__name__}: {str(error)[:40]}")
        return
    finally:
        hook.remove()
    grid_h, grid_w = height // PATCH, width // PATCH
    patches = grid_h * grid_w
    if keeps_all(budget, patches):  # the identity: every token, the original model
        promised = patches
    elif tiers:
        promised = wrapped.tier_counts(grid_h, grid_w).total
    else:  # top K, plus one summary token when tokens were dropped and are fused (EViT)
        k = num_kept(budget, patches)
        promised = k + (dropped == "fuse" and k < patches)
    event("ran" + (" with tiers" if tiers else ""))
    assert seen[0] == 1 + promised  # CLS + exactly the promised patch tokens
    assert kept.shape == (batch, num_kept(budget, patches))
    assert logits.shape == (batch, 5) and torch.isfinite(logits.float()).all()


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), budget=st.sampled_from([0.25, 0.5, 3, 16]), query=st.booleans(),
       target=st.sampled_from(["attention", "perturbation", "reward"]))
def test_learning_fills_finite_grads_and_changes_only_the_relevance_module(batch, budget, query, target):
    model = backbone(torch.float32)
    backbone_state = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = arrcoc.attach(model, budget=budget, config={"target": target})
    images = torch.rand(batch, 3, 32, 32)
    queries = torch.randn(batch, 384) if query else None
    wrapped.fill_grads(images, queries, labels=torch.randint(0, 5, (batch,)))
    grads = [p.grad for p in wrapped.relevance.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone_state.items())
