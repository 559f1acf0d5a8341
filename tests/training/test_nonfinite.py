"""A diverging run never destroys the good checkpoints (issue 9).

A non-finite loss or gradient norm is never applied; more than ``--max_nonfinite_steps`` of them in
a row stop the run on every rank with ``NonFiniteStepError`` (exit code 3 from train_my_ddp.py),
naming the step; a float16 loss-scaler overflow is routine and not counted. A checkpoint of
non-finite state is refused by ``CheckpointManager.save`` on every rank, so rotation never deletes
the last good checkpoints for NaN ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.dist_utils import run_distributed
from tests.training.test_checkpoint import fresh, make, saved_steps, train_step
from tests.training.test_loop import TinyLM, make_cfg, make_data
from z2all.training import exit_codes, train
from z2all.training.build import Components
from z2all.training.checkpoint import CheckpointManager, NonFiniteStateError
from z2all.training.loop import NonFiniteStepError
from z2all.training.metrics import read_metrics
from z2all.training.state import TrainState
from z2all.training.tasks import PretrainTask


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (inf: an fp16-style overflow
    with a finite loss)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class FaultyLM(TinyLM):
    """TinyLM whose training forward goes wrong at given optimizer steps (1-based, counted from the
    first training forward, ``micro`` forwards per step): a NaN loss at ``nan_steps`` (through
    ``gate``, as NanGateLM), an Inf gradient with a finite loss at ``inf_grad_steps``."""

    def __init__(self, micro: int, nan_steps=(), inf_grad_steps=()):
        super().__init__()
        self.gate = nn.Parameter(torch.tensor([1.0]))
        self.micro, self.nan_steps, self.inf_grad_steps = micro, set(nan_steps), set(inf_grad_steps)
        self.calls = 0

    def forward(self, input_ids, targets=None, return_logits: bool = True):
        out = super().forward(input_ids, targets, return_logits)
        if self.training and out.loss is not None:
            step = self.calls // self.micro + 1
            self.calls += 1
            sign = -1.0 if step in self.nan_steps else 1.0  # sqrt(-1) = NaN
            out.loss = out.loss + 0.0 * torch.sqrt(sign * self.gate).sum()
            if step in self.inf_grad_steps:
                out.loss = _ScaleGrad.apply(out.loss, math.inf)
        return out


class OptimizerFactory:
    """``Components.make_optimizer`` that remembers the optimizer it built (the loop builds it)."""

    def __init__(self, cls=torch.optim.AdamW, **kw):
        self.cls, self.kw, self.built = cls, kw, None

    def __call__(self, named_params):
        self.built = self.cls([p for _, p in named_params], **self.kw)
        return self.built


def faulty_components(cfg, **faults) -> Components:
    torch.manual_seed(cfg.seed)
    model = FaultyLM(cfg.gradient_accumulation_steps, **faults).to(cfg.device)
    make = OptimizerFactory(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return Components(model=model, make_optimizer=make, task=PretrainTask(), train_data=make_data(64, 1))


def adam_steps(comp: Components) -> int:
    """How many optimizer steps were applied (AdamW's per-parameter step count)."""
    # keyed by the fp32 main params with 16-bit weights: every parameter's count is the step count
    counts = {int(s["step"]) for s in comp.make_optimizer.built.state.values()}
    assert len(counts) == 1, counts
    return counts.pop()


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())


def test_first_nonfinite_step_stops_the_run_naming_it(tmp_path):
    cfg = make_cfg(tmp_path / "run", max_iters=6, lr_decay_iters=6, save_interval=2, eval_interval=0)
    comp = faulty_components(cfg, nan_steps={5})
    with pytest.raises(NonFiniteStepError, match=r"^step 5: non-finite loss .*step_000004"):
        train(cfg, comp)
    assert saved_steps(tmp_path / "run") == [2, 4]  # the good ones: nothing saved after the bad step
    assert adam_steps(comp) == 4 and all_finite(comp.model)  # step 5 was not applied
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5] and recs[-1]["loss"] is None  # NaN -> null


