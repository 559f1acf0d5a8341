"""Every RNG stream continues exactly after a capture / torch.save / weights_only load / restore."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from z2all.training.rng_state import get_rng_state, rank_seed, seed_all, set_rng_state


def _draw() -> list:
    """A few values from each global stream (numpy's gaussian path exercises its cached value)."""
    return [
        random.random(),
        random.getrandbits(64),
        np.random.rand(3).tolist(),
        float(np.random.randn()),
        torch.rand(4).tolist(),
        torch.randint(0, 1000, (3,)).tolist(),
    ]


def test_round_trip_through_weights_only_load():
    seed_all(123)
    _draw()
    np.random.randn()  # leaves a cached gaussian in numpy's state
    buf = io.BytesIO()
    torch.save(get_rng_state(), buf)
    expected = _draw()
    seed_all(999)  # scramble every stream
    _draw()
    set_rng_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert _draw() == expected


def test_seed_all_is_deterministic_per_rank():
    seed_all(rank_seed(7, 1))
    a = _draw()
    seed_all(rank_seed(7, 1))
    assert _draw() == a
    seed_all(rank_seed(7, 0))
    assert _draw() != a
    assert rank_seed(7, 3) == 10


def test_malformed_state_is_a_clear_error():
    state = get_rng_state()
    with pytest.raises(ValueError, match="version"):
        set_rng_state({**state, "version": 99})
    del state["numpy"]
    with pytest.raises(ValueError, match="numpy"):
        set_rng_state(state)


@pytest.mark.gpu
def test_cuda_streams_round_trip():
    seed_all(3)
    state = get_rng_state()
    assert len(state["torch_cuda"]) == torch.cuda.device_count()
    expected = torch.rand(5, device="cuda").tolist()
    seed_all(4)
    set_rng_state(state)
    assert torch.rand(5, device="cuda").tolist() == expected
