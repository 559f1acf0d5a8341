"""How much gradient communication our DDP hides behind backward, read from a torch.profiler trace.

For each setting (``overlap_grad_reduce`` True and False) rank 0 profiles ``--steps`` training steps
on ``--world-size`` gloo CPU processes. From the trace:

  * comm intervals: the ``gloo:*`` collective events (they run on gloo's worker threads);
  * backward: the ``backward`` record_function range around ``loss.backward()``;
  * comm_ms:    length of the union of comm intervals in the step;
  * exposed_ms: the part of that union lying after backward ended (nothing left to hide it behind:
                the training thread sits in ``finish_grad_sync()`` waiting);
  * hidden_fraction = 1 - exposed_ms / comm_ms;  exposed_over_step = exposed_ms / step_ms.

Prints one JSON object with the medians over steps for both settings, measured in the same run.

    python benchmarks/bench_overlap.py
    python benchmarks/bench_overlap.py --layers 8 --width 384 --bucket-mb 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from parallel import DistributedDataParallel, DistributedDataParallelConfig


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ResidualMLP(nn.Module):
    """``layers`` pre-norm blocks x + W2 gelu(W1 norm(x)) (the model of bench_ddp_step.py)."""

    def __init__(self, layers: int, width: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, width) -> (B, width)
        for block in self.blocks:
            x = x + block(x)
        return x


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def analyse(events, steps: int) -> dict[str, float]:
    """Per-step comm / exposed / step times (ms) from profiler events; medians over steps."""
    ranges = lambda name: sorted((e.time_range.start, e.time_range.end) for e in events if e.name == name)
    step_ranges, bwd_ranges = ranges("step"), ranges("backward")
    comm = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("gloo:")]
    if len(step_ranges) != steps or len(bwd_ranges) != steps or not comm:
        raise RuntimeError(
            f"trace has {len(step_ranges)} steps, {len(bwd_ranges)} backwards, {len(comm)} comm events"
        )
    rows = []
    for (s0, s1), (_, b1) in zip(step_ranges, bwd_ranges, strict=True):
        mine = _union([(max(lo, s0), min(hi, s1)) for lo, hi in comm if hi > s0 and lo < s1])
        comm_us = sum(hi - lo for lo, hi in mine)
        exposed_us = sum(max(0.0, hi - max(lo, b1)) for lo, hi in mine)
        rows.append((s1 - s0, comm_us, exposed_us))
    step_us, comm_us, exposed_us = (statistics.median(col) for col in zip(*rows))
    return {
        "step_ms": round(step_us / 1e3, 2),
        "comm_ms": round(comm_us / 1e3, 2),
        "exposed_comm_ms": round(exposed_us / 1e3, 2),
        "hidden_fraction": round(1 - exposed_us / comm_us, 3),
        "exposed_over_step": round(exposed_us / step_us, 3),
    }


def run_setting(args, overlap: bool, rank: int) -> dict[str, float] | None:
    torch.manual_seed(0)
    cfg = DistributedDataParallelConfig(
        overlap_grad_reduce=overlap, bucket_size=int(args.bucket_mb * 2**20) // 4
    )
    ddp = DistributedDataParallel(cfg, ResidualMLP(args.layers, args.width))
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank))

    def step() -> None:
        with record_function("step"):
            loss = ddp(x).square().mean()
            with record_function("backward"):
                loss.backward()
            ddp.finish_grad_sync()
            opt.step()
            ddp.zero_grad_buffer()

    for _ in range(2):  # warm-up
        step()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    return analyse(prof.events(), args.steps) if rank == 0 else None


def worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {f"overlap_grad_reduce={o}": run_setting(args, o, rank) for o in (True, False)}
        if rank == 0:
            out = {
                "benchmark": "overlap",
                "world_size": world,
                "backend": "gloo",
                "layers": args.layers,
                "width": args.width,
                "batch": args.batch,
                "bucket_mb": args.bucket_mb,
                "steps": args.steps,
                **results,
            }
            on, off = results["overlap_grad_reduce=True"], results["overlap_grad_reduce=False"]
            out["step_time_ratio_overlap_vs_not"] = round(on["step_ms"] / off["step_ms"], 3)
            print(json.dumps(out, indent=2))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bucket-mb", type=float, default=4.0, help="bucket size (MiB of fp32 gradient)")
    p.add_argument("--steps", type=int, default=8, help="profiled steps per setting")
    args = p.parse_args()
    mp.spawn(worker, args=(args.world_size, free_port(), args), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
