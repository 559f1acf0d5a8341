"""optimizer: AdamW with fused backends, and the fp32/bf16/fp16 wrappers with a dynamic loss scaler.

Knows no model: every entry point takes parameters or param groups. Design: docs/optimizer.md.
"""

from optimizer.adamw import build_adamw, resolve_adamw_backend
from optimizer.config import OptimizerConfig
from optimizer.grad_scaler import DynamicGradScaler, LossScaleUnderflowError
from optimizer.main_params import MainParams
from optimizer.mixed_precision import (
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MixedPrecisionOptimizer,
    adamw_factory,
)
from optimizer.param_groups import weight_decay_param_groups

__all__ = [
    "FP32Optimizer",
    "DynamicGradScaler",
    "Float16OptimizerWithFloat16Params",
    "LossScaleUnderflowError",
    "MainParams",
    "MixedPrecisionOptimizer",
    "OptimizerConfig",
    "adamw_factory",
    "build_adamw",
    "resolve_adamw_backend",
    "weight_decay_param_groups",
]
