"""Configuration of the custom DDP engine (one typed dataclass, validated on construction).

See ``docs/ddp.md`` for what each knob does to the buffers, buckets and communication.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class DistributedDataParallelConfig:
    """Every knob of :class:`parallel.DistributedDataParallel`; unknown keys are rejected by ``from_dict``."""

    grad_reduce_in_fp32: bool = False
    """Accumulate and reduce gradients in an fp32 buffer even when parameters are bf16/fp16.
    Costs 4 bytes per parameter instead of 2 but keeps micro-batch accumulation and the
    all-reduce sum from losing low bits."""

    param_grad_copies: bool = True
    """With ``grad_reduce_in_fp32`` and bf16/fp16 params: after ``finish_grad_sync()`` each used
    parameter's ``.grad`` is a copy of its averaged fp32 ``main_grad`` in the param dtype, what a plain
    torch optimizer steps. False: their ``.grad`` stays None and the optimizer reads ``main_grad``
    (Megatron's way; the optimizer/ wrappers do), saving that copy's 2 bytes per parameter; which
    parameters no rank used is then in ``unused_params``."""

    overlap_grad_reduce: bool = True
    """Launch each bucket's collective asynchronously during backward, as soon as its last
    gradient is ready (from the first iteration on). False: all collectives are launched from
    ``finish_grad_sync()`` after backward, in bucket order."""

    use_distributed_optimizer: bool = False
    """Reduce-scatter instead of all-reduce (default hook only): after ``finish_grad_sync()`` rank r
    holds the averaged gradient only in shard r of every bucket (the rest of the grad buffer is stale
    local gradient) and ``param.grad`` is NOT set; a ZeRO-1 optimizer reads its shard of
    ``param.main_grad``/``bucket.grad_data``."""

    bucket_size: int | None = 40_000_000
    """Target bucket size in ELEMENTS (a bucket is closed once it holds at least this many; a
    parameter is never split). None: one bucket per buffer (after the first small bucket)."""

    first_bucket_size: int | None = 262_144
    """Target size in elements of bucket 0, the first to fill during backward (262144 fp32
    elements = 1 MiB, PyTorch DDP's first-bucket cap) so communication starts early.
    None: bucket 0 uses ``bucket_size`` like the others."""

    bucket_alignment: int = 128
    """Every bucket's length is padded up to a multiple of lcm(data-parallel size, this) elements,
    so it splits into equal, aligned reduce-scatter shards."""

    average_in_collective: bool = False
    """Average with ``ReduceOp.AVG`` inside the collective (NCCL) instead of pre-dividing the
    gradient by the world size. Backends without AVG (gloo) silently fall back to pre-dividing."""

    check_for_nan_in_grad: bool = False
    """Check every bucket for NaN/Inf before and after reduction; raise a RuntimeError naming the
    rank and the parameter(s). Costs one extra pass over the grad buffer per check."""

    broadcast_params: bool = True
    """Broadcast parameters and module buffers from data-parallel rank 0 at construction so every
    rank starts from identical weights."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool",) and not isinstance(value, bool):
                raise TypeError(f"DistributedDataParallelConfig.{f.name} must be a bool, got {value!r}")
        for name in ("bucket_size", "first_bucket_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(
                    f"DistributedDataParallelConfig.{name} must be a positive int (elements) or None, "
                    f"got {value!r}"
                )
        if not isinstance(self.bucket_alignment, int) or self.bucket_alignment <= 0:
            raise ValueError(
                f"DistributedDataParallelConfig.bucket_alignment must be a positive int, "
                f"got {self.bucket_alignment!r}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> DistributedDataParallelConfig:
        """Build from a plain dict, rejecting keys that are not fields (typos must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown DistributedDataParallelConfig key(s) {unknown}; known keys: {sorted(known)}"
            )
        return cls(**d)
