"""Step time of our DistributedDataParallel vs torch.nn.parallel.DistributedDataParallel.

Spawns ``--world-size`` processes (default: CPU, gloo on loopback, 1 thread each; ``--device cuda``:
rank r on cuda:r, NCCL unless ``--backend gloo``, timings bracketed by ``torch.cuda.synchronize()``),
builds the same residual-MLP model for every variant, and times full training steps (forward,
backward, gradient sync, SGD step, zero grads) in interleaved rounds: round r runs ``--steps`` steps
of every variant, in an order that rotates per round, so machine-load drift hits all variants alike.
Prints one JSON object (rank 0): median step time per variant, the ratio of each to torch DDP with
default settings, and the per-round paired ratios (median, min, max over rounds).

    python benchmarks/bench_ddp_step.py                      # defaults below
    python benchmarks/bench_ddp_step.py --layers 4 --width 256 --rounds 4
    python benchmarks/bench_ddp_step.py --device cuda --world-size 1   # one GPU: NCCL, 1 rank
    python benchmarks/bench_ddp_step.py --mode train_loop              # z2all.training step, tiny

``--mode train_loop`` times the real training step instead (``train_loop_worker``): the Llama ``tiny``
preset through ``z2all.training.train`` with ``--ddp_impl=z2all`` vs ``--ddp_impl=torch``, which runs
torch DDP on its default path (C++ all-reduce, no Python comm hook): the reference's best path.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import (
    ResidualMLP,
    add_backend_args,
    free_port,
    in_memory_train_config,
    init_rank,
    make_bench_adamw,
    random_windows,
    resolve_backend,
)
from torch import nn

from parallel import DistributedDataParallel, DistributedDataParallelConfig


def build_variants(args, base: nn.Module, device: torch.device) -> dict[str, nn.Module]:
    bucket_elems = int(args.bucket_mb * 2**20) // 4  # same bucket size in fp32 elements for both
    variants = {}
    for overlap in (True, False):
        cfg = DistributedDataParallelConfig(overlap_grad_reduce=overlap, bucket_size=bucket_elems)
        variants[f"ours_overlap={overlap}"] = DistributedDataParallel(cfg, copy.deepcopy(base))
    ids = [device.index] if device.type == "cuda" else None
    variants["torch_ddp"] = nn.parallel.DistributedDataParallel(
        copy.deepcopy(base), device_ids=ids, bucket_cap_mb=args.bucket_mb
    )
    variants["torch_ddp_bucket_view"] = nn.parallel.DistributedDataParallel(
        copy.deepcopy(base), device_ids=ids, bucket_cap_mb=args.bucket_mb, gradient_as_bucket_view=True
    )
    return variants


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = model(x).square().mean()
    loss.backward()
    if isinstance(model, DistributedDataParallel):
        model.finish_grad_sync()
    opt.step()
    if isinstance(model, DistributedDataParallel):
        model.zero_grad_buffer()
    else:
        opt.zero_grad(set_to_none=True)


def worker(rank: int, world: int, port: int, args) -> None:
    device = init_rank(rank, world, port, args)
    try:
        torch.manual_seed(0)
        base = ResidualMLP(args.layers, args.width).to(device)
        variants = build_variants(args, base, device)
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in variants.items()}
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, args.width, generator=g).to(device)
        # On CUDA kernels run asynchronously: wait for the GPU before reading the clock, both ends.
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        times: dict[str, list[float]] = {k: [] for k in variants}
        per_round: dict[str, list[float]] = {k: [] for k in variants}  # median step time of each round
        names = list(variants)
        for name in names:  # warm-up: allocator, autograd graph, torch DDP bucket rebuild
            for _ in range(2):
                step(variants[name], opts[name], x)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                dist.barrier()
                round_times = []
                for _ in range(args.steps):
                    sync()
                    t0 = time.perf_counter()
                    step(variants[name], opts[name], x)
                    sync()
                    round_times.append(time.perf_counter() - t0)
                times[name] += round_times
                per_round[name].append(statistics.median(round_times))
        if rank == 0:
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            n_params = sum(p.numel() for p in base.parameters())
            result = {
                "benchmark": "ddp_step",
                "world_size": world,
                "backend": args.backend,
                "device": str(device),
                "threads_per_rank": torch.get_num_threads(),
                "params": n_params,
                "grad_mb": round(n_params * 4 / 2**20, 2),
                "batch": args.batch,
                "bucket_mb": args.bucket_mb,
                "steps_per_variant": args.rounds * args.steps,
                "median_step_ms": {k: round(v, 2) for k, v in med.items()},
                "ratio_vs_torch_ddp": {k: round(v / med["torch_ddp"], 3) for k, v in med.items()},
                # Per round, variant median / torch_ddp median of the same round (adjacent in time,
                # so robust to load drift): median, min and max over rounds.
                "paired_round_ratio_vs_torch_ddp": {
                    k: [
                        round(f(a / b for a, b in zip(v, per_round["torch_ddp"])), 3)
                        for f in (statistics.median, min, max)
                    ]
                    for k, v in per_round.items()
                },
            }
            print(json.dumps(result, indent=2))
    finally:
        dist.destroy_process_group()


def train_loop_worker(rank: int, world: int, port: int, args, out_root: str) -> None:
    """``--mode train_loop``: the real ``z2all.training`` step, --ddp_impl=z2all vs torch, interleaved.

    One process group for every ``train()`` call (train() reuses an initialised group and leaves it
    alone). Round r trains a fresh Llama ``tiny`` (same seed, data and TrainConfig but ``ddp_impl``)
    for ``--steps`` optimizer steps with each implementation, in an order that rotates per round.
    Step times are the loop's own timer (tokens / tokens_per_s of each step: forward, backward, grad
    sync, clip, AdamW, stats all-reduce; synchronised on CUDA); the first ``--warmup`` of each run are
    dropped.
    """
    device = init_rank(rank, world, port, args)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    try:
        from z2all.model import Z2allForCausalLM, get_preset
        from z2all.training import train
        from z2all.training.build import Components
        from z2all.training.tasks import PretrainTask

        mcfg = get_preset("tiny")
        # identical on every rank; the sampler splits it
        data = random_windows(mcfg.vocab_size, args.batch * args.accum * args.steps, args.seq)
        impls = ["z2all", "torch"]
        step_s: dict[str, list[float]] = {k: [] for k in impls}
        per_round: dict[str, list[float]] = {k: [] for k in impls}
        for r in range(args.rounds):
            for impl in impls[r % 2 :] + impls[: r % 2]:
                torch.manual_seed(0)
                model = Z2allForCausalLM(mcfg).to(device)
                cfg = in_memory_train_config(
                    os.path.join(out_root, f"round{r}_{impl}"),
                    args,
                    device=args.device,
                    backend=args.backend,
                    ddp_impl=impl,
                )
                dist.barrier()
                history = train(
                    cfg,
                    Components(
                        model=model, make_optimizer=make_bench_adamw, task=PretrainTask(), train_data=data
                    ),
                )
                tokens = [0] + [rec["tokens"] for rec in history.history]
                times = [
                    (t1 - t0) / rec["tokens_per_s"]
                    for t0, t1, rec in zip(tokens, tokens[1:], history.history)
                ][args.warmup :]
                step_s[impl] += times
                per_round[impl].append(statistics.median(times))
        if rank == 0:
            med = {k: statistics.median(v) * 1e3 for k, v in step_s.items()}
            ratios = [a / b for a, b in zip(per_round["z2all"], per_round["torch"])]
            result = {
                "benchmark": "ddp_train_loop_step",
                "world_size": world,
                "backend": args.backend,
                "device": str(device),
                "threads_per_rank": torch.get_num_threads(),
                "model": "tiny",
                "params": sum(p.numel() for p in model.parameters()),
                "micro_batch": args.batch,
                "accum": args.accum,
                "seq": args.seq,
                "timed_steps_per_impl": len(step_s["z2all"]),
                "median_step_ms": {k: round(v, 2) for k, v in med.items()},
                "ratio_z2all_vs_torch": round(med["z2all"] / med["torch"], 3),
                "paired_round_ratio_z2all_vs_torch": [
                    round(f(ratios), 3) for f in (statistics.median, min, max)
                ],
            }
            print(json.dumps(result, indent=2))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--mode",
        choices=("mlp", "train_loop"),
        default="mlp",
        help="mlp: bare steps of a residual MLP, 4 DDP variants; train_loop: z2all.training's step",
    )
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bucket-mb", type=float, default=4.0, help="bucket size for both DDPs (MiB of fp32)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--steps", type=int, default=None, help="steps per variant per round (mlp 4, train_loop 8)"
    )
    g = p.add_argument_group("--mode train_loop (Llama tiny, AdamW, in-memory random tokens)")
    g.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    g.add_argument("--accum", type=int, default=2, help="global micro-batches per step (divisible by world)")
    g.add_argument("--warmup", type=int, default=2, help="steps of each run left out of the timing")
    add_backend_args(p)
    args = p.parse_args()
    resolve_backend(p, args)
    if args.mode == "mlp":
        args.steps = args.steps or 4
        mp.spawn(worker, args=(args.world_size, free_port(), args), nprocs=args.world_size, join=True)
        return
    args.steps = args.steps or 8
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    if args.batch == p.get_default("batch"):
        args.batch = 4  # sequences per micro-batch; the mlp default (64 rows) is far too many here
    with tempfile.TemporaryDirectory() as out_root:
        mp.spawn(
            train_loop_worker,
            args=(args.world_size, free_port(), args, out_root),
            nprocs=args.world_size,
            join=True,
        )


if __name__ == "__main__":
    main()
