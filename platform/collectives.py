"""Small collectives over the training world that degrade to no-ops in one process.

Shared by training and the checkpoint format (which gathers every rank's share of the state).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _multi() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def broadcast(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (picklable objects)."""
    if not _multi():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not _multi():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank."""
    if not _multi():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if _multi():
        dist.barrier()


def mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks."""
    if _multi():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks."""
    if _multi():
        dist.all_reduce(t)
    return t
