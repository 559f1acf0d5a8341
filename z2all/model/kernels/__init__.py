"""Fused-kernel backends for the model's hot ops, chosen at run time.

| op            | backends, in "auto" preference order                              |
|---------------|-------------------------------------------------------------------|
| attention     | flash_attn -> sdpa (torch scaled_dot_product_attention) -> eager   |
| rms_norm      | apex -> flash_attn -> liger -> torch (F.rms_norm) -> eager         |
| rotary        | flash_attn -> liger -> eager                                       |
| swiglu        | xformers -> liger -> eager                                         |
| cross_entropy | liger_fused_linear -> torch_chunked -> flash_attn -> liger -> torch |
|               | -> eager  (the first two only for loss-only calls, see below)     |

cross_entropy computes the LM head and the loss together. ``forward(..., return_logits=False)``
lets a fused-linear backend skip the (N, vocab) logits; calls that want logits fall through (logged
once) to the first backend that returns them.

GPU backends count as available only when their library imports AND CUDA is present. Force one per
model with ``Z2allConfig(kernels={"attention": "eager"})``, or process-wide with
``set_backend("attention", "eager")``, or from the shell with
``Z2ALL_KERNELS="attention=eager,rms_norm=torch"``. Precedence: config entry, then set_backend, then
the environment variable, then "auto". Forcing an unknown or unavailable backend is a ``ValueError``;
everything else degrades silently to the next backend.
"""

from __future__ import annotations

import os

from z2all.model.kernels._registry import Backend, KernelOp, ResolvedKernel
from z2all.model.kernels.attention import ATTENTION
from z2all.model.kernels.cross_entropy import CROSS_ENTROPY
from z2all.model.kernels.norm import RMS_NORM
from z2all.model.kernels.rotary import ROTARY
from z2all.model.kernels.swiglu import SWIGLU

OPS: dict[str, KernelOp] = {op.name: op for op in (ATTENTION, RMS_NORM, ROTARY, SWIGLU, CROSS_ENTROPY)}

# Process-wide forced backends (set_backend); empty means "auto" everywhere.
_FORCED: dict[str, str] = {}


def _check_op(op: str) -> KernelOp:
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {list(OPS)}")
    return OPS[op]


def set_backend(op: str, backend: str = "auto") -> None:
    """Force ``backend`` for ``op`` in models built after this call ("auto" clears it)."""
    kop = _check_op(op)
    if backend == "auto":
        _FORCED.pop(op, None)
        return
    kop.resolve(backend)  # raises now, naming the op, if the backend is unknown or unavailable
    _FORCED[op] = backend


ENV_VAR = "Z2ALL_KERNELS"


def env_overrides() -> dict[str, str]:
    """``Z2ALL_KERNELS="op=backend,op=backend"`` parsed; a malformed entry raises naming the variable."""
    spec = os.environ.get(ENV_VAR, "").strip()
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        op, sep, backend = item.partition("=")
        if not sep or not backend.strip():
            raise ValueError(f"{ENV_VAR}: entry {item!r} is not op=backend (ops: {list(OPS)})")
        _check_op(op.strip())
        out[op.strip()] = backend.strip()
    return out


def resolve(op: str, overrides: dict[str, str] | None = None) -> ResolvedKernel:
    """The backend ``op`` runs with: ``overrides`` (a config's ``kernels``), else set_backend, else the
    ``Z2ALL_KERNELS`` environment variable, else auto."""
    kop = _check_op(op)
    forced = (overrides or {}).get(op) or _FORCED.get(op) or env_overrides().get(op, "auto")
    return kop.resolve(forced)


def active_backends(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """``{op: backend name}`` that a model built now (with ``overrides``) would use."""
    return {op: resolve(op, overrides).name for op in OPS}


def available_backends() -> dict[str, list[str]]:
    """``{op: [every backend usable on this machine, in preference order]}``."""
    return {name: op.available_backends() for name, op in OPS.items()}


__all__ = [
    "Backend",
    "KernelOp",
    "OPS",
    "ResolvedKernel",
    "active_backends",
    "available_backends",
    "env_overrides",
    "resolve",
    "set_backend",
]
