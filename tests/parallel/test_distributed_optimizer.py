"""ZeRO-1 (parallel.distributed_optimizer) against one process with torch.optim.AdamW.

Reference: the same model on ONE process, the whole global batch, ``clip_grad_norm_`` and
``torch.optim.AdamW`` (foreach), in fp32. ZeRO-1 on W = 2 and 4 gloo ranks, each rank its slice of
the global batch, must give the same losses and weights over 20 steps within 1e-5 relative (the
reduce-scatter sums W partial gradients in another order; nothing else differs), with and without
overlap_grad_reduce + overlap_param_gather, with small buckets (parameters straddling shards).
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from optimizer import DynamicGradScaler, OptimizerConfig
from parallel import DistributedDataParallel, DistributedDataParallelConfig
from parallel.distributed_optimizer import DistributedOptimizer, owned_slices
from tests.dist_utils import run_distributed

STEPS, BATCH, DIM = 20, 8, 24
CFG = OptimizerConfig(lr=3e-3, weight_decay=0.1, grad_clip=0.5, backend="foreach")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(DIM, 40)
        self.norm = nn.LayerNorm(40)
        self.hidden = nn.Linear(40, 40)
        self.out = nn.Linear(40, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.tanh(self.norm(self.inp(x))))))


def _data(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, DIM, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return MLP().to(dtype)


def _reference(steps=STEPS):
    model = _model()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": CFG.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=CFG.lr, betas=(CFG.beta1, CFG.beta2), eps=CFG.eps, foreach=True)
    losses = []
    for step in range(steps):
        x, y = _data(step)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CFG.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _zero1(rank, world, overlap, bucket_size, dtype=torch.float32, grads_fp32=True, steps=STEPS):
    model = _model(dtype)
    ddp_cfg = DistributedDataParallelConfig(
        use_distributed_optimizer=True,
        overlap_grad_reduce=overlap,
        bucket_size=bucket_size,
        first_bucket_size=None,
        grad_reduce_in_fp32=grads_fp32,
    )
    ddp = DistributedDataParallel(ddp_cfg, model)
    opt = DistributedOptimizer(ddp, CFG, overlap_param_gather=overlap)
    losses = []
    per = BATCH // world
    for step in range(steps):
        x, y = _data(step)
        x, y = x[rank * per : (rank + 1) * per].to(dtype), y[rank * per : (rank + 1) * per]
        loss = F.cross_entropy(ddp(x).float(), y)
        loss.backward()
        ddp.finish_grad_sync()
        stepped, norm, _ = opt.step()
        assert stepped
        opt.zero_grad()
        ddp.zero_grad_buffer()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / world)
    opt.finish_param_sync()
    n = sum(p.numel() for p in model.parameters())
    return {
        "losses": losses,
        "weights": {k: v.detach().float().clone() for k, v in model.state_dict().items()},
        "state_per_param": opt.shard_bytes()["optimizer_state"] / n,
        "main_per_param": opt.shard_bytes()["main_params"] / n,
        "owned": sum(s.numel for s in opt.slices),
        "n": n,
    }


def _run_variants(rank, world):
    return {
        (overlap, size): _zero1(rank, world, overlap, size)
        for overlap in (False, True)
        for size in (None, 500)
    }


def _check_against_reference(results, world):
    ref_losses, ref_weights = _reference()
    for key in results[0]:
        for r in range(world):
            got = results[r][key]
            torch.testing.assert_close(
                torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0, msg=str(key)
            )
            for name, w in ref_weights.items():
                torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
        # every element owned exactly once; AdamW state = 8 bytes x owned elements (+ step counts)
        n = results[0][key]["n"]
        assert sum(results[r][key]["owned"] for r in range(world)) == n
        # over the ranks the moments are 8 bytes per parameter exactly (+ 4-byte step counts per slice);
        # each rank holds its 1/W within the padding of its shards
        states = [results[r][key]["state_per_param"] for r in range(world)]
        assert 8.0 <= sum(states) <= 8.0 + 0.05, (key, states)
        for r in range(world):
            assert abs(states[r] - 8 / world) <= 0.25 * 8 / world, (key, states)
            assert results[r][key]["main_per_param"] == 0.0  # fp32 weights are their own main params


def test_zero1_two_ranks_equals_one_process_adamw():
    _check_against_reference(run_distributed(_run_variants, 2), 2)


def test_zero1_four_ranks_equals_one_process_adamw():
    _check_against_reference(run_distributed(_run_variants, 4), 4)


def _bf16(rank, world):
    return _zero1(rank, world, True, 500, dtype=torch.bfloat16)


def test_zero1_bf16_weights_hold_fp32_main_shards_and_track_fp32():
    """bf16 weights: 4/W bytes of fp32 main params and 8/W of moments per parameter on each rank; the
    trajectory follows fp32 to bf16's rounding of the forward (measured: 4.5e-4 relative at most)."""
    res = run_distributed(_bf16, 2)
    ref_losses, _ = _reference()
    assert sum(r["main_per_param"] for r in res) == 4.0  # every element's fp32 copy, once
    assert 8.0 <= sum(r["state_per_param"] for r in res) <= 8.05
    for r in res:
        assert abs(r["main_per_param"] - 2.0) < 0.25 and abs(r["state_per_param"] - 4.0) < 0.5
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses), rtol=2e-3, atol=0)
    assert res[0]["weights"].keys() == res[1]["weights"].keys()
    assert all(torch.equal(res[0]["weights"][k], res[1]["weights"][k]) for k in res[0]["weights"])


