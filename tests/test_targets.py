"""The forward-only targets on a backbone whose prediction is known: the sum of its patch tokens' logits."""

import pytest
import torch

from arrcoc.backbones import TokenSet
from arrcoc.relevance.targets import perturbation_target, sufficiency_target

GRID = (6, 6)


class SummingBackbone:
    """Blocks that change nothing and a head that adds up the patch tokens: each token is its own logits."""

    def run_blocks(self, state: TokenSet) -> TokenSet:
        return state

    def head(self, state: TokenSet) -> torch.Tensor:
        return state.tokens[:, state.num_prefix:].sum(1)


def canvas(objects: list[tuple[int, int]], label: int = 3, classes: int = 5) -> TokenSet:
    """One image: a 2 x 2 object (each patch strong evidence for ``label``) at each (row, column), zeros elsewhere."""
    tokens = torch.zeros(GRID[0], GRID[1], classes)
    for row, col in objects:
        tokens[row:row + 2, col:col + 2, label] = 1.0
    patches = tokens.flatten(0, 1)[None]
    return TokenSet(torch.cat([torch.zeros(1, 1, classes), patches], 1), 1, torch.arange(patches.shape[1])[None])


def top(target: torch.Tensor, k: int) -> set[int]:
    return set(target[0].topk(k).indices.tolist())


def patches_of(row: int, col: int) -> set[int]:
    return {(row + i) * GRID[1] + col + j for i in range(2) for j in range(2)}


def test_sufficiency_finds_what_alone_gives_the_prediction_where_dropping_a_redundant_copy_changes_nothing():
    state = canvas([(0, 0), (3, 3)])  # two copies: dropping either leaves the prediction where it was
    target = sufficiency_target(SummingBackbone(), state, GRID)
    assert target.shape == (1, 36) and target.max() == 1 and target.min() >= 0
    copies = patches_of(0, 0) | patches_of(3, 3)
    assert top(target, 8) == copies
    # both copies score the same: either alone gives the full prediction's class with the same confidence
    assert torch.allclose(target[0, sorted(copies)], target[0, sorted(copies)][0])
    # a window on half a copy reads less of it, one on the background nothing
    others = sorted(set(range(36)) - copies)
    assert target[0, others].max() < 0.75 and target[0, others].min() < 0.25
    # the perturbation target cannot tell the copies from the background: every group's drop changes it a little
    dropped = perturbation_target(SummingBackbone(), state, GRID)
    assert top(dropped, 8) != copies


def test_one_object_is_the_sufficiency_targets_top_window():
    state = canvas([(2, 1)])
    assert top(sufficiency_target(SummingBackbone(), state, GRID), 4) == patches_of(2, 1)


def test_sufficiency_window_must_fit_the_grid():
    with pytest.raises(ValueError, match=r"window must be in 1..6 for a 6x6 patch grid, got 7"):
        sufficiency_target(SummingBackbone(), canvas([(0, 0)]), GRID, window=7)
