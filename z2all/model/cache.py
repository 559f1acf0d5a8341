"""Key/value cache for incremental decoding (inference only).

One preallocated buffer pair per layer, ``(B, Hkv, capacity, D)``; ``seq_len`` positions are valid.
A forward step writes its T new keys/values at ``[seq_len, seq_len + T)`` in every layer and then
``advance(T)`` moves ``seq_len`` on, so all layers agree on the length at the start of each step.
Capacity doubles when exceeded (one copy), so appends are amortised O(1) rather than the O(T)
concatenation a tuple-of-tensors cache pays every step.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, capacity: int = 0):
        self.num_layers = num_layers
        self.capacity = capacity
        self.seq_len = 0
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` (B, Hkv, T, D) for ``layer``; return all valid (B, Hkv, seq_len + T, D)."""
        start, end = self.seq_len, self.seq_len + k.shape[2]
        buf_k = self._k[layer]
        if buf_k is None or buf_k.shape[2] < end:
            new_cap = max(end, self.capacity, 2 * (buf_k.shape[2] if buf_k is not None else 0))
            self.capacity = new_cap
            b, h, _, d = k.shape
            nk = k.new_empty(b, h, new_cap, d)
            nv = v.new_empty(b, h, new_cap, d)
            if buf_k is not None:
                nk[:, :, :start] = buf_k[:, :, :start]
                nv[:, :, :start] = self._v[layer][:, :, :start]
            self._k[layer], self._v[layer] = nk, nv
        self._k[layer][:, :, start:end] = k
        self._v[layer][:, :, start:end] = v
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called once per forward after every layer has written its ``n`` new positions."""
        self.seq_len += n

    def __len__(self) -> int:
        return self.seq_len