def _fp16_inf_on_one_rank(rank, world):
    model = _model(torch.float16)
    ddp = DistributedDataParallel(
        DistributedDataParallelConfig(
            use_distributed_optimizer=True, bucket_size=500, first_bucket_size=None
        ),
        model,
    )
    cfg = OptimizerConfig(lr=1e-3, backend="foreach", initial_loss_scale=2.0**8, hysteresis=1)
    opt = DistributedOptimizer(ddp, cfg, grad_scaler=DynamicGradScaler.from_config(cfg))
    out = []
    for step in range(3):
        x, y = _data(step)
        loss = F.cross_entropy(ddp(x[rank * 4 : rank * 4 + 4].half()).float(), y[rank * 4 : rank * 4 + 4])
        if step == 1 and rank == 1:
            loss = loss * float("inf")
        opt.scale_loss(loss).backward()
        ddp.finish_grad_sync(allow_nonfinite=True)
        before = [m.detach().clone() for m in opt.main_params] + [
            p.detach().clone() for p in model.parameters()
        ]
        stepped, _, _ = opt.step()
        after = [m.detach().clone() for m in opt.main_params] + [
            p.detach().clone() for p in model.parameters()
        ]
        out.append(
            (stepped, float(opt.get_loss_scale()), all(torch.equal(a, b) for a, b in zip(before, after)))
        )
        opt.zero_grad()
        ddp.zero_grad_buffer()
    return out


def test_fp16_overflow_on_one_rank_skips_every_rank_and_leaves_shards_unchanged():
    for r in run_distributed(_fp16_inf_on_one_rank, 2):
        assert [s for s, _, _ in r] == [True, False, True]
        assert [sc for _, sc, _ in r] == [256.0, 128.0, 128.0]
        assert [same for _, _, same in r] == [False, True, False]  # bit-unchanged on the skipped step


def _slices(rank, world):
    model = _model()
    ddp = DistributedDataParallel(
        DistributedDataParallelConfig(
            use_distributed_optimizer=True, bucket_size=300, first_bucket_size=None
        ),
        model,
    )
    names = {p: n for n, p in model.named_parameters()}
    return [
        [(names[s.param], s.start, s.end) for s in owned_slices(ddp.param_and_grad_buffers, r, world)]
        for r in range(world)
    ]


def test_owned_slices_partition_every_parameter_and_agree_across_ranks():
    maps = run_distributed(_slices, 3)
    assert maps[0] == maps[1] == maps[2]  # a pure function of the layout: every rank sees every map
    sizes = {n: p.numel() for n, p in _model().named_parameters()}
    covered = {n: [] for n in sizes}
    for rank_map in maps[0]:
        for name, s, e in rank_map:
            covered[name].append((s, e))
    for name, ranges in covered.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == sizes[name], name
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (name, ranges)  # disjoint, contiguous
    assert any(len(r) > 1 for r in covered.values())  # small buckets: some parameter straddles shards


def test_rectangles_cover_a_flat_range_exactly():
    """Every flat range of 1-, 2- and 3-D shapes as rectangles: in order, disjoint, covering it, each
    rectangle's elements exactly its flat span (what a sharded checkpoint chunk must be)."""
    from parallel.distributed_optimizer.sharded_state import rectangles

    for shape in [(7,), (6, 5), (3, 4, 5), (1, 9), (4, 1)]:
        n = math.prod(shape)
        index = torch.arange(n).view(shape)
        for start in range(n):
            for end in range(start + 1, n + 1):
                rects = rectangles(start, end, shape)
                assert len(rects) <= 2 * len(shape) - 1, (shape, start, end, rects)
                flat = []
                for off, size, lo, hi in rects:
                    block = index[tuple(slice(o, o + s) for o, s in zip(off, size))]
                    assert block.flatten().tolist() == list(range(lo, hi)), (shape, start, end, off, size)
                    flat += block.flatten().tolist()
                assert flat == list(range(start, end)), (shape, start, end)


