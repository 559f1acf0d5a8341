"""Gradient bytes each rank hands to collectives per step: all-reduce vs fp16/bf16 vs PowerSGD rank 1/2/4/8.

Part 1 (measured): the Llama ``tiny`` preset trained through ``parallel.DistributedDataParallel`` on
``--world-size`` gloo CPU ranks; ``ddp.comm_bytes`` of one synchronised step for each hook, and its
ratio to plain all-reduce in the same run. fp16/bf16 are ``fp16_compress_wrapper(allreduce_hook)`` /
``bf16_compress_wrapper(allreduce_hook)``, and ``fp16_powersgd_rank4`` wraps PowerSGD rank 4 (P, Q and
the uncompressed tensors travel in fp16).

Part 2 (from shapes, with the hook's own compress/skip rule): the compression ratio of one
7B-shaped Llama layer (hidden 4096, intermediate 11008, 32 heads, no GQA), 2-D weights alone and
the whole layer with its two norms. The goal is >= 100x at rank 4.

    python benchmarks/bench_comm_bytes.py                  # 2 ranks, tiny preset; ~1 min on 2 CPU cores
    python benchmarks/bench_comm_bytes.py --world-size=4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.ddp_comm_hooks.powerSGD_hook import PowerSGDConfig, _make_plan

RANKS = (1, 2, 4, 8)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hooks() -> dict:
    """name -> (state factory, hook) for every hook measured through the DDP (None: no hook)."""
    from parallel.ddp_comm_hooks import default_hooks
    from parallel.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

    hooks: dict = {
        "allreduce": None,
        "fp16": (
            default_hooks.DefaultHookState,
            default_hooks.fp16_compress_wrapper(default_hooks.allreduce_hook),
        ),
        "bf16": (
            default_hooks.DefaultHookState,
            default_hooks.bf16_compress_wrapper(default_hooks.allreduce_hook),
        ),
    }
    for r in RANKS:
        cfg = PowerSGDConfig(matrix_approximation_rank=r, start_powerSGD_iter=1)
        hooks[f"powersgd_rank{r}"] = (lambda cfg=cfg: PowerSGDState(None, cfg), powerSGD_hook)
    cfg4 = PowerSGDConfig(matrix_approximation_rank=4, start_powerSGD_iter=1)
    hooks["fp16_powersgd_rank4"] = (
        lambda: PowerSGDState(None, cfg4),
        default_hooks.fp16_compress_wrapper(powerSGD_hook),
    )
    return hooks


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from parallel import DistributedDataParallel, DistributedDataParallelConfig
        from z2all.model import Z2allForCausalLM, get_preset

        result = {}
        for name, spec in _hooks().items():
            torch.manual_seed(0)
            model = Z2allForCausalLM(get_preset("tiny"))
            ddp = DistributedDataParallel(DistributedDataParallelConfig(), model)
            if spec is not None:
                make_state, hook = spec
                ddp.register_comm_hook(make_state(), hook)
            g = torch.Generator().manual_seed(rank)
            for _ in range(2):  # step 0 is plain all-reduce for PowerSGD (start_powerSGD_iter=1)
                ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=g)
                ddp.reset_comm_stats()
                ddp(ids, labels=ids).loss.backward()
                ddp.finish_grad_sync()
                ddp.zero_grad_buffer()
            result[name] = {"bytes_per_step": ddp.comm_bytes, "buckets": len(ddp.buckets)}
        result["_numel"] = sum(p.numel() for p in model.parameters())
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _shape_ratio(shapes: list[tuple[int, ...]], rank: int) -> dict:
    grads = [torch.empty(s, device="meta") for s in shapes]
    plan = _make_plan(grads, PowerSGDConfig(matrix_approximation_rank=rank))
    return {
        "elements": plan.numel_before,
        "elements_sent": plan.numel_after,
        "ratio": round(plan.numel_before / plan.numel_after, 1),
    }


def llama_layer_shapes(hidden: int, inter: int, heads: int, kv_heads: int) -> tuple[list, list]:
    """(2-D weights, 1-D norms) of one Llama decoder layer."""
    kv = hidden // heads * kv_heads
    mats = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]  # q, k, v, o
    mats += [(inter, hidden), (inter, hidden), (hidden, inter)]  # gate, up, down
    return mats, [(hidden,), (hidden,)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(args.world_size, _free_port(), out_dir), nprocs=args.world_size, join=True)
        measured = torch.load(Path(out_dir) / "rank0.pt", weights_only=True)

    numel = measured.pop("_numel")
    base = measured["allreduce"]["bytes_per_step"]
    tiny = {}
    for name, m in measured.items():
        tiny[name] = {**m, "ratio_to_allreduce": round(m["bytes_per_step"] / base, 4), "source": "ddp"}

    mats, norms = llama_layer_shapes(4096, 11008, 32, 32)
    layer_7b = {
        f"rank{r}": {"weights_2d": _shape_ratio(mats, r), "whole_layer": _shape_ratio(mats + norms, r)}
        for r in RANKS
    }
    print(
        json.dumps(
            {
                "tiny": {"world_size": args.world_size, "params": numel, "bytes_per_step": tiny},
                "llama7b_layer_compression": layer_7b,
                "goal_rank4_weights_ratio_ge_100x": layer_7b["rank4"]["weights_2d"]["ratio"] >= 100,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
