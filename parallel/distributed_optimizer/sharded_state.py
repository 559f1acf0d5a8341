"""ZeRO-1's checkpoint layout: every tensor under its parameter's name and in its parameter's shape, each
rank writing only the elements it owns. Design page: docs/distributed_optimizer.md, "Checkpoints".

A rank owns a flat range ``[start, end)`` of ``param.view(-1)`` (shard_map.py), which in a row-major
tensor is a union of at most ``2 * ndim - 1`` rectangles: a partial block, full blocks, a partial
block, recursively. Each rectangle is one chunk of a ``torch.distributed.checkpoint`` sharded tensor
(``ShardedTensor`` with explicit ``ShardMetadata``; its local shards are *views* of this rank's flat
fp32 tensors, so a save reads them and a load fills them in place, with no copy and no gather).

Hence the files are those of an unsharded run: ``model.<name>`` of the parameter's shape in fp32 and
``optim.state.<name>.exp_avg`` / ``exp_avg_sq`` / ``step``, ``optim.param_groups`` as
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` writes them. They do not depend
on the data-parallel size, the bucket size or the overlap settings: DCP reads, for each chunk a
loading rank asks for, whatever saved chunks overlap it. So a ZeRO-1 checkpoint loads on any number
of ranks, into an unsharded run, and an unsharded run's checkpoint loads into ZeRO-1.

Every rank builds every sharded tensor (its global metadata lists all ranks' chunks, a pure function
of the layout), including those it holds no chunk of.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties


def rectangles(start: int, end: int, shape: tuple[int, ...]) -> list[tuple[list[int], list[int], int, int]]:
    """``[(offsets, sizes, lo, hi)]``: the flat range ``[start, end)`` of a row-major ``shape`` as
    rectangles, each covering the flat elements ``[lo, hi)``, in order."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [([start], [end - start], start, end)]
    inner = math.prod(shape[1:])
    out = []
    first, last = start // inner, (end - 1) // inner  # blocks (indices along dim 0) touched
    s = start
    if s % inner or (first == last and end - s < inner):  # a partial leading block
        stop = min(end, (first + 1) * inner)
        for off, size, lo, hi in rectangles(s - first * inner, stop - first * inner, shape[1:]):
            out.append(([first, *off], [1, *size], lo + first * inner, hi + first * inner))
        s = stop
    full = (end - s) // inner
    if full:
        b = s // inner
        out.append(([b] + [0] * (len(shape) - 1), [full, *shape[1:]], s, s + full * inner))
        s += full * inner
    if s < end:  # a partial trailing block
        b = s // inner
        for off, size, lo, hi in rectangles(0, end - b * inner, shape[1:]):
            out.append(([b, *off], [1, *size], lo + b * inner, hi + b * inner))
    return out


def sharded_tensor(
    local: torch.Tensor | None,
    local_range: tuple[int, int] | None,
    shape: tuple[int, ...],
    ranges: list[tuple[int, int, int]],
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
) -> ShardedTensor:
    """The sharded tensor of global ``shape`` whose chunks are the ranks' ``ranges`` (``(rank, start,
    end)`` flat ranges); this rank's chunks are views of ``local`` (its flat elements
    ``local_range``), or it holds none."""
    metas, shards = [], []
    for r, s, e in ranges:
        for off, size, lo, hi in rectangles(s, e, shape):
            md = ShardMetadata(shard_offsets=off, shard_sizes=size, placement=f"rank:{r}/{device}")
            metas.append(md)
            if r == rank:
                assert local is not None and local_range is not None
                base = local_range[0]
                shards.append(Shard(local[lo - base : hi - base].view(size), md))
    meta = ShardedTensorMetadata(
        shards_metadata=metas, size=torch.Size(shape), tensor_properties=TensorProperties(dtype=dtype)
    )
    with warnings.catch_warnings():  # torch deprecates ShardedTensor for DTensor, which cannot express
        warnings.simplefilter("ignore", FutureWarning)  # uneven flat ranges; DCP reads both
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta)
