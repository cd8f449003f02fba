"""The inference forward compiled whole and captured in CUDA graphs, with the eager forward to fall back to.

On a GPU the relevance module costs kernel launches, not FLOPs: compiled whole, its operators fuse into a few
kernels, and captured in a CUDA graph, a forward of fixed shapes is one launch to replay. ``torch.compile`` with
``mode="reduce-overhead"`` does both (each new input shape compiles and captures once; elsewhere than on CUDA it
only compiles).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

Forward = Callable[..., Tensor]  # tensors (or None) in, one tensor out


class GraphedForward:
    """``forward(*inputs)`` (e.g. images and query) compiled whole (``fullgraph=True``, fixed shapes) and
    graph-captured; if that fails, a warning says why and this and every later call run ``forward`` eagerly."""

    def __init__(self, forward: Forward):
        self.forward = forward
        self.compiled = torch.compile(forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
        self.failure: str | None = None  # why the compiled forward is no longer tried

    def run(self, *inputs: Tensor | None) -> Tensor:
        if self.failure is None:
            try:
                torch.compiler.cudagraph_mark_step_begin()  # the outputs of earlier calls are the caller's copies
                return self.compiled(*inputs).clone()  # a replay overwrites its graph's outputs: copy them
            except Exception as error:  # any failure to compile or capture: eager from now on, saying why
                self.failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
                warnings.warn(f"the graph-captured forward failed ({self.failure}); running eager from now on "
                              "(graphs=False runs eager from the start)", stacklevel=3)
        return self.forward(*inputs)
