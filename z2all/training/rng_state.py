"""Capture and restore every random-number stream a training process draws from.

A resumed run is bit-identical to an uninterrupted one only if every stream continues exactly where
it stopped: Python's ``random``, NumPy's legacy global generator, torch's CPU generator and each
CUDA device's generator. :func:`get_rng_state` packs them into a dict of plain Python values and
tensors, so the dict round-trips through ``torch.save`` / ``torch.load(weights_only=True)`` without
pickling any custom class (NumPy's state array is stored as an int64 tensor for that reason).

Seeding convention (shared with the training loop): rank ``r`` of a run with seed ``s`` seeds all
its streams with ``s + r`` (:func:`rank_seed`). A resumed run on more ranks than were saved seeds
the new ranks this way, so the choice is deterministic and documented.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

# Layout version of the dict below; bump when a field changes meaning.
RNG_STATE_VERSION = 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed rank ``rank`` of a run with base seed ``seed`` uses for all its generators."""
    return int(seed) + int(rank)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy, torch CPU and every CUDA device with the same ``seed``."""
    random.seed(seed)
    # NumPy's legacy seeding accepts only [0, 2**32).
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def get_rng_state() -> dict[str, Any]:
    """Every global RNG stream of this process, as weights_only-loadable values.

    Returns ``{"version", "python", "numpy", "torch_cpu", "torch_cuda"}`` where ``python`` is
    ``random.getstate()`` (a tuple of ints), ``numpy`` a dict holding the MT19937 key as an int64
    tensor of shape (624,), ``torch_cpu`` a uint8 tensor and ``torch_cuda`` a list with one uint8
    tensor per visible CUDA device (empty without CUDA).
    """
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "version": RNG_STATE_VERSION,
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(key.astype(np.int64)),  # (624,) uint32 values held in int64
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured; raises ValueError on a malformed dict.

    CUDA states are restored for ``min(saved, visible)`` devices: a resume on a machine with fewer
    GPUs restores the ones it has, one with more leaves the extra devices as they are.
    """
    if not isinstance(state, dict) or state.get("version") != RNG_STATE_VERSION:
        raise ValueError(
            f"RNG state: expected a dict with version={RNG_STATE_VERSION}, "
            f"got {type(state).__name__} with version={getattr(state, 'get', lambda _k: None)('version')}"
        )
    missing = {"python", "numpy", "torch_cpu", "torch_cuda"} - state.keys()
    if missing:
        raise ValueError(f"RNG state is missing {sorted(missing)}")
    py = state["python"]
    # random.setstate wants (int, tuple-of-ints, float|None); a torch round trip keeps tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    key = npst["key"].numpy().astype(np.uint32)
    np.random.set_state((npst["kind"], key, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and state["torch_cuda"]:
        n = min(len(state["torch_cuda"]), torch.cuda.device_count())
        for device in range(n):
            torch.cuda.set_rng_state(state["torch_cuda"][device], device)
