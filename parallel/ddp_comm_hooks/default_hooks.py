"""The default per-bucket collectives: all-reduce (plain DDP) and reduce-scatter (ZeRO-1).

Both follow the hook API of :mod:`parallel.ddp_comm_hooks.bucket`: ``hook(state, bucket)`` returns a
Future whose value is ``bucket.buffer()`` itself, reduced in place, so the DDP never has to copy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DefaultHookState:
    """State of the default hooks."""

    process_group: dist.ProcessGroup | None = None
    """Data-parallel group; None means the default (world) group."""

    average_in_collective: bool = False
    """Use ReduceOp.AVG where the backend has it (NCCL); otherwise pre-divide by the world size."""


def _resolve(state) -> tuple[dist.ProcessGroup, bool]:
    """Accept a DefaultHookState, a bare ProcessGroup (as torch's hooks do) or None."""
    if isinstance(state, DefaultHookState):
        group, avg = state.process_group, state.average_in_collective
    else:
        group, avg = state, False
    group = group if group is not None else dist.group.WORLD
    return group, avg


def _supports_avg(group: dist.ProcessGroup) -> bool:
    # Only NCCL implements ReduceOp.AVG; gloo raises on it, so we pre-divide there instead.
    return dist.get_backend(group) == "nccl"


def _prepare_average(tensor: torch.Tensor, group: dist.ProcessGroup, avg: bool) -> dist.ReduceOp:
    """Either pre-divide ``tensor`` in place (returns SUM) or return AVG; the sum stays an average."""
    if avg and _supports_avg(group):
        return dist.ReduceOp.AVG
    tensor.div_(group.size())
    return dist.ReduceOp.SUM


def allreduce_hook(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce ``bucket.buffer()`` in place to the average over the group."""
    return _allreduce_future(state, bucket).then(lambda fut: fut.value()[0])


def _allreduce_future(state, bucket) -> torch.futures.Future[list[torch.Tensor]]:
    """The collective's own Future (value ``[bucket.buffer()]``), with no Python callback chained.

    The DDP uses this when no hook is registered: a ``.then`` callback runs on gloo's worker thread
    and must take the GIL before that thread can start the next bucket's collective.
    """
    group, avg = _resolve(state)
    buf = bucket.buffer()  # (numel_padded,)
    op = _prepare_average(buf, group, avg)
    bucket.record_comm_bytes(buf.numel() * buf.element_size())
    return dist.all_reduce(buf, op=op, group=group, async_op=True).get_future()


def reduce_scatter_hook(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """Reduce-scatter ``bucket.buffer()``: afterwards only shard r (the r-th 1/W slice) on rank r holds
    the average; the other slices still hold this rank's local (pre-divided) gradient, i.e. garbage.

    The returned Future's value is the whole buffer (same storage), so the DDP does not copy it.
    """
    group, avg = _resolve(state)
    buf = bucket.buffer()  # (numel_padded,), numel_padded % W == 0 by the buffer's padding invariant
    world = group.size()
    if buf.numel() % world != 0:
        raise RuntimeError(
            f"bucket {bucket.index()} has {buf.numel()} elements, not a multiple of the group size {world}"
        )
    shard_len = buf.numel() // world
    rank = group.rank()
    shard = buf[rank * shard_len : (rank + 1) * shard_len]  # output aliases the input, as in Megatron
    op = _prepare_average(buf, group, avg)
    bucket.record_comm_bytes(buf.numel() * buf.element_size())
    work = dist.reduce_scatter_single(shard, buf, op=op, group=group, async_op=True)
    return _future_of(work, buf)


def _future_of(work: dist.Work, value: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """A Future that completes with ``value`` when ``work`` does.

    gloo's reduce-scatter Work implements no Future (``Work::getFuture not implemented``), though the
    collective itself runs asynchronously on gloo's worker threads. A small waiter thread completes the
    Future when the Work is done, so the reduce-scatter overlaps the rest of the backward on CPU too
    (on 2 CPU ranks with 2 cores this measured no net gain: no core is idle; BENCHMARKS.md, issue 12).
    The collective was enqueued by the caller, so the collective order is untouched.
    """
    try:
        return work.get_future().then(lambda fut: value)
    except RuntimeError:
        pass
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()

    def complete() -> None:
        try:
            work.wait()
        except Exception as e:  # noqa: BLE001 - handed to whoever waits on the Future
            fut.set_exception(e)
            return
        fut.set_result(value)

    threading.Thread(target=complete, name="z2all-collective-waiter", daemon=True).start()
    return fut


def _compress_hook(dtype: torch.dtype, state, bucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce a ``dtype`` copy of the bucket (half the bytes of fp32), written back in place.

    Same arithmetic as torch's ``fp16_compress_hook``/``bf16_compress_hook``: cast, pre-divide in the
    low precision, sum in the low precision, cast back.
    """
    group, avg = _resolve(state)
    buf = bucket.buffer()  # (numel_padded,) grad dtype
    compressed = buf.to(dtype)
    op = _prepare_average(compressed, group, avg)
    bucket.record_comm_bytes(compressed.numel() * compressed.element_size())
    work = dist.all_reduce(compressed, op=op, group=group, async_op=True)

    def decompress(fut: torch.futures.Future) -> torch.Tensor:
        buf.copy_(fut.value()[0])
        return buf

    return work.get_future().then(decompress)


def fp16_compress_hook(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce the bucket in float16 (5-bit exponent: scale losses so gradients do not underflow)."""
    return _compress_hook(torch.float16, state, bucket)


def bf16_compress_hook(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce the bucket in bfloat16 (fp32's exponent range, 8-bit mantissa)."""
    return _compress_hook(torch.bfloat16, state, bucket)


def _compress_wrapper(dtype: torch.dtype, hook):
    """Wrap ``hook`` so it communicates a ``dtype`` copy of the bucket; the result lands in fp32 again.

    The inner hook sees ``bucket.buffer()`` as the low-precision copy (so a z2all hook records half
    the bytes) and keeps its state in that dtype; the reduced copy is cast back into the DDP's own
    buffer in place, so the Future's value is that buffer, as for an uncompressed hook.
    """

    def wrapped(state, bucket) -> torch.futures.Future[torch.Tensor]:
        full = bucket.buffer()  # (numel_padded,) grad dtype (fp32): the DDP's storage
        bucket.set_buffer(full.to(dtype))  # the inner hook works on, and sends, this copy
        fut = hook(state, bucket)

        def decompress(f: torch.futures.Future) -> torch.Tensor:
            value = f.value()
            if isinstance(value, list) and len(value) == 1:
                value = value[0]  # a collective's own Future holds [tensor]
            full.copy_(value)  # dtype -> fp32 upcast is exact: accumulation continues in fp32
            return full

        return fut.then(decompress)

    wrapped.__name__ = (
        f"{str(dtype).removeprefix('torch.')}_compress_wrapper({getattr(hook, '__name__', hook)})"
    )
    wrapped.__wrapped__ = hook
    return wrapped


def fp16_compress_wrapper(hook):
    """``hook`` communicating in float16: ``fp16_compress_wrapper(powerSGD_hook)`` sends P and Q in fp16.

    Same as torch's ``default_hooks.fp16_compress_wrapper``; ``fp16_compress_wrapper(allreduce_hook)``
    gives the numbers of :func:`fp16_compress_hook`.
    """
    return _compress_wrapper(torch.float16, hook)


def bf16_compress_wrapper(hook):
    """``hook`` communicating in bfloat16 (fp32's exponent range): torch's ``bf16_compress_wrapper``."""
    return _compress_wrapper(torch.bfloat16, hook)
