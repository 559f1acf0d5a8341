"""Custom DDP behaviour beyond plain equivalence: fp32 grad reduction of bf16 params, NaN reports,
reduce-scatter shards, overlap during backward, broadcast, state_dict, comm bytes, misuse errors."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel import DistributedDataParallel, DistributedDataParallelConfig
from tests.dist_utils import run_distributed
from tests.parallel.test_ddp import SMALL_BUCKETS, TinyNet, batches, run_scenarios, scenario


def _step(model, x, y, scale=1.0):
    nn.functional.mse_loss(model(x), y).mul(scale).backward()


def _raises(fn, *args) -> str:
    try:
        fn(*args)
    except RuntimeError as e:
        return str(e)
    return "<no error>"


# ------------------------------------------------------------------------------------------------
def _wrapper_behaviour(rank, world_size):
    out = {}
    # Broadcast at construction: ranks start from different weights and buffers.
    torch.manual_seed(rank)
    model = TinyNet(unused=True)
    model.scale.fill_(1.0 + rank)
    ddp = DistributedDataParallel(DistributedDataParallelConfig(**SMALL_BUCKETS), model)
    out["params"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    out["scale"] = model.scale.clone()

    # state_dict: no "module." prefix; load keeps params as views into the buffer.
    sd = ddp.state_dict()
    out["sd_keys_ok"] = sorted(sd) == sorted(model.state_dict())
    ptrs = [p.data_ptr() for p in model.parameters()]
    ddp.load_state_dict({k: v.clone() * 0 + 0.5 for k, v in sd.items()})
    out["views_kept"] = ptrs == [p.data_ptr() for p in model.parameters()]
    out["loaded"] = bool((model.embed.weight == 0.5).all())
    ddp.load_state_dict(sd)

    # Overlap from the first iteration: after backward, before finish_grad_sync, every bucket up to
    # (excluding) the one holding the unused layer has been launched; the rest wait for finish.
    x, y = batches(rank, 1, 1)[0][0]
    ddp.reset_comm_stats()
    calls = []
    all_reduce = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: (calls.append(1), all_reduce(*a, **k))[1]
    try:
        _step(ddp, x, y)
        unused_bucket = ddp._param_to_bucket[model.unused.weight].index
        out["launched_in_backward"] = ddp._next_bucket
        out["unused_bucket"] = unused_bucket
        out["n_buckets"] = len(ddp.buckets)
        ddp.finish_grad_sync()
    finally:
        torch.distributed.all_reduce = all_reduce
    # The used-parameter flags ride in the last bucket's all-reduce: one collective per bucket, no more.
    out["all_reduce_calls"] = len(calls)
    out["comm_bytes"] = ddp.comm_bytes
    out["expected_bytes"] = sum((b.end - b.start) * 4 for b in ddp.buckets)
    unused = {id(p) for p in model.unused.parameters()}
    out["grad_is_view"] = all(
        p.grad.data_ptr() == p.main_grad.data_ptr() for p in model.parameters() if id(p) not in unused
    )
    # Unused on every rank: .grad None (as torch DDP with find_unused_parameters), main_grad zero.
    out["unused_grad_none"] = all(p.grad is None for p in model.unused.parameters())
    out["unused_listed"] = {id(p) for p in ddp.unused_params} == unused
    out["unused_main_grad_zero"] = bool((model.unused.weight.main_grad == 0).all())

    # Misuse: backward again without zero_grad_buffer(); hook registration after a backward.
    out["no_zero_error"] = _raises(_step, ddp, x, y)
    out["late_hook_error"] = _raises(ddp.register_comm_hook, None, lambda s, b: None)
    ddp.zero_grad_buffer()
    # .grad is None (as after torch's optimizer.zero_grad()); the buffer is not memset: the next
    # backward overwrites each main_grad with its first gradient, then .grad is the view again.
    out["grads_cleared"] = all(p.grad is None for p in model.parameters())
    _step(ddp, x, y)
    out["grad_views_again"] = all(
        p.grad is not None and p.grad.data_ptr() == p.main_grad.data_ptr()
        for n, p in model.named_parameters()
        if not n.startswith("unused")
    )
    ddp.finish_grad_sync()
    # The unused layer's slot held last iteration's (zero) gradient; padding was never written.
    out["buffer_zero"] = bool((model.unused.weight.main_grad == 0).all()) and all(
        bool((b.grad_data[b.numel_unpadded :] == 0).all()) for b in ddp.buckets
    )
    ddp.zero_grad_buffer()
    ddp.reset_comm_stats()
    out["comm_bytes_reset"] = ddp.comm_bytes
    # A second backward outside no_sync() in one iteration is an error, not silent double counting.
    _step(ddp, x, y)
    out["double_backward_error"] = _raises(_step, ddp, x, y)
    return out


@pytest.fixture(scope="module")
def results():
    names = [
        "_wrapper_behaviour",
        "_bf16_fp32_reduce",
        "_nan_report",
        "_nan_check_with_loss_scaler",
        "_nan_check_sharded",
        "_reduce_scatter_shards",
        "_llama_tiny",
    ]
    return run_distributed(run_scenarios, 2, __name__, names)


def test_wrapper_broadcast_state_dict_overlap_comm_bytes_and_misuse(results):
    r0, r1 = scenario(results, "_wrapper_behaviour")
    assert torch.equal(r0["params"], r1["params"]), "parameters not broadcast from rank 0"
    assert torch.equal(r0["scale"], r1["scale"]) and r1["scale"].item() == 1.0, "buffers not broadcast"
    for r in (r0, r1):
        assert r["sd_keys_ok"] and r["views_kept"] and r["loaded"]
        assert r["n_buckets"] >= 4
        assert 0 < r["unused_bucket"] < r["n_buckets"] - 1, "test model must put the unused layer mid-way"
        assert r["launched_in_backward"] == r["unused_bucket"], "buckets before the unused one must overlap"
        assert r["comm_bytes"] == r["expected_bytes"]
        assert r["all_reduce_calls"] == r["n_buckets"]
        assert (
            r["grad_is_view"] and r["unused_grad_none"] and r["unused_listed"] and r["unused_main_grad_zero"]
        )
        assert "zero_grad_buffer" in r["no_zero_error"]
        assert "before the first backward" in r["late_hook_error"]
        assert (
            r["grads_cleared"] and r["grad_views_again"] and r["buffer_zero"] and r["comm_bytes_reset"] == 0
        )
        assert "already launched" in r["double_backward_error"] and "no_sync" in r["double_backward_error"]


# ------------------------------------------------------------------------------------------------
def _bf16_fp32_reduce(rank, world_size):
    torch.manual_seed(0)
    fp32_model = TinyNet()
    ref = nn.parallel.DistributedDataParallel(copy.deepcopy(fp32_model))
    model = copy.deepcopy(fp32_model).to(torch.bfloat16)
    local = copy.deepcopy(model)  # same bf16 weights, run without any DDP
    cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, **SMALL_BUCKETS)
    ddp = DistributedDataParallel(cfg, model)
    micro = batches(rank, 1, 2)[0]
    acc = {}
    for i, (x, y) in enumerate(micro):
        with ddp.no_sync() if i == 0 else contextlib.nullcontext():
            _step(ddp, x.bfloat16(), y.bfloat16(), 0.5)
        _step(ref, x, y, 0.5)
        _step(local, x.bfloat16(), y.bfloat16(), 0.5)
        for r in local.parameters():  # accumulate each bf16 micro-grad in fp64, as main_grad should
            acc[r] = acc.get(r, 0) + r.grad.double()
            r.grad = None
    ddp.finish_grad_sync()
    exact_err = loose_err = 0.0
    dtypes_ok = True
    for p, q, r in zip(model.parameters(), ref.module.parameters(), local.parameters(), strict=True):
        dtypes_ok &= p.main_grad.dtype == torch.float32 and p.grad.dtype == torch.bfloat16
        # Exact reference: each rank's bf16 micro-grads summed in fp64, averaged in fp64 over ranks.
        gathered = [torch.empty_like(acc[r]) for _ in range(world_size)]
        dist.all_gather(gathered, acc[r])
        exact = torch.stack(gathered).mean(0)
        exact_err = max(exact_err, ((p.main_grad.double() - exact).abs().max() / exact.abs().max()).item())
        loose_err = max(loose_err, ((p.main_grad - q.grad).abs().max() / q.grad.abs().max()).item())
    return dtypes_ok, exact_err, loose_err


def test_grad_reduce_in_fp32_with_bf16_params(results):
    for dtypes_ok, exact_err, loose_err in scenario(results, "_bf16_fp32_reduce"):
        assert dtypes_ok
        # Summing bf16 micro-grads and 2 ranks in fp32 is exact up to fp32 rounding of the sum.
        assert exact_err <= 1e-6, exact_err
        # Versus an all-fp32 run the only difference is bf16 forward/backward math (stated: 5%).
        assert loose_err <= 5e-2, loose_err


# ------------------------------------------------------------------------------------------------
def _nan_report(rank, world_size):
    torch.manual_seed(0)
    model = TinyNet()
    ddp = DistributedDataParallel(
        DistributedDataParallelConfig(check_for_nan_in_grad=True, **SMALL_BUCKETS), model
    )
    x, y = batches(rank, 1, 1)[0][0]
    if rank == 1:
        y = y.clone()
        y[0, 0] = float("nan")  # NaN target: only head.* and earlier params get NaN grads
    _step(ddp, x, y)
    msg = _raises(ddp.finish_grad_sync)
    # No hang afterwards: the next clean iteration syncs normally on both ranks.
    ddp.zero_grad_buffer()
    _step(ddp, *batches(rank, 1, 1)[0][0])
    ddp.finish_grad_sync()
    return msg, all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_nan_gradient_names_rank_and_parameter(results):
    (msg0, ok0), (msg1, ok1) = scenario(results, "_nan_report")
    assert "rank 1" in msg1 and "before reduction" in msg1 and "head.bias" in msg1, msg1
    assert "after reduction" in msg0 and "head.bias" in msg0 and "another rank" in msg0, msg0
    assert ok0 and ok1


@contextlib.contextmanager
def _count_host_syncs():
    """Count Tensor.__bool__/item/tolist calls (each a device-to-host sync on CUDA) while active."""
    count = [0]
    saved = {name: getattr(torch.Tensor, name) for name in ("__bool__", "item", "tolist")}

    def counting(original):
        def wrapper(self, *args, **kwargs):
            count[0] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in saved.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield count
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _nan_check_with_loss_scaler(rank, world_size):
    """check_for_nan_in_grad beside a dynamic loss scaler: rank 1's scaled loss overflows (routine in
    fp16). With allow_nonfinite=True nothing raises, the scaler skips the step on both ranks and backs
    off; without it, the same overflow raises on both ranks after the collectives (no hang)."""
    torch.manual_seed(0)
    model = TinyNet()
    ddp = DistributedDataParallel(
        DistributedDataParallelConfig(check_for_nan_in_grad=True, **SMALL_BUCKETS), model
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    data = batches(rank, 3, 1)
    out = {}

    def step(i, overflow, allow):
        x, y = data[i][0]
        before = [p.detach().clone() for p in model.parameters()]
        loss = nn.functional.mse_loss(ddp(x), y)
        if overflow and rank == 1:
            loss = loss * 1e35  # x 65536 overflows fp32: inf gradients on this rank only
        with _count_host_syncs() as syncs_in_backward:
            scaler.scale(loss).backward()
        with _count_host_syncs() as syncs_in_finish:
            error = _raises(lambda: ddp.finish_grad_sync(allow_nonfinite=allow))
        if error == "<no error>":
            scaler.step(opt)
            scaler.update()
        ddp.zero_grad_buffer()
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        return {
            "error": error,
            "moved": moved,
            "scale": scaler.get_scale(),
            "syncs_in_backward": syncs_in_backward[0],
            "syncs_in_finish": syncs_in_finish[0],
        }

    out["overflow, allowed"] = step(0, overflow=True, allow=True)
    out["finite"] = step(1, overflow=False, allow=False)  # checked: finite, so no error
    out["overflow, not allowed"] = step(2, overflow=True, allow=False)
    return out


def test_nan_check_leaves_loss_scaler_overflow_alone_and_syncs_once(results):
    for r in scenario(results, "_nan_check_with_loss_scaler"):
        skipped, finite, refused = r["overflow, allowed"], r["finite"], r["overflow, not allowed"]
        assert skipped["error"] == "<no error>" and not skipped["moved"], skipped
        assert skipped["scale"] == 2.0**15, "the scaler must back off after the overflow"
        assert finite["error"] == "<no error>" and finite["moved"] and finite["scale"] == 2.0**15
        assert "non-finite" in refused["error"] and not refused["moved"], refused
        for rec in (skipped, finite, refused):
            # No device-to-host sync inside backward (buckets launch there); at most one per check.
            assert rec["syncs_in_backward"] == 0, rec
        assert finite["syncs_in_finish"] == 1, finite  # the single read of the finiteness flags


def _nan_check_sharded(rank, world_size):
    """Reduce-scatter (use_distributed_optimizer): a NaN only in shard 0, on rank 0 only. Rank 1's own
    shard is finite, yet both ranks must raise (or neither): a lone raise would hang the other."""
    torch.manual_seed(0)
    model = nn.Linear(64, 4, bias=False)
    cfg = DistributedDataParallelConfig(use_distributed_optimizer=True, check_for_nan_in_grad=True)
    ddp = DistributedDataParallel(cfg, model)
    g = torch.ones(2, 4)
    if rank == 0:
        g[0, 0] = float("nan")  # weight row 0: the first 64 elements of the bucket, in shard 0
    (ddp(torch.ones(2, 64)) * g).sum().backward()
    msg = _raises(ddp.finish_grad_sync)
    ddp.zero_grad_buffer()
    ddp(torch.ones(2, 64)).sum().backward()  # the next clean iteration syncs on both ranks
    ddp.finish_grad_sync()
    return msg


def test_nan_check_with_reduce_scatter_raises_on_every_rank(results):
    msg0, msg1 = scenario(results, "_nan_check_sharded")
    assert "rank 0" in msg0 and "before reduction" in msg0, msg0
    assert "another rank's shard" in msg1, msg1


# ------------------------------------------------------------------------------------------------
def _reduce_scatter_shards(rank, world_size):
    torch.manual_seed(0)
    model = TinyNet()
    ref = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    cfg = DistributedDataParallelConfig(use_distributed_optimizer=True, **SMALL_BUCKETS)
    ddp = DistributedDataParallel(cfg, model)
    x, y = batches(rank, 1, 1)[0][0]
    _step(ddp, x, y)
    _step(ref, x, y)
    ddp.finish_grad_sync()
    ref_grad = {p: q.grad for p, q in zip(model.parameters(), ref.module.parameters(), strict=True)}
    err, checked = 0.0, 0
    for buf in ddp.param_and_grad_buffers:
        expected = torch.zeros_like(buf.grad_data)  # torch DDP's averaged grads in our layout
        for p, (lo, hi, _) in buf.param_index_map.items():
            expected[lo:hi] = ref_grad[p].flatten()
        for b in buf.buckets:
            lo, hi = b.shard_range(rank, world_size)
            err = max(err, (buf.grad_data[lo:hi] - expected[lo:hi]).abs().max().item())
            checked += hi - lo
    return (
        err,
        checked,
        sum(b.end - b.start for b in ddp.buckets),
        all(p.grad is None for p in model.parameters()),
    )


def test_reduce_scatter_leaves_averaged_shard_on_each_rank(results):
    world_size = 2
    for err, checked, total, grads_unset in scenario(results, "_reduce_scatter_shards"):
        assert err <= 1e-6, err
        assert checked * world_size == total
        assert grads_unset


# ------------------------------------------------------------------------------------------------
def _llama_tiny(rank, world_size):
    """Optional: the project's Llama (tiny preset) under our DDP vs torch DDP, 2 micro-steps, overlap."""
    try:
        from z2all.model import Z2allForCausalLM, get_preset
    except ImportError as e:
        return {"skipped": f"z2all.model not importable: {e}"}
    torch.manual_seed(0)
    model = Z2allForCausalLM(get_preset("tiny"))
    ref = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    ddp = DistributedDataParallel(DistributedDataParallelConfig(bucket_size=100_000), model)
    g = torch.Generator().manual_seed(rank)
    vocab = model.config.vocab_size if hasattr(model, "config") else 512
    micro = [torch.randint(0, vocab, (2, 32), generator=g) for _ in range(2)]
    for m in (ddp, ref):
        for i, ids in enumerate(micro):
            with m.no_sync() if i == 0 else contextlib.nullcontext():
                (m(ids, labels=ids).loss / 2).backward()
    ddp.finish_grad_sync()
    err = 0.0
    for p, q in zip(model.parameters(), ref.module.parameters(), strict=True):
        err = max(err, ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item())
    return {"err": err, "n_buckets": len(ddp.buckets)}


def test_project_llama_matches_torch_ddp(results):
    for r in scenario(results, "_llama_tiny"):
        if "skipped" in r:
            pytest.skip(r["skipped"])
        assert r["n_buckets"] > 2
        assert r["err"] <= 1e-6, r["err"]
