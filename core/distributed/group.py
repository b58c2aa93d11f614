"""The tensor-parallel group of a model: which rank this process is, how many there are, and
the two collectives the sharded layers need. The model runner makes its group current while
the model is built; each layer keeps the group it was built in."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

# all_gather_into_tensor was renamed all_gather_single in recent torch
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    device_group: object = None        # a torch.distributed ProcessGroup on the model's device

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place. No host synchronization: graph-capturable on
        backends that support capture (NCCL)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank, in place."""
        if self.size > 1:
            dist.broadcast(x, src=dist.get_global_rank(self.device_group, 0),
                           group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, ..., m] of each rank -> [n, ..., size * m], rank 0's columns first."""
        if self.size == 1:
            return x
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_into(out, x.contiguous(), group=self.device_group)
        stacked = out.view(self.size, *x.shape)
        return stacked.movedim(0, -2).reshape(*x.shape[:-1], self.size * x.shape[-1])


SINGLE = TensorParallelGroup()
_current = SINGLE


def current_group() -> TensorParallelGroup:
    """The group layers built now belong to (one rank, outside ``building``)."""
    return _current


@contextmanager
def building(group: TensorParallelGroup) -> Iterator[None]:
    """Make ``group`` current while a model is built."""
    global _current
    saved, _current = _current, group
    try:
        yield
    finally:
        _current = saved
