"""Overlap the optimizer step with gradient communication: step each bucket as soon as it is reduced.

Design page: ``docs/powersgd.md`` (section "Overlapped optimizer step").

Without overlap an iteration is: backward (buckets reduce as they fill) -> wait for ALL buckets ->
one ``optimizer.step()`` over all parameters. With this hook, each bucket's parameters are stepped by
their own optimizer in a ``fut.then(...)`` callback of the bucket's collective, while later buckets
are still being reduced (and, with ``overlap_grad_reduce``, while backward is still running). After
``ddp.finish_grad_sync()`` every parameter has been updated; the training loop must NOT call
``optimizer.step()`` again.

Why it is exact: AdamW (and SGD, Adam, ...) update each parameter from its own gradient and its
own state only, given the same hyper-parameters, so stepping the parameter set in per-bucket pieces
gives the same numbers as one step over all of them (tested to <= 1e-6; measured bit-for-bit).

Why it is safe during backward: a bucket's Future exists only once all its gradients are accumulated,
and a parameter's gradient is produced by the same autograd node that last reads the parameter, so
no pending backward node still needs the old value (an in-place update of a tensor that autograd
saved for later would raise, not silently corrupt).

Parameters no rank used: a bucket holding a parameter that got no gradient on this rank cannot be
stepped in its callback, since whether another rank used it is known only at the end of
``finish_grad_sync()`` (which then sets ``.grad = None`` for parameters unused everywhere). Such a
bucket's step is deferred to ``after_grad_sync()``, which the DDP calls then; the optimizer skips
parameters whose ``.grad`` is None, so they do not move, as with torch DDP and one process.

Global-norm gradient clipping is REFUSED: it scales every gradient by max_norm / ||g||, where ||g||
is over all buckets, which is unknown when the first bucket is stepped. ``OptimizerOverlapState``
raises a ValueError for ``max_grad_norm > 0``; train without clipping (or with the plain step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from parallel.ddp_comm_hooks.default_hooks import reduce_scatter_hook

logger = logging.getLogger(__name__)

__all__ = ["OptimizerOverlapState", "optimizer_overlap_hook"]

# make_optimizer(named_params) -> optimizer over exactly those parameters; the names let the caller
# split weight-decay groups (e.g. no decay for norms), as it would for the whole model.
OptimizerFactory = Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]
Hook = Callable[[Any, Any], torch.futures.Future]


class OptimizerOverlapState:
    """State of :func:`optimizer_overlap_hook`: the wrapped comm hook and one optimizer per bucket.

    ``hook``/``hook_state``: the reduction to run first (``allreduce_hook`` with its state,
    ``powerSGD_hook`` with a ``PowerSGDState``, ...); its Future's value must be the averaged bucket.
    ``make_optimizer``: builds the optimizer of one bucket from its ``(name, param)`` pairs; called on
    the bucket's first reduction, with the same hyper-parameters for every bucket.
    ``max_grad_norm``: must be None or <= 0 (see module docstring: global clipping is refused).
    """

    def __init__(
        self,
        hook: Hook,
        hook_state: Any,
        make_optimizer: OptimizerFactory,
        max_grad_norm: float | None = None,
    ):
        if max_grad_norm is not None and max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm={max_grad_norm}: global-norm gradient clipping needs every bucket's "
                "reduced gradient before the first parameter is updated, which the overlapped optimizer "
                "step does not wait for. Disable clipping (max_grad_norm=0) or the overlapped step."
            )
        if hook is reduce_scatter_hook:
            raise ValueError(
                "optimizer_overlap_hook needs the whole averaged bucket; reduce_scatter_hook leaves only "
                "this rank's shard valid (use_distributed_optimizer). Wrap allreduce_hook or "
                "powerSGD_hook instead."
            )
        self.hook = hook
        self.hook_state = hook_state
        self.make_optimizer = make_optimizer
        self.optimizers: dict[int, torch.optim.Optimizer] = {}  # bucket index -> its optimizer
        self.steps: dict[int, int] = {}  # bucket index -> optimizer steps taken
        self._pending_state: dict[int, dict] = {}  # loaded before the bucket's optimizer existed
        self._deferred: list[int] = []  # buckets with a locally unused parameter: stepped after the sync

    @property
    def param_groups(self) -> list[dict]:
        """All param groups of all bucket optimizers (set ``group["lr"]`` here for an LR schedule)."""
        return [g for i in sorted(self.optimizers) for g in self.optimizers[i].param_groups]

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    def after_grad_sync(self) -> None:
        """Called by the DDP at the end of ``finish_grad_sync()``: step the deferred buckets, whose
        ``.grad`` is now final (None for parameters unused on every rank)."""
        for index in sorted(self._deferred):
            self.optimizers[index].step()
            self.steps[index] = self.steps.get(index, 0) + 1
        self._deferred.clear()

    def state_dict(self) -> dict[int, dict]:
        """Per bucket index, the bucket optimizer's state dict (weights_only-loadable)."""
        sd = {i: opt.state_dict() for i, opt in self.optimizers.items()}
        sd.update({i: s for i, s in self._pending_state.items() if i not in sd})
        return sd

    def load_state_dict(self, sd: dict[int, dict]) -> None:
        """Load now for built optimizers, or on the bucket's first reduction for the others."""
        for i, s in sd.items():
            if int(i) in self.optimizers:
                self.optimizers[int(i)].load_state_dict(s)
            else:
                self._pending_state[int(i)] = s

    def _optimizer_for(self, bucket: Any) -> torch.optim.Optimizer:
        index = bucket.index()
        opt = self.optimizers.get(index)
        if opt is None:
            params = bucket.parameters()
            names = (
                bucket.param_names()
                if hasattr(bucket, "param_names")
                else [str(i) for i in range(len(params))]
            )
            opt = self.optimizers[index] = self.make_optimizer(list(zip(names, params)))
            if index in self._pending_state:
                # the saved state carries the learning rate of the step it was saved at: keep this
                # step's, which make_optimizer set (a resume would otherwise take one step at the old LR)
                lrs = [group["lr"] for group in opt.param_groups]
                opt.load_state_dict(self._pending_state.pop(index))
                for group, lr in zip(opt.param_groups, lrs, strict=True):
                    group["lr"] = lr
            logger.info(
                "overlapped optimizer for bucket %d: %d params (%s ...)", index, len(params), names[:2]
            )
        return opt


