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
    ``param.grad`` after ``finish_grad_sync()`` with torch DDP's ``param.grad`` (None read as 0).
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
            if p.grad is None:  # never raise on one rank only: record an infinite error instead
                errors.append(float("inf"))
                continue
            g_ref = q.grad if q.grad is not None else torch.zeros_like(q)
            scale = max(g_ref.abs().max().item(), 1e-12)
            err = max(err, (p.grad.double() - g_ref.double()).abs().max().item() / scale)
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
    return run_distributed(run_scenarios, 2, __name__, ["_equivalence_grid", "_unused_and_out_of_order"])


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
