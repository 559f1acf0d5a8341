"""DynamicGradScaler: Megatron's hysteresis / growth walk, the underflow error, the state round trip."""

from __future__ import annotations

import io

import pytest
import torch

from optimizer import DynamicGradScaler, LossScaleUnderflowError, OptimizerConfig


def _scaler(**kw):
    args = dict(initial_scale=2.0**8, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5,
                growth_interval=3, hysteresis=2)  # fmt: skip
    args.update(kw)
    return DynamicGradScaler(**args)


def _scale(s):
    return float(s.scale.item())


def test_scale_is_float32_tensor_from_config():
    s = DynamicGradScaler.from_config(OptimizerConfig())
    assert s.scale.dtype == torch.float32 and s.scale.shape == (1,)
    assert _scale(s) == 2.0**16 and float(s.inv_scale.item()) == 2.0**-16


def test_backoff_only_after_hysteresis_overflows():
    s = _scaler()
    s.update(True)
    assert _scale(s) == 2.0**8  # first overflow: tolerated
    s.update(True)
    assert _scale(s) == 2.0**7  # hysteresis (2) spent: back off
    s.update(True)
    assert _scale(s) == 2.0**6  # spent hysteresis stays spent until a growth refills it


def test_good_steps_between_overflows_do_not_refill_hysteresis():
    s = _scaler()
    s.update(True)
    s.update(False)
    s.update(False)  # 2 < growth_interval good steps
    s.update(True)
    assert _scale(s) == 2.0**7


def test_growth_after_interval_and_overflow_resets_growth_tracker():
    s = _scaler()
    for _ in range(2):
        s.update(False)
    s.update(True)  # resets the growth count (and uses one unit of hysteresis)
    for _ in range(2):
        s.update(False)
    assert _scale(s) == 2.0**8
    s.update(False)  # third consecutive good step
    assert _scale(s) == 2.0**9
    s.update(True)  # growth refilled the hysteresis: tolerated again
    assert _scale(s) == 2.0**9


def test_backoff_clamps_at_min_then_underflow_raises():
    s = _scaler(initial_scale=3.0, min_scale=2.0, hysteresis=1)
    s.update(True)
    assert _scale(s) == 2.0  # 1.5 clamped to the minimum
    with pytest.raises(LossScaleUnderflowError, match="--min_loss_scale=2"):
        s.update(True)


def test_state_dict_round_trip_weights_only():
    s = _scaler()
    s.update(True)
    s.update(False)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    fresh = _scaler()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for a, b in ((s, fresh),):
        assert torch.equal(a.scale, b.scale)
    for flags in ([False, False, True], [True, True]):
        for f in flags:
            s.update(f)
            fresh.update(f)
        assert torch.equal(s.scale, fresh.scale)
