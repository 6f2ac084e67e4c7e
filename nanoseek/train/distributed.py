"""Rank / world-size plumbing, isolated so that FSDP2 / multi-process training can land here later.

Today nanoseek trains in one process on one device: rank 0 of a world of 1. The training loop only
calls the helpers below (``is_main()`` before writing files, ``all_reduce_mean`` on logged scalars,
``barrier()`` around checkpoints), so adding ``torch.distributed`` means filling these in, not
rewriting the loop.
"""

from __future__ import annotations

import torch


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def world_size() -> int:
    """Number of training processes (1 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def is_main() -> bool:
    """Whether this process writes checkpoints, metrics and logs."""
    return rank() == 0


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (``x`` itself in a single process; no copy, no sync)."""
    if world_size() == 1:
        return x
    y = x.detach().clone()
    torch.distributed.all_reduce(y, op=torch.distributed.ReduceOp.SUM)
    return y / world_size()


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world_size() > 1:
        torch.distributed.barrier()
