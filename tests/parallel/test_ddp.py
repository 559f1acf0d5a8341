"""Custom DDP vs torch.nn.parallel.DistributedDataParallel: gradients must match (fp32: <= 1e-6 relative).

Also holds the tiny generic model and the side-by-side runner that test_ddp_features.py reuses.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import traceback

import pytest
import torch
from torch import nn

from parallel import DistributedDataParallel, DistributedDataParallelConfig
from tests.dist_utils import run_distributed


class TinyNet(nn.Module):
    """Transformer-ish residual MLP: embed -> blocks -> norm -> head (~1.3k parameters).

    ``order`` is the order the blocks run in forward (a permutation of their registration order
    makes gradients arrive out of registration order); ``unused`` adds a registered layer that
    never takes part in forward.
    """

    def __init__(self, order=(0, 1, 2), unused: bool = False, d_in: int = 8, d: int = 16):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(3))
        self.unused = nn.Linear(d, d) if unused else None
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 4)
        self.order = tuple(order)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, d_in) -> (B, 4)
        h = self.embed(x)
        for i in self.order:
            h = h + self.blocks[i](h)
        return self.head(self.norm(h)) * self.scale


def batches(rank: int, steps: int, accum: int, batch: int = 6, d_in: int = 8):
    """Different data on every rank: a list (per step) of lists (per micro-step) of (x, y)."""
    g = torch.Generator().manual_seed(1000 + rank)
    return [
        [(torch.randn(batch, d_in, generator=g), torch.randn(batch, 4, generator=g)) for _ in range(accum)]
        for _ in range(steps)
    ]


def run_pair(
    rank,
    cfg: DistributedDataParallelConfig,
    model_kwargs,
    steps=2,
    accum=1,
    find_unused=False,
    user_set_to_none=False,
    launch_log: list | None = None,
):
    """Train the same model with torch DDP and with ours (SGD); return per-step grad errors.

    Returns a list over steps of ``max_p |g_ours - g_ref|_max / max(|g_ref|_max, 1e-12)``, comparing
    ``param.grad`` after ``finish_grad_sync()`` with torch DDP's ``param.grad`` (both must be None for
    a parameter unused on every rank, or neither).
    Ours follows the documented protocol (``zero_grad_buffer()`` only: backward accumulates into the
    ``.grad`` = ``main_grad`` views); ``user_set_to_none`` also calls ``optimizer.zero_grad()`` on it, so
    backward makes fresh ``.grad`` tensors that the hook must fold into the buffer.

    ``launch_log``, if given, gets one entry per step: ``(launched during backward, all launched)``,
    the bucket indices in the order their collectives were issued before ``finish_grad_sync()`` was
    called, and in all.
    """
    torch.manual_seed(0)
    base = TinyNet(**model_kwargs)
    ref_model = copy.deepcopy(base)
    # A small bucket_cap_mb makes torch DDP use several buckets too (not needed for equality).
    ref = nn.parallel.DistributedDataParallel(
        ref_model, bucket_cap_mb=0.001, find_unused_parameters=find_unused
    )
    ours = DistributedDataParallel(cfg, base)
    launched: list[int] = []
    if launch_log is not None:
        launch = ours._launch  # observe every collective launch (bucket index), then do it
        ours._launch = lambda bucket: (launched.append(bucket.index), launch(bucket))[1]
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    errors = []
    for micro in batches(rank, steps, accum):
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            if model is ref or user_set_to_none:
                opt.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(micro):
                ctx = model.no_sync() if i < accum - 1 else contextlib.nullcontext()
                with ctx:
                    loss = nn.functional.mse_loss(model(x), y) / accum
                    loss.backward()
        during_backward = tuple(launched)
        ours.finish_grad_sync()
        if launch_log is not None:
            launch_log.append((during_backward, tuple(launched)))
            launched.clear()
        err = 0.0
        for p, q in zip(base.parameters(), ref_model.parameters(), strict=True):
            if (p.grad is None) != (q.grad is None):
                # A parameter unused on every rank has .grad None in both; None in one only is an
                # error (recorded as infinite: never raise on one rank only).
                errors.append(float("inf"))
                continue
            if p.grad is None:
                continue
            scale = max(q.grad.abs().max().item(), 1e-12)
            err = max(err, (p.grad.double() - q.grad.double()).abs().max().item() / scale)
        errors.append(err)
        opt_ref.step()
        opt_ours.step()
        ours.zero_grad_buffer()
    # Parameters must also stay equal after the optimizer steps.
    param_err = max((p - q).abs().max().item() for p, q in zip(base.parameters(), ref_model.parameters()))
    return errors, param_err


# ------------------------------------------------------------------------------------------------
# Rank functions (module level so spawned ranks can unpickle them).

SMALL_BUCKETS = dict(bucket_size=200, first_bucket_size=100)  # TinyNet: 5 buckets (6 with `unused`)


def _equivalence_grid(rank, world_size):
    """Every (overlap, accumulation) combination against torch DDP, several buckets."""
    out = {}
    for overlap in (False, True):
        for accum in (1, 3):
            cfg = DistributedDataParallelConfig(overlap_grad_reduce=overlap, **SMALL_BUCKETS)
            out[f"overlap={overlap},accum={accum}"] = run_pair(rank, cfg, {}, steps=2, accum=accum)
        out[f"overlap={overlap},accum=3,user set_to_none"] = run_pair(
            rank, cfg, {}, steps=2, accum=3, user_set_to_none=True
        )
    # One bucket for everything (bucket_size None, no small first bucket).
    cfg = DistributedDataParallelConfig(bucket_size=None, first_bucket_size=None)
    out["one bucket"] = run_pair(rank, cfg, {}, steps=2, accum=1)
    return out


def _unused_and_out_of_order(rank, world_size):
    out = {}
    for overlap in (False, True):
        cfg = DistributedDataParallelConfig(overlap_grad_reduce=overlap, **SMALL_BUCKETS)
        out[f"unused,overlap={overlap}"] = run_pair(rank, cfg, {"unused": True}, steps=2, find_unused=True)
        # Backward reaches block 1 (bucket 2) and block 0 (bucket 3) before block 2 (bucket 1).
        launches: list = []
        out[f"order=(2,0,1),overlap={overlap}"] = run_pair(
            rank, cfg, {"order": (2, 0, 1)}, steps=2, launch_log=launches
        )
        out[f"launches: order=(2,0,1),overlap={overlap}"] = launches
        # Data-dependent: block 1 is unused on rank 1 only, so the two ranks complete different
        # buckets during backward; the collective sequence must still match.
        per_rank = {"order": (0, 1, 2) if rank == 0 else (0, 2)}
        out[f"unused on rank 1 only,overlap={overlap}"] = run_pair(
            rank, cfg, per_rank, steps=2, find_unused=True
        )
        out[f"both,accum=2,overlap={overlap}"] = run_pair(
            rank, cfg, {"order": (1, 2, 0), "unused": True}, steps=2, accum=2, find_unused=True
        )
    return out


def _adamw_three_ways(rank, world_size, per_rank_order, unused: bool, steps=4, odd_steps_order=None):
    """AdamW(weight_decay=0.1) for ``steps`` steps: ours, torch DDP (find_unused_parameters) and one
    process that computes the world's mean loss itself. Returns the final parameters of each (flat)
    and which of ours were unused on every rank at the last step. ``odd_steps_order``: per-rank forward
    orders for odd steps (usage that changes from step to step), else ``per_rank_order`` always."""
    torch.manual_seed(0)
    base = TinyNet(order=per_rank_order[rank], unused=unused)
    ref_model, single = copy.deepcopy(base), copy.deepcopy(base)
    initial = [p.detach().clone() for p in base.parameters()]
    ref = nn.parallel.DistributedDataParallel(ref_model, find_unused_parameters=True)
    ours = DistributedDataParallel(DistributedDataParallelConfig(**SMALL_BUCKETS), base)

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)

    opts = [adamw(ref.parameters()), adamw(ours.parameters()), adamw(single.parameters())]
    all_data = [batches(r, steps, 1) for r in range(world_size)]
    for step in range(steps):
        orders = odd_steps_order if odd_steps_order is not None and step % 2 else per_rank_order
        base.order = ref_model.order = tuple(orders[rank])
        x, y = all_data[rank][step][0]
        for model in (ref, ours):
            nn.functional.mse_loss(model(x), y).backward()
        ours.finish_grad_sync()
        # The single process: mean over ranks of each rank's loss, with that rank's forward order.
        total = 0.0
        for r in range(world_size):
            single.order = tuple(orders[r])
            xr, yr = all_data[r][step][0]
            total = total + nn.functional.mse_loss(single(xr), yr) / world_size
        total.backward()
        unused_now = [i for i, p in enumerate(base.parameters()) if p.grad is None]
        single_unused = [i for i, p in enumerate(single.parameters()) if p.grad is None]
        for opt in opts:
            opt.step()
        ref.zero_grad(set_to_none=True)
        opts[2].zero_grad(set_to_none=True)
        ours.zero_grad_buffer()
    flat = lambda m: [p.detach().clone() for p in m.parameters()]  # noqa: E731
    return {
        "ours": flat(base),
        "torch": flat(ref_model),
        "single": flat(single),
        "initial": initial,
        "unused_idx": unused_now,
        "single_unused_idx": single_unused,
    }


def _adamw_unused(rank, world_size):
    return {
        # The `unused` layer takes part in no forward on any rank.
        "unused everywhere": _adamw_three_ways(rank, world_size, [(0, 1, 2), (0, 1, 2)], unused=True),
        # Block 1 runs on rank 0 only: it must get rank 0's gradient / 2 and move like the others.
        "block 1 on rank 0 only": _adamw_three_ways(rank, world_size, [(0, 1, 2), (0, 2)], unused=False),
        # Usage changes per step: block 1 everywhere on even steps, on no rank on odd ones, so its
        # grad-buffer slot holds the previous step's gradient when its bucket is reduced.
        "block 1 on even steps": _adamw_three_ways(
            rank, world_size, [(0, 1, 2), (0, 1, 2)], unused=False, odd_steps_order=[(0, 2), (2, 0)]
        ),
    }


class _MixedBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d).double()  # registered before the linear, as a pre-norm block's
        self.linear = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, d) fp32
        return h + self.linear(self.norm(h.double()).float())


class MixedNet(nn.Module):
    """Pre-norm blocks with fp64 norms beside fp32 linears (two buffers; the fp64 one appears first).
    Numbering buckets buffer after buffer would put every fp32 bucket behind the first block's norm,
    whose gradient comes at the end of backward."""

    def __init__(self, d: int = 16, n: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(_MixedBlock(d) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, d) fp32 -> (B, 4)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _mixed_dtype_order(rank, world_size):
    """Record, for each bucket launch, how many gradients had arrived; compare grads with torch DDP."""
    torch.manual_seed(0)
    model = MixedNet()
    ref = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    arrivals: list[nn.Parameter] = []
    for p in model.parameters():  # registered before the DDP's hooks, so it runs first
        p.register_post_accumulate_grad_hook(arrivals.append)
    ours = DistributedDataParallel(DistributedDataParallelConfig(bucket_size=30, first_bucket_size=30), model)
    launched_at: dict[int, int] = {}
    launch = ours._launch
    ours._launch = lambda b: (launched_at.setdefault(b.index, len(arrivals)), launch(b))[1]
    out = {"steps": []}
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x, y = torch.randn(6, 16, generator=g), torch.randn(6, 4, generator=g)
        for m in (ref, ours):
            nn.functional.mse_loss(m(x), y).backward()
        in_backward = dict(launched_at)
        ours.finish_grad_sync()
        pos = {id(p): i for i, p in enumerate(arrivals)}
        # A bucket is complete once its last gradient arrived: position max(pos) + 1.
        complete_at = {b.index: 1 + max(pos[id(p)] for p in b.params) for b in ours.buckets}
        err = max(
            ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
            for p, q in zip(model.parameters(), ref.module.parameters(), strict=True)
        )
        out["steps"].append(
            {
                "launched_at": in_backward,
                "complete_at": complete_at,
                "err": err,
                "buffers": len(ours.param_and_grad_buffers),
            }
        )
        ours.zero_grad_buffer()
        ref.zero_grad(set_to_none=True)
        arrivals.clear()
        launched_at.clear()
    return out


def _guarded(fn, rank, world_size):
    """Run one scenario; an exception becomes {"error": traceback} so the other scenarios still report.

    Scenarios must not raise on one rank only before a collective (that would hang the peer), so
    they return what they measured and the test process asserts.
    """
    try:
        return fn(rank, world_size)
    except Exception:
        return {"error": traceback.format_exc()}


def run_scenarios(rank, world_size, module_name: str, names: list[str]):
    """Rank function: run the named module-level scenarios of ``module_name`` in one process group.

    Spawning ranks costs ~10-20 s on a loaded 2-core machine, so each test file spawns once (in a
    module-scoped fixture) and its tests assert on their own scenario's result.
    """
    module = importlib.import_module(module_name)
    return {name: _guarded(getattr(module, name), rank, world_size) for name in names}


def scenario(results, name):
    """Per-rank results of one scenario; fails with the rank's traceback if it raised."""
    per_rank = [r[name] for r in results]
    for rank, r in enumerate(per_rank):
        if isinstance(r, dict) and "error" in r:
            pytest.fail(f"scenario {name} raised on rank {rank}:\n{r['error']}")
    return per_rank


