"""What run_info.json records about a run, measured from the live objects (not from the config alone).

``p`` below is the trainer's ``TrainerParts`` (z2all.training.loop, which imports this module: typed
``Any`` here so that no import goes back up).
"""

from __future__ import annotations

import platform
from typing import Any

import torch

import z2all
from z2all.model import kernels


def held_bytes(p: Any) -> dict[str, int]:
    """Bytes this rank holds for the weights, gradients, fp32 main copies and optimizer state,
    measured from the tensors (distinct storages; DDP buffers with their padding)."""

    def storage_bytes(tensors) -> int:
        seen = {}
        for t in tensors:
            if t is not None:
                st = t.untyped_storage()
                seen[(st.data_ptr(), t.device)] = st.nbytes()
        return sum(seen.values())

    params = list(p.model.parameters())
    # what the optimizer reads: z2all DDP's grad buffers, else each .grad (torch DDP's own bucket
    # copies are internal to it and not counted; neither are the step's transient fp32 copies)
    grads = [p.dp.grad_of(w) for w in params] + [w.grad for w in params]  # .grad: copies, if any
    optimizers = [p.optimizer] if p.optimizer is not None else list(p.dp.bucket_optimizers())
    state = [v for o in optimizers for st in o.state.values() for v in st.values() if torch.is_tensor(v)]
    return {
        "params": storage_bytes(params),
        "grads": storage_bytes(grads),
        "main_params": p.main_params.nbytes()
        if p.main_params is not None
        else (p.optimizer.shard_bytes()["main_params"] if hasattr(p.optimizer, "shard_bytes") else 0),
        "optimizer_state": storage_bytes(state),
    }


def run_info(p: Any, world: int, device: torch.device, held_bytes: dict[str, int] | None) -> dict[str, Any]:
    """What run_info.json says: the run's layout, versions, devices, and ``bytes_per_param`` as
    measured on the first applied step (:func:`held_bytes`)."""
    cfg = p.cfg
    n_params = sum(t.numel() for t in p.model.parameters())
    held = dict(held_bytes or {})
    held["total"] = sum(held.values())
    info: dict[str, Any] = {
        "world_size": world,
        "ddp_impl": cfg.ddp_impl,  # as requested
        "effective_ddp": p.dp.impl,  # what wraps the model: "none" on one process, else ddp_impl
        "comm_hook": cfg.comm_hook,
        "bucket_size": cfg.bucket_size,
        "overlap_grad_reduce": cfg.overlap_grad_reduce,
        "use_distributed_optimizer": cfg.use_distributed_optimizer,
        "overlap_param_gather": cfg.overlap_param_gather,
        "async_save": cfg.async_save,
        "task_type": cfg.task_type,
        "num_params": n_params,
        "optimizer_state_bytes_per_rank": held.get("optimizer_state", 0),
        # measured on this process's first step (Trainer._held_bytes), per model parameter
        "bytes_per_param": {k: round(v / n_params, 3) for k, v in held.items()},
        "params_dtype": cfg.params_dtype,
        "dtype": cfg.dtype,
        "overlap_optim_step": p.dp.steps_optimizer,
        "optimizer": type(p.optimizer).__name__ if p.optimizer is not None else "per-bucket",
        "torch_version": torch.__version__,
        "z2all_version": z2all.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if device.type == "cuda"
        else [platform.processor() or platform.machine()],
        "active_backends": kernels.active_backends(),
    }
    if p.model_config is not None and hasattr(p.model_config, "to_dict"):
        info["model_config"] = p.model_config.to_dict()
    info.update(p.info or {})
    return info
