"""Learning-rate schedule: linear warmup, cosine decay to ``min_lr`` at ``lr_decay_iters``, then flat.

``lr_at(step)`` is a pure function of the step, so a resumed run needs no scheduler state: the step
count saved in the checkpoint is enough. ``step`` is 0-based (the step about to run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    learning_rate: float
    """Peak learning rate."""
    min_lr: float
    """Floor reached at decay_iters."""
    warmup_iters: int
    """Steps 0..warmup_iters-1 ramp linearly up to learning_rate."""
    decay_iters: int
    """Step at which the cosine reaches min_lr."""

    def lr_at(self, step: int) -> float:
        if step < self.warmup_iters:
            # (step + 1) so that step 0 already trains (nanoGPT convention); reaches the peak at the end.
            return self.learning_rate * (step + 1) / (self.warmup_iters + 1)
        if step >= self.decay_iters:
            return self.min_lr
        progress = (step - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
        return self.min_lr + coeff * (self.learning_rate - self.min_lr)


def set_lr(optimizer, lr: float) -> None:
    """Apply ``lr`` to every param group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
