"""Contiguous parameter and gradient buffers, cut into buckets (design page: ``docs/ddp.md``).

One :class:`ParamAndGradBuffer` holds every parameter of one (param dtype, grad dtype) group:

    param_data: (numel,) param dtype   each param.data      is a view into it
    grad_data:  (numel,) grad dtype    each param.main_grad is a view into it (same offsets)

Layout invariants (tested in tests/parallel/test_buffers.py):
  * parameters are placed in REVERSE registration order, so the buffer fills front to back
    during backward and bucket 0 is the first bucket to become ready;
  * a parameter never straddles two buckets;
  * every bucket starts where the previous one ends and its length (padding included) is a
    multiple of ``lcm(data-parallel size, alignment)``, so shard r of bucket b, the r-th 1/W
    slice ``[start + r*L/W, start + (r+1)*L/W)``, is equal-sized and aligned on every rank;
  * padding elements are never a view of any parameter and stay zero in both buffers, except the
    ``tail_reserve`` elements right after the last bucket's last parameter, which the DDP may use to
    carry its used-parameter flags inside that bucket's all-reduce (zero again after each sync);
  * the buffer's first bucket is closed at ``first_bucket_size`` elements, later ones at
    ``bucket_size`` (a parameter is never split, so a bucket whose first parameter alone exceeds the
    cap, e.g. an untied ``lm_head``, is exactly that parameter).

Bucket ``index`` is the bucket's place in the DDP's global collective order; the buffer numbers its
buckets ``first_bucket_index, first_bucket_index + 1, ...`` and a DDP with several buffers re-numbers
them by expected gradient readiness (``DistributedDataParallel`` docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class _Bucket:
    """A contiguous range ``[start, end)`` of one buffer (``end - start`` includes padding)."""

    index: int  # global id across all buffers of a DDP; collectives are issued in this order
    start: int
    end: int
    params: list[torch.nn.Parameter]  # in buffer order (reverse registration order)
    offsets: list[int]  # offset of params[i] relative to ``start``
    param_data: torch.Tensor  # (end - start,) view into buffer.param_data
    grad_data: torch.Tensor  # (end - start,) view into buffer.grad_data
    numel_unpadded: int = 0
    # Per-iteration state, reset by ParamAndGradBuffer.reset(): which params' grads arrived.
    params_ready: set = field(default_factory=set)

    def shard_range(self, rank: int, world_size: int) -> tuple[int, int]:
        """Buffer-absolute ``[lo, hi)`` of shard ``rank`` of this bucket (the r-th 1/W slice)."""
        shard = (self.end - self.start) // world_size
        return self.start + rank * shard, self.start + (rank + 1) * shard


def _pad(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple)) * multiple


class ParamAndGradBuffer:
    """Param and grad storage of one dtype group plus its buckets (see module docstring)."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        param_dtype: torch.dtype,
        grad_dtype: torch.dtype,
        data_parallel_size: int,
        bucket_size: int | None,
        first_bucket_size: int | None,
        alignment: int,
        first_bucket_index: int,
        tail_reserve: int = 0,
    ):
        """``params`` in registration order; buckets get global ids from ``first_bucket_index`` on;
        the last bucket gets ``tail_reserve`` spare elements after its parameters (its padding)."""
        if not params:
            raise ValueError("ParamAndGradBuffer needs at least one parameter")
        self.param_dtype = param_dtype
        self.grad_dtype = grad_dtype
        self.pad_multiple = math.lcm(data_parallel_size, alignment)
        device = params[0].device

        # 1) Plan the layout: walk params in reverse, close a bucket once it reaches its cap.
        #    ``plan`` holds (bucket params, offsets relative to the bucket, padded length).
        plan: list[tuple[list, list[int], int, int]] = []
        cur: list[torch.nn.Parameter] = []
        cur_offsets: list[int] = []
        cur_numel = 0

        def cap() -> float:
            size = first_bucket_size if (not plan and first_bucket_size is not None) else bucket_size
            return math.inf if size is None else size

        def close() -> None:
            nonlocal cur, cur_offsets, cur_numel
            plan.append((cur, cur_offsets, cur_numel, _pad(cur_numel, self.pad_multiple)))
            cur, cur_offsets, cur_numel = [], [], 0

        for p in reversed(params):
            cur.append(p)
            cur_offsets.append(cur_numel)
            cur_numel += p.numel()
            if cur_numel >= cap():
                close()
        if cur:
            close()
        if tail_reserve:
            last, last_offsets, last_numel, _ = plan[-1]
            plan[-1] = (last, last_offsets, last_numel, _pad(last_numel + tail_reserve, self.pad_multiple))

        self.numel = sum(padded for *_, padded in plan)
        # Zero-initialised so padding is zero from the start and never changes (no param views it).
        self.param_data = torch.zeros(self.numel, dtype=param_dtype, device=device)
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)

        # 2) Materialise: copy each param into its slot and make .data / .main_grad views.
        self.buckets: list[_Bucket] = []
        # param -> (start, end, bucket index within this buffer); buffer-absolute element offsets.
        self.param_index_map: dict[torch.nn.Parameter, tuple[int, int, int]] = {}
        start = 0
        for i, (bparams, offsets, numel, padded) in enumerate(plan):
            bucket = _Bucket(
                index=first_bucket_index + i,
                start=start,
                end=start + padded,
                params=bparams,
                offsets=offsets,
                param_data=self.param_data[start : start + padded],
                grad_data=self.grad_data[start : start + padded],
                numel_unpadded=numel,
            )
            for p, off in zip(bparams, offsets, strict=True):
                lo, hi = start + off, start + off + p.numel()
                view = self.param_data[lo:hi].view(p.shape)
                view.copy_(p.data)
                p.data = view
                p.main_grad = self.grad_data[lo:hi].view(p.shape)
                self.param_index_map[p] = (lo, hi, i)
            self.buckets.append(bucket)
            start += padded

    def reset(self) -> None:
        """Forget which grads arrived (the grads themselves are overwritten by the next backward)."""
        for b in self.buckets:
            b.params_ready.clear()
