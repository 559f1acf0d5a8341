"""Which slice of which parameter each data-parallel rank owns under ZeRO-1: a pure function of the
DDP's buffers, so every rank computes every rank's map alike (no collective).

Rank r of W owns shard r of every bucket: ``bucket.shard_range(r, W)``, the r-th 1/W slice of the
bucket's padded range (equal-sized and aligned: the buffer pads each bucket to a multiple of
``lcm(W, alignment)``). A parameter may straddle shards, so a rank owns the intersection of the
parameter's buffer range with its shard; padding is never a parameter and is owned by nobody.

Invariants (tests/parallel/test_distributed_optimizer.py):
- over all ranks the owned slices of a parameter are disjoint and cover ``[0, numel)`` exactly;
- on each rank the slices are listed in buffer order (bucket by bucket, front to back), which is
  also the order of the inner optimizer's tensors and of the checkpoint's chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OwnedSlice:
    """Elements ``[start, end)`` of ``param.view(-1)``, owned by this rank."""

    param: nn.Parameter
    buffer_index: int
    """Which of the DDP's ``param_and_grad_buffers`` holds the parameter."""
    bucket_index: int
    """The bucket's global index (the DDP's collective order)."""
    start: int
    end: int
    buffer_start: int
    """Where element ``start`` sits in the buffer: ``buffer.param_data[buffer_start:][: end - start]``."""

    @property
    def numel(self) -> int:
        return self.end - self.start


def owned_slices(buffers, rank: int, world_size: int) -> list[OwnedSlice]:
    """Every slice rank ``rank`` of ``world_size`` owns, over all ``buffers`` (``ParamAndGradBuffer``)."""
    out: list[OwnedSlice] = []
    for bi, buf in enumerate(buffers):
        for bucket in buf.buckets:
            lo, hi = bucket.shard_range(rank, world_size)
            for p in sorted(bucket.params, key=lambda q: buf.param_index_map[q][0]):
                plo, phi, _ = buf.param_index_map[p]
                s, e = max(plo, lo), min(phi, hi)
                if s < e:
                    out.append(OwnedSlice(p, bi, bucket.index, s - plo, e - plo, s))
    return out


def param_view(t: torch.Tensor, s: OwnedSlice) -> torch.Tensor:
    """The owned slice of ``t`` (a parameter-shaped tensor: the weight, its main_grad...), flat."""
    return t.detach().view(-1)[s.start : s.end]
