"""The token budget, one definition: how many of a grid's patch tokens the backbone keeps.

A budget is either a **ratio** (a float in (0, 1]: ``0.25`` keeps a quarter, ``1.0`` keeps every token) or a
**count** (an int >= 1: ``16`` keeps 16 tokens, ``1`` keeps one). A model keeps every token, and runs the
unmodified backbone, exactly when :func:`num_kept` is the number of patches.
"""

from __future__ import annotations

Budget = float | int


def check_budget(budget: object) -> Budget:
    """``budget`` if it is a valid ratio or count; otherwise a clear error.

    Args:
        budget: a float in (0, 1] (the share of patch tokens kept) or an int >= 1 (how many are kept).

    Returns:
        The budget unchanged.

    Raises:
        TypeError: not a number (bools are not budgets).
        ValueError: a ratio outside (0, 1] or a count below 1.
    """
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise TypeError(f"budget must be a ratio (float in (0, 1]) or a token count (int >= 1), got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"a token count budget must be >= 1, got {budget}")
    elif not 0.0 < budget <= 1.0:
        hint = f" (for a count of {int(budget)} tokens give the int {int(budget)})" if budget.is_integer() else ""
        raise ValueError(f"a budget ratio must be in (0, 1], got {budget}{hint}")
    return budget


def num_kept(budget: Budget, num_patches: int) -> int:
    """K, the number of patch tokens kept out of ``num_patches``.

    Args:
        budget: a ratio in (0, 1] (rounded, at least 1 token) or a count in [1, num_patches].
        num_patches: the patch tokens of the image (its grid size).

    Returns:
        K in [1, num_patches]; ``K == num_patches`` means every token is kept.
    """
    check_budget(budget)
    if isinstance(budget, int):
        if budget > num_patches:
            raise ValueError(f"token count budget K must be in [1, {num_patches}] (number of patches), got {budget}")
        return budget
    return max(1, round(budget * num_patches))


def keeps_all(budget: Budget, num_patches: int) -> bool:
    """Whether ``budget`` keeps every one of ``num_patches`` tokens (the model then runs unmodified)."""
    return num_kept(budget, num_patches) == num_patches
