"""Intercept the ``F.linear`` calls of a rule's own layers, in execution order.

Local rules need each layer's own pre- and post-synaptic activity (Hebbian), or to change what flows
backward through a layer (feedback alignment). A ``TorchFunctionMode`` sees every ``F.linear`` call,
including ones made inside library modules, so rules work on any module built from ``nn.Linear``
without patching or re-implementing its forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


@dataclass
class LinearCall:
    layer: int  # index into the rule's layer list
    inputs: Tensor
    output: Tensor


class LinearCalls(TorchFunctionMode):
    """Record (and optionally replace) calls of ``F.linear`` on the given layers' weights.

    ``replace(layer_index, inputs)`` computes the layer's output instead of the plain linear map.
    """

    def __init__(
        self,
        layers: Sequence[nn.Linear],
        replace: Callable[[int, Tensor], Tensor] | None = None,
    ):
        super().__init__()
        self.index = {id(layer.weight): i for i, layer in enumerate(layers)}
        self.replace = replace
        self.calls: list[LinearCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            layer = self.index.get(id(weight))
            if layer is not None:
                inputs = args[0] if args else kwargs["input"]
                output = self.replace(layer, inputs) if self.replace else func(*args, **kwargs)
                self.calls.append(LinearCall(layer, inputs, output))
                return output
        return func(*args, **kwargs)


def flat(t: Tensor) -> Tensor:
    """(..., features) -> (samples, features): tokens and batch are samples alike for a local rule."""
    return t.reshape(-1, t.shape[-1])
