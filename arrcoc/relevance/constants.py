"""Tensors that depend on nothing but shapes, devices and dtypes (patch positions, kernels, colour maps), made once.

:func:`shape_constant` caches what such a function makes per distinct arguments, as ordinary tensors (also when
first asked for under ``torch.inference_mode``, so that training may use them later), and tells ``torch.compile``
that its result is a constant: the compiled graph holds the tensors instead of tracing how they are made.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

Made = TypeVar("Made")


def shape_constant(make: Callable[..., Made]) -> Callable[..., Made]:
    """``make`` (a function of hashable arguments: sizes, devices, dtypes) cached per arguments. Its tensors are
    shared: never modify them in place."""
    made: dict[tuple, Made] = {}

    @functools.wraps(make)
    def cached(*args: Any, **kwargs: Any) -> Made:
        key = (args, tuple(sorted(kwargs.items())))
        if key not in made:
            with torch.inference_mode(False), torch.no_grad():
                made[key] = make(*args, **kwargs)
        return made[key]

    # torch.compile names each constant after the code that made it: one name per function
    cached.__code__ = cached.__code__.replace(co_name=make.__name__)
    return torch.compiler.assume_constant_result(cached)
