"""Count the bytes a rank puts on the wire for torch.distributed collectives, as a ring sends them.

``with WireCounter(kind) as c: ...`` records every collective of :data:`RING` called inside (on this
rank) as ``(op, numel, element size, world size, kind(op, tensor))`` and then runs it; :func:`wire_bytes`
charges each, for d ranks and N elements of b bytes of the FULL tensor:

    all_reduce                                      2 (d-1)/d * N * b   (reduce-scatter + all-gather)
    reduce_scatter_single / reduce_scatter_tensor     (d-1)/d * N * b   (N = the input, all d shards)
    all_gather_single / all_gather_into_tensor        (d-1)/d * N * b   (N = the output, all d shards)
    broadcast                                         (d-1)/d * N * b   (a pipelined ring from the root:
                                                      d-1 of d ranks forward the message; the mean,
                                                      charged to every rank)

This is the wire model of docs/distributed_optimizer.md, not ``comm_bytes`` (the payload handed to the
gradient collectives). The functions are patched in ``torch.distributed`` and ``distributed_c10d``
(whose functions call each other); a nested call is counted once. C++ callers (torch DDP's reducer,
DTensor's functional collectives) are not seen.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterable
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# collective -> (argument holding the FULL tensor, ring factor over (d-1)/d)
RING = {
    "all_reduce": ("tensor", 2),
    "reduce_scatter_single": ("input", 1),
    "reduce_scatter_tensor": ("input", 1),
    "all_gather_single": ("output_tensor", 1),
    "all_gather_into_tensor": ("output_tensor", 1),
    "broadcast": ("tensor", 1),
}
Call = tuple[str, int, int, int, str]
"""(op, numel of the full tensor, element size, world size, kind)."""


class WireCounter:
    def __init__(self, kind: Callable[[str, torch.Tensor], str] = lambda op, t: "other"):
        self.kind = kind
        self.calls: list[Call] = []
        self._local = threading.local()
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, name: str, orig):
        arg = RING[name][0]
        sig = inspect.signature(orig)

        def counted(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                bound = sig.bind(*args, **kwargs)
                t = bound.arguments[arg]
                world = dist.get_world_size(bound.arguments.get("group"))
                self.calls.append((name, t.numel(), t.element_size(), world, self.kind(name, t)))
            self._local.depth = depth + 1
            try:
                return orig(*args, **kwargs)
            finally:
                self._local.depth = depth

        return counted

    def __enter__(self) -> WireCounter:
        for name in RING:
            counted = self._wrap(name, getattr(c10d, name))
            for mod in (dist, c10d):
                self._saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for mod, name, orig in reversed(self._saved):
            setattr(mod, name, orig)
        self._saved.clear()


def wire_bytes(calls: Iterable[Call], kinds=None, ops=None) -> Fraction:
    """Bytes this rank sends for ``calls`` (the ring model above), exactly; ``kinds`` / ``ops``: only
    those."""
    total = Fraction(0)
    for op, numel, size, world, kind in calls:
        if (kinds is None or kind in kinds) and (ops is None or op in ops):
            total += RING[op][1] * Fraction(world - 1, world) * numel * size
    return total