def _expose_reduced_grads(bucket: Any, reduced: torch.Tensor) -> None:
    """Make ``p.grad`` of every bucket parameter hold its averaged gradient from ``reduced``.

    Precondition: ``reduced`` is the hook's completed value (numel of ``bucket.buffer()``).
    The DDP's grad storage may still receive a copy of ``reduced`` later; writing the same values
    earlier (here) is harmless.
    """
    buffer = bucket.buffer()
    if reduced.data_ptr() != buffer.data_ptr():
        buffer.copy_(reduced)
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        if p.grad is not None and p.grad.data_ptr() == g.data_ptr() and p.grad.dtype == g.dtype:
            continue  # p.grad is already the view into the reduced buffer (same-dtype DDP buckets)
        p.grad = g if g.dtype == p.dtype else g.to(p.dtype)  # fp32 grads of bf16 params: a cast copy


def optimizer_overlap_hook(state: OptimizerOverlapState, bucket: Any) -> torch.futures.Future:
    """Comm hook: reduce ``bucket`` with ``state.hook``, then step the optimizer of its parameters.

    ``ddp.register_comm_hook(OptimizerOverlapState(allreduce_hook, None, make), optimizer_overlap_hook)``
    The returned Future completes after the step; its value is the reduced bucket, as for any hook.
    """
    if bucket.index() == 0:
        # Bucket 0 is launched first in every iteration: forget steps deferred by an iteration whose
        # finish_grad_sync() raised before after_grad_sync() ran (they must not be taken twice).
        state._deferred.clear()
    opt = state._optimizer_for(bucket)  # built on the calling thread, before any callback runs
    fut = state.hook(state.hook_state, bucket)
    index = bucket.index()

    all_used = bucket.params_all_used_locally() if hasattr(bucket, "params_all_used_locally") else True

    def _step(done: torch.futures.Future) -> torch.Tensor:
        # The reduction of this bucket is complete; other buckets may still be in flight.
        reduced = done.value()
        if not all_used:
            state._deferred.append(index)  # stepped by after_grad_sync() (module docstring)
            return reduced
        _expose_reduced_grads(bucket, reduced)
        opt.step()
        state.steps[index] = state.steps.get(index, 0) + 1
        return reduced

    return fut.then(_step)
