"""Every checkpoint component (z2all.training.state, and DataParallelModel's comm state) round-trips
through a real CheckpointManager save and load into freshly built objects, bit-exactly.

Each test saves one component next to the model, builds new objects (other init, other settings
where they can differ), loads, and compares with ``torch.equal`` / ``==``: nothing is compared to a
tolerance. The empty state dict means "as freshly built" (state.py's protocol rule), so the fresh
optimizer and the absent loss scaler are checked both ways: nothing written, and loading puts a
used object back to freshly built.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from optimizer import DynamicGradScaler, MainParams
from tests.dist_utils import run_distributed
from tests.training.test_checkpoint import make, train_step
from tests.training.test_loop import make_cfg
from z2all.training.checkpoint import CheckpointManager, CheckpointMismatchError
from z2all.training.parallelize import DataParallelModel
from z2all.training.rng_state import seed_all
from z2all.training.state import (
    LossScalerState,
    MainParamsState,
    ModelState,
    OptimizerState,
    RNGState,
    TrainProgress,
    TrainState,
)


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """``got`` equals ``want`` exactly: same nesting and keys, tensors ``torch.equal`` with the same
    dtype, everything else ``==``."""
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), (where, list(got), list(want))
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def round_trip(tmp_path: Path, saved: TrainState, fresh: TrainState, step: int = 1) -> dict:
    """Save ``saved`` as checkpoint ``step``, load it into ``fresh`` with a new manager; the manifest."""
    CheckpointManager(tmp_path).save(step, saved)
    manifest = CheckpointManager(tmp_path).load_latest(fresh)
    assert manifest is not None and manifest["step"] == step
    return manifest


# ---- ModelState --------------------------------------------------------------------------------------
class Buffered(nn.Module):
    """Parameters and buffers of three dtypes (BatchNorm's running stats, its int64 batch count)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("f16", torch.zeros(3, dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 4)
        return self.norm(self.lin(x))


def test_model_state_round_trip_with_buffers(tmp_path):
    torch.manual_seed(0)
    model = Buffered()
    for _ in range(3):
        model(torch.randn(8, 4))  # moves the running stats and the batch count
    with torch.no_grad():
        model.f16.copy_(torch.tensor([1.5, -2.0, 65504.0]))
    want = {k: v.clone() for k, v in model.state_dict().items()}
    assert ModelState(model).config_dict() is None  # no config: the manifest records none

    torch.manual_seed(1)
    model2 = Buffered()
    manifest = round_trip(tmp_path, TrainState.of(model), TrainState.of(model2))
    assert manifest["model_config"] is None
    assert manifest["components"] == {"shared": ["model"], "empty": [], "per_rank": ["rng"]}
    assert_same(dict(model2.state_dict()), want)
    assert int(model2.norm.num_batches_tracked) == 3


# ---- OptimizerState ----------------------------------------------------------------------------------
def test_optimizer_state_round_trip(tmp_path):
    model, opt = make()
    for _ in range(3):
        train_step(model, opt)
    for group in opt.param_groups:
        group["lr"] = 3e-3  # as an LR schedule leaves it: the groups are state too
    want = opt.state_dict()

    model2, opt2 = make(seed=5)  # lr 1e-2, no state
    round_trip(tmp_path, TrainState.of(model, opt), TrainState.of(model2, opt2))
    got = opt2.state_dict()
    assert_same(got["state"], want["state"])
    assert [g["lr"] for g in got["param_groups"]] == [3e-3]
    assert_same(got["param_groups"], want["param_groups"])
    assert int(opt2.state[model2.head.weight]["step"]) == 3


def test_fresh_optimizer_is_saved_empty_and_loads_back_fresh(tmp_path):
    """A never-stepped optimizer has state dict {} and is not written; saving it creates no state (a
    zero-lr step would count as AdamW step 1). Loading the empty state clears a used optimizer."""
    model, opt = make()
    assert OptimizerState(model, opt).state_dict() == {} and not opt.state
    model2, opt2 = make(seed=5)
    train_step(model2, opt2)  # this one has state
    manifest = round_trip(tmp_path, TrainState.of(model, opt), TrainState.of(model2, opt2), step=0)
    assert manifest["components"]["empty"] == ["optim"] and "optim" not in manifest["components"]["shared"]
    assert not opt.state and not opt2.state
    for m, o in ((model, opt), (model2, opt2)):  # the same weights now: the same first step
        seed_all(1)
        train_step(m, o)
    assert int(opt.state[model.head.weight]["step"]) == 1 == int(opt2.state[model2.head.weight]["step"])
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert_same(opt2.state[p2], opt.state[p])


def test_a_shared_component_the_checkpoint_lacks_is_refused(tmp_path):
    """Resuming state the checkpoint never held is a mismatch, not a silent fresh start."""
    model, opt = make()
    CheckpointManager(tmp_path).save(1, TrainState.of(model))
    with pytest.raises(CheckpointMismatchError, match="saved without optim state"):
        CheckpointManager(tmp_path).load_latest(TrainState.of(*make(seed=1)))


# ---- LossScalerState ---------------------------------------------------------------------------------
def _scaler(initial_scale: float = 1024.0) -> DynamicGradScaler:
    """A small-window fp16 loss scaler: it grows after 2 good steps, backs off after 2 overflows."""
    return DynamicGradScaler(
        initial_scale, min_scale=1.0, growth_factor=4.0, backoff_factor=0.5, growth_interval=2, hysteresis=2
    )


def _scaled_steps(scaler: DynamicGradScaler, pattern: str) -> None:
    """One ``update`` per character of ``pattern``: ``O`` an overflowing step, ``G`` a good one (what
    the fp16 optimizer wrapper reports after its all-rank Inf/NaN check)."""
    for c in pattern:
        scaler.update(found_inf={"O": True, "G": False}[c])


def test_loss_scaler_round_trip(tmp_path):
    model, opt = make()
    scaler = _scaler()
    _scaled_steps(scaler, "GGOGOG")  # grows to 4096, spends its hysteresis, backs off to 2048
    want = scaler.state_dict()
    assert float(want["scale"]) == 2048.0 and want["growth_tracker"] == 1 and want["hysteresis_tracker"] == 0
    assert want["scale"].dtype == torch.float32 and want["scale"].shape == (1,)

    model2, opt2 = make(seed=5)
    scaler2 = _scaler(initial_scale=65536.0)  # the same factors and windows, another starting point
    _scaled_steps(scaler2, "GO")  # and not as built either
    round_trip(
        tmp_path,
        TrainState.of(model, opt, scaler=LossScalerState(scaler)),
        TrainState.of(model2, opt2, scaler=LossScalerState(scaler2)),
    )
    assert_same(scaler2.state_dict(), want)
    # the same scale schedule from here on: the next overflow backs off at once (no hysteresis left)
    for s in (scaler, scaler2):
        _scaled_steps(s, "OGGO")
    assert_same(scaler2.state_dict(), scaler.state_dict())
    assert float(scaler.scale) == 4096.0 and scaler.state_dict()["hysteresis_tracker"] == 1


def test_no_scaler_is_saved_empty_and_leaves_the_scaler_as_built(tmp_path):
    """bf16/fp32 runs: nothing written; a scaler on resume (another --dtype) starts as built, and a
    saved scaler's state is not forced onto a run without one."""
    model, _ = make()
    off = LossScalerState(None)
    assert off.state_dict() == {}
    on = _scaler(initial_scale=8.0)
    on_state = LossScalerState(on)  # built here: "as built" is this state
    _scaled_steps(on, "GGOG")  # moved before the load: the load must put it back
    assert on.state_dict()["growth_tracker"] == 1
    manifest = round_trip(
        tmp_path / "a",
        TrainState.of(model, scaler=off),
        TrainState.of(make(seed=1)[0], scaler=on_state),
    )
    assert manifest["components"]["empty"] == ["scaler"]
    assert "scaler" not in manifest["components"]["shared"]
    assert_same(on.state_dict(), _scaler(initial_scale=8.0).state_dict())

    used = _scaler()
    _scaled_steps(used, "GOO")
    assert used.state_dict() != _scaler().state_dict()
    off2 = LossScalerState(None)
    manifest = round_trip(
        tmp_path / "b",
        TrainState.of(model, scaler=LossScalerState(used)),
        TrainState.of(make(seed=1)[0], scaler=off2),
    )
    assert "scaler" in manifest["components"]["shared"]
    assert off2.scaler is None and off2.state_dict() == {}


# ---- MainParamsState ---------------------------------------------------------------------------------
def _bf16(seed: int) -> tuple[nn.Module, MainParams]:
    """A bf16 model and its fp32 main copies, taken from the fp32 init before the cast."""
    model, _ = make(seed=seed)
    main = MainParams(model.named_parameters(remove_duplicate=False))
    model.to(torch.bfloat16)
    return model, main


def _mains(main: MainParams) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in main.module.named_parameters(remove_duplicate=False)}


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters(remove_duplicate=False)}


