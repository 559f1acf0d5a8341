"""Compression hooks beyond fp32 PowerSGD: half-precision PowerSGD vs torch, fp16/bf16 wrappers around
all-reduce and PowerSGD vs torch's wrappers (through the DDP) and their bytes, and the side-stream
wrapper (transparent on CPU; on CUDA it must wait for and publish via events)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as torch_default
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd

from parallel import DistributedDataParallel, DistributedDataParallelConfig
from parallel.ddp_comm_hooks import default_hooks
from parallel.ddp_comm_hooks.powerSGD_hook import PowerSGDConfig, PowerSGDState, powerSGD_hook
from parallel.ddp_comm_hooks.stream_wrapper import side_stream_hook
from tests.dist_utils import run_distributed
from tests.parallel.test_powersgd import BUCKETS, FakeBucket, local_grads

_KEEP_GROUPS_ALIVE: list = []  # see test_powersgd.py: torch's hook must not destroy its group off-thread


def _powersgd_half_vs_torch(rank: int, world_size: int) -> dict:
    """bf16 and fp16 buckets: Gram-Schmidt at every rank (QR has no half kernels), 4 iterations."""
    ref_group = dist.new_group(list(range(world_size)))
    _KEEP_GROUPS_ALIVE.append(ref_group)
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        opts = dict(matrix_approximation_rank=4, start_powerSGD_iter=2, orthogonalization_epsilon=1e-6)
        mine = PowerSGDState(None, PowerSGDConfig(**opts, use_side_stream=False))
        ref = torch_psgd.PowerSGDState(ref_group, **opts)
        worst = 0.0
        for it in range(4):
            for b, shapes in enumerate(BUCKETS):
                last = b == len(BUCKETS) - 1
                mb = FakeBucket(b, last, local_grads(rank, it, b, shapes, dtype), shapes)
                rb = FakeBucket(b, last, local_grads(rank, it, b, shapes, dtype), shapes)
                got = powerSGD_hook(mine, mb).wait()
                want = torch_psgd.powerSGD_hook(ref, rb).wait()
                assert got.dtype == dtype and torch.isfinite(got).all()
                worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
        out[str(dtype)] = worst
    return out


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 40), nn.Tanh(), nn.Linear(40, 3))


def _grads_and_bytes(rank: int, hook=None, state=None) -> tuple[list[torch.Tensor], int]:
    model = _mlp()
    ddp = DistributedDataParallel(
        DistributedDataParallelConfig(bucket_size=200, first_bucket_size=100), model
    )
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    g = torch.Generator().manual_seed(rank)
    nn.functional.mse_loss(ddp(torch.randn(5, 10, generator=g)), torch.randn(5, 3, generator=g)).backward()
    ddp.finish_grad_sync()
    return [p.grad.clone() for p in model.parameters()], ddp.comm_bytes


def _wrappers(rank: int, world_size: int) -> dict:
    plain, plain_bytes = _grads_and_bytes(rank)
    out = {"plain_bytes": plain_bytes}
    # The side-stream wrapper on CPU: same numbers, same bytes, via the DDP.
    wrapped, wrapped_bytes = _grads_and_bytes(rank, side_stream_hook(default_hooks.allreduce_hook), None)
    out["side_stream"] = (max((a - b).abs().max().item() for a, b in zip(plain, wrapped)), wrapped_bytes)
    # fp16/bf16 compression wrappers around all-reduce: grads vs torch's wrapper, bytes must halve.
    for name in ("fp16", "bf16"):
        ours = getattr(default_hooks, f"{name}_compress_wrapper")
        theirs = getattr(torch_default, f"{name}_compress_wrapper")
        got, got_bytes = _grads_and_bytes(rank, ours(default_hooks.allreduce_hook), None)
        want, _ = _grads_and_bytes(rank, theirs(torch_default.allreduce_hook), None)
        hook_got, _ = _grads_and_bytes(rank, getattr(default_hooks, f"{name}_compress_hook"), None)
        out[name] = (
            max((a - b).abs().max().item() for a, b in zip(got, want)),
            got_bytes,
            max((a - b).abs().max().item() for a, b in zip(got, hook_got)),
            all(g.dtype == torch.float32 for g in got),
        )
    return out


def _torch_hook_one_at_a_time(state, bucket) -> torch.futures.Future:
    """torch's PowerSGD hook, waited for at once (see test_powersgd_ddp.py: it issues collectives from
    callbacks on gloo threads; one bucket in flight is safe)."""
    value = torch_psgd.powerSGD_hook(state, bucket).wait()
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


def _powersgd_wrapped(rank: int, world_size: int) -> dict:
    """fp16/bf16 wrapper around PowerSGD through the DDP (3 buckets, overlap), 6 SGD steps (2 plain,
    4 compressed, rank 2) vs torch's wrapper around torch's hook; plus our fp32 PowerSGD's bytes."""
    ref_group = dist.new_group(list(range(world_size)))
    _KEEP_GROUPS_ALIVE.append(ref_group)
    opts = dict(matrix_approximation_rank=2, start_powerSGD_iter=2)  # torch requires > 1
    cfg = DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=1000, first_bucket_size=300)

    def train(hook, state) -> tuple[list[torch.Tensor], list[int], int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 6))
        ddp = DistributedDataParallel(cfg, model)
        ddp.register_comm_hook(state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sent = []
        for step in range(6):
            g = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(8, 24, generator=g), torch.randn(8, 6, generator=g)
            ddp.reset_comm_stats()
            nn.functional.mse_loss(ddp(x), y).backward()
            ddp.finish_grad_sync()
            assert all(p.grad.dtype == torch.float32 for p in model.parameters())
            opt.step()
            ddp.zero_grad_buffer()
            sent.append(ddp.comm_bytes)
        return [p.detach().clone() for p in model.parameters()], sent, len(ddp.buckets)

    _, fp32_sent, _ = train(powerSGD_hook, PowerSGDState(None, PowerSGDConfig(**opts)))
    out = {"fp32_sent": fp32_sent}
    for name in ("fp16", "bf16"):
        ours = getattr(default_hooks, f"{name}_compress_wrapper")(powerSGD_hook)
        theirs = getattr(torch_default, f"{name}_compress_wrapper")(_torch_hook_one_at_a_time)
        got, sent, n_buckets = train(ours, PowerSGDState(None, PowerSGDConfig(**opts)))
        want, _, _ = train(theirs, torch_psgd.PowerSGDState(ref_group, **opts))
        rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
        out[name] = {"rel": rel, "sent": sent, "n_buckets": n_buckets}
    return out


def _all_cases(rank: int, world_size: int) -> dict:
    return {
        "half": _powersgd_half_vs_torch(rank, world_size),
        "wrappers": _wrappers(rank, world_size),
        "powersgd_wrapped": _powersgd_wrapped(rank, world_size),
    }


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_all_cases, 2)


