"""16-bit weights through the trainer (--params_dtype): bf16/fp16 weights in the DDP buffers, fp32 main
params in the optimizer wrapper, checkpoints whose model entry is those fp32 main params.

Pinned here: a bf16 run trains and resumes bit-exactly; 2 ranks == 1 rank with bf16 weights; a
checkpoint moves between --params_dtype values (the fp32 main params are the truth); bytes per
parameter in run_info.json are measured from what each rank holds. fp16's loss scaler through the
loop: test_nonfinite.py; the wrappers against torch.optim.AdamW: tests/optimizer/.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tests.dist_utils import run_distributed
from tests.training.test_loop import TinyLM, make_cfg, make_components
from z2all.training import train
from z2all.training.checkpoint_format import list_checkpoints
from z2all.training.checkpoint_io import load_model_weights
from z2all.training.metrics import read_metrics

BF16 = dict(params_dtype="bfloat16", dtype="bfloat16")


def _losses(records) -> list[float]:
    return [r["loss"] for r in records]


def load_model_weights_dir(run: Path) -> dict[str, torch.Tensor]:
    """The model entry of the run's newest checkpoint, read into an fp32 TinyLM."""
    model = TinyLM()
    load_model_weights(list_checkpoints(run)[0][1], model)
    return {k: v.detach() for k, v in model.named_parameters()}


def test_bf16_weights_train_and_report_bytes_per_param(tmp_path):
    cfg = make_cfg(tmp_path / "bf16", max_iters=20, lr_decay_iters=20, learning_rate=3e-2, **BF16)
    comp = make_components(cfg)
    losses = _losses(train(cfg, comp).history)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == torch.bfloat16 for p in comp.model.parameters())  # the weights are 16-bit
    info = json.loads((Path(cfg.out_dir) / "run_info.json").read_text())
    assert (info["params_dtype"], info["effective_ddp"], info["optimizer"]) == (
        "bfloat16",
        "z2all",  # one process too: the buffers hold the bf16 weights and fp32 gradients
        "Float16OptimizerWithFloat16Params",
    )
    b, n = info["bytes_per_param"], info["num_params"]
    # bf16 weights and fp32 grads in buffers padded to 128 elements; fp32 main params; AdamW's two
    # fp32 moments plus a 4-byte step per parameter tensor
    pad = 128 * 8 / n  # at most 128 padding elements per bucket, a handful of buckets
    assert 2.0 <= b["params"] <= 2.0 + 2 * pad and 4.0 <= b["grads"] <= 4.0 + 4 * pad, b
    steps = 4 * len(list(TinyLM().parameters())) / n  # AdamW's fp32 step count per tensor
    assert b["main_params"] == 4.0 and abs(b["optimizer_state"] - (8.0 + steps)) < 1e-3, b
    assert abs(b["total"] - sum(v for k, v in b.items() if k != "total")) < 0.01, b
    assert abs(info["optimizer_state_bytes_per_rank"] / n - b["optimizer_state"]) < 1e-3

    fp32 = make_cfg(tmp_path / "fp32", max_iters=2, lr_decay_iters=2)
    train(fp32, make_components(fp32))
    b = json.loads((Path(fp32.out_dir) / "run_info.json").read_text())["bytes_per_param"]
    # one process, no wrapper: each weight and .grad its own fp32 tensor, no main copies
    assert (b["params"], b["grads"], b["main_params"]) == (4.0, 4.0, 0.0)
    assert abs(b["optimizer_state"] - (8.0 + steps)) < 1e-3, b


