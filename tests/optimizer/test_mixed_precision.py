"""FP32Optimizer and Float16OptimizerWithFloat16Params against plain torch.optim.AdamW on fp32 copies.

Tolerance: none. The wrappers run the same single-tensor AdamW and the same clipping arithmetic
(``clip_grad_norm_`` = ``get_total_norm`` + ``clip_grads_with_norm_``) on the same fp32 numbers, so
fp32 params and fp32 main params are compared with ``torch.equal``, and 16-bit weights must equal
``main.to(dtype)``. A skipped step must leave every tensor bit-unchanged.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from optimizer import (
    DynamicGradScaler,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    LossScaleUnderflowError,
    OptimizerConfig,
    weight_decay_param_groups,
)

STEPS = 5
SHAPES = [(16, 8), (8,), (32, 16), (3,), (4, 4)]  # the last one never gets a gradient


def _cfg(**kw):
    args = dict(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, backend="torch")
    args.update(kw)
    return OptimizerConfig(**args)


def _adamw(cfg):
    def build(groups):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, foreach=False)  # fmt: skip

    return build


def _params(dtypes):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dt)) for s, dt in zip(SHAPES, dtypes)]


def _grads(step):
    """fp32 gradients of step ``step``; norm ~ 25, so grad_clip=1 clips; None for the last param."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES[:-1]] + [None]


def _reference(cfg, grads_of_step, init):
    """torch.optim.AdamW + clip_grad_norm_ on fp32 copies of ``init``."""
    params = [torch.nn.Parameter(p.detach().float().clone()) for p in init]
    opt = _adamw(cfg)(weight_decay_param_groups(params, cfg.weight_decay))
    for step in range(STEPS):
        for p, g in zip(params, grads_of_step(step)):
            p.grad = None if g is None else g.clone()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad()
    return params, opt


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
@pytest.mark.parametrize("use_main_grad", [False, True])
def test_fp32_optimizer_equals_adamw(grad_clip, use_main_grad):
    cfg = _cfg(grad_clip=grad_clip)
    params = _params([torch.float32] * len(SHAPES))
    init = [p.detach().clone() for p in params]
    opt = FP32Optimizer(weight_decay_param_groups(params, cfg.weight_decay), cfg, inner_factory=_adamw(cfg))
    norms = []
    for step in range(STEPS):
        for p, g in zip(params, _grads(step)):
            if use_main_grad:
                p.main_grad = torch.zeros_like(p) if g is None else g.clone()
            else:
                p.grad = None if g is None else g.clone()
        stepped, norm, num_zeros = opt.step()
        assert stepped and num_zeros is None
        norms.append(norm)
        opt.zero_grad()
        assert all(p.grad is None for p in params)
    ref, ref_opt = _reference(cfg, _grads, init)
    for p, r in zip(params[:-1], ref[:-1]):
        assert torch.equal(p, r)
    if use_main_grad:  # a zero main_grad is a gradient: AdamW's weight decay moves the param
        assert not torch.equal(params[-1], init[-1])
    else:  # no gradient at all: never stepped, no state
        assert torch.equal(params[-1], init[-1]) and params[-1] not in opt.optimizer.state
    g0 = [g for g in _grads(STEPS - 1) if g is not None]
    assert norms[-1] == float(torch.nn.utils.get_total_norm(g0))


def test_fp32_optimizer_default_factory_is_build_adamw():
    cfg = _cfg()
    params = _params([torch.float32] * len(SHAPES))
    init = [p.detach().clone() for p in params]
    opt = FP32Optimizer(weight_decay_param_groups(params, cfg.weight_decay), cfg)
    assert opt.optimizer.z2all_backend == "torch"
    for step in range(STEPS):
        for p, g in zip(params, _grads(step)):
            p.grad = g
        opt.step()
        opt.zero_grad()
    ref, _ = _reference(cfg, _grads, init)
    assert all(torch.equal(p, r) for p, r in zip(params, ref))


