"""The LR schedule against torch's own schedulers (LinearLR warmup, CosineAnnealingLR decay)."""

from __future__ import annotations

import math

import pytest
import torch

from z2all.training.lr_schedule import CosineSchedule, set_lr


def _torch_reference(peak: float, floor: float, warmup: int, decay: int, steps: int) -> list[float]:
    """Per-step LR from torch.optim.lr_scheduler: our warmup is (s+1)/(warmup+1) of peak, then a
    cosine over decay - warmup steps to the floor, then flat."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    warm = torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=1 / (warmup + 1), end_factor=warmup / (warmup + 1), total_iters=max(warmup - 1, 1)
    )
    out = []
    for _ in range(warmup):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        warm.step()
    opt.param_groups[0]["lr"] = peak
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=decay - warmup, eta_min=floor)
    for _ in range(decay - warmup):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        cos.step()
    out += [floor] * (steps - decay)
    return out


@pytest.mark.parametrize("warmup, decay, steps", [(5, 40, 50), (2, 10, 10), (0, 20, 25)])
def test_matches_torch_schedulers(warmup, decay, steps):
    sched = CosineSchedule(learning_rate=3e-4, min_lr=3e-5, warmup_iters=warmup, decay_iters=decay)
    ours = [sched.lr_at(s) for s in range(steps)]
    ref = _torch_reference(3e-4, 3e-5, warmup, decay, steps)
    torch.testing.assert_close(
        torch.tensor(ours, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-12
    )


def test_landmarks():
    s = CosineSchedule(learning_rate=1.0, min_lr=0.1, warmup_iters=4, decay_iters=14)
    assert s.lr_at(0) == pytest.approx(1 / 5) and s.lr_at(3) == pytest.approx(4 / 5)
    assert s.lr_at(4) == 1.0  # peak right after warmup
    assert s.lr_at(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))  # halfway: mean
    assert s.lr_at(14) == 0.1 and s.lr_at(1000) == 0.1
    lrs = [s.lr_at(i) for i in range(4, 15)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_set_lr_sets_every_group():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=1.0)
    set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.2]
