"""Layout invariants of ParamAndGradBuffer and the DDP's bucket plan (single process, no spawn)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel import DistributedDataParallel, DistributedDataParallelConfig
from parallel.param_and_grad_buffer import ParamAndGradBuffer


def _params(sizes):
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(*s)) for s in sizes]


SIZES = [(7, 5), (13,), (33, 3), (1,), (64, 2), (5, 5, 5), (200,), (3,)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("bucket_size,first", [(100, 40), (None, None), (1, None), (10_000, 10_000)])
def test_layout_invariants(world, bucket_size, first):
    params = _params(SIZES)
    originals = [p.detach().clone() for p in params]
    buf = ParamAndGradBuffer(params, torch.float32, torch.float32, world, bucket_size, first, 128, 5)
    multiple = math.lcm(world, 128)

    # Views: .data and .main_grad alias the buffers at param_index_map offsets; values preserved.
    for p, orig in zip(params, originals, strict=True):
        lo, hi, _ = buf.param_index_map[p]
        assert p.data.data_ptr() == buf.param_data[lo:hi].data_ptr()
        assert p.main_grad.data_ptr() == buf.grad_data[lo:hi].data_ptr()
        assert p.shape == orig.shape and torch.equal(p.data, orig)
        assert p.main_grad.shape == p.shape

    # Reverse registration order: later-registered params sit at lower offsets.
    starts = [buf.param_index_map[p][0] for p in params]
    assert starts == sorted(starts, reverse=True)

    # Buckets tile the buffer, padded lengths are multiples of lcm(W, 128), global ids from 5.
    pos = 0
    covered = torch.zeros(buf.numel, dtype=torch.bool)
    for i, b in enumerate(buf.buckets):
        assert b.index == 5 + i and b.start == pos and (b.end - b.start) % multiple == 0
        assert b.end - b.start - b.numel_unpadded < multiple  # minimal padding
        pos = b.end
        for p, off in zip(b.params, b.offsets, strict=True):
            lo, hi, bid = buf.param_index_map[p]
            assert bid == i and lo == b.start + off and b.start <= lo and hi <= b.start + b.numel_unpadded
            covered[lo:hi] = True
        # Shards: W equal contiguous slices of the bucket.
        shards = [b.shard_range(r, world) for r in range(world)]
        assert shards[0][0] == b.start and shards[-1][1] == b.end
        assert all(s[1] == t[0] for s, t in zip(shards, shards[1:]))
        assert len({hi - lo for lo, hi in shards}) == 1
    assert pos == buf.numel
    assert int(covered.sum()) == sum(p.numel() for p in params)  # no overlap between params
    # Padding is nobody's view and zero in both buffers.
    assert not buf.param_data[~covered].any() and not buf.grad_data[~covered].any()

    # Bucket caps: each bucket closes on the param that reaches its cap, not earlier.
    for i, b in enumerate(buf.buckets):
        limit = first if (i == 0 and first is not None) else bucket_size
        if limit is None:
            continue
        if i < len(buf.buckets) - 1:
            assert b.numel_unpadded >= limit
        assert b.numel_unpadded - b.params[-1].numel() < limit

    # Gradients written through main_grad land in grad_data.
    for p in params:
        p.main_grad.fill_(1.0)
    assert int(buf.grad_data.sum()) == sum(p.numel() for p in params)


def test_grad_dtype_can_differ_from_param_dtype():
    params = [nn.Parameter(torch.randn(10, dtype=torch.bfloat16))]
    buf = ParamAndGradBuffer(params, torch.bfloat16, torch.float32, 2, None, None, 128, 0)
    assert params[0].dtype == torch.bfloat16 and params[0].main_grad.dtype == torch.float32
    assert buf.param_data.dtype == torch.bfloat16 and buf.grad_data.dtype == torch.float32


@pytest.fixture
def world_of_one():
    """A real gloo process group of size 1 in this process (conftest destroys it afterwards)."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lowp = nn.Linear(8, 8).to(torch.bfloat16)  # registered first: its gradient comes last
        self.a = nn.Linear(512, 512)  # 262_656 params
        self.b = nn.Linear(512, 512)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.c = nn.Linear(512, 512)


