"""parallel: data-parallel training on torch.distributed: custom DDP with bucketed buffers, comm hooks."""
