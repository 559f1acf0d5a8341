"""optimizer: optimizer construction with fused backends, and mixed-precision optimizer wrappers."""

from optimizer.adamw import build_adamw, resolve_adamw_backend

__all__ = ["build_adamw", "resolve_adamw_backend"]
