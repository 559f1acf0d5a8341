"""Communication hooks: ``hook(state, bucket) -> Future[Tensor]`` replaces a bucket's collective.

``bucket`` is :class:`parallel.ddp_comm_hooks.bucket.GradBucket` (duck-type compatible with
``torch.distributed.GradBucket``); :mod:`default_hooks` holds the all-reduce / reduce-scatter the DDP
uses when no hook is registered, and the fp16/bf16 compression hooks and wrappers.
"""

from parallel.ddp_comm_hooks.bucket import GradBucket
from parallel.ddp_comm_hooks.default_hooks import (
    DefaultHookState,
    allreduce_hook,
    bf16_compress_hook,
    bf16_compress_wrapper,
    fp16_compress_hook,
    fp16_compress_wrapper,
    reduce_scatter_hook,
)

__all__ = [
    "DefaultHookState",
    "GradBucket",
    "allreduce_hook",
    "bf16_compress_hook",
    "bf16_compress_wrapper",
    "fp16_compress_hook",
    "fp16_compress_wrapper",
    "reduce_scatter_hook",
]