@pytest.fixture(scope="module")
def results():
    return run_distributed(
        run_scenarios,
        2,
        __name__,
        ["_equivalence_grid", "_unused_and_out_of_order", "_adamw_unused", "_mixed_dtype_order"],
    )


def _check(per_rank, tol=1e-6):
    for rank_result in per_rank:
        for case, (grad_errors, param_err) in rank_result.items():
            if case.startswith("launches:"):
                continue
            assert max(grad_errors) <= tol, f"{case}: grad relative error {grad_errors} > {tol}"
            assert param_err <= tol, f"{case}: params diverged by {param_err}"


def test_matches_torch_ddp_overlap_accumulation_buckets(results):
    _check(scenario(results, "_equivalence_grid"))


def test_matches_torch_ddp_unused_param_and_out_of_order_grads(results):
    _check(scenario(results, "_unused_and_out_of_order"))


def test_out_of_order_grads_still_overlap(results):
    """order=(2,0,1): buckets 2 and 3 complete before bucket 1 in backward. With overlap, every
    bucket must still be launched during backward (from the moment bucket 1 completes), in index order;
    without overlap none is. Checked on both ranks, both iterations."""
    for rank_result in scenario(results, "_unused_and_out_of_order"):
        n_buckets = 5  # TinyNet with SMALL_BUCKETS
        in_order = tuple(range(n_buckets))
        for during, total in rank_result["launches: order=(2,0,1),overlap=True"]:
            assert during == in_order and total == in_order, (during, total)
        for during, total in rank_result["launches: order=(2,0,1),overlap=False"]:
            assert during == () and total == in_order, (during, total)


