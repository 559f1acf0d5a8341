"""Pieces the benchmark scripts share: spawned process groups on one host, the residual-MLP model of
the DDP benchmarks, and the in-memory Llama training run of the train-loop benchmarks.

Not a benchmark itself. The scripts import it as ``_common``: ``python benchmarks/bench_x.py`` puts
``benchmarks/`` on ``sys.path`` (and spawned ranks inherit that path).
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
from torch import nn


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: rank r on cuda:r")
    p.add_argument(
        "--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: nccl on cuda, else gloo"
    )


def resolve_backend(p: argparse.ArgumentParser, args) -> None:
    """Check --device/--backend/--world-size against this machine; sets args.backend to gloo or nccl."""
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device")
        if torch.cuda.device_count() < args.world_size:
            p.error(
                f"--device cuda needs one GPU per rank: --world-size {args.world_size} > "
                f"{torch.cuda.device_count()} visible GPUs"
            )
    if args.backend == "auto":
        args.backend = "nccl" if args.device == "cuda" else "gloo"
    if args.backend == "nccl" and args.device != "cuda":
        p.error("--backend nccl needs --device cuda")


def init_rank(rank: int, world: int, port: int, args) -> torch.device:
    """Join the process group as ``rank`` (spawned on one host: local rank == rank); return its device."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if args.backend == "nccl" else {}
    dist.init_process_group(args.backend, rank=rank, world_size=world, **kwargs)
    return device


class ResidualMLP(nn.Module):
    """``layers`` pre-norm blocks x + W2 gelu(W1 norm(x)); 2*width^2*2 weights per block."""

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


def random_windows(vocab_size: int, n: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (input (seq,), target (seq,)) pairs of uniform random tokens, seed 0 (same on every rank)."""
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, vocab_size, (n, seq + 1), generator=g)  # (n, seq + 1)
    return [(w[:-1], w[1:]) for w in windows]


def bench_adamw(model: nn.Module) -> torch.optim.AdamW:
    return make_bench_adamw(list(model.named_parameters()))


def make_bench_adamw(named_params) -> torch.optim.AdamW:
    """The benchmarks' AdamW over ``[(name, param)]``: a ``Components.make_optimizer``."""
    return torch.optim.AdamW([p for _, p in named_params], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def in_memory_train_config(out_dir: str, args, **overrides):
    """The ``TrainConfig`` of a benchmark run over :func:`random_windows`: ``args.steps`` optimizer
    steps of ``args.accum`` micro-batches of ``args.batch`` x ``args.seq`` tokens; no eval, no
    periodic checkpoint, no console lines. ``overrides`` set further fields."""
    from z2all.training.config import TrainConfig  # imported on use: the MLP benchmarks skip it

    return TrainConfig(
        data_dir="in-memory",
        out_dir=out_dir,
        max_iters=args.steps,
        warmup_iters=1,
        learning_rate=1e-3,
        min_lr=1e-4,
        train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        max_seq_len=args.seq,
        eval_interval=0,
        log_interval=10**6,
        save_interval=0,
        **overrides,
    )