def test_tolerated_nonfinite_steps_are_skipped_and_the_streak_resets(tmp_path):
    cfg = make_cfg(
        tmp_path / "run",
        max_iters=8,
        lr_decay_iters=8,
        save_interval=3,
        eval_interval=0,
        max_nonfinite_steps=1,
    )
    comp = faulty_components(cfg, nan_steps={3, 6})  # never two in a row
    res = train(cfg, comp)
    assert [math.isnan(r["loss"]) for r in res.history] == [s in (3, 6) for s in range(1, 9)]
    assert adam_steps(comp) == 6 and all_finite(comp.model)  # 8 steps, 2 skipped
    assert saved_steps(tmp_path / "run") == [6, 8]  # step 6 itself was skipped: its weights are step 5's

    cfg = make_cfg(tmp_path / "run2", max_iters=8, lr_decay_iters=8, save_interval=0, max_nonfinite_steps=1)
    with pytest.raises(
        NonFiniteStepError, match=r"^step 4: .*2 step\(s\) in a row \(--max_nonfinite_steps=1\)"
    ):
        train(cfg, faulty_components(cfg, nan_steps={3, 4}))


@pytest.mark.parametrize(
    "device,params_dtype,zero",
    [
        ("cpu", "float32", False),
        ("cpu", "float16", False),
        ("cpu", "float16", True),  # ZeRO-1: the same skip from the shards' all-reduced flag
        pytest.param("cuda", "float32", False, marks=pytest.mark.gpu),
        pytest.param("cuda", "float16", False, marks=pytest.mark.gpu),
    ],
)
def test_loss_scaler_overflow_is_not_counted(tmp_path, device, params_dtype, zero):
    """float16 (autocast over fp32 weights, or fp16 weights): an Inf gradient with a finite loss is
    the scaler's routine overflow: the step is skipped on every rank (metrics say so), the scale
    halves once the hysteresis (2) is spent, nothing is counted as non-finite; a NaN *loss* still
    counts. CPU runs float16 too (slowly): the same loop as on a GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # 2**10: this model's fp16 gradients overflow for real at the default 2**16 (its first steps too)
    kw = dict(device=device, dtype="float16", params_dtype=params_dtype, initial_loss_scale=1024.0)
    kw.update(save_interval=0, eval_interval=0, use_distributed_optimizer=zero)
    cfg = make_cfg(tmp_path / "fp16", max_iters=6, lr_decay_iters=6, **kw)
    comp = faulty_components(cfg, inf_grad_steps={2, 3})
    res = train(cfg, comp)
    assert [r["step"] for r in res.history] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in res.history)
    if not zero:  # ZeRO-1 builds its own AdamW over the shards (the factory's is not used)
        assert adam_steps(comp) == 4
    assert all_finite(comp.model)  # the scaler skipped 2 and 3
    recs = read_metrics(tmp_path / "fp16")
    assert [r.get("skipped", False) for r in recs] == [False, True, True, False, False, False]
    assert [r["loss_scale"] for r in recs] == [1024.0] * 3 + [512.0] * 3  # backed off after 2
    assert [r["grad_norm"] is None for r in recs] == [False, True, True, False, False, False]

    cfg = make_cfg(tmp_path / "fp16-nan", max_iters=6, lr_decay_iters=6, **kw)
    with pytest.raises(NonFiniteStepError, match=r"^step 2: non-finite loss"):
        train(cfg, faulty_components(cfg, nan_steps={2}))


def test_overflow_at_min_loss_scale_and_endless_overflows_stop_the_run(tmp_path):
    """An overflow that needs a backoff at --min_loss_scale stops the run (exit code 3) naming the
    flag; so do more than --max_skipped_steps overflows in a row, whatever the scale."""
    kw = dict(dtype="float16", save_interval=0, eval_interval=0, max_iters=6, lr_decay_iters=6)
    cfg = make_cfg(tmp_path / "a", initial_loss_scale=4.0, min_loss_scale=4.0, hysteresis=1, **kw)
    with pytest.raises(
        NonFiniteStepError, match=r"^step 2: fp16 gradients overflow at the minimum loss scale 4 "
    ):
        train(cfg, faulty_components(cfg, inf_grad_steps={2}))
    cfg = make_cfg(tmp_path / "b", max_skipped_steps=2, **kw)
    with pytest.raises(
        NonFiniteStepError, match=r"^step 4: float16 gradients overflowed in 3 steps in a row"
    ):
        train(cfg, faulty_components(cfg, inf_grad_steps={2, 3, 4, 5}))
    assert [r.get("skipped", False) for r in read_metrics(tmp_path / "b")] == [False, True, True, True]


def test_save_refuses_nonfinite_model_or_optimizer_state(tmp_path):
    mgr = CheckpointManager(tmp_path)
    model, opt = make()
    train_step(model, opt)
    mgr.save(1, TrainState.of(model, opt))
    train_step(model, opt)
    mgr.save(2, TrainState.of(model, opt))
    with torch.no_grad():
        model.emb.weight[0, 0] = float("nan")
    with pytest.raises(
        NonFiniteStateError, match=r"refusing to save checkpoint step 3: NaN/Inf in model\.emb\.weight"
    ):
        mgr.save(3, TrainState.of(model, opt))
    model, opt = make()
    train_step(model, opt)
    opt.state[model.head.weight]["exp_avg_sq"][0] = float("inf")
    with pytest.raises(NonFiniteStateError, match=r"NaN/Inf in optim\.state\.head\.weight\.exp_avg_sq"):
        mgr.save(3, TrainState.of(model, opt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000002"]
    assert mgr.load_latest(fresh(seed=1))["step"] == 2


def _nan_on_one_rank(rank, world, out_dir):
    mgr = CheckpointManager(out_dir)
    model, opt = make()
    train_step(model, opt)
    mgr.save(1, TrainState.of(model, opt))
    if rank == 1:
        with torch.no_grad():
            model.head.bias[0] = float("nan")
    try:
        mgr.save(2, TrainState.of(model, opt))
        return ""
    except NonFiniteStateError as e:
        return str(e)


def test_nonfinite_state_on_one_rank_is_refused_on_every_rank(tmp_path):
    """Every rank raises together (none is left waiting in a collective) and nothing is written."""
    msgs = run_distributed(_nan_on_one_rank, 2, str(tmp_path))
    assert msgs[1].startswith("rank 1: refusing to save checkpoint step 2: NaN/Inf in model.head.bias")
    assert msgs[0].startswith("rank 0: refusing to save checkpoint step 2: NaN/Inf in another rank's state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]


class _OverflowingAdamW(torch.optim.AdamW):
    """AdamW whose ``at``-th step leaves an Inf in the LM head: the update overflowed, while that
    step's loss and gradient were finite."""

    def __init__(self, params, at: int, **kw):
        super().__init__(params, **kw)
        self.at, self.calls = at, 0

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        self.calls += 1
        if self.calls == self.at:
            self.param_groups[0]["params"][-1].fill_(math.inf)
        return out


