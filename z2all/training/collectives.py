"""The few small collectives the trainer and the checkpoint manager agree with: no-ops on one process.

Every function here is collective when a process group exists: all ranks call it, in the same order
(the ordering invariant of parallel/distributed_data_parallel.py holds for these too). ``group``: the
default group when None; an asynchronous checkpoint's background thread passes its own gloo group
(z2all.training.checkpoint_async), so its collectives never interleave with the training loop's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist_on() else (0, 1)


def who(rank: int, world: int) -> str:
    """``"rank R: "`` to start a message with, when there are several ranks."""
    return f"rank {rank}: " if world > 1 else ""


def _int_tensor(value: int, group: Any = None) -> torch.Tensor:
    # NCCL only moves CUDA tensors; gloo (and no process group) uses CPU.
    on_cuda = dist_on() and dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    return torch.tensor([value], dtype=torch.int64, device=device)


def broadcast_int(value: int, group: Any = None) -> int:
    """Rank 0's ``value`` on every rank."""
    if not dist_on():
        return value
    t = _int_tensor(value, group)
    dist.broadcast(t, src=0, group=group)
    return int(t.item())


def all_reduce_max(value: int, group: Any = None) -> int:
    """The largest ``value`` of all ranks, on every rank."""
    if not dist_on():
        return value
    t = _int_tensor(value, group)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place; returns it."""
    if dist_on() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (small, JSON-like values this process built; never bytes read from disk)."""
    if not dist_on():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, group: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (small, JSON-like values this process built)."""
    if not dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def barrier(group: Any = None) -> None:
    if dist_on():
        dist.barrier(group=group)
