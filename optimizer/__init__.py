"""optimizer: AdamW construction with fused backends (torch fused/foreach, apex when installed)."""

from optimizer.adamw import build_adamw, resolve_adamw_backend

__all__ = ["build_adamw", "resolve_adamw_backend"]