def test_loop_never_saves_a_nonfinite_state(tmp_path):
    cfg = make_cfg(tmp_path / "run", max_iters=6, lr_decay_iters=6, save_interval=1, eval_interval=0)
    comp = faulty_components(cfg)
    comp.make_optimizer = OptimizerFactory(_OverflowingAdamW, at=4, lr=cfg.learning_rate)
    with pytest.raises(
        NonFiniteStateError, match=r"^refusing to save checkpoint step 4: NaN/Inf in model\.head\.bias"
    ):
        train(cfg, comp)
    assert saved_steps(tmp_path / "run") == [2, 3]


# ---- the scenario, through the real entry point and the tiny Llama ------------------------------
def test_huge_learning_rate_stops_with_its_exit_code_and_keeps_the_good_checkpoints(
    pretok_world, entry_point, tmp_path, capsys
):
    """It used to run on with NaN losses, save NaN checkpoints, rotate the good ones away, and
    ``z2all.sample`` crashed on what was left."""
    from z2all.sample import main as sample_main

    out = tmp_path / "run"
    assert entry_point.main(pretok_world.flags(out, max_iters=4, save_interval=2)) == exit_codes.OK
    capsys.readouterr()
    resume = ["--resume", f"--out_dir={out}", "--max_iters=12", "--lr_decay_iters=12", "--save_interval=2"]
    assert entry_point.main([*resume, "--learning_rate=1e30", "--min_lr=0"]) == exit_codes.NONFINITE
    err = capsys.readouterr().err
    # step 5 applies the huge update (its own loss is still finite); step 6 is non-finite
    assert "train_my_ddp.py: error: step 6: non-finite gradient norm" in err, err[-3000:]
    assert f"the newest checkpoint is {out / 'step_000004'}" in err and "Traceback" not in err
    assert saved_steps(out) == [2, 4]
    assert read_metrics(out)[-1]["step"] == 6
    (text,) = sample_main([f"--out_dir={out}", "--prompt=def", "--max_new_tokens=4", "--device=cpu"])
    assert isinstance(text, str)
