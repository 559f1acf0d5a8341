"""parallel: data-parallel training on torch.distributed: custom DDP with bucketed buffers, comm hooks."""

from parallel.distributed_data_parallel import DistributedDataParallel, NonFiniteGradError
from parallel.distributed_data_parallel_config import DistributedDataParallelConfig

__all__ = ["DistributedDataParallel", "DistributedDataParallelConfig", "NonFiniteGradError"]
