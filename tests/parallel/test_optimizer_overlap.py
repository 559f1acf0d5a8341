"""Overlapped per-bucket optimizer steps equal one AdamW step after a torch-DDP sync; clipping is refused."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel import DistributedDataParallel, DistributedDataParallelConfig
from parallel.ddp_comm_hooks.default_hooks import DefaultHookState, allreduce_hook, reduce_scatter_hook
from parallel.ddp_comm_hooks.optimizer_overlap_hooks import OptimizerOverlapState, optimizer_overlap_hook
from parallel.ddp_comm_hooks.powerSGD_hook import PowerSGDConfig, PowerSGDState, powerSGD_hook
from tests.dist_utils import run_distributed

STEPS = 4
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))


def adamw_groups(named_params) -> list[dict]:
    """Weight decay on matrices only: exercises the per-bucket factory's use of parameter names."""
    decay = [p for n, p in named_params if n.endswith("weight")]
    no_decay = [p for n, p in named_params if not n.endswith("weight")]
    return [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)]


def make_adamw(named_params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(adamw_groups(named_params), **HYPER)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(6, 12, generator=g), torch.randn(6, 5, generator=g)


def _overlap_vs_reference(rank: int, world_size: int, use_powersgd: bool) -> dict:
    # Overlapped: our DDP, several small buckets reduced during backward, each stepped in its callback.
    model = make_model()
    cfg = DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=300, first_bucket_size=100)
    ddp = DistributedDataParallel(cfg, model)
    if use_powersgd:
        inner, inner_state = powerSGD_hook, PowerSGDState(None, PowerSGDConfig(start_powerSGD_iter=2))
    else:
        inner, inner_state = allreduce_hook, DefaultHookState()
    state = OptimizerOverlapState(inner, inner_state, make_adamw)
    ddp.register_comm_hook(state, optimizer_overlap_hook)

    # Reference, all-reduce: torch DDP + one AdamW over all parameters after the sync.
    # Reference, PowerSGD: our DDP with the same buckets and plain powerSGD_hook, then one AdamW step
    # (the random initial Q depends on bucket layout, so torch DDP's buckets would give other numbers).
    ref_model = make_model()
    if use_powersgd:
        ref = DistributedDataParallel(cfg, ref_model)
        ref.register_comm_hook(PowerSGDState(None, PowerSGDConfig(start_powerSGD_iter=2)), powerSGD_hook)
    else:
        ref = nn.parallel.DistributedDataParallel(ref_model, bucket_cap_mb=1000)  # one bucket
    ref_opt = torch.optim.AdamW(adamw_groups(list(ref_model.named_parameters())), **HYPER)

    for step in range(STEPS):
        x, y = batch(rank, step)
        nn.functional.mse_loss(ddp(x), y).backward()
        ddp.finish_grad_sync()  # waits for every bucket's reduce + step
        ddp.zero_grad_buffer()

        nn.functional.mse_loss(ref(x), y).backward()
        if use_powersgd:
            ref.finish_grad_sync()
        ref_opt.step()
        if use_powersgd:
            ref.zero_grad_buffer()
        else:
            ref_opt.zero_grad(set_to_none=True)

    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref_model.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), make_model().parameters()))
    return {"diff": diff, "moved": moved, "steps": dict(state.steps), "n_buckets": len(ddp.buckets)}


def _overlap_with_unused(rank: int, world_size: int) -> dict:
    """TinyNet with a layer no rank uses and block 1 used on rank 0 only, AdamW with weight decay:
    overlapped per-bucket steps vs torch DDP (find_unused_parameters) + one AdamW step."""
    from tests.parallel.test_ddp import SMALL_BUCKETS, TinyNet, batches

    order = (0, 1, 2) if rank == 0 else (0, 2)
    torch.manual_seed(0)
    model = TinyNet(order=order, unused=True)
    torch.manual_seed(0)
    ref_model = TinyNet(order=order, unused=True)
    initial = [p.detach().clone() for p in model.parameters()]
    ddp = DistributedDataParallel(DistributedDataParallelConfig(**SMALL_BUCKETS), model)
    state = OptimizerOverlapState(allreduce_hook, DefaultHookState(), make_adamw)
    ddp.register_comm_hook(state, optimizer_overlap_hook)
    ref = nn.parallel.DistributedDataParallel(ref_model, find_unused_parameters=True)
    ref_opt = torch.optim.AdamW(adamw_groups(list(ref_model.named_parameters())), **HYPER)
    for micro in batches(rank, STEPS, 1):
        x, y = micro[0]
        nn.functional.mse_loss(ddp(x), y).backward()
        ddp.finish_grad_sync()
        ddp.zero_grad_buffer()
        nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    names = [n for n, _ in model.named_parameters()]
    return {
        "diff": max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref_model.parameters())),
        "unused_moved": [
            n
            for n, a, b in zip(names, model.parameters(), initial)
            if n.startswith("unused") and not torch.equal(a, b)
        ],
        "block1_moved": not torch.equal(model.blocks[1][0].weight, initial[names.index("blocks.1.0.weight")]),
    }