def test_ddp_first_bucket_is_small_and_frozen_params_are_left_out(world_of_one):
    model = _Mixed()
    ddp = DistributedDataParallel(DistributedDataParallelConfig(bucket_size=600_000), model)
    # Two buffers in order of first appearance: bf16 then fp32.
    assert [(b.param_dtype, b.grad_dtype) for b in ddp.param_and_grad_buffers] == [
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),
    ]
    assert [b.index for b in ddp.buckets] == list(range(len(ddp.buckets)))
    # Global order = expected readiness across buffers: the bf16 buffer's only bucket holds the
    # first-registered parameters, so it is expected last and comes last, after both fp32 buckets.
    # Bucket 0 (filled first in backward: c.bias, c.weight) closes at ~1 MiB of fp32 (262_144 el).
    first = ddp.buckets[0]
    assert first.params == [model.c.bias, model.c.weight]
    assert 262_144 <= first.numel_unpadded < 262_144 + 512 * 512
    assert ddp.buckets[1].params == [model.b.bias, model.b.weight, model.a.bias, model.a.weight]
    assert ddp.buckets[2].params == [model.lowp.bias, model.lowp.weight]
    # Frozen parameters are in no buffer and keep their own storage.
    in_buffers = {p for b in ddp.buckets for p in b.params}
    assert not any(p in in_buffers for p in model.frozen.parameters())
    assert not hasattr(model.frozen.weight, "main_grad")
    assert len(in_buffers) == sum(1 for p in model.parameters() if p.requires_grad)


def test_first_bucket_cap_goes_to_the_buffer_whose_gradient_comes_first(world_of_one):
    """The last registered parameter is bf16: the small first bucket is the bf16 buffer's."""
    model = _Mixed()
    model.tail = nn.Linear(512, 512).to(torch.bfloat16)
    ddp = DistributedDataParallel(DistributedDataParallelConfig(bucket_size=600_000), model)
    assert ddp.buckets[0].params == [model.tail.bias, model.tail.weight]  # alone: it exceeds the cap
    # The fp32 buffer's first bucket now closes at bucket_size (600_000): c, b, then a crosses it.
    fp32 = [model.c.bias, model.c.weight, model.b.bias, model.b.weight, model.a.bias, model.a.weight]
    assert ddp.buckets[1].params == fp32
    assert ddp.buckets[2].params == [model.lowp.bias, model.lowp.weight]  # bf16 again, expected last
    assert len(ddp.buckets) == 3


def test_config_validation():
    with pytest.raises(ValueError, match="bucket_size"):
        DistributedDataParallelConfig(bucket_size=0)
    with pytest.raises(ValueError, match="first_bucket_size"):
        DistributedDataParallelConfig(first_bucket_size=-1)
    with pytest.raises(TypeError, match="overlap_grad_reduce"):
        DistributedDataParallelConfig(overlap_grad_reduce="yes")
    with pytest.raises(ValueError, match="unknown DistributedDataParallelConfig key.*bucket_sise"):
        DistributedDataParallelConfig.from_dict({"bucket_sise": 10})
    assert DistributedDataParallelConfig.from_dict({"bucket_size": 10}).bucket_size == 10


def test_ddp_without_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedDataParallel(DistributedDataParallelConfig(), nn.Linear(2, 2))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # torch's own caveat
def test_accumulation_with_create_graph_counts_each_micro_step_once(world_of_one):
    """backward(create_graph=True) makes AccumulateGrad return a fresh ``.grad + new``: it must not be
    added on top of what main_grad already holds (it used to double the first micro-step)."""
    torch.manual_seed(0)
    model, ref = nn.Linear(3, 2), nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(DistributedDataParallelConfig(), model)
    xs = [torch.randn(4, 3) for _ in range(3)]
    for i, x in enumerate(xs):
        with ddp.no_sync() if i < len(xs) - 1 else contextlib.nullcontext():
            ddp(x).square().sum().backward(create_graph=True)
        ref(x).square().sum().backward()
    ddp.finish_grad_sync()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6)
