"""Run any comm hook on a side CUDA stream so its work overlaps the caller's stream; a no-op on CPU.

Design page: ``docs/powersgd.md`` (section "Side stream").

Why: a hook such as PowerSGD launches matmuls, QR factorisations and collectives. Queued on the
stream that runs backward, they would delay the next layer's gradient kernels. Queued on a side
stream they run beside backward and beside other buckets' collectives, and the caller only waits
where it consumes the result (``fut.wait()`` in ``finish_grad_sync``).

Stream protocol (the invariants the code below keeps):

1. Before the hook runs, the side stream waits for everything already queued on the caller's
   stream: the bucket's gradients were written there, and the hook must not read them earlier.
2. The hook's kernels are queued on the side stream (``torch.cuda.stream(side)`` is current while
   it runs; collectives and ``.then`` callbacks follow the current stream).
3. The returned Future is CUDA-aware (``Future(devices=[device])``): its result is set while the
   side stream is current, which records an event there; ``Future.wait()`` / ``.value()`` on the
   consumer side make the consumer's current stream wait on that event, never the CPU.
4. ``buffer.record_stream(side)`` tells the caching allocator the bucket memory is in use on the
   side stream, so it is not handed out again while side-stream kernels may still touch it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

Hook = Callable[[Any, Any], torch.futures.Future]

# One side stream per CUDA device, created on first use and shared by every wrapped hook.
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The shared side stream of ``device`` (a CUDA device), created on first use."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"side_stream needs a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
        logger.debug("created comm-hook side stream on %s", device)
    return _SIDE_STREAMS[device]


def run_hook_on_side_stream(
    hook: Hook, state: Any, bucket: Any, stream: torch.cuda.Stream | None = None
) -> torch.futures.Future:
    """Call ``hook(state, bucket)`` with its work queued on a side stream (CUDA) or directly (CPU).

    Returns a Future with the hook's value. On CUDA the Future is CUDA-aware: waiting on it makes
    the waiting thread's current stream wait for the side stream, so the caller never reads a
    half-reduced buffer and the CPU is not blocked.
    """
    buffer = bucket.buffer()
    if buffer.device.type != "cuda":
        return hook(state, bucket)

    side = stream if stream is not None else side_stream(buffer.device)
    caller = torch.cuda.current_stream(buffer.device)
    # (1) gradients written on the caller stream must be complete before the side stream reads them.
    side.wait_stream(caller)
    # (4) the grad buffer is used on `side` from now until the result event.
    buffer.record_stream(side)
    with torch.cuda.stream(side):
        inner = hook(state, bucket)  # (2) every kernel the hook queues lands on `side`

    result: torch.futures.Future = torch.futures.Future(devices=[buffer.device])

    def _forward(done: torch.futures.Future) -> None:
        # Runs on whatever thread completes `inner` (a collective's thread, or inline).
        try:
            with torch.cuda.stream(side):
                # wait(), not value(): only wait() makes the current stream (`side`) wait for the
                # events a CUDA-aware `inner` recorded; value() hands over the tensor unsynchronised.
                value = done.wait()
                result.set_result(value)  # (3) records the completion event on `side`
        except Exception as exc:  # handed to whoever waits on `result`
            result.set_exception(exc)

    inner.add_done_callback(_forward)
    return result


def side_stream_hook(hook: Hook) -> Hook:
    """Wrap ``hook`` to run on the side stream on CUDA: ``register_comm_hook(s, side_stream_hook(h))``."""

    def wrapped(state: Any, bucket: Any) -> torch.futures.Future:
        return run_hook_on_side_stream(hook, state, bucket)

    wrapped.__name__ = f"side_stream_{getattr(hook, '__name__', 'hook')}"
    wrapped.__qualname__ = wrapped.__name__
    wrapped.__doc__ = hook.__doc__
    return wrapped
