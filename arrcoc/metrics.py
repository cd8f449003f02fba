"""What the commands and benchmarks measure: accuracy, how much of the target a selection keeps, intervals
over seeds, wall time (on CPU or GPU, in float32 or autocast) and memory."""

from __future__ import annotations

import collections
import math
import os
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch._C._profiler import _ExperimentalConfig
from torch.autograd import ProfilerConfig, ProfilerState, _disable_profiler_legacy, _enable_profiler_legacy
from torch.utils._python_dispatch import TorchDispatchMode

from arrcoc.backbones import PatchGrid, top_k
from arrcoc.budget import num_kept
from arrcoc.data.tasks import TaskData
from arrcoc.relevance import ARRCOC
from arrcoc.relevance.targets import box_target

EVAL_BATCH = 250
# two-sided 95% Student t quantiles by degrees of freedom
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def accuracy(predict: Callable[[TaskData], Tensor], data: TaskData) -> float:
    """Accuracy (%) of ``predict(batch) -> logits`` over ``data`` in batches."""
    correct = sum(int((predict(batch).argmax(-1) == batch.labels).sum()) for batch in data.batches(EVAL_BATCH))
    return 100.0 * correct / len(data)


def box_coverage(kept: Tensor, boxes: Tensor, grid: PatchGrid, k: int) -> Tensor:
    """(B,) share of the digit's patches (at most K of them) among the ``kept`` patch indices (B, K)."""
    in_box = box_target(boxes, (grid.height, grid.width), grid.patch_size) > 0
    return in_box.gather(1, kept).sum(1) / in_box.sum(1).clamp_min(1).clamp_max(k)


@torch.no_grad()
def selection_metrics(model: ARRCOC, data: TaskData) -> dict[str, float]:
    """What the selections keep: with boxes, the box coverage (% of the target digit's patches kept); with
    queries, the top-K overlap (%) of the selections with and without the query (100 = the query changes
    nothing). Data with neither gives {}."""
    grid = model.adapter.grid(data.images[:1])
    k = num_kept(model.budget, grid.num_patches)
    covered, overlap = [], []
    for batch in data.batches(EVAL_BATCH):
        kept = model.relevance_map(batch.images, batch.queries).kept
        if batch.boxes is not None:
            covered.append(box_coverage(kept, batch.boxes, grid, k))
        if batch.queries is not None:
            blind = model.relevance_map(batch.images, None).kept
            overlap.append((kept[:, :, None] == blind[:, None, :]).any(-1).float().mean(1))
    metrics = {}
    if covered:
        metrics["box_coverage"] = 100.0 * torch.cat(covered).mean().item()
    if overlap:
        metrics["query_overlap"] = 100.0 * torch.cat(overlap).mean().item()
    return metrics


@torch.no_grad()
def target_coverage(model: ARRCOC, data: TaskData, kind: str) -> float:
    """Box coverage (%) of the forward-only target ``kind`` itself (its top-K at the model's budget): learning
    towards a target cannot keep more of the digit than the target does."""
    grid = model.adapter.grid()
    k = num_kept(model.budget, grid.num_patches)
    covered = [box_coverage(top_k(model.relevance_target(batch.images, kind=kind), k), batch.boxes, grid, k)
               for batch in data.batches(EVAL_BATCH)]
    return 100.0 * torch.cat(covered).mean().item()


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (Student t over seeds; 0 for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = T_95[max(df for df in T_95 if df <= len(values) - 1)]  # an untabulated df: the next smaller one's, wider
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``a - b`` over paired runs (the same seed and test images) and its 95% half-width: the seed's
    own luck, shared by both methods, cancels."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same, non-zero number of runs, got {len(a)} and {len(b)}")
    return interval([x - y for x, y in zip(a, b)])


