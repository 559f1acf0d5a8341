"""``check_for_nan_in_grad``: find NaN/Inf gradients with one host sync per step, and raise on every rank.

Design page: ``docs/ddp.md`` (item 7, NaN/Inf). The DDP records one device flag per bucket when
it launches the bucket (are this rank's local gradients finite?) and, once every collective has
COMPLETED on this rank, asks for the check of the reduced buckets; one host sync then reads all
flags. Raising only after all collectives completed cannot leave a peer waiting in a collective: the
error never causes a hang.

Who raises: a NaN/Inf in one rank's local gradient spreads through the all-reduce to every rank, so
every rank finds it after reduction and raises; the rank that produced it says so ("before
reduction"), the others name the parameters and point to it. After a reduce-scatter each rank holds
only its own shard, so the ranks first agree with one all-reduce (MAX) of a "bad" byte: then every
rank raises or none does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.param_and_grad_buffer import _Bucket


class NonFiniteGradError(RuntimeError):
    """``check_for_nan_in_grad`` found a NaN/Inf gradient; raised after every collective completed, on
    every rank (the message names the rank and the parameters)."""


class _NonFiniteGradCheck:
    """Per-iteration finite flags of one DDP's buckets (see the module docstring)."""

    def __init__(
        self,
        buckets: list[_Bucket],
        param_to_name: dict[nn.Parameter, str],
        process_group: dist.ProcessGroup,
        dp_rank: int,
        dp_size: int,
    ):
        self._buckets = buckets  # in global bucket-index order
        self._param_to_name = param_to_name
        self._process_group = process_group
        self._dp_rank = dp_rank
        self._dp_size = dp_size
        self._global_rank = dist.get_rank()
        self._local: list[torch.Tensor] = []  # per launched bucket, on device: no host sync in backward

    def record_launch(self, bucket: _Bucket) -> None:
        """At ``bucket``'s launch, before its collective: are this rank's gradients in it finite?"""
        self._local.append(torch.isfinite(bucket.grad_data).all())

    def reset(self) -> None:
        self._local = []

    def _shard_of(self, bucket: _Bucket) -> tuple[int, int]:
        """This rank's reduce-scatter shard of ``bucket``, relative to the bucket's start."""
        lo, hi = bucket.shard_range(self._dp_rank, self._dp_size)
        return lo - bucket.start, hi - bucket.start

    def raise_if_nonfinite(self, sharded: bool) -> None:
        """Precondition: every bucket's collective completed on this rank. ``sharded``: the buckets were
        reduce-scattered (only this rank's shard of each holds the reduced gradient).

        One host sync reads the per-bucket flags recorded at launch (this rank's local gradients) and
        those of the reduced buckets; parameter names are looked up only when something is wrong.
        """
        n = len(self._local)
        # After a reduce-scatter only this rank's shard of each bucket is reduced (the rest is local
        # garbage that differs between ranks): check the shard, and agree across ranks with one
        # all-reduce (MAX) so that every rank raises or none does.
        reduced = [
            torch.isfinite(b.grad_data[slice(*self._shard_of(b))] if sharded else b.grad_data).all()
            for b in self._buckets
        ]
        flags = torch.stack(self._local + reduced)
        if sharded:
            bad = (~flags.all()).to(torch.uint8).reshape(1)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self._process_group)
            if not bool(bad):
                return
        flags = flags.tolist()
        if all(flags):
            if sharded:
                raise NonFiniteGradError(
                    f"non-finite (NaN/Inf) gradient after reduction in another rank's shard (rank "
                    f"{self._global_rank} holds finite values); that rank's error names the parameters"
                )
            return
        names = [
            self._param_to_name[p]
            for b, ok in zip(self._buckets, flags[n:], strict=True)
            if not ok
            for p in b.params
            if not bool(torch.isfinite(p.main_grad).all())
        ]
        local_bad = [b.index for b, ok in zip(self._buckets, flags[:n], strict=True) if not ok]
        if local_bad:
            raise NonFiniteGradError(
                f"non-finite (NaN/Inf) gradient on rank {self._global_rank} (data-parallel rank "
                f"{self._dp_rank}) before reduction, in bucket(s) {local_bad}; non-finite after reduction "
                f"in parameter(s): {', '.join(names)}"
            )
        raise NonFiniteGradError(
            f"non-finite (NaN/Inf) gradient after reduction on rank {self._global_rank}, in parameter(s): "
            f"{', '.join(names)}; it came from another rank, whose error names it"
        )
