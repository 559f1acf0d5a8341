"""AdamW with the fastest backend available: apex FusedAdam -> torch fused -> torch foreach -> torch.

All four compute the same decoupled-weight-decay Adam (Loshchilov & Hutter):

    p -= lr * weight_decay * p
    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

and differ only in how many kernels a step launches: "torch" loops over parameters, "foreach"
batches them into multi-tensor kernels, "fused" (torch) and "apex" do the whole update in one kernel
per group. "auto" takes apex when installed and every parameter is on CUDA, else torch fused on
CUDA, else foreach. The optimizer knows nothing about models; it takes parameters or param groups.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)

ADAMW_BACKENDS = ("auto", "apex", "fused", "foreach", "torch")


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam
    except Exception:  # missing or a broken CUDA extension
        return None
    return FusedAdam


def _all_params(param_groups) -> list[torch.Tensor]:
    return [p for g in param_groups for p in g["params"]]


def _normalize_groups(param_groups) -> list[dict]:
    groups = list(param_groups)
    if not groups:
        raise ValueError("build_adamw: got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or "params" not in g:
            raise ValueError(f"build_adamw: param group {i} must be a dict with a 'params' entry")
        g = dict(g)
        g["params"] = list(g["params"]) if not isinstance(g["params"], torch.Tensor) else [g["params"]]
        out.append(g)
    return out


def resolve_adamw_backend(param_groups: Iterable, backend: str = "auto") -> str:
    """The backend ``build_adamw`` would use for these parameters."""
    if backend not in ADAMW_BACKENDS:
        raise ValueError(f"build_adamw: unknown backend {backend!r}; choose from {ADAMW_BACKENDS}")
    params = _all_params(_normalize_groups(param_groups))
    on_cuda = all(p.is_cuda for p in params)
    if backend == "apex":
        if _apex_fused_adam() is None or not on_cuda:
            raise ValueError("build_adamw: backend 'apex' needs apex installed and every parameter on CUDA")
        return "apex"
    if backend != "auto":
        return backend
    return auto_adamw_backend(on_cuda)


def auto_adamw_backend(on_cuda: bool) -> str:
    """What ``backend="auto"`` picks when every parameter is on CUDA (``on_cuda``) or not.

    apex counts only when ``apex.optimizers.FusedAdam`` really imports (a broken CUDA extension does
    not); ``python -m z2all.env`` reports this for the current machine.
    """
    if on_cuda and _apex_fused_adam() is not None:
        return "apex"
    return "fused" if on_cuda else "foreach"


def build_adamw(
    param_groups: Iterable,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    backend: str = "auto",
) -> torch.optim.Optimizer:
    """An AdamW over ``param_groups`` (parameters, or dicts with "params" and per-group overrides).

    ``weight_decay`` / ``lr`` / ``betas`` / ``eps`` are the defaults for groups that do not set them.
    The chosen backend is logged and stored as ``optimizer.z2all_backend``.
    """
    if not lr >= 0.0:
        raise ValueError(f"build_adamw: lr must be >= 0, got {lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"build_adamw: betas must be in [0, 1), got {betas}")
    if not eps > 0.0:
        raise ValueError(f"build_adamw: eps must be > 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"build_adamw: weight_decay must be >= 0, got {weight_decay}")
    groups = _normalize_groups(param_groups)
    name = resolve_adamw_backend(groups, backend)
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "apex":
        opt = _apex_fused_adam()(groups, adam_w_mode=True, bias_correction=True, **kwargs)
    elif name == "fused":
        opt = torch.optim.AdamW(groups, fused=True, **kwargs)
    elif name == "foreach":
        opt = torch.optim.AdamW(groups, foreach=True, **kwargs)
    else:
        opt = torch.optim.AdamW(groups, foreach=False, fused=False, **kwargs)
    opt.z2all_backend = name
    n = sum(p.numel() for p in _all_params(groups))
    logger.info("AdamW backend: %s (%d groups, %.2fM params)", name, len(groups), n / 1e6)
    return opt