def _all_cases(rank: int, world_size: int) -> dict:
    return {
        "unused": _overlap_with_unused(rank, world_size),
        "allreduce": _overlap_vs_reference(rank, world_size, False),
        "powersgd": _overlap_vs_reference(rank, world_size, True),
        "state_dict": _state_dict_round_trip(rank, world_size),
    }


@pytest.fixture(scope="module")
def results() -> list[dict]:
    """One 2-rank job runs every case of this module (process start-up dominates the runtime)."""
    return run_distributed(_all_cases, 2)


def test_overlapped_adamw_equals_adamw_after_torch_ddp_sync(results):
    """Measured: max |param difference| = 0.0 after 4 steps (bit-for-bit); asserted <= 1e-6."""
    for r in (res["allreduce"] for res in results):
        assert r["n_buckets"] >= 3, r
        assert r["steps"] == {i: STEPS for i in range(r["n_buckets"])}, r
        assert r["moved"] > 1e-3, r  # the parameters really were updated
        assert r["diff"] <= 1e-6, r


def test_overlapped_adamw_on_top_of_powersgd_equals_sync_then_step(results):
    """Overlap wraps any hook: per-bucket PowerSGD + per-bucket AdamW vs PowerSGD sync, then one AdamW.

    4 steps with start_powerSGD_iter=2 (2 plain, 2 compressed). Measured: 0.0; asserted <= 1e-6.
    """
    for r in (res["powersgd"] for res in results):
        assert r["steps"] == {i: STEPS for i in range(r["n_buckets"])}, r
        assert r["moved"] > 1e-3, r
        assert r["diff"] <= 1e-6, r


def test_overlapped_step_leaves_parameters_no_rank_used_untouched(results):
    """Buckets holding a locally unused parameter step after the sync, when .grad is None for the
    parameters unused everywhere: same numbers as torch DDP + AdamW(weight_decay). Asserted <= 1e-6."""
    for r in (res["unused"] for res in results):
        assert r["unused_moved"] == [], r
        assert r["block1_moved"], r  # used on rank 0 only: updated from its averaged gradient
        assert r["diff"] <= 1e-6, r


def test_global_clipping_is_refused():
    with pytest.raises(ValueError, match="max_grad_norm=1.0: global-norm gradient clipping"):
        OptimizerOverlapState(allreduce_hook, None, make_adamw, max_grad_norm=1.0)
    # Clipping off (None or 0) is accepted.
    OptimizerOverlapState(allreduce_hook, None, make_adamw, max_grad_norm=0.0)


def test_reduce_scatter_inner_hook_is_refused():
    with pytest.raises(ValueError, match="reduce_scatter_hook leaves only this rank's shard valid"):
        OptimizerOverlapState(reduce_scatter_hook, None, make_adamw)


def _state_dict_round_trip(rank: int, world_size: int) -> dict:
    """State dict round trip: a fresh state loaded from a saved one continues identically."""
    model = make_model()
    ddp = DistributedDataParallel(
        DistributedDataParallelConfig(bucket_size=300, first_bucket_size=100), model
    )
    state = OptimizerOverlapState(allreduce_hook, DefaultHookState(), make_adamw)
    ddp.register_comm_hook(state, optimizer_overlap_hook)
    x, y = batch(rank, 0)
    nn.functional.mse_loss(ddp(x), y).backward()
    ddp.finish_grad_sync()
    ddp.zero_grad_buffer()
    saved = state.state_dict()
    state.set_lr(5e-3)
    assert all(g["lr"] == 5e-3 for g in state.param_groups)

    fresh = OptimizerOverlapState(allreduce_hook, DefaultHookState(), make_adamw)
    fresh.load_state_dict(saved)  # optimizers do not exist yet: applied on first reduction
    return {"pending": sorted(fresh._pending_state), "saved": sorted(saved), "world": dist.get_world_size()}


def test_state_dict_is_deferred_until_bucket_optimizers_exist(results):
    r = results[0]["state_dict"]
    assert r["pending"] == r["saved"] and len(r["saved"]) >= 3