def test_main_params_state_round_trip_and_across_dtypes(tmp_path):
    """A bf16 run saves its fp32 main copies under the model's names: they come back bit for bit
    (the bf16 weights as their rounding), and the checkpoint is interchangeable with an fp32 run's."""
    model, main = _bf16(seed=0)
    want = _mains(main)
    assert set(want) == set(_weights(model))
    assert all(v.dtype == torch.float32 for v in want.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # the main copies hold more than the bf16 weights: a load that went through bf16 would show
    assert any(not torch.equal(want[k], w.float()) for k, w in _weights(model).items())

    model2, main2 = _bf16(seed=1)
    assert not all(torch.equal(want[k], v) for k, v in _mains(main2).items())
    round_trip(
        tmp_path / "bf16",
        TrainState({"model": MainParamsState(model, main)}),
        TrainState({"model": MainParamsState(model2, main2)}),
    )
    assert_same(_mains(main2), want)
    assert_same(_weights(model2), {k: v.to(torch.bfloat16) for k, v in want.items()})

    # bf16 run -> fp32 run: the fp32 main values, not their bf16 rounding
    fp32, _ = make(seed=2)
    CheckpointManager(tmp_path / "bf16").load_latest(TrainState.of(fp32))
    assert_same(_weights(fp32), want)

    # fp32 run -> bf16 run: main == the fp32 weights exactly, the bf16 weights their rounding
    src, _ = make(seed=3)
    src_w = _weights(src)
    model4, main4 = _bf16(seed=4)
    round_trip(tmp_path / "fp32", TrainState.of(src), TrainState({"model": MainParamsState(model4, main4)}))
    assert_same(_mains(main4), src_w)
    assert_same(_weights(model4), {k: v.to(torch.bfloat16) for k, v in src_w.items()})


# ---- TrainProgress -----------------------------------------------------------------------------------
def test_progress_round_trip(tmp_path):
    """Token counts pass 2**31 in real runs: stored and read back as Python ints, not truncated."""
    model, _ = make()
    progress = TrainProgress()
    round_trip(
        tmp_path,
        TrainState.of(model, progress=TrainProgress(step=7, tokens=2**40 + 3)),
        TrainState.of(make(seed=1)[0], progress=progress),
        step=7,
    )
    assert progress == TrainProgress(7, 2**40 + 3)
    assert type(progress.step) is int and type(progress.tokens) is int


# ---- RNGState ----------------------------------------------------------------------------------------
def _draws() -> tuple:
    """The next values of every stream a training step draws from."""
    return random.random(), float(np.random.rand()), torch.rand(4), torch.randint(0, 1000, (3,))


def test_rng_state_round_trip(tmp_path):
    """The draws after a load equal the draws right after the save: the save itself draws nothing
    from the streams it captured, and every stream continues where it stopped."""
    model, _ = make()
    seed_all(3)
    _draws()  # away from the seeded start
    CheckpointManager(tmp_path).save(1, TrainState.of(model))  # per_rank: {"rng": RNGState()}
    want = _draws()
    seed_all(999)
    assert CheckpointManager(tmp_path).load_latest(TrainState.of(make(seed=1)[0]))["step"] == 1
    got = _draws()
    assert got[:2] == want[:2]
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    assert isinstance(TrainState.of(model).per_rank["rng"], RNGState)


# ---- DataParallelModel (per rank, 2 gloo ranks) ------------------------------------------------------
SMALL = 1_000  # --bucket_size: one bucket per Linear


def _dp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 40), nn.Linear(40, 40))


