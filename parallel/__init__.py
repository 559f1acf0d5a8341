"""parallel: data-parallel training on torch.distributed: custom DDP with bucketed buffers, comm hooks."""

from parallel.distributed_data_parallel import DistributedDataParallel
from parallel.distributed_data_parallel_config import DistributedDataParallelConfig
from parallel.nonfinite_grads import NonFiniteGradError
from parallel.unwrap import param_name, unwrap_model

__all__ = [
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "NonFiniteGradError",
    "param_name",
    "unwrap_model",
]