@pytest.mark.parametrize("grad_source", ["main_grad_fp32", "main_grad_bf16", "grad_bf16"])
def test_bf16_main_params_equal_adamw_on_fp32_copies(grad_source):
    cfg = _cfg()
    # the 1-D params stay fp32 (norms kept in fp32): stepped in place alongside the main copies
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    params = _params(dtypes)
    init = [p.detach().clone() for p in params]
    opt = Float16OptimizerWithFloat16Params(
        weight_decay_param_groups(params, cfg.weight_decay), cfg, inner_factory=_adamw(cfg)
    )

    def fed(step):
        """The gradient each param's source holds, as the fp32 numbers the reference must see."""
        out = []
        for p, g in zip(params, _grads(step)):
            if g is not None and grad_source != "main_grad_fp32":
                g = g.to(p.dtype).float()
            out.append(g)
        return out

    for step in range(STEPS):
        for p, g in zip(params, fed(step)):
            if g is None:
                continue
            g = g.to(p.dtype if grad_source != "main_grad_fp32" else torch.float32)
            if grad_source.startswith("main_grad"):
                p.main_grad = g
            else:
                p.grad = g
        stepped, _, _ = opt.step()
        assert stepped
        opt.zero_grad()
    ref, _ = _reference(cfg, fed, init)
    # the wrapper's order is param-group order (decay group first): pair by identity
    index = {id(p): i for i, p in enumerate(params)}
    for p, main in zip(opt.model_params, opt.main_params):
        i = index[id(p)]
        assert main.dtype == torch.float32 and torch.equal(main, ref[i])
        assert p.dtype == dtypes[i] and torch.equal(p, main.to(p.dtype))
        assert (main is p) == (dtypes[i] == torch.float32)
    assert torch.equal(params[-1], init[-1])  # never had a gradient


def test_bf16_nonfinite_grad_without_scaler_skips():
    cfg = _cfg()
    params = _params([torch.bfloat16] * len(SHAPES))
    opt = Float16OptimizerWithFloat16Params(params, cfg, inner_factory=_adamw(cfg))
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, _grads(0)):
        p.grad = None if g is None else g.to(p.dtype)
    params[0].grad[0, 0] = float("nan")
    stepped, norm, _ = opt.step()
    assert not stepped and norm != norm
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.optimizer.state


def test_fp16_weights_need_a_scaler():
    with pytest.raises(ValueError, match="DynamicGradScaler"):
        Float16OptimizerWithFloat16Params(_params([torch.float16] * len(SHAPES)), _cfg())


def _snapshot(opt):
    return copy.deepcopy(
        {
            "model": [p.detach().clone() for p in opt.model_params],
            "main": [p.detach().clone() for p in opt.main_params],
            "state": opt.optimizer.state_dict()["state"],
        }
    )


def _assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a["model"], b["model"]))
    assert all(torch.equal(x, y) for x, y in zip(a["main"], b["main"]))
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name in a["state"][k]:
            assert torch.equal(a["state"][k][name], b["state"][k][name]), (k, name)


def _feed_scaled(opt, params, step, inf_at=None):
    scale = float(opt.get_loss_scale().item())
    for i, (p, g) in enumerate(zip(params, _grads(step))):
        p.grad = None if g is None else (g * scale).to(p.dtype)
        if i == inf_at:
            p.grad[0] = float("inf")


def test_fp16_overflow_skips_bit_unchanged_then_hysteresis_and_growth():
    cfg = _cfg(initial_loss_scale=2.0**8, hysteresis=2, loss_scale_window=3)
    params = _params([torch.float16] * len(SHAPES))
    opt = Float16OptimizerWithFloat16Params(
        params, cfg, inner_factory=_adamw(cfg), grad_scaler=DynamicGradScaler.from_config(cfg)
    )
    scale = lambda: float(opt.get_loss_scale().item())
    _feed_scaled(opt, params, 0)
    assert opt.step()[0]
    opt.zero_grad()

    before = _snapshot(opt)
    for expected_scale in (2.0**8, 2.0**7):  # tolerated once (hysteresis 2), then backed off
        _feed_scaled(opt, params, 1, inf_at=2)
        assert opt.step() == (False, None, None)
        opt.zero_grad()
        _assert_same(before, _snapshot(opt))
        assert all(s["step"] == 1 for s in opt.optimizer.state.values())
        assert scale() == expected_scale

    for step in range(2, 5):
        _feed_scaled(opt, params, step)
        stepped, norm, _ = opt.step()
        assert stepped and norm == norm
        opt.zero_grad()
    assert scale() == 2.0**8  # grew after loss_scale_window (3) good steps
    assert all(s["step"] == 4 for s in opt.optimizer.state.values())
    for p, main in zip(params, opt.main_params):
        assert torch.equal(p, main.to(torch.float16))