def _dp_steps(dp: DataParallelModel, n: int, gen: torch.Generator) -> list[torch.Tensor | None]:
    """``n`` synced steps (with --overlap_optim_step the hook steps the bucket optimizers); the
    all-rank gradient each ended with, concatenated (None where the hook left none)."""
    out = []
    for _ in range(n):
        dp(torch.randn(4, 40, generator=gen)).square().sum().backward()
        dp.finish_grad_sync()
        grads = [p.grad for p in dp.module.parameters()]
        out.append(None if any(g is None for g in grads) else torch.cat([g.flatten() for g in grads]))
        dp.zero_grad()
    return out


def _bucket_adamw(named):
    return torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.1)


def _dp_case(rank: int, out: Path, cfg, **kw) -> dict:
    """3 steps, save, 2 more (the uninterrupted run); the same 2 from a fresh wrapper that loaded the
    checkpoint, and from one that loaded only the weights and continued its count (``cold``)."""

    def build() -> tuple[DataParallelModel, TrainState]:
        dp = DataParallelModel(_dp_model(), cfg, torch.device("cpu"), **kw)
        return dp, TrainState({"model": ModelState(dp.module)}, {"rng": RNGState(), "comm": dp})

    def weights(dp: DataParallelModel) -> list[torch.Tensor]:
        return [p.detach().clone() for p in dp.module.parameters()]

    dp, state = build()
    gen = torch.Generator().manual_seed(rank)  # each rank its own data
    _dp_steps(dp, 3, gen)  # PowerSGD: 2 plain steps, then 1 compressed (its memories exist)
    res = {"saved": dp.state_dict()}
    CheckpointManager(out).save(3, state)
    after = gen.get_state()
    res.update(want=_dp_steps(dp, 2, gen), want_w=weights(dp))

    dp2, state2 = build()
    assert CheckpointManager(out).load_latest(state2)["step"] == 3
    dp2.start_at(3)
    res["loaded"] = dp2.state_dict()
    gen.set_state(after)
    res.update(got=_dp_steps(dp2, 2, gen), got_w=weights(dp2))

    dp3, state3 = build()
    del state3.per_rank["comm"]  # the weights of step 3, the hook state as built
    CheckpointManager(out).load_latest(state3)
    dp3.start_at(3)
    gen.set_state(after)
    res.update(cold=_dp_steps(dp3, 2, gen), cold_w=weights(dp3))
    return res


