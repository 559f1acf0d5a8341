"""DataParallelModel construction details: torch PowerSGD bucketing on gloo, names under torch.compile."""

from __future__ import annotations

import torch
from torch import nn

from tests.dist_utils import run_distributed
from tests.training.test_loop import NanGateLM, make_cfg
from z2all.training.parallelize import DataParallelModel


def _two_linears() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(600, 600), nn.Linear(600, 600))  # 2 x 1.44 MB of fp32 grads


def _rank(rank, world, out_dir):
    torch.set_num_threads(1)
    out = {}
    # (1) torch DDP + PowerSGD on gloo with a 1 MiB bucket cap: forced into one bucket. Without that,
    # DDP rebuilds its buckets after the first step into one per Linear (bucket_cap_mb=1).
    cfg = make_cfg(
        f"{out_dir}/psgd", ddp_impl="torch", comm_hook="powersgd", powersgd_start_iter=2, bucket_size=1000
    )
    dp = DataParallelModel(_two_linears(), cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(rank)
    for _ in range(4):  # 2 plain steps, then compressed ones
        dp(torch.randn(4, 600, generator=g)).square().sum().backward()
        dp.finish_grad_sync()
        dp.zero_grad()
    out["torch_psgd_buckets"] = int(dp.wrapped._get_ddp_logging_data()["num_buckets_reduced"])
    plain = make_cfg(f"{out_dir}/plain", ddp_impl="torch", bucket_size=1000)
    dp = DataParallelModel(_two_linears(), plain, torch.device("cpu"))
    for _ in range(4):
        dp(torch.randn(4, 600, generator=g)).square().sum().backward()
        dp.zero_grad()
    out["torch_plain_buckets"] = int(dp.wrapped._get_ddp_logging_data()["num_buckets_reduced"])
    # The reference runs on its default path: no Python comm hook; bytes come from the gradient sizes.
    out["torch_plain_hook"] = dp.wrapped._get_ddp_logging_data().get("comm_hook", "")
    for _ in range(2):
        dp(torch.randn(4, 600, generator=g)).square().sum().backward()
        dp.finish_grad_sync()
        dp.zero_grad()
    out["torch_plain_bytes"] = dp.pop_comm_bytes()

    # (2) a torch.compile'd model: z2all DDP and the torch-DDP NaN check name the model's own params
    for impl in ("z2all", "torch"):
        cfg = make_cfg(f"{out_dir}/{impl}", ddp_impl=impl, check_for_nan_in_grad=True)
        torch.manual_seed(0)
        dp = DataParallelModel(torch.compile(NanGateLM(), backend="eager"), cfg, torch.device("cpu"))
        if impl == "z2all":
            out["z2all_names"] = sorted(dp.wrapped.param_to_name.values())
        x = torch.randint(0, 32, (2, 8))
        dp(x, targets=x).loss.backward()
        try:
            dp.finish_grad_sync()
            out[f"{impl}_nan"] = ""
        except RuntimeError as e:
            out[f"{impl}_nan"] = str(e)
    return out


def test_torch_powersgd_single_bucket_and_compiled_names(tmp_path):
    res = run_distributed(_rank, 2, str(tmp_path))
    own_names = sorted(n for n, _ in NanGateLM().named_parameters())
    for r in range(2):
        assert res[r]["torch_plain_buckets"] == 2  # the cap really splits this model
        assert res[r]["torch_psgd_buckets"] == 1
        assert res[r]["torch_plain_hook"] == ""
        assert res[r]["torch_plain_bytes"] == 2 * 2 * (600 * 600 + 600) * 4  # 2 synced steps, fp32
        assert res[r]["z2all_names"] == own_names
        for impl in ("z2all", "torch"):
            msg = res[r][f"{impl}_nan"]
            assert msg.endswith("in parameter(s): gate"), (impl, msg)