class _LazyGather:
    """An all-gather that happens only when waited for: what a collective still in flight looks like
    to a forward that reads the weights too early (it would see the previous step's values)."""

    def __init__(self, out, inp, group):
        self.args = (out, inp.clone(), group)

    def wait(self):
        out, inp, group = self.args
        torch.distributed.all_gather_single(out, inp, group=group)
        return True


def _llama_overlap(rank, world, overlap, lazy):
    """The real Llama, whose fused kernels read lm_head's and the MLPs' weights without calling those
    modules; a vocabulary large enough that lm_head is a bucket of its own."""
    import parallel.distributed_optimizer.param_gather as pg
    from tests.model.helpers import tiny_config
    from z2all.model import Z2allForCausalLM

    if lazy:
        pg.dist = types.SimpleNamespace(
            all_gather_single=lambda out, inp, group=None, async_op=False: _LazyGather(out, inp, group)
        )
    torch.manual_seed(0)
    model = Z2allForCausalLM(tiny_config(vocab_size=8192))
    ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=True, bucket_size=40_000)
    ddp = DistributedDataParallel(ddp_cfg, model)
    opt = DistributedOptimizer(ddp, CFG, overlap_param_gather=overlap, prefetch_depth=1)
    g = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(4):
        ids = torch.randint(0, 8192, (2 * world, 17), generator=g)[rank * 2 : rank * 2 + 2]
        loss = ddp(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        ddp.finish_grad_sync()
        opt.step()
        opt.zero_grad()
        ddp.zero_grad_buffer()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item())
    return {"losses": losses, "buckets": len(ddp.buckets)}


def _llama_variants(rank, world):
    return {lazy: _llama_overlap(rank, world, True, lazy) for lazy in (False, True)} | {
        "plain": _llama_overlap(rank, world, False, False)
    }


def test_overlapped_gather_waits_for_weights_read_by_fused_kernels():
    """With every all-gather completing only when waited for, the overlapped forward must still
    produce the unoverlapped losses exactly: each weight is waited for before its first read, also
    those no module call reads (the loss kernel's lm_head, the SwiGLU kernel's projections)."""
    res = run_distributed(_llama_variants, 2)[0]
    assert res["plain"]["buckets"] > 3
    assert res[False]["losses"] == res["plain"]["losses"]
    assert res[True]["losses"] == res["plain"]["losses"]


def _owns_nothing(rank, world):
    torch.manual_seed(0)
    model = nn.Linear(1, 1)  # two 1-element buckets, each padded to 128: rank 1 owns no element at all
    ddp_cfg = DistributedDataParallelConfig(
        use_distributed_optimizer=True, bucket_size=1, first_bucket_size=None
    )
    ddp = DistributedDataParallel(ddp_cfg, model.half())
    cfg = OptimizerConfig(lr=1e-2, backend="foreach", grad_clip=1.0, initial_loss_scale=128.0)
    opt = DistributedOptimizer(ddp, cfg, grad_scaler=DynamicGradScaler.from_config(cfg))
    owned = sum(s.numel for s in opt.slices)
    for step in range(3):
        loss = ddp(torch.full((2, 1), float(step + 1)).half()).float().pow(2).mean()
        opt.scale_loss(loss).backward()
        ddp.finish_grad_sync(allow_nonfinite=True)
        stepped, norm, _ = opt.step()
        opt.zero_grad()
        ddp.zero_grad_buffer()
    return {"owned": owned, "stepped": stepped, "norm": norm, "w": model.weight.detach().float().clone()}


def test_a_rank_owning_no_element_takes_part_in_every_collective():
    """fp16 + clipping on a rank with no shard: its overflow flag and squared norm are zeros on the
    right device, the step agrees on every rank and the weights stay identical."""
    a, b = run_distributed(_owns_nothing, 2)
    assert (a["owned"], b["owned"]) == (2, 0)
    assert a["stepped"] and b["stepped"] and a["norm"] == b["norm"] > 0
    assert torch.equal(a["w"], b["w"])
