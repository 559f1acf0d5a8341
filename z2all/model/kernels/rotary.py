"""Rotary position embedding: flash-attn / liger-kernel -> eager.

Signature shared by every backend::

    apply_rotary(q, k, cos, sin) -> (q_rot, k_rot)
    q: (B, H, T, D)   k: (B, Hkv, T, D)   cos, sin: (1 or B, T, D), the half-frequency table repeated
    twice along D (transformers' "rotate_half" / GPT-NeoX layout, not the interleaved GPT-J one)

cos/sin are built once per forward by the model (see ``z2all.model.rope``) and shared by all layers.
"""

from __future__ import annotations

import torch

from z2all.model.kernels._registry import Backend, KernelOp, cuda_available, try_import


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_rotary(q, k, cos, sin):
    cos = cos.unsqueeze(1).to(q.dtype)  # (B|1, 1, T, D)
    sin = sin.unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _flash_supports(q, k, cos, sin) -> bool:
    # flash-attn's kernel takes one table for the whole batch (no per-row positions, e.g. left padding)
    return q.is_cuda and cos.shape[0] == 1


def flash_rotary(q, k, cos, sin):
    mod = try_import("flash_attn.layers.rotary")
    half = q.shape[-1] // 2
    c = cos[0, :, :half].to(q.dtype)  # (T, D/2)
    s = sin[0, :, :half].to(q.dtype)
    # apply_rotary_emb wants (B, T, H, D); non-interleaved is the rotate_half layout
    qr = mod.apply_rotary_emb(q.transpose(1, 2), c, s, interleaved=False).transpose(1, 2)
    kr = mod.apply_rotary_emb(k.transpose(1, 2), c, s, interleaved=False).transpose(1, 2)
    return qr, kr


def liger_rotary(q, k, cos, sin):
    mod = try_import("liger_kernel.ops.rope")
    # LigerRopeFunction works in place on contiguous copies: (q, k, cos, sin, position_ids, unsqueeze_dim)
    return mod.LigerRopeFunction.apply(
        q.contiguous(), k.contiguous(), cos.to(q.dtype), sin.to(q.dtype), None, 1
    )


ROTARY = KernelOp(
    "rotary",
    [
        Backend(
            "flash_attn",
            flash_rotary,
            lambda: cuda_available() and try_import("flash_attn.layers.rotary") is not None,
            _flash_supports,
        ),
        Backend(
            "liger",
            liger_rotary,
            lambda: cuda_available() and try_import("liger_kernel.ops.rope") is not None,
            lambda q, k, cos, sin: q.is_cuda,
        ),
        Backend("eager", eager_rotary),
    ],
)
