"""How much gradient communication our DDP hides behind backward, read from a torch.profiler trace.

For each setting (``overlap_grad_reduce`` True and False) rank 0 profiles ``--steps`` training steps
on ``--world-size`` processes. On CPU (default; gloo), from the trace:

  * comm intervals: the ``gloo:*`` collective events (they run on gloo's worker threads);
  * backward: the ``backward`` record_function range around ``loss.backward()``;
  * comm_ms:    length of the union of comm intervals in the step;
  * exposed_ms: the part of that union lying after backward ended (nothing left to hide it behind:
                the training thread sits in ``finish_grad_sync()`` waiting);
  * hidden_fraction = 1 - exposed_ms / comm_ms;  exposed_over_step = exposed_ms / step_ms.

On CUDA (``--device cuda``: rank r on cuda:r, NCCL unless ``--backend gloo``; each step ends with
``torch.cuda.synchronize()`` so its kernels lie inside its ``step`` range) the GPU timeline is used:

  * comm intervals: CUDA kernels whose name contains ``nccl``;
  * exposed_ms: the part of their union not covered by any other GPU activity (compute kernels,
                memcpy/memset) of the step: comm the GPU had nothing to run alongside.

Prints one JSON object with the medians over steps for both settings, measured in the same run.

    python benchmarks/bench_overlap.py
    python benchmarks/bench_overlap.py --device cuda --world-size 1   # one GPU: NCCL, 1 rank
    python benchmarks/bench_overlap.py --layers 8 --width 384 --bucket-mb 1
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import ResidualMLP, add_backend_args, free_port, init_rank, resolve_backend
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from parallel import DistributedDataParallel, DistributedDataParallelConfig


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def _minus(intervals, holes) -> float:
    """Total length of the disjoint sorted ``intervals`` not covered by the disjoint sorted ``holes``."""
    total = 0.0
    for lo, hi in intervals:
        covered = sum(max(0.0, min(hi, h1) - max(lo, h0)) for h0, h1 in holes)
        total += (hi - lo) - covered
    return total


def analyse(events, steps: int, device: torch.device) -> dict[str, float]:
    """Per-step comm / exposed / step times (ms) from profiler events; medians over steps."""
    ranges = lambda name: sorted((e.time_range.start, e.time_range.end) for e in events if e.name == name)
    step_ranges, bwd_ranges = ranges("step"), ranges("backward")
    span = lambda e: (e.time_range.start, e.time_range.end)
    if device.type == "cuda":
        gpu = [e for e in events if e.device_type == DeviceType.CUDA and e.name not in ("step", "backward")]
        comm = [span(e) for e in gpu if "nccl" in e.name.lower()]
        other = [span(e) for e in gpu if "nccl" not in e.name.lower()]
    else:
        comm = [span(e) for e in events if e.name.startswith("gloo:")]
        other = []
    if len(step_ranges) != steps or len(bwd_ranges) != steps or not comm:
        raise RuntimeError(
            f"trace has {len(step_ranges)} steps, {len(bwd_ranges)} backwards, {len(comm)} comm events"
        )
    clip = lambda ivs, s0, s1: _union([(max(lo, s0), min(hi, s1)) for lo, hi in ivs if hi > s0 and lo < s1])
    rows = []
    for (s0, s1), (_, b1) in zip(step_ranges, bwd_ranges, strict=True):
        mine = clip(comm, s0, s1)
        comm_us = sum(hi - lo for lo, hi in mine)
        if device.type == "cuda":
            exposed_us = _minus(mine, clip(other, s0, s1))
        else:
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


def run_setting(args, overlap: bool, rank: int, device: torch.device) -> dict[str, float] | None:
    torch.manual_seed(0)
    cfg = DistributedDataParallelConfig(
        overlap_grad_reduce=overlap, bucket_size=int(args.bucket_mb * 2**20) // 4
    )
    ddp = DistributedDataParallel(cfg, ResidualMLP(args.layers, args.width).to(device))
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def step() -> None:
        with record_function("step"):
            loss = ddp(x).square().mean()
            with record_function("backward"):
                loss.backward()
            ddp.finish_grad_sync()
            opt.step()
            ddp.zero_grad_buffer()
            sync()  # on CUDA: the step's kernels end inside its range

    for _ in range(2):  # warm-up
        step()
    dist.barrier()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
    return analyse(prof.events(), args.steps, device) if rank == 0 else None


def worker(rank: int, world: int, port: int, args) -> None:
    device = init_rank(rank, world, port, args)
    try:
        results = {f"overlap_grad_reduce={o}": run_setting(args, o, rank, device) for o in (True, False)}
        if rank == 0:
            out = {
                "benchmark": "overlap",
                "world_size": world,
                "backend": args.backend,
                "device": str(device),
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
    add_backend_args(p)
    args = p.parse_args()
    resolve_backend(p, args)
    if args.device == "cuda" and args.backend != "nccl":
        p.error("--device cuda reads NCCL kernels from the GPU trace: use --backend nccl (or auto)")
    mp.spawn(worker, args=(args.world_size, free_port(), args), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
