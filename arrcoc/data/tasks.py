"""The canvas tasks as tensors: images, labels, digit boxes and (query task) sentence embeddings.

``task_data("query", "test", 1000, seed=0)`` is what the commands, the benchmark and the demos score on;
see :mod:`arrcoc.data.canvas` for how the canvases are composed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .canvas import cluttered_split, query_split
from .text import TextEncoder

TASKS = ("cluttered", "query")


@dataclass
class TaskData:
    """One split of one task; ``boxes`` are the target digits' pixel boxes (None for images without them, e.g.
    an image folder); ``queries`` are sentence embeddings (query task) or None."""

    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor | None
    queries: torch.Tensor | None = None
    sentences: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: slice | torch.Tensor) -> TaskData:
        sentences = None
        if self.sentences is not None:
            rows = range(len(self))[index] if isinstance(index, slice) else index.tolist()
            sentences = [self.sentences[i] for i in rows]
        queries = None if self.queries is None else self.queries[index]
        boxes = None if self.boxes is None else self.boxes[index]
        return TaskData(self.images[index], self.labels[index], boxes, queries, sentences)

    def batches(self, size: int):
        """Consecutive batches of at most ``size`` images, in order."""
        for start in range(0, len(self), size):
            yield self.batch(slice(start, start + size))


@cache
def shared_text_encoder() -> TextEncoder:
    """One all-MiniLM-L6-v2 encoder per process (loading it takes a while; it is only ever read)."""
    return TextEncoder()


def task_data(task: str, split: str, n: int, seed: int) -> TaskData:
    """Canvases of ``task`` (cluttered | query), ``split`` (train | test | shift), deterministic in ``seed``."""
    if task == "cluttered":
        data = cluttered_split(split, n, seed=seed)
        return TaskData(data.images, data.labels, data.boxes)
    if task != "query":
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    data = query_split(split, n, seed=seed)
    return TaskData(data.images, data.labels, data.boxes, shared_text_encoder()(data.queries), data.queries)
