"""One batch spread over several processes (``torchrun`` + ``DistributedSampler``).

Each process runs the rules on its shard of the batch; :func:`all_reduce_grads` then averages the filled
``.grad`` over the processes, weighting each by its shard size. That equals one process's update on the
whole batch because every rule's update is a mean over samples of per-sample terms. Some per-sample terms
depend on the rest of the batch: batch-norm statistics, in-batch negatives, a batch-mean baseline, a
running threshold, a relaxation that stops (or restarts its momentum) when the whole batch says so. Those
computations call the helpers below, which combine the shards inside :func:`sharded_batch` and are the
identity outside it (or with one process), so single-process results are unchanged bit for bit.

The all-reduce of ``.grad`` is the only communication for the update itself; the helpers only exchange
what a batch-coupled computation reads (statistics, negatives, stopping decisions).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "ShardedBatchNorm1d",
    "all_reduce_grads",
    "all_shards_true",
    "batch_mean",
    "gather_shards",
    "is_sharded",
    "max_over_shards",
    "shard_rows",
    "sharded_batch",
    "sum_over_shards",
]

# The process group whose shards form the batch being processed, or None (the batch is local).
_GROUP: ContextVar[dist.ProcessGroup | None] = ContextVar("arrcoc_batch_group", default=None)


@contextmanager
def sharded_batch(group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Inside, the batch each process handles is its shard of one batch spread over ``group`` (default:
    every process). Without an initialised ``torch.distributed``, or with one process, it changes nothing."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        yield
        return
    token = _GROUP.set(group if group is not None else dist.group.WORLD)
    try:
        yield
    finally:
        _GROUP.reset(token)


def is_sharded() -> bool:
    return _GROUP.get() is not None


def _all_reduce(t: Tensor, op: dist.ReduceOp) -> Tensor:
    out = t.clone()
    dist.all_reduce(out, op=op, group=_GROUP.get())
    return out


def sum_over_shards(t: Tensor) -> Tensor:
    """Element-wise sum over the shards (``t`` itself when the batch is local)."""
    return _all_reduce(t, dist.ReduceOp.SUM) if is_sharded() else t


def max_over_shards(t: Tensor) -> Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX) if is_sharded() else t


def _device() -> torch.device:
    """Where the group's collectives run (NCCL: this process's GPU)."""
    if dist.get_backend(_GROUP.get()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_shards_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every shard: a decision all processes then take together (never one
    process raising while the others wait in a collective)."""
    if not is_sharded():
        return flag
    return bool(_all_reduce(torch.tensor(float(flag), device=_device()), dist.ReduceOp.MIN).item())


def batch_mean(t: Tensor, dim: int = 0) -> Tensor:
    """Mean over ``dim`` (the samples) of the whole batch."""
    if not is_sharded():
        return t.mean(dim)
    total = sum_over_shards(t.sum(dim, dtype=torch.float64))
    count = sum_over_shards(torch.tensor(float(t.shape[dim]), dtype=torch.float64, device=t.device))
    return (total / count).to(t.dtype)


def _shard_sizes(n: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(dist.get_world_size(_GROUP.get()))]
    dist.all_gather(sizes, torch.tensor(n, dtype=torch.int64, device=device), group=_GROUP.get())
    return [int(s) for s in sizes]


def gather_shards(t: Tensor) -> tuple[Tensor, slice]:
    """The whole batch (shards concatenated along dim 0 in rank order) and the rows that are this shard's."""
    if not is_sharded():
        return t, slice(0, t.shape[0])
    sizes = _shard_sizes(t.shape[0], t.device)
    padded = t.new_zeros(max(sizes), *t.shape[1:])  # all_gather needs equal shapes
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=_GROUP.get())
    rank = dist.get_rank(_GROUP.get())
    start = sum(sizes[:rank])
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), slice(start, start + sizes[rank])


def shard_rows(n: int) -> tuple[int, slice]:
    """(whole-batch size, this shard's rows) for a shard of ``n`` samples: e.g. to draw noise for the whole
    batch and keep this shard's part, so that every sample gets the noise it gets in one process."""
    if not is_sharded():
        return n, slice(0, n)
    sizes = _shard_sizes(n, _device())
    start = sum(sizes[: dist.get_rank(_GROUP.get())])
    return sum(sizes), slice(start, start + n)


def all_reduce_grads(parameters: Iterable[nn.Parameter], shard_size: int) -> None:
    """Replace each ``.grad`` by its shard-size-weighted mean over the processes (one all-reduce).

    A parameter without ``.grad`` on a process counts as zero there; one without ``.grad`` anywhere keeps
    none (the optimizer then skips it, as in one process). Outside :func:`sharded_batch`: nothing to do.
    """
    if not is_sharded():
        return
    params = list(parameters)
    if not params:
        return
    device = params[0].device
    # float64, so that weighting and summing add no rounding of their own to the rules' updates
    pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() * shard_size for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64, device=device)
    flat = torch.cat([*pieces, present, torch.tensor([float(shard_size)], dtype=torch.float64, device=device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=_GROUP.get())
    total = flat[-1]
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if flat[-1 - len(params) + i] > 0:
            p.grad = (flat[offset : offset + n] / total).view_as(p).to(p.dtype)
        else:
            p.grad = None
        offset += n


class ShardedBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training-mode statistics are those of the whole sharded batch.

    Outside :func:`sharded_batch` it *is* ``nn.BatchNorm1d`` (same computation, same state dict); inside,
    mean and variance come from sums over every shard (two-pass, in float64), as ``nn.SyncBatchNorm`` does
    on GPUs, but on any device.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_sharded()):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.double()
        count = sum_over_shards(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
        mean = sum_over_shards(x.sum(0)) / count
        var = sum_over_shards((x - mean).pow(2).sum(0)) / count
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        out = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.double() + self.bias.double()
        return out.to(input.dtype)