# ---- cost --------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``fn`` takes; on a GPU, queued work is waited for before and after."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# operators after which the host waits for the device: a value read back (item, bool, float, int) or an output
# whose shape depends on the data (nonzero, boolean-mask selection, unique)
HOST_SYNCS = frozenset({"aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.masked_select",
                        "aten.unique_dim", "aten._unique2", "aten.unique_consecutive"})


@dataclass
class DispatchCount:
    """What one call dispatched: ``ops`` aten operators (on a GPU each is a kernel launch, or a view), ``syncs`` of
    them host syncs (plus ``Tensor.tolist`` reads, which do not dispatch), and the count per operator."""

    ops: int
    syncs: int
    by_op: dict[str, int]


class _DispatchCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by_op: collections.Counter[str] = collections.Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.by_op[name] += 1
        if name in HOST_SYNCS or (name == "aten.index" and any(
                isinstance(i, Tensor) and i.dtype == torch.bool for i in args[1])):  # a boolean mask's nonzero
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def count_dispatch(fn: Callable[[], Any]) -> DispatchCount:
    """The aten operators and host syncs of one call of ``fn`` (run once before, so that lazily built state is not
    counted): the CPU proxy of its cost on a GPU, where the module's cost is launches and syncs, not FLOPs."""
    fn()
    counter = _DispatchCounter()
    tolist = Tensor.tolist

    def counted_tolist(self: Tensor) -> Any:
        counter.syncs += 1
        return tolist(self)

    Tensor.tolist = counted_tolist
    try:
        with counter:
            fn()
    finally:
        Tensor.tolist = tolist
    return DispatchCount(sum(counter.by_op.values()), counter.syncs, dict(counter.by_op))


def relevance_module_call(model: ARRCOC, images: Tensor) -> Callable[[], Any]:
    """A call that runs only ``model``'s relevance module (scoring, field relaxation, allocation) on ``images``,
    embedded once beforehand: the module's own cost, without the token embedding the backbone computes anyway."""
    grid = model.adapter.grid(images)
    with torch.no_grad():
        patches = model.adapter.tokens(images).patches
    return lambda: model.relevance(images, patches, (grid.height, grid.width), None)


def autocast(device: torch.device | str, dtype: str) -> AbstractContextManager:
    """Mixed precision as timed runs use it: ``float32`` runs as is; ``bfloat16`` / ``float16`` autocast."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return nullcontext() if dtype == "float32" else torch.autocast(torch.device(device).type, dtype=DTYPES[dtype])


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_cpu_bytes(fn: Callable[[], Any]) -> int:
    """The most bytes CPU tensors allocated while ``fn()`` runs held at once. CPU PyTorch keeps no allocator
    statistics, so the profiler's allocation and free events are replayed in time order: exact and
    deterministic, unlike the process's resident memory, which follows the C library's heap (docs/decisions.md).

    The autograd profiler without Kineto records the same allocator events as ``torch.profiler``; Kineto would
    also ask CUDA for its devices and, on a machine without one, log the failure as an ERROR."""
    config = ProfilerConfig(ProfilerState.CPU, report_input_shapes=False, profile_memory=True, with_stack=False,
                            with_flops=False, with_modules=False, experimental_config=_ExperimentalConfig())
    _enable_profiler_legacy(config)
    try:
        fn()
    finally:
        threads = _disable_profiler_legacy()  # the events, one list per thread
    reference = threads[0][0]  # times are read as ns after one event (integers, where absolute ones lose the ns)
    changes = [(round(1000 * reference.cpu_elapsed_us(event)), event.cpu_memory_usage())  # frees are negative
               for events in threads for event in events if event.kind() == "memory_alloc"]
    held = peak = 0
    for _, size in sorted(changes):
        held += size
        peak = max(peak, held)
    return peak


def peak_tensor_memory(fn: Callable[[], Any]) -> float:
    """MB: :func:`peak_cpu_bytes` of ``fn()`` (what CUDA's ``max_memory_allocated`` gives on a GPU)."""
    return peak_cpu_bytes(fn) / 2**20
