"""CUDA stream ordering of the comm hooks: a consumer that waits on a hook's Future sees finished data.

Each test delays the producer (a long ``torch.cuda._sleep`` on a stream of its own) so that a missing
stream wait becomes wrong numbers, not a rare flake. All need a GPU (``@pytest.mark.gpu``); on CPU
they are skipped.
"""

from __future__ import annotations

import math
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

import parallel.ddp_comm_hooks.powerSGD_hook as psgd
import parallel.ddp_comm_hooks.stream_wrapper as sw
from parallel import DistributedDataParallel, DistributedDataParallelConfig
from parallel.ddp_comm_hooks.powerSGD_hook import PowerSGDConfig, PowerSGDState, powerSGD_hook
from parallel.ddp_comm_hooks.stream_wrapper import run_hook_on_side_stream, side_stream
from tests.parallel.test_powersgd import FakeBucket

SLEEP_CYCLES = 200_000_000  # ~0.1 s at H100/H200 clocks (~2 GHz): the race window of every test
PAD = 3


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """TF32 (the training loop turns it on) would make GPU matmuls differ from CPU by ~1e-3."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


def _dev() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _private_stream(avoid: list[torch.cuda.Stream]) -> torch.cuda.Stream:
    """A stream other than those in ``avoid``: ``torch.cuda.Stream()`` hands out pool streams round
    robin, so it could return the side stream itself, and then there would be no race to test."""
    for _ in range(64):
        s = torch.cuda.Stream(device=_dev())
        if all(s.cuda_stream != a.cuda_stream for a in avoid):
            return s
    raise AssertionError("no stream distinct from the hook's streams")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------- 1. stream_wrapper and its inner Future
@pytest.mark.gpu
@pytest.mark.parametrize("explicit_side", [False, True], ids=["shared_side", "high_priority_side"])
def test_side_stream_waits_for_inner_future(explicit_side):
    """``run_hook_on_side_stream`` must make its side stream wait on the inner Future's CUDA events.

    The inner hook doubles the buffer on its own stream s2 after ~0.1 s and completes a CUDA-aware
    Future there. Old code took ``done.value()`` under ``torch.cuda.stream(side)``: value() does not
    synchronise, so the result event recorded on ``side`` preceded s2's ``mul_``, and the consumer's
    ``fut.wait(); buf.clone()`` copied the undoubled buffer. ``done.wait()`` makes ``side`` wait on s2.
    A torch callback runs on a pool stream that does wait on the inner events; the high-priority
    explicit side stream can never be that pool stream, so that case cannot pass by coincidence.
    """
    dev = _dev()
    side = torch.cuda.Stream(device=dev, priority=-1) if explicit_side else side_stream(dev)
    s2 = _private_stream([side, torch.cuda.current_stream(dev)])
    buf = torch.arange(4 * 2**20, dtype=torch.float32, device=dev)  # exact in fp32, doubled too
    want = buf * 2
    # Load every kernel used below now: a lazily loaded CUDA module may synchronise the context,
    # which would wait out the sleep and close the race window.
    torch.cuda._sleep(1000)
    buf[:16].clone().mul_(2)
    torch.cuda.synchronize()

    def inner(state, bucket):
        b = bucket.buffer()
        s2.wait_stream(torch.cuda.current_stream(dev))  # current = the side stream here
        b.record_stream(s2)
        fut: torch.futures.Future = torch.futures.Future(devices=[dev])
        with torch.cuda.stream(s2):
            torch.cuda._sleep(SLEEP_CYCLES)
            b.mul_(2)
            fut.set_result(b)  # records the completion event on s2
        return fut

    fut = run_hook_on_side_stream(inner, None, SimpleNamespace(buffer=lambda: buf), stream=side)
    out = fut.wait().clone()  # on the default stream, as finish_grad_sync consumes
    assert not s2.query(), "s2 finished before the consumer read: raise SLEEP_CYCLES"
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


# ---------------------------------------------------------------- 2. PowerSGD's decompression consumer
class _FakeWork:
    def __init__(self, stream: torch.cuda.Stream | None, fut: torch.futures.Future):
        self.stream, self.fut = stream, fut

    def wait(self) -> bool:  # as NCCL: the caller's current stream waits, the CPU does not
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        return True

    def get_future(self) -> torch.futures.Future:
        return self.fut


class _FakeDist:
    """The ``dist`` PowerSGD sees: 2 identical ranks, so all_reduce(SUM) doubles. ``delayed``: each
    collective runs on a private stream after a long sleep (an asynchronous NCCL all-reduce);
    otherwise at once on the current stream."""

    group = SimpleNamespace(WORLD=None)

    def __init__(self, delayed: bool):
        self.delayed = delayed
        self.streams: list[torch.cuda.Stream] = []

    def get_world_size(self, group=None) -> int:
        return 2

    def all_reduce(self, t: torch.Tensor, group=None, async_op: bool = False) -> _FakeWork:
        assert async_op, "PowerSGD issues every collective asynchronously"
        caller = torch.cuda.current_stream(t.device)
        fut: torch.futures.Future = torch.futures.Future(devices=[t.device])
        if not self.delayed:
            t.mul_(2)
            fut.set_result([t])
            return _FakeWork(None, fut)
        s = _private_stream([caller, side_stream(t.device)])
        self.streams.append(s)
        s.wait_stream(caller)
        t.record_stream(s)
        with torch.cuda.stream(s):
            torch.cuda._sleep(SLEEP_CYCLES)
            t.mul_(2)
            fut.set_result([t])  # CUDA-aware: its event is on s, as NCCL's Future's is on its stream
        return _FakeWork(s, fut)


SHAPES = [(256, 128), (64, 96), (100,), (256, 128)]  # compressed at rank 2 except the 1-D one


@pytest.mark.gpu
@pytest.mark.parametrize("use_side_stream", [True, False], ids=["side_stream", "current_stream"])
def test_powersgd_decompression_waits_for_collectives(monkeypatch, use_side_stream):
    """PowerSGD's decompression must wait on each collective's own CUDA-aware Future.

    Old code decompressed in ``collect_all([unc_fut, q_fut]).then(...)``. collect_all's Future has no
    devices, so its callback made no stream wait for the collectives: with them still running on
    their streams, decompression read the unreduced uncompressed tensors and Q (half the right values
    after ``/ world_size``) and the error feedback was computed from them. Here each fake collective
    has its own stream, so the uncompressed all-reduce is not covered by the P all-reduce's
    ``work.wait()``. The reference is the same hook with collectives that finish at once. The side
    stream is a high-priority one: a callback's low-priority pool stream that happened to be the side
    stream would wait on the collective and let the old code pass by coincidence.
    """
    dev = _dev()
    monkeypatch.setitem(sw._SIDE_STREAMS, dev, torch.cuda.Stream(device=dev, priority=-1))
    cfg = PowerSGDConfig(matrix_approximation_rank=2, start_powerSGD_iter=0, use_side_stream=use_side_stream)
    numel = sum(math.prod(s) for s in SHAPES) + PAD
    delayed, immediate = _FakeDist(delayed=True), _FakeDist(delayed=False)
    states = {"delayed": PowerSGDState(None, cfg), "immediate": PowerSGDState(None, cfg)}
    for it in range(2):  # the second round uses error feedback and warm-started Q
        cpu_flat = torch.zeros(numel)
        cpu_flat[:-PAD] = torch.randn(numel - PAD, generator=torch.Generator().manual_seed(it))
        monkeypatch.setattr(psgd, "dist", immediate)
        want = powerSGD_hook(states["immediate"], FakeBucket(0, True, cpu_flat.to(dev), SHAPES)).wait()
        torch.cuda.synchronize()
        monkeypatch.setattr(psgd, "dist", delayed)
        fut = powerSGD_hook(states["delayed"], FakeBucket(0, True, cpu_flat.to(dev), SHAPES))
        out = fut.wait().clone()  # on the default stream, as finish_grad_sync consumes
        assert not delayed.streams[-1].query(), "the Q all-reduce finished too early: raise SLEEP_CYCLES"
        torch.cuda.synchronize()
        assert _rel(out, want) <= 1e-5, (it, _rel(out, want))
        err, want_err = states["delayed"].error_dict[0], states["immediate"].error_dict[0]
        assert _rel(err, want_err) <= 1e-5, (it, _rel(err, want_err))
        assert _rel(out, cpu_flat.to(dev)) > 1e-3  # rank 2 really approximates: not a copy of the input
    assert len(delayed.streams) == 6  # uncompressed, P and Q per round


# ------------------------------------------------------------------- 3. real NCCL at world size 1
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def _ddp_grads(dev: torch.device, group) -> list[list[torch.Tensor]]:
    """3 SGD steps (1 plain, 2 PowerSGD rank 2 on the side stream) over several overlapped buckets;
    the gradients after each ``finish_grad_sync()``, read on the default stream."""
    model = _mlp().to(dev)
    cfg = DistributedDataParallelConfig(bucket_size=2500, first_bucket_size=600)
    ddp = DistributedDataParallel(cfg, model, process_group=group)
    psgd_cfg = PowerSGDConfig(matrix_approximation_rank=2, start_powerSGD_iter=1, use_side_stream=True)
    ddp.register_comm_hook(PowerSGDState(group, psgd_cfg), powerSGD_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 32, generator=g).to(dev), torch.randn(16, 8, generator=g).to(dev)
        nn.functional.mse_loss(ddp(x), y).backward()
        ddp.finish_grad_sync()
        grads.append([p.grad.detach().cpu().clone() for p in model.parameters()])
        opt.step()
        ddp.zero_grad_buffer()
    assert len(ddp.buckets) > 1
    return grads


@pytest.mark.gpu
@pytest.mark.skipif(not dist.is_nccl_available(), reason="needs NCCL")
def test_ddp_powersgd_side_stream_on_nccl_world_size_1(tmp_path):
    """Smoke test of the real thing: NCCL's CUDA-aware Futures through PowerSGD, the side stream and
    the DDP. At world size 1 the all-reduce changes nothing, so the gradients must equal those of the
    same hook on CPU over gloo (fp32 CPU vs GPU kernels: 1e-4 relative), and be finite."""
    torch.cuda.set_device(0)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=timedelta(seconds=120))
    try:
        gloo = dist.new_group([0], backend="gloo")
        got = _ddp_grads(_dev(), None)  # None: the world group, NCCL
        want = _ddp_grads(torch.device("cpu"), gloo)
        for step, (gs, ws) in enumerate(zip(got, want)):
            for i, (g, w) in enumerate(zip(gs, ws)):
                assert torch.isfinite(g).all(), (step, i)
                assert _rel(g, w) <= 1e-4, (step, i, _rel(g, w))
    finally:
        dist.destroy_process_group()
