"""OptimizerConfig: every knob of the AdamW, the gradient clip, the loss scaler and weight-decay groups.

Read-only after construction (frozen); ``__post_init__`` rejects bad values with a ValueError that
names the field (the trainer maps field names one to one onto its flags: ``grad_clip`` is
``--grad_clip``, ``min_loss_scale`` is ``--min_loss_scale``, ...). Design: docs/optimizer.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from optimizer.adamw import ADAMW_BACKENDS


@dataclass(frozen=True)
class OptimizerConfig:
    # ---- AdamW --------------------------------------------------------------------------------------
    lr: float = 3e-4
    """Learning rate the inner AdamW is built with (a schedule then overwrites each group's "lr")."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the decaying group (see decay_ndim_min); the other group gets 0."""
    beta1: float = 0.9
    """AdamW beta1 (first-moment decay)."""
    beta2: float = 0.95
    """AdamW beta2 (second-moment decay)."""
    eps: float = 1e-8
    """AdamW epsilon, added to sqrt(v_hat)."""
    backend: str = "auto"
    """AdamW implementation, one of optimizer.adamw.ADAMW_BACKENDS (see build_adamw)."""
    decay_ndim_min: int = 2
    """Parameters with ndim >= this decay (2: Linear and Embedding weights); the rest (norm weights,
    biases) get weight decay 0. 1 decays every parameter except scalars."""

    # ---- gradient clipping --------------------------------------------------------------------------
    grad_clip: float = 1.0
    """Clip the global L2 norm of the fp32 gradients to this value; 0 disables clipping (the norm is
    still computed and returned)."""

    # ---- dynamic loss scaling (fp16 only; bf16 and fp32 run without a scaler) ------------------------
    initial_loss_scale: float = 2.0**16
    """Starting loss scale. torch.amp.GradScaler's 2**16, not Megatron's 2**32: fp16 overflows above
    65504, so 2**32 only costs the first ~16 x hysteresis steps of every run as skipped overflows."""
    loss_scale_window: int = 1000
    """Growth interval: the scale grows by growth_factor after this many consecutive good steps."""
    growth_factor: float = 2.0
    """Multiplier of the scale after loss_scale_window good steps (> 1)."""
    backoff_factor: float = 0.5
    """Multiplier of the scale when hysteresis is exhausted by overflows (in (0, 1))."""
    hysteresis: int = 2
    """Overflowing steps tolerated (skipped without backoff) before the scale backs off."""
    min_loss_scale: float = 1.0
    """The scale never goes below this; an overflow that needs a backoff at this scale stops the run
    (LossScaleUnderflowError)."""

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"OptimizerConfig.{field}={getattr(self, field)!r}: {why}")

        if not (math.isfinite(self.lr) and self.lr >= 0.0):
            bad("lr", "must be a finite number >= 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            bad("weight_decay", "must be a finite number >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        if not (math.isfinite(self.eps) and self.eps > 0.0):
            bad("eps", "must be a finite number > 0")
        if self.backend not in ADAMW_BACKENDS:
            bad("backend", f"must be one of {ADAMW_BACKENDS}")
        if not (isinstance(self.decay_ndim_min, int) and self.decay_ndim_min >= 0):
            bad("decay_ndim_min", "must be an int >= 0")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0.0):
            bad("grad_clip", "must be a finite number >= 0 (0 disables clipping)")
        if not (isinstance(self.loss_scale_window, int) and self.loss_scale_window >= 1):
            bad("loss_scale_window", "must be an int >= 1")
        if not (math.isfinite(self.growth_factor) and self.growth_factor > 1.0):
            bad("growth_factor", "must be > 1")
        if not 0.0 < self.backoff_factor < 1.0:
            bad("backoff_factor", "must be in (0, 1)")
        if not (isinstance(self.hysteresis, int) and self.hysteresis >= 1):
            bad("hysteresis", "must be an int >= 1")
        # >= 1 keeps the unscale factor 1/scale <= 1, so unscaling a finite fp32 gradient never overflows
        if not (math.isfinite(self.min_loss_scale) and self.min_loss_scale >= 1.0):
            bad("min_loss_scale", "must be a finite number >= 1")
        if not (math.isfinite(self.initial_loss_scale) and self.initial_loss_scale >= self.min_loss_scale):
            bad("initial_loss_scale", f"must be finite and >= min_loss_scale ({self.min_loss_scale})")
