"""The parameter all-gather of ZeRO-1: after a step each rank sends its updated shard of every bucket
and receives the others', in place in the DDP's param buffer.

Without overlap, ``start()`` gathers every bucket and returns once all are complete. With overlap,
``start()`` launches the first ``prefetch_depth`` buckets in *forward order* and returns; a forward
pre-hook on each module that owns parameters waits for the bucket(s) holding them, launching the next
bucket in forward order whenever one is waited for; a forward post-hook on the root module waits for
anything left (a bucket no forward touched), so a forward always ends with complete weights.

Forward order is the reverse of the DDP's bucket index (buckets are numbered by expected gradient
readiness, i.e. reverse registration order, and a Llama runs forward in registration order). The
*launch* sequence is a pure function of that order and of which module runs when, so it is the same
on every rank; a module that needs a bucket not launched yet launches every bucket before it in
forward order first, which keeps the sequence identical even when a model runs out of order.

Invariant: between ``start()`` and the end of the next forward (or ``finish()``), weights outside
this rank's shards may be stale; nothing reads them then except the forward, which waits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ParamGather:
    def __init__(self, ddp, overlap: bool, prefetch_depth: int):
        if prefetch_depth < 1:
            raise ValueError(f"prefetch_depth must be >= 1, got {prefetch_depth}")
        self.group = ddp.process_group
        self.rank, self.world = ddp.dp_rank, ddp.dp_size
        self.order = sorted(ddp.buckets, key=lambda b: -b.index)  # forward order
        self.overlap = overlap
        self.depth = prefetch_depth
        self._work: dict[int, dist.Work] = {}  # position in self.order -> in-flight all-gather
        self._launched = len(self.order)  # positions [0, _launched) launched this round (none pending)
        self._done: set[int] = set(range(len(self.order)))
        self.bytes_sent = 0  # payload handed to all-gathers since construction (this rank's shards)
        self._handles = []
        if overlap:
            position = {id(b): i for i, b in enumerate(self.order)}
            bucket_of = {p: b for b in ddp.buckets for p in b.params}
            for module in ddp.module.modules():
                own = [p for p in module.parameters(recurse=False) if p in bucket_of]
                mine = {position[id(bucket_of[p])] for p in own}
                if mine:
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook(sorted(mine))))
            self._handles.append(ddp.module.register_forward_hook(lambda *_: self.finish()))

    def _shard(self, bucket) -> torch.Tensor:
        lo, hi = bucket.shard_range(self.rank, self.world)
        return bucket.param_data[lo - bucket.start : hi - bucket.start]

    def _launch_next(self) -> None:
        i = self._launched
        bucket = self.order[i]
        shard = self._shard(bucket)
        self.bytes_sent += shard.numel() * shard.element_size()
        # in place: the input is this rank's slice of the output, as Megatron's all-gather
        self._work[i] = dist.all_gather_single(bucket.param_data, shard, group=self.group, async_op=True)
        self._launched += 1

    def _wait(self, i: int) -> None:
        while self._launched <= i:
            self._launch_next()
        work = self._work.pop(i, None)
        if work is not None:
            work.wait()
            self._done.add(i)
        # keep `depth` gathers in flight ahead of the forward
        while self._launched < len(self.order) and self._launched < i + 1 + self.depth:
            self._launch_next()

    def _pre_hook(self, positions: list[int]):
        def hook(module: nn.Module, args) -> None:
            for i in positions:
                if i not in self._done:
                    self._wait(i)

        return hook

    def start(self) -> None:
        """Launch this step's gathers (all of them and wait, without overlap)."""
        self.finish()  # a previous round must be complete before its buffers are sent again
        self._launched, self._done = 0, set()
        if not self.overlap:
            self.finish()
            return
        while self._launched < min(self.depth, len(self.order)):
            self._launch_next()

    def finish(self) -> None:
        """Launch whatever is left, in order, and wait for everything."""
        for i in range(len(self.order)):
            if i not in self._done:
                self._wait(i)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