def test_fp16_unscaled_main_grads_equal_adamw():
    """With a power-of-two scale the unscaled fp32 main grads are exactly the fp16 gradient / scale."""
    cfg = _cfg(initial_loss_scale=2.0**10)
    params = _params([torch.float16] * len(SHAPES))
    init = [p.detach().clone() for p in params]
    opt = Float16OptimizerWithFloat16Params(
        params, cfg, inner_factory=_adamw(cfg), grad_scaler=DynamicGradScaler.from_config(cfg)
    )
    fed = lambda step: [None if g is None else (g * 2.0**10).half().float() / 2.0**10 for g in _grads(step)]
    for step in range(STEPS):
        _feed_scaled(opt, params, step)
        assert opt.step()[0]
        opt.zero_grad()
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in init]
    ref_opt = _adamw(cfg)([{"params": ref}])
    for step in range(STEPS):
        for p, g in zip(ref, fed(step)):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(ref, cfg.grad_clip)
        ref_opt.step()
    assert all(torch.equal(m, r) for m, r in zip(opt.main_params, ref))


def test_underflow_at_min_scale_raises():
    cfg = _cfg(initial_loss_scale=1.0, min_loss_scale=1.0, hysteresis=1)
    params = _params([torch.float16] * len(SHAPES))
    opt = Float16OptimizerWithFloat16Params(params, cfg, grad_scaler=DynamicGradScaler.from_config(cfg))
    _feed_scaled(opt, params, 0, inf_at=0)
    with pytest.raises(LossScaleUnderflowError, match="--min_loss_scale"):
        opt.step()


def _build(kind, params, cfg):
    groups = weight_decay_param_groups(params, cfg.weight_decay)
    if kind == "fp32":
        return FP32Optimizer(groups, cfg, inner_factory=_adamw(cfg))
    scaler = DynamicGradScaler.from_config(cfg) if kind in ("fp16", "fp32_autocast_fp16") else None
    if kind == "fp32_autocast_fp16":
        return FP32Optimizer(groups, cfg, inner_factory=_adamw(cfg), grad_scaler=scaler)
    return Float16OptimizerWithFloat16Params(groups, cfg, inner_factory=_adamw(cfg), grad_scaler=scaler)


_DTYPE = {"fp32": torch.float32, "fp32_autocast_fp16": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}  # fmt: skip


def _train(opt, params, steps, inf_at_step=None):
    for step in steps:
        if opt.grad_scaler is not None:
            _feed_scaled(opt, params, step, inf_at=0 if step == inf_at_step else None)
        else:
            for p, g in zip(params, _grads(step)):
                p.grad = None if g is None else g.to(p.dtype)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind", list(_DTYPE))
def test_state_dict_round_trip_weights_only_next_steps_bit_identical(kind):
    cfg = _cfg(initial_loss_scale=2.0**8, hysteresis=1, loss_scale_window=2)
    params = _params([_DTYPE[kind]] * len(SHAPES))
    opt = _build(kind, params, cfg)
    _train(opt, params, range(3), inf_at_step=1)  # fp16: one backoff lands in the saved scaler state

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh_params = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    fresh = _build(kind, fresh_params, cfg)
    fresh.load_state_dict(loaded)
    _assert_same(_snapshot(opt), _snapshot(fresh))
    if opt.grad_scaler is not None:
        assert torch.equal(opt.get_loss_scale(), fresh.get_loss_scale())

    _train(opt, params, range(3, 6))
    _train(fresh, fresh_params, range(3, 6))
    _assert_same(_snapshot(opt), _snapshot(fresh))
    if opt.grad_scaler is not None:
        assert torch.equal(opt.get_loss_scale(), fresh.get_loss_scale())


def test_bf16_checkpoint_loads_into_fp32_run_from_main_params(caplog):
    cfg = _cfg()
    params = _params([torch.bfloat16] * len(SHAPES))
    opt = _build("bf16", params, cfg)
    _train(opt, params, range(2))
    fp32_params = [torch.nn.Parameter(torch.zeros(p.shape)) for p in params]
    fp32 = _build("fp32_autocast_fp16", fp32_params, cfg)
    with caplog.at_level("INFO", logger="optimizer.mixed_precision"):
        fp32.load_state_dict(opt.state_dict())
    assert "no loss-scaler state saved" in caplog.text
    assert all(torch.equal(p, m) for p, m in zip(fp32.model_params, opt.main_params))
    assert any(not torch.equal(p, m.bfloat16().float()) for p, m in zip(fp32.model_params, opt.main_params))


def test_load_state_dict_rejects_bad_keys_and_shapes():
    cfg = _cfg()
    params = _params([torch.bfloat16] * len(SHAPES))
    opt = _build("bf16", params, cfg)
    state = opt.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['grad_scaler'\], unexpected keys \['x'\]"):
        opt.load_state_dict({"optimizer": state["optimizer"], "main_params": state["main_params"], "x": 1})
    bad = dict(state, main_params=[torch.zeros(2)] + state["main_params"][1:])
    with pytest.raises(ValueError, match="main param 0 has shape"):
        opt.load_state_dict(bad)
