"""Run a function on N CPU processes with the gloo backend, as torchrun would, and collect results.

``fn(rank, world_size, *args)`` must be a module-level function (it is pickled into the children).
Whatever it returns (tensors, numbers, lists/dicts of them) comes back as a list indexed by rank;
an exception in any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world_size, port, result_dir, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    # A bounded timeout: a collective-order bug must fail the test, not hang CI.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=180))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Success: leave without tearing down. torch's own PowerSGD hook (used as a reference) can abort a
    # process while its gloo callback threads are torn down ("Resource deadlock avoided"), after all
    # results are written; a throwaway rank gains nothing from an orderly interpreter exit.
    os._exit(0)


def run_distributed(fn, world_size: int, *args) -> list:
    """Spawn ``world_size`` gloo ranks on loopback running ``fn``; return each rank's result."""
    with tempfile.TemporaryDirectory() as result_dir:
        mp.spawn(_worker, args=(fn, world_size, free_port(), result_dir, args), nprocs=world_size, join=True)
        return [torch.load(Path(result_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
