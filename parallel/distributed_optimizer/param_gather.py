"""The parameter all-gather of ZeRO-1: after a step each rank sends its updated shard of every bucket
and receives the others', in place in the DDP's param buffer.

Without overlap, ``start()`` gathers every bucket and returns once all are complete. With overlap,
``start()`` launches the first ``prefetch_depth`` buckets in *forward order* and returns; during the
next forward a ``TorchFunctionMode`` watches every torch call, and the first call that touches a
parameter of a bucket still in flight waits for that bucket (launching the buckets before it in
forward order first, and then the next ones up to ``prefetch_depth`` ahead). A forward hook on the
root module (``always_call``: also when the forward raises) leaves the mode and waits for anything
left, so a forward always ends with complete weights.

Why a mode and not module hooks: a model may read a weight without calling the module that owns it
(Z2allForCausalLM hands ``lm_head.weight`` to the fused loss kernel and the MLP's three weights to the
SwiGLU kernel); every read of a tensor goes through a torch function, so the mode sees them all.

Forward order is the reverse of the DDP's bucket index (buckets are numbered by expected gradient
readiness, i.e. reverse registration order). The launch sequence is a pure function of that order and
of which parameters the forward touches when, so it is the same on every rank as long as every rank
runs the same forward; a rank that may run none (evaluation with fewer batches than ranks) must call
``finish()`` first, as the trainer does before every evaluation, checkpoint and the end of a run.

Invariant: between ``start()`` and the end of the next forward (or ``finish()``), weights outside this
rank's shards may be stale; nothing may read them then except that forward, which waits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode


class _WaitOnUse(TorchFunctionMode):
    """Before any torch call reads a parameter of a bucket in flight: wait for that bucket."""

    def __init__(self, gather: ParamGather):
        super().__init__()
        self.gather = gather

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        g = self.gather
        if g.pending():
            for a in (*args, *kwargs.values()):
                for t in a if isinstance(a, (list, tuple)) else (a,):
                    i = g.position_of.get(id(t))
                    if i is not None and i not in g.done:
                        g.wait(i)
        return func(*args, **kwargs)


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
        self.done: set[int] = set(range(len(self.order)))
        # id(parameter) -> its bucket's position in forward order (ids: parameters live as long as ddp)
        self.position_of = {id(p): i for i, b in enumerate(self.order) for p in b.params}
        self._handles = []
        self._mode: _WaitOnUse | None = None
        if overlap:
            root: nn.Module = ddp.module
            self._handles.append(root.register_forward_pre_hook(self._enter))
            self._handles.append(root.register_forward_hook(self._leave, always_call=True))

    # ---- the forward ---------------------------------------------------------------------------------
    def pending(self) -> bool:
        return len(self.done) < len(self.order)

    def _enter(self, module, args) -> None:
        if self.pending() and self._mode is None:
            self._mode = _WaitOnUse(self)
            self._mode.__enter__()

    def _leave(self, module, args, output) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        self.finish()

    # ---- launching and waiting -----------------------------------------------------------------------
    def _shard(self, bucket) -> torch.Tensor:
        lo, hi = bucket.shard_range(self.rank, self.world)
        return bucket.param_data[lo - bucket.start : hi - bucket.start]

    def _launch_next(self) -> None:
        i = self._launched
        bucket = self.order[i]
        shard = self._shard(bucket)
        # in place: the input is this rank's slice of the output, as Megatron's all-gather
        self._work[i] = dist.all_gather_single(bucket.param_data, shard, group=self.group, async_op=True)
        self._launched += 1

    def wait(self, i: int) -> None:
        """Bucket ``i`` (forward order) complete; keep ``prefetch_depth`` more in flight."""
        while self._launched <= i:
            self._launch_next()
        work = self._work.pop(i, None)
        if work is not None:
            work.wait()
        self.done.add(i)
        while self._launched < len(self.order) and self._launched < i + 1 + self.depth:
            self._launch_next()

    def start(self) -> None:
        """Launch this step's gathers (all of them and wait, without overlap)."""
        self.finish()  # a previous round must be complete before its buffers are sent again
        self._launched, self.done = 0, set()
        if not self.overlap:
            self.finish()
            return
        while self._launched < min(self.depth, len(self.order)):
            self._launch_next()

    def finish(self) -> None:
        """Launch whatever is left, in order, and wait for everything."""
        for i in range(len(self.order)):
            if i not in self.done:
                self.wait(i)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
