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

_PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "small": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
    ),
    "100m": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=1024,
    ),
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
    ),
    "1.7b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
    ),
}


def list_presets() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str, **overrides) -> Z2allConfig:
    """A new config for preset ``name``; ``overrides`` replace fields (e.g. ``vocab_size=...``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {list_presets()}")
    return Z2allConfig(**{**_PRESETS[name], **overrides})