def test_unused_parameters_do_not_move_with_adamw_weight_decay(results):
    """A parameter no rank used gets .grad None, so AdamW (weight decay, momentum) leaves it bit-exact,
    as torch DDP (find_unused_parameters=True) and one process do; a parameter used on one rank only
    is updated from that rank's gradient like in both references."""
    for rank_result in scenario(results, "_adamw_unused"):
        everywhere = rank_result["unused everywhere"]
        n = len(everywhere["ours"])
        unused = [n - 6, n - 5]  # TinyNet(unused=True): unused.weight, unused.bias (before norm, head)
        assert everywhere["unused_idx"] == unused and everywhere["single_unused_idx"] == unused
        for i in unused:
            assert torch.equal(everywhere["ours"][i], everywhere["initial"][i]), "unused parameter moved"
            assert torch.equal(everywhere["torch"][i], everywhere["initial"][i])
        for case in rank_result.values():
            for ours, ref, single in zip(case["ours"], case["torch"], case["single"], strict=True):
                # measured 0.0 for both (2026-12-01); fp32 summation order may differ elsewhere
                assert (ours - ref).abs().max().item() <= 1e-6, "ours != torch DDP"
                assert (ours - single).abs().max().item() <= 1e-6, "ours != one process"
        one_rank = rank_result["block 1 on rank 0 only"]
        assert one_rank["unused_idx"] == []
        block1 = [4, 5]  # blocks.1.0.weight, blocks.1.0.bias
        for i in block1:
            assert not torch.equal(one_rank["ours"][i], one_rank["initial"][i])


def test_buckets_of_several_dtypes_launch_as_soon_as_complete(results):
    """Two buffers (fp64 norms beside fp32 linears, fp64 first): every bucket is launched during
    backward at the very gradient that completes it, so collectives overlap backward across buffers;
    the gradients still equal torch DDP's."""
    for rank_result in scenario(results, "_mixed_dtype_order"):
        for step in rank_result["steps"]:
            assert step["buffers"] == 2
            assert step["launched_at"] == step["complete_at"], step
            assert sorted(step["launched_at"]) == list(range(len(step["complete_at"])))
            assert step["err"] <= 1e-6
