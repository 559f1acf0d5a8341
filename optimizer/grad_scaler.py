"""DynamicGradScaler: Megatron's dynamic loss scale for fp16 (fp16 weights or fp16 autocast).

The loop multiplies the loss by ``scale`` before backward; the optimizer wrapper unscales the fp32
gradients by ``inv_scale``, finds whether any is Inf/NaN on any rank, and calls ``update(found_inf)``
once per step, with the same ``found_inf`` on every rank (it comes out of one all-reduce), so every
rank's scaler walks through the same states. Semantics (Megatron ``DynamicGradScaler``):

    overflow:  growth_tracker = 0; hysteresis_tracker -= 1
               hysteresis_tracker <= 0  ->  scale = max(scale * backoff_factor, min_scale)
    good step: growth_tracker += 1
               growth_tracker == growth_interval  ->  scale *= growth_factor; growth_tracker = 0;
                                                      hysteresis_tracker = hysteresis

So the first backoff comes after ``hysteresis`` overflows without ``growth_interval`` good steps in
between, and once the hysteresis is spent every further overflow backs off at once until the next
growth refills it. Unlike Megatron, an overflow that needs a backoff while the scale is already at
``min_scale`` raises ``LossScaleUnderflowError`` instead of skipping steps forever.

bf16 and fp32 training run without a scaler (the wrappers take ``grad_scaler=None``).
"""

from __future__ import annotations

import torch


class LossScaleUnderflowError(RuntimeError):
    """fp16 gradients overflow even at the minimum loss scale: the run cannot make progress."""


class DynamicGradScaler:
    """Invariants: ``scale`` is a float32 tensor of shape (1,) on ``device``, ``min_scale <= scale``;
    ``0 <= growth_tracker < growth_interval``; ``hysteresis_tracker <= hysteresis``."""

    def __init__(
        self,
        initial_scale: float,
        min_scale: float,
        growth_factor: float,
        backoff_factor: float,
        growth_interval: int,
        hysteresis: int,
        device: torch.device | str = "cpu",
    ):
        if not initial_scale >= min_scale >= 1.0:
            raise ValueError(
                f"DynamicGradScaler: need initial_scale >= min_scale >= 1, got {initial_scale}, {min_scale}"
            )
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0):
            raise ValueError(
                f"DynamicGradScaler: need growth_factor > 1 and backoff_factor in (0, 1), got "
                f"{growth_factor}, {backoff_factor}"
            )
        if not (growth_interval >= 1 and hysteresis >= 1):
            raise ValueError(
                f"DynamicGradScaler: need growth_interval >= 1 and hysteresis >= 1, got "
                f"{growth_interval}, {hysteresis}"
            )
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._scale = torch.tensor([float(initial_scale)], dtype=torch.float32, device=device)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    @classmethod
    def from_config(cls, config, device: torch.device | str = "cpu") -> DynamicGradScaler:
        """The scaler an ``OptimizerConfig`` describes (its loss-scale fields)."""
        return cls(
            initial_scale=config.initial_loss_scale,
            min_scale=config.min_loss_scale,
            growth_factor=config.growth_factor,
            backoff_factor=config.backoff_factor,
            growth_interval=config.loss_scale_window,
            hysteresis=config.hysteresis,
            device=device,
        )

    @property
    def scale(self) -> torch.Tensor:
        """The current loss scale, a float32 tensor of shape (1,)."""
        return self._scale

    @property
    def inv_scale(self) -> torch.Tensor:
        """1 / scale in float32 (exact: the scale is a power of two with the default factors)."""
        return self._scale.double().reciprocal().float()

    def update(self, found_inf: bool) -> None:
        """Advance by one step whose (all-rank) gradients did (``found_inf``) or did not overflow."""
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                current = float(self._scale.item())
                if current <= self.min_scale:
                    raise LossScaleUnderflowError(
                        f"fp16 gradients overflow at the minimum loss scale {current:g} "
                        f"(--min_loss_scale={self.min_scale:g}) after {self.hysteresis} overflowing "
                        "step(s): the loss or gradients are too large for float16; lower the learning "
                        "rate, or train in bfloat16"
                    )
                self._scale = torch.clamp(self._scale * self.backoff_factor, min=self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor

    def state_dict(self) -> dict:
        """Tensors and ints only: loadable with ``torch.load(weights_only=True)``."""
        return {
            "scale": self._scale.detach().cpu().clone(),
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the scale and both trackers; the factors and intervals stay this scaler's own."""
        self._scale = state["scale"].to(dtype=torch.float32, device=self._scale.device).reshape(1).clone()
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])
