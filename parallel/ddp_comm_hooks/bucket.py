"""The bucket a communication hook sees: duck-type compatible with ``torch.distributed.GradBucket``.

A hook is ``hook(state, bucket) -> torch.futures.Future[Tensor]``; its Future's value is the AVERAGE
over the data-parallel group of ``bucket.buffer()`` (same numel; a value in another dtype, e.g. from
a compression wrapper, is cast back into the DDP's grad buffer). torch's own hooks
(``default_hooks.allreduce_hook``, ``powerSGD_hook.powerSGD_hook``) run on this class unchanged.

Invariants a hook may rely on when it is called:
  * every gradient of ``parameters()`` has been accumulated into ``buffer()``; the buffer is not
    touched by the DDP again until the hook's Future completes;
  * padding elements of ``buffer()`` (after the last parameter) are zero;
  * for buckets whose grad dtype equals the param dtype, each ``param.grad`` already is the view
    ``gradients()[i]`` into the DDP's grad buffer, so an in-place reduction into ``buffer()`` is
    visible through ``param.grad`` inside a ``fut.then(...)`` callback.

A hook's state may define ``after_grad_sync()``: the DDP calls it at the end of ``finish_grad_sync()``,
once every ``param.grad`` is final (None for parameters no rank used).

And one rule a hook must keep: issue every collective from the hook call itself (the DDP's thread),
never from a ``fut.then`` callback. The DDP calls hooks in the same bucket order on every rank, so
collectives issued inline are paired correctly; gloo runs callbacks on its worker threads, so a
collective launched there can interleave differently with the next bucket's on another rank (torch's
``powerSGD_hook`` does this for its Q all-reduce: safe with a single bucket, not in general).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GradBucket:
    """One bucket of one gradient buffer, as handed to a comm hook (see module docstring)."""

    def __init__(
        self,
        index: int,
        is_last: bool,
        buffer: torch.Tensor,
        params: list[torch.nn.Parameter],
        param_names: list[str],
        offsets: list[int],
        record_comm_bytes: Callable[[int], None],
    ):
        # buffer: (numel_padded,) contiguous; offsets[i] = start of params[i] inside it.
        self._index = index
        self._is_last = is_last
        self._grad_data = buffer  # the DDP's own storage; never replaced
        self._buffer = buffer  # what buffer() returns; set_buffer() may swap it
        self._params = list(params)
        self._param_names = list(param_names)
        self._offsets = list(offsets)
        self._record = record_comm_bytes
        self._all_used = True  # set by the DDP at each launch

    # --- torch.distributed.GradBucket interface -------------------------------------------------
    def index(self) -> int:
        """Bucket id, stable across iterations (0 = first bucket to fill during backward)."""
        return self._index

    def is_last(self) -> bool:
        """True for the bucket with the highest index (the last one launched each iteration)."""
        return self._is_last

    def buffer(self) -> torch.Tensor:
        """1-D contiguous flat gradient of the bucket, padding included (padding is zero)."""
        return self._buffer

    def set_buffer(self, tensor: torch.Tensor) -> None:
        """Make ``buffer()`` (and ``gradients()``) refer to ``tensor`` (e.g. a compressed copy)."""
        if tensor.dim() != 1 or tensor.numel() != self._grad_data.numel():
            raise ValueError(
                f"GradBucket {self._index}.set_buffer: expected a 1-D tensor of {self._grad_data.numel()} "
                f"elements, got shape {tuple(tensor.shape)}"
            )
        self._buffer = tensor

    def gradients(self) -> list[torch.Tensor]:
        """Views into ``buffer()`` shaped like each parameter, in bucket order."""
        return [
            self._buffer[off : off + p.numel()].view(p.shape)
            for off, p in zip(self._offsets, self._params, strict=True)
        ]

    def parameters(self) -> list[torch.Tensor]:
        """The parameters whose gradients live in this bucket, in bucket order."""
        return list(self._params)

    # --- z2all extras ---------------------------------------------------------------------------
    def param_names(self) -> list[str]:
        """Fully qualified names (as in ``module.named_parameters()``) of ``parameters()``."""
        return list(self._param_names)

    def params_all_used_locally(self) -> bool:
        """True when every parameter of this bucket got a gradient on this rank this iteration. When
        False, whether the others got one on ANY rank is known only after ``finish_grad_sync()``."""
        return self._all_used

    def record_comm_bytes(self, n: int) -> None:
        """Every z2all hook calls this with the payload bytes it hands to collectives."""
        self._record(int(n))

    def _reset(self) -> None:
        """Called by the DDP before each launch: ``buffer()`` is the DDP's grad storage again."""
        self._buffer = self._grad_data

    def __repr__(self) -> str:
        return (
            f"GradBucket(index={self._index}, numel={self._grad_data.numel()}, "
            f"dtype={self._grad_data.dtype}, params={len(self._params)})"
        )