def test_bf16_resume_is_bit_exact(tmp_path):
    full_cfg = make_cfg(tmp_path / "full", **BF16)
    full = _losses(train(full_cfg, make_components(full_cfg, dropout=0.1)).history)
    part_cfg = make_cfg(tmp_path / "part", max_iters=3, **BF16)
    train(part_cfg, make_components(part_cfg, dropout=0.1))
    res_cfg = make_cfg(tmp_path / "part", resume=True, **BF16)
    resumed = train(res_cfg, make_components(res_cfg, dropout=0.1)).history
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert _losses(read_metrics(res_cfg.out_dir)) == full  # bit-identical: main params, moments, RNG
    got = load_model_weights_dir(tmp_path / "part")
    want = load_model_weights_dir(tmp_path / "full")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_checkpoint_moves_between_params_dtypes(tmp_path, caplog):
    """bf16 -> fp32: the resumed fp32 weights are the saved fp32 main params, not their bf16 rounding;
    fp32 -> bf16: the main params are the fp32 weights exactly, the bf16 weights their rounding."""
    cfg = make_cfg(tmp_path / "a", max_iters=3, **BF16)
    comp = make_components(cfg)
    train(cfg, comp)
    saved = load_model_weights_dir(tmp_path / "a")
    assert all(t.dtype == torch.float32 for t in saved.values())
    weights = dict(comp.model.named_parameters())
    for name, t in saved.items():  # fp32 truth, whose rounding is the run's bf16 weights
        assert torch.equal(t.to(torch.bfloat16), weights[name].detach()), name
    assert any(not torch.equal(t.to(torch.bfloat16).float(), t) for t in saved.values())

    with caplog.at_level(logging.INFO, logger="z2all.training.resume"):
        res = make_cfg(tmp_path / "a", resume=True, max_iters=4)
        comp32 = make_components(res)
        hist = train(res, comp32).history
    assert [r["step"] for r in hist] == [4] and "--params_dtype=bfloat16 checkpoint with" in caplog.text

    cfg = make_cfg(tmp_path / "b", max_iters=3)
    train(cfg, make_components(cfg))
    fp32_weights = load_model_weights_dir(tmp_path / "b")
    res = make_cfg(tmp_path / "b", resume=True, max_iters=3, **BF16)  # nothing left to train: load only
    comp16 = make_components(res)
    train(res, comp16)
    for name, w in comp16.model.named_parameters():
        assert w.dtype == torch.bfloat16 and torch.equal(w.detach(), fp32_weights[name].to(torch.bfloat16))


def _bf16_rank(rank, world, out_dir):
    cfg = make_cfg(out_dir, save_interval=0, **BF16)
    return _losses(train(cfg, make_components(cfg)).history)


def test_two_ranks_equal_one_rank_with_bf16_weights(tmp_path):
    """The fp32 main_grad of 2 ranks' micro-batches (each scaled by 1/2 in the all-reduce) and of 1
    rank's accumulation of the same two (each loss scaled by 1/2) are the same sums of the same bf16
    gradients, scaled by powers of two: the trajectories are identical (measured), not merely close."""
    cfg = make_cfg(tmp_path / "one", save_interval=0, **BF16)
    one = _losses(train(cfg, make_components(cfg)).history)
    two = run_distributed(_bf16_rank, 2, str(tmp_path / "two"))
    assert two[0] == two[1] == one


def _with_unused(cfg):
    """TinyLM plus a parameter no forward uses: torch DDP semantics leave it alone (no gradient)."""
    comp = make_components(cfg)
    comp.model.unused = torch.nn.Parameter(torch.ones(4, 4))
    return comp


def _overlap_rank(rank, world, out_dir):
    out = {}
    for dtype, extra in (("fp32", {}), ("bf16", BF16)):
        kw = dict(grad_clip=0.0, bucket_size=600, **extra)
        for name, more in (("plain", {}), ("overlap", {"overlap_optim_step": True})):
            cfg = make_cfg(f"{out_dir}/{dtype}-{name}", **kw, **more)
            comp = _with_unused(cfg)
            out[f"{dtype}-{name}"] = _losses(train(cfg, comp).history)
            out[f"{dtype}-{name}-unused-moved"] = not bool((comp.model.unused == 1).all())
        part = make_cfg(f"{out_dir}/{dtype}-part", max_iters=3, overlap_optim_step=True, **kw)
        train(part, make_components(part))
        res = make_cfg(f"{out_dir}/{dtype}-part", resume=True, overlap_optim_step=True, **kw)
        train(res, make_components(res))
        out[f"{dtype}-resumed"] = _losses(read_metrics(f"{out_dir}/{dtype}-part")) if rank == 0 else None
    return out


def test_overlapped_step_equals_the_plain_step_and_resumes_exactly(tmp_path):
    """--overlap_optim_step, fp32 and bf16 weights (bf16: one Float16OptimizerWithFloat16Params per
    bucket over the shared fp32 main params, stepped inside the bucket's comm hook): AdamW is
    per-parameter, so the trajectory is the plain step's bit for bit, and a resume reproduces it
    (the per-bucket moments from each rank's state, the main params from the model entry, and the
    first resumed step at its own learning rate, not the saved one)."""
    got = run_distributed(_overlap_rank, 2, str(tmp_path))[0]
    for dtype in ("fp32", "bf16"):
        assert got[f"{dtype}-overlap"] == got[f"{dtype}-plain"], dtype
        for name in ("plain", "overlap"):  # never stepped: no weight decay, no momentum
            assert not got[f"{dtype}-{name}-unused-moved"], (dtype, name)
        assert got[f"{dtype}-resumed"] == got[f"{dtype}-overlap"], dtype
    info = json.loads((tmp_path / "bf16-overlap" / "run_info.json").read_text())
    assert info["optimizer"] == "per-bucket" and info["bytes_per_param"]["main_params"] == 4.0
