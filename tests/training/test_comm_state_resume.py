"""Comm-hook state across a resume (DataParallelModel, 2 gloo ranks): PowerSGD continues its iteration
count when its memories cannot be restored (another world size or --bucket_size), and per-bucket
optimizer state saved for another bucket layout is refused before the first step."""

from __future__ import annotations

import logging

import torch
from torch import nn

from tests.dist_utils import run_distributed
from tests.training.test_loop import make_cfg
from z2all.training.config import ConfigError
from z2all.training.parallelize import DataParallelModel

# --bucket_size: one bucket per Linear, or the first (small-cap) bucket and one for the other two
SMALL, LARGE = 1_000, 10_000_000


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(600, 600), nn.Linear(600, 600), nn.Linear(600, 600))


def _steps(dp: DataParallelModel, n: int, rank: int) -> list[int]:
    """n steps (no optimizer: only the communication matters); comm bytes of each."""
    g = torch.Generator().manual_seed(rank)
    sent = []
    for _ in range(n):
        dp(torch.randn(4, 600, generator=g)).square().sum().backward()
        dp.finish_grad_sync()
        dp.zero_grad()
        sent.append(dp.pop_comm_bytes())
    return sent


def _rank(rank, world, out_dir):
    torch.set_num_threads(1)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("z2all.training.parallelize").addHandler(handler)

    def cfg(**kw):
        return make_cfg(out_dir, comm_hook="powersgd", powersgd_rank=1, powersgd_start_iter=2, **kw)

    out = {}
    first = DataParallelModel(_model(), cfg(bucket_size=SMALL), torch.device("cpu"))
    out["first"] = _steps(first, 3, rank)  # 2 plain, 1 compressed
    saved = first.state_dict()

    resumed = {
        "same": dict(bucket_size=SMALL, saved_world_size=2),
        "bucket_size": dict(bucket_size=LARGE, saved_world_size=2),
        "world_size": dict(bucket_size=SMALL, saved_world_size=4),
    }
    for name, kw in resumed.items():
        warnings.clear()
        dp = DataParallelModel(_model(), cfg(bucket_size=kw["bucket_size"]), torch.device("cpu"))
        dp.load_state_dict({**saved, "world_size": kw["saved_world_size"]})
        dp.start_at(3)
        out[name] = {"iter": dp._powersgd.iter, "sent": _steps(dp, 1, rank), "warnings": list(warnings)}

    # --overlap_optim_step: AdamW moments per bucket index cannot move to another layout.
    def make(named):
        return torch.optim.AdamW([p for _, p in named], lr=1e-3)

    overlap = DataParallelModel(
        _model(),
        cfg(bucket_size=SMALL, overlap_optim_step=True, grad_clip=0.0),
        torch.device("cpu"),
        make_bucket_optimizer=make,
    )
    _steps(overlap, 1, rank)
    saved_overlap = overlap.state_dict()
    try:
        DataParallelModel(
            _model(),
            cfg(bucket_size=LARGE, overlap_optim_step=True, grad_clip=0.0),
            torch.device("cpu"),
            make_bucket_optimizer=make,
        ).load_state_dict(saved_overlap)
        out["overlap_refusal"] = ""
    except ConfigError as e:
        out["overlap_refusal"] = str(e)
    out["full_bytes"] = sum(p.numel() * 4 for p in _model().parameters())
    return out


def test_powersgd_resume_continues_count_and_refuses_foreign_bucket_state(tmp_path):
    for r in run_distributed(_rank, 2, str(tmp_path)):
        full = r["full_bytes"]
        assert r["first"][0] >= full and r["first"][2] < full / 4  # plain, plain, compressed
        for name in ("same", "bucket_size", "world_size"):
            case = r[name]
            assert case["iter"] == 3, (name, case)
            # The first step after the resume compresses: no second warm-up.
            assert case["sent"][0] < full / 4, (name, case)
        assert r["same"]["warnings"] == []
        assert any(
            "--bucket_size=1000 when saved, --bucket_size=10000000 now (3 vs 2 buckets)" in w
            for w in r["bucket_size"]["warnings"]
        )
        assert any("saved on world size 4, this run has 2" in w for w in r["world_size"]["warnings"])
        assert "--bucket_size=1000 when saved" in r["overlap_refusal"], r["overlap_refusal"]