def _dp_rank(rank, world, out_dir):
    torch.set_num_threads(1)
    out = Path(out_dir)
    psgd = make_cfg(out, comm_hook="powersgd", powersgd_rank=1, powersgd_start_iter=2, bucket_size=SMALL)
    overlap = make_cfg(out, bucket_size=SMALL, overlap_optim_step=True, grad_clip=0.0)
    return {
        "powersgd": _dp_case(rank, out / "powersgd", psgd),
        "overlap": _dp_case(rank, out / "overlap", overlap, make_bucket_optimizer=_bucket_adamw),
    }


def test_data_parallel_comm_state_round_trip(tmp_path):
    """PowerSGD's error feedback and P/Q memories, and the per-bucket AdamW of --overlap_optim_step,
    come back per rank: state dicts equal, and the next steps equal those of the uninterrupted run
    (and differ from those of a wrapper that loaded the weights but not its own state: the test can
    tell)."""
    for rank, res in enumerate(run_distributed(_dp_rank, 2, str(tmp_path))):
        psgd = res["powersgd"]
        assert psgd["saved"]["world_size"] == 2 and psgd["saved"]["powersgd"]["iter"] == 3
        assert psgd["saved"]["powersgd"]["error_dict"], "no error feedback to check"
        assert_same(psgd["loaded"], psgd["saved"], f"rank {rank}")
        assert_same(psgd["got"], psgd["want"], f"rank {rank}")
        assert not all(torch.equal(c, w) for c, w in zip(psgd["cold"], psgd["want"]))

        ovl = res["overlap"]
        assert ovl["saved"]["overlap_optim"], "no per-bucket optimizer state to check"
        assert_same(ovl["loaded"], ovl["saved"], f"rank {rank}")
        assert_same(ovl["got"], ovl["want"], f"rank {rank}")
        assert_same(ovl["got_w"], ovl["want_w"], f"rank {rank}")
        assert not all(torch.equal(c, w) for c, w in zip(ovl["cold_w"], ovl["want_w"]))


class _TorchGradScalerState:
    """What z2all saved as the ``scaler`` entry before issue 11: torch.amp.GradScaler's state dict."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state_dict)


def test_a_torch_grad_scaler_checkpoint_loads_into_the_dynamic_scaler(tmp_path):
    """fp16 checkpoints written with torch's GradScaler (float ``scale``, ``_growth_tracker``) resume:
    the scale and the growth count carry over; the hysteresis starts full."""
    model, opt = make()
    train_step(model, opt)
    old = torch.amp.GradScaler("cpu", init_scale=1024.0)
    old._growth_tracker = torch.tensor([5], dtype=torch.int32)  # as after 5 good steps
    scaler = DynamicGradScaler(65536.0, 1.0, 2.0, 0.5, 1000, 2)
    round_trip(
        tmp_path,
        TrainState.of(model, opt, scaler=_TorchGradScalerState(old)),
        TrainState.of(*make(seed=1), scaler=LossScalerState(scaler)),
    )
    assert scaler.state_dict()["scale"].item() == 1024.0
    assert (scaler.state_dict()["growth_tracker"], scaler.state_dict()["hysteresis_tracker"]) == (5, 2)
