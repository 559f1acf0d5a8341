"""ZeRO-1 for z2all's DDP: each data-parallel rank keeps fp32 main params and AdamW moments for its own
shard of every gradient bucket (docs/distributed_optimizer.md)."""

from parallel.distributed_optimizer.distributed_optimizer import DistributedOptimizer
from parallel.distributed_optimizer.shard_map import OwnedSlice, owned_slices

__all__ = ["DistributedOptimizer", "OwnedSlice", "owned_slices"]
