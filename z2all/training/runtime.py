"""The process's place in the run: rank, world size, device; the process group it may own.

Derived at start-up from torchrun's environment and passed as a value to everything that needs it
(TrainConfig stays read-only: it never learns the world size).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout  # private, but the only way to change it

from z2all.training.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device


@contextmanager
def distributed_runtime(cfg: TrainConfig) -> Iterator[Runtime]:
    """Join torchrun's process group (gloo or NCCL per ``--backend``) unless one exists (on one
    process with 16-bit ``--params_dtype``: a one-rank group, see below), pick the device
    (``cuda:LOCAL_RANK``), check the world size against the config; destroy the group on exit if this
    context created it."""
    created = False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.check_world_size(world)  # before joining: every rank refuses alike, nobody waits
    try:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cfg.device == "cuda" else "gloo")
        init_timeout = timedelta(seconds=cfg.dist_init_timeout)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend, timeout=init_timeout)
            created = True
        elif (cfg.params_dtype != "float32" or cfg.use_distributed_optimizer) and not dist.is_initialized():
            # 16-bit weights and ZeRO-1 live in the z2all DDP's buffers (fp32 gradients beside the
            # weights, shards of them), on one process too, the same code path as W ranks: a one-rank
            # group over an in-process store.
            if cfg.device == "cuda" and torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=init_timeout)
            created = True
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        cfg.check_world_size(world)
        if cfg.device == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("--device=cuda but CUDA is not available on this machine")
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            device = torch.device("cpu")
        yield Runtime(rank, world, device)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def set_collective_timeout(seconds: int) -> None:
    """From now on a collective of the default group fails after ``seconds`` instead of waiting (the
    first step is done: start-up's longer --dist_init_timeout is over). torchtitan does the same."""
    if dist.is_available() and dist.is_initialized():
        _set_pg_timeout(timedelta(seconds=seconds))
