"""2 gloo ranks: one rank's Inf skips the step on every rank; the sharded grad norm equals the full one.

Each rank holds the same fp16 weights and the same (as if DDP-reduced) gradients, except that rank 1's
gradient carries an Inf at step 1. Only the found-inf all-reduce can tell rank 0 to skip.
Tolerance: exact for the skip; the sharded norm is sqrt(sum of squared shard norms), rel 1e-6.
"""

from __future__ import annotations

import torch

from optimizer import DynamicGradScaler, Float16OptimizerWithFloat16Params, OptimizerConfig
from tests.dist_utils import run_distributed

SHAPES = [(16, 8), (8,), (32, 16), (3,)]


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _inf_on_one_rank(rank, world_size):
    cfg = OptimizerConfig(lr=1e-2, grad_clip=1.0, backend="torch", initial_loss_scale=2.0**8, hysteresis=1)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).half()) for s in SHAPES]
    opt = Float16OptimizerWithFloat16Params(params, cfg, grad_scaler=DynamicGradScaler.from_config(cfg))
    stepped, scales, snapshots = [], [], []
    for step in range(4):
        scale = float(opt.get_loss_scale().item())
        for p, grad in zip(params, _grads(step)):
            p.main_grad = (grad * scale).half()
        if step == 1 and rank == 1:
            params[3].main_grad[1] = float("inf")
        stepped.append(opt.step()[0])
        opt.zero_grad()
        scales.append(float(opt.get_loss_scale().item()))
        snapshots.append([p.detach().clone() for p in params + opt.main_params])
    steps = [s["step"].item() for s in opt.optimizer.state.values()]
    return {"stepped": stepped, "scales": scales, "snapshots": snapshots, "steps": steps}


def test_inf_on_one_rank_skips_on_both():
    res = run_distributed(_inf_on_one_rank, 2)
    for r in res:
        assert r["stepped"] == [True, False, True, True]
        assert r["scales"] == [2.0**8, 2.0**7, 2.0**7, 2.0**7]  # hysteresis 1: the overflow backs off
        assert r["steps"] == [3.0] * len(SHAPES)
        assert all(torch.equal(a, b) for a, b in zip(r["snapshots"][0], r["snapshots"][1]))  # skipped
        assert not torch.equal(r["snapshots"][1][0], r["snapshots"][2][0])  # then training continues
    for a, b in zip(res[0]["snapshots"][-1], res[1]["snapshots"][-1]):
        assert torch.equal(a, b)


def _sharded_norm(rank, world_size):
    cfg = OptimizerConfig(backend="torch", grad_clip=1.0)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in SHAPES]
    mine = params[rank::world_size]  # a stand-in for ZeRO-1's shards
    opt = Float16OptimizerWithFloat16Params(mine, cfg, grad_norm_process_group=torch.distributed.group.WORLD)
    for p, grad in zip(params, _grads(0)):
        p.grad = grad.bfloat16()
    _, norm, _ = opt.step()
    full = float(torch.nn.utils.get_total_norm([p.grad.float() for p in params]))
    return torch.tensor([norm, full], dtype=torch.float64)


def test_sharded_grad_norm_sums_squares_over_the_group():
    for r in run_distributed(_sharded_norm, 2):
        norm, full = r.tolist()
        assert abs(norm - full) <= 1e-6 * full
