"""OptimizerConfig validation (errors name the field) and the weight-decay groups."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from optimizer import OptimizerConfig, weight_decay_param_groups


def test_defaults_are_valid_and_frozen():
    cfg = OptimizerConfig()
    assert cfg.initial_loss_scale == 2.0**16 and cfg.loss_scale_window == 1000 and cfg.hysteresis == 2
    assert cfg.decay_ndim_min == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", -1.0),
        ("weight_decay", float("nan")),
        ("beta1", 1.0),
        ("beta2", -0.1),
        ("eps", 0.0),
        ("backend", "magic"),
        ("decay_ndim_min", -1),
        ("grad_clip", -0.5),
        ("loss_scale_window", 0),
        ("growth_factor", 1.0),
        ("backoff_factor", 1.0),
        ("hysteresis", 0),
        ("min_loss_scale", 0.5),
        ("initial_loss_scale", 0.5),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"OptimizerConfig\.{field}="):
        OptimizerConfig(**{field: value})


def test_weight_decay_groups_default_rule():
    w, emb, norm, bias = (torch.nn.Parameter(torch.zeros(s)) for s in [(4, 3), (7, 4), (4,), (3,)])
    frozen = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    groups = weight_decay_param_groups([w, norm, emb, frozen, bias], 0.1)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(w), id(emb)], [id(norm), id(bias)]]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    everything = weight_decay_param_groups([w, norm], 0.1, decay_ndim_min=1)
    assert len(everything) == 1 and len(everything[0]["params"]) == 2
