"""The background half of an asynchronous checkpoint: a host-memory snapshot and one writer thread.

:class:`~z2all.training.checkpoint.CheckpointManager` splits a save in two (docs/checkpoint.md,
"Asynchronous saves")::

    training loop (blocking)              writer thread (this module)
    ------------------------              -----------------------------------------------
    checks: weights_only, NaN/Inf         ckpt_tmp-<step>/: DCP write, rank file, fsync
    snapshot -> host memory (staging)     hash, all-gather, manifest (last), rename to step_<N>
    submit, return                        rotate; the outcome is agreed by every rank

Invariants:
- At most one save is in flight per process: :meth:`AsyncWriter.submit` waits for the previous one
  first, so the staging buffers it overwrites are no longer read by anyone, and checkpoints are
  published in step order.
- The snapshot is a copy: the loop may change every tensor of the live state the moment
  :meth:`snapshot` returns. Its buffers are allocated once (the first snapshot, or :meth:`warm_up` at
  start-up) and reused by every later save, so a save step pays a memory copy, not page faults.
- Every collective of the writer thread runs on this writer's own gloo group, never on the default
  one: the loop's all-reduces and the writer's cannot interleave, on any backend (gloo needs CPU
  tensors, which the snapshot is).
- A failed write is agreed on by all ranks inside the thread (the manager's ``_agree``), so each
  rank's future ends with the same kind of outcome; the loop learns of it from the per-step
  all-reduce (:meth:`failed`) and raises it from :meth:`wait` on every rank at the same step.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata

from z2all.training.collectives import all_reduce_max, dist_on, rank_world

logger = logging.getLogger(__name__)

# The writer thread's nice value (Linux: per thread). Where training keeps every core busy (CPU
# training) the write then takes the cycles training leaves idle (waits in collectives, data
# loading) instead of slowing every step; on a GPU node, with cores to spare, it changes nothing.
WRITER_NICE = 19


def _on_cpu(md: ShardMetadata) -> ShardMetadata:
    """``md`` placed on its rank's CPU: where the snapshot of that chunk lives."""
    return ShardMetadata(md.shard_offsets, md.shard_sizes, f"rank:{md.placement.rank()}/cpu")


def agreed_on_every_rank(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` (a host snapshot) on every rank, a failure on any rank (host memory) raised on every
    rank before any of them enters the writer's collectives. Collective on the default group."""
    failure: Exception | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - agreed on below, then re-raised
        failure = e
    if all_reduce_max(int(failure is not None)):
        if failure is not None:
            raise failure
        rank, _ = rank_world()
        raise RuntimeError(f"rank {rank}: {what}: another rank failed to snapshot its state (see its error)")
    return result


def _lower_priority() -> None:
    """Executor initializer: runs in the writer thread, before its first write."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except OSError as e:  # a container may forbid it: the write still works, at normal priority
            logger.debug("could not lower the checkpoint writer's priority: %s", e)


@dataclass
class SaveJob:
    """One save, checked: what the write (blocking, or in the writer thread) puts on disk."""

    step: int
    own: bytes
    """This rank's per-rank file, serialized (and proven weights_only-loadable)."""
    per_rank: list[str]
    shared: dict[str, Any]
    """The non-empty shared components' state dicts (an asynchronous save: their host snapshot)."""
    empty: list[str]
    need: int
    """Bytes the checkpoint needs (for the no-space message)."""
    model_config: dict | None
    t0: float
    final: Path
    tmp: Path
    run: dict = field(default_factory=dict)
    blocking: bool = True
    files: dict[str, dict] = field(default_factory=dict)
    """Set by the write: size and sha256 of every file (the manifest's ``files``)."""


class AsyncWriter:
    """Snapshots state dicts into reused host buffers and runs one checkpoint write at a time in a
    background thread. All ranks create it and call :meth:`snapshot` / :meth:`submit` together."""

    def __init__(self, device: torch.device | None = None, timeout: timedelta | None = None):
        # Pinned host memory makes the device-to-host copy of a CUDA state fast; CPU state needs none.
        self._pin = device is not None and device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}  # dotted path -> host buffer, reused by every save
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._group: Any = None
        self._timeout = timeout

    def group(self) -> Any:
        """The writer's gloo process group (created on first use: collective), or None on one
        process without torch.distributed."""
        if self._group is None and dist_on():
            self._group = dist.new_group(backend="gloo", timeout=self._timeout)
        return self._group

    def snapshot(self, tree: dict[str, Any]) -> dict[str, Any]:
        """A host-memory copy of ``tree`` (tensors, ShardedTensor chunks, plain values), in the
        buffers of the previous snapshot when the shapes match. Waits for the write in flight first:
        it may still read those buffers."""
        self.wait()
        staged = self._stage(tree, "")
        if self._pin:
            torch.cuda.synchronize()  # the copies are complete before the loop changes a weight
        return staged

    def _stage(self, tree: Any, path: str) -> Any:
        """``tree`` with every tensor copied into this path's host buffer (torch's StateDictStager
        cannot copy a ShardedTensor, ZeRO-1's layout: its local chunks are copied one by one and
        wrapped with the same global layout, placed on the CPU)."""
        if isinstance(tree, ShardedTensor):
            meta = tree.metadata()
            # the same on every rank (global metadata): whether the chunks live on CUDA, so pinned here
            pinned = self._pin and any("cuda" in str(m.placement) for m in meta.shards_metadata)
            local = enumerate(tree.local_shards())
            shards = [Shard(self._copy(s.tensor, f"{path}#{i}"), _on_cpu(s.metadata)) for i, s in local]
            host_meta = ShardedTensorMetadata(
                [_on_cpu(m) for m in meta.shards_metadata],
                meta.size,
                dataclasses.replace(meta.tensor_properties, pin_memory=pinned),
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Please use DTensor instead", category=FutureWarning)
                return ShardedTensor._init_from_local_shards_and_global_metadata(shards, host_meta)
        if torch.is_tensor(tree):
            return self._copy(tree, path)
        if isinstance(tree, dict):
            return {k: self._stage(v, f"{path}.{k}") for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self._stage(v, f"{path}.{i}") for i, v in enumerate(tree))
        return copy.deepcopy(tree)  # numbers, strings: the loop may rebind, never share

    def _copy(self, t: torch.Tensor, path: str) -> torch.Tensor:
        buf = self._buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self._pin and t.is_cuda)
            self._buffers[path] = buf
        return buf.copy_(t.detach(), non_blocking=self._pin and t.is_cuda)

    def submit(self, write: Callable[[], Any]) -> None:
        """Run ``write()`` in the writer thread (after the previous write)."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="z2all-ckpt", initializer=_lower_priority
            )
        self._pending = self._executor.submit(write)

    def in_flight(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def failed(self) -> bool:
        """Whether the last write has ended with an error (not yet raised by :meth:`wait`)."""
        p = self._pending
        return p is not None and p.done() and p.exception() is not None

    def wait(self) -> None:
        """Block until the write in flight (if any) has ended; raise its error. An interrupt while
        waiting leaves the write pending: nobody may reuse its buffers before it has ended."""
        p = self._pending
        if p is None:
            return
        try:
            p.result()
        finally:
            if p.done():
                self._pending = None

    def close(self) -> None:
        """Wait for the write in flight (its error is raised), then release the thread and buffers."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._buffers.clear()
