"""Named model sizes. ``get_preset(name, **overrides)`` returns a fresh ``Z2allConfig``.

| name  | hidden | layers | heads / kv | inter | ctx  | params (vocab 32000, untied) |
|-------|--------|--------|------------|-------|------|------------------------------|
| tiny  | 128    | 2      | 4 / 2      | 352   | 512  | CPU tests (vocab 512)         |
| small | 512    | 8      | 8 / 8      | 1408  | 1024 | ~59M                          |
| 100m  | 768    | 12     | 12 / 12    | 2048  | 1024 | ~134M                         |
| 1b    | 2048   | 16     | 16 / 16    | 5632  | 2048 | ~0.95B (MFU benchmark)        |
| 1.7b  | 2048   | 24     | 16 / 16    | 8192  | 2048 | ~1.74B (reference system)     |

Callers override ``vocab_size`` with their tokenizer's.
"""

from __future__ import annotations

from z2all.model.config import Z2allConfig

# Columns in the order of the table above.
_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "vocab_size",
)
_ROWS: dict[str, tuple[int, ...]] = {
    "tiny": (128, 2, 4, 2, 352, 512, 512),
    "small": (512, 8, 8, 8, 1408, 1024, 32000),
    "100m": (768, 12, 12, 12, 2048, 1024, 32000),
    "1b": (2048, 16, 16, 16, 5632, 2048, 32000),
    "1.7b": (2048, 24, 16, 16, 8192, 2048, 32000),
}
_PRESETS: dict[str, dict] = {name: dict(zip(_FIELDS, row, strict=True)) for name, row in _ROWS.items()}


def list_presets() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str, **overrides) -> Z2allConfig:
    """A new config for preset ``name``; ``overrides`` replace fields (e.g. ``vocab_size=...``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {list_presets()}")
    return Z2allConfig(**{**_PRESETS[name], **overrides})
