"""Rotary position tables (cos/sin), with optional linear or dynamic-NTK scaling.

The model builds one ``(B|1, T, head_dim)`` cos/sin pair per forward and every layer shares it. For
the plain and linear cases the table for positions ``[0, max_position_embeddings)`` is computed once
per device in fp32 and then only indexed, never rebuilt per step. The table is a plain attribute,
not a buffer, so ``model.to(torch.bfloat16)`` cannot round the frequencies.

Conventions follow transformers' Llama (``rotate_half`` layout: the D/2 frequencies repeated twice):
- linear:  inv_freq /= factor
- dynamic: when the sequence is longer than max_position_embeddings (L = max position + 1),
  base' = base * (factor * L / max_pos - (factor - 1)) ** (D / (D - 2)), recomputed per forward.
"""

from __future__ import annotations

import torch

from z2all.model.config import Z2allConfig


def inv_frequencies(cfg: Z2allConfig, seq_len: int | None = None, device=None) -> torch.Tensor:
    """(D/2,) fp32 inverse frequencies for a sequence of ``seq_len`` positions."""
    dim = cfg.head_dim
    base = float(cfg.rope_theta)
    scaling = cfg.rope_scaling
    if scaling is not None and scaling["rope_type"] == "dynamic" and seq_len is not None:
        seq_len = max(seq_len, cfg.max_position_embeddings)
        factor = scaling["factor"]
        base = base * ((factor * seq_len / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base**exponent)
    if scaling is not None and scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    return inv_freq


def _cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = position_ids[..., None].float() * inv_freq  # (B|1, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B|1, T, D)
    return emb.cos(), emb.sin()


class RotaryTables:
    """Hands out fp32 cos/sin for given positions; caches the full table per device."""

    def __init__(self, cfg: Z2allConfig):
        self.cfg = cfg
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            pos = torch.arange(self.cfg.max_position_embeddings, device=device)
            self._tables[device] = _cos_sin(pos, inv_frequencies(self.cfg, None, device))  # (P, D) each
        return self._tables[device]

    def __call__(self, position_ids: torch.Tensor, max_position: int | None = None):
        """cos, sin: (B|1, T, D) fp32 for ``position_ids`` (B|1, T).

        ``max_position``: the largest position id in the batch if the caller knows it (saves a
        device sync); only consulted when positions may run past the cached table.
        """
        if max_position is None:
            max_position = int(position_ids.max())
        dynamic = self.cfg.rope_scaling is not None and self.cfg.rope_scaling["rope_type"] == "dynamic"
        if max_position < self.cfg.max_position_embeddings:
            cos, sin = self._table(position_ids.device)
            return cos[position_ids], sin[position_ids]
        # Past the table: compute directly (dynamic NTK changes the base with the length).
        seq_len = max_position + 1 if dynamic else None
        return _cos_sin(position_ids, inv_frequencies(self.cfg, seq_len, position_ids.device))