def test_half_precision_powersgd_matches_torch(results):
    """Measured: 0.0 (bit-for-bit) for bf16 and fp16; asserted <= 1e-6 relative."""
    for r in results:
        for dtype, rel in r["half"].items():
            assert rel <= 1e-6, (dtype, rel)


def test_side_stream_wrapper_is_transparent_on_cpu(results):
    for r in results:
        diff, sent = r["wrappers"]["side_stream"]
        assert diff == 0.0 and sent == r["wrappers"]["plain_bytes"], r["wrappers"]


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_compression_wrappers_match_torch_and_halve_bytes(results, name):
    """Wrapper around all-reduce, through the DDP. Measured: 0.0 vs torch's wrapper and vs our
    {name}_compress_hook (same arithmetic: cast, pre-divide, sum in half, cast back); asserted exact."""
    for r in results:
        diff, sent, diff_to_hook, fp32 = r["wrappers"][name]
        assert diff == 0.0 and diff_to_hook == 0.0 and fp32, r["wrappers"]
        assert sent * 2 == r["wrappers"]["plain_bytes"], r["wrappers"]


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_compression_wrapper_around_powersgd_matches_torch(results, name):
    """6 SGD steps through the DDP. Measured: relative parameter difference 0.0; asserted <= 1e-6.
    Bytes per step are exactly half of fp32 PowerSGD's, in the plain and in the compressed phase."""
    for res in results:
        r, fp32_sent = res["powersgd_wrapped"][name], res["powersgd_wrapped"]["fp32_sent"]
        assert r["n_buckets"] >= 3, r
        assert r["rel"] <= 1e-6, r
        assert [2 * b for b in r["sent"]] == fp32_sent, (r["sent"], fp32_sent)
        assert r["sent"][-1] < r["sent"][0] / 2, r["sent"]  # compression is on from step 2


def _cuda_side_stream(rank: int, world_size: int) -> dict:
    """A gradient written by a long kernel on the current stream, reduced on the side stream."""
    dev = torch.device("cuda", 0)
    shapes = BUCKETS[0]
    cpu_flat = local_grads(rank, 3, 0, shapes)
    cfg = PowerSGDConfig(matrix_approximation_rank=2, start_powerSGD_iter=0, use_error_feedback=False)

    cpu_state = PowerSGDState(None, dataclasses.replace(cfg, use_side_stream=False))
    want = powerSGD_hook(cpu_state, FakeBucket(0, True, cpu_flat.clone(), shapes)).wait()

    gpu_flat = torch.zeros_like(cpu_flat, device=dev)
    torch.cuda._sleep(50_000_000)  # keep the current stream busy, so an unsynchronised read sees zeros
    gpu_flat.copy_(cpu_flat.to(dev, non_blocking=True))
    fut = powerSGD_hook(PowerSGDState(None, cfg), FakeBucket(0, True, gpu_flat, shapes))
    got = fut.wait()  # makes the current stream wait on the side stream's completion event
    return {"rel": ((got.cpu() - want).abs().max() / want.abs().max()).item()}


@pytest.mark.gpu
def test_powersgd_on_side_stream_matches_cpu():
    r = run_distributed(_cuda_side_stream, 1)[0]
    assert r["rel"] <= 1e-5, r  # CUDA and CPU matmul kernels round differently
