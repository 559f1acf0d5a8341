"""Attention: flash-attn -> torch scaled_dot_product_attention -> eager.

Signature shared by every backend::

    attention(q, k, v, mask=None, causal=True, dropout_p=0.0) -> (B, H, Tq, D)
    q: (B, H, Tq, D)   k, v: (B, Hkv, Tk, D) with H % Hkv == 0 (grouped-query attention), Tq <= Tk
    mask: None or bool (B, 1, Tq, Tk), True = may attend (already includes causality and padding)

With ``mask=None`` and ``causal=True`` the causal mask is aligned bottom-right: query i (of Tq)
sits at absolute position Tk - Tq + i, which is what a KV-cache decoding step needs.
The softmax scale is 1/sqrt(D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from z2all.model.kernels._registry import Backend, KernelOp, cuda_available, try_import


def _causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    # (Tq, Tk) True where key j <= absolute position of query i (= tk - tq + i)
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def eager_attention(q, k, v, mask=None, causal=True, dropout_p=0.0):
    """Reference: explicit scores, fp32 softmax, explicit GQA repeat."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)  # (B, H, Tk, D)
    v = v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if mask is None and causal:
        mask = _causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


# enable_gqa arrived in torch 2.5; older versions expand the kv heads instead.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa_attention(q, k, v, mask=None, causal=True, dropout_p=0.0):
    """torch.nn.functional.scaled_dot_product_attention (flash / mem-efficient / math inside torch)."""
    tq, tk = q.shape[2], k.shape[2]
    is_causal = False
    if mask is None and causal:
        if tq == tk:
            is_causal = True  # lets SDPA pick its causal kernels; no mask tensor is built
        elif tq > 1:
            mask = _causal_mask(tq, tk, q.device)
        # tq == 1: a single new query may see every cached key; no mask at all
    if k.shape[1] != q.shape[1]:
        if _SDPA_HAS_GQA:
            # native grouped-query attention: no (B, H, Tk, D) copy of the kv heads, which in KV-cache
            # decoding would copy the whole cache every step
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True
            )
        n_rep = q.shape[1] // k.shape[1]
        b, hkv, t, d = k.shape
        k = k[:, :, None].expand(b, hkv, n_rep, t, d).reshape(b, hkv * n_rep, t, d)
        v = v[:, :, None].expand(b, hkv, n_rep, t, d).reshape(b, hkv * n_rep, t, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


def _flash_available() -> bool:
    return cuda_available() and try_import("flash_attn") is not None


def _flash_supports(q, k, v, mask=None, causal=True, dropout_p=0.0) -> bool:
    # flash-attn takes no arbitrary mask (padded batches go to SDPA) and only half precision on CUDA.
    return mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def flash_attention(q, k, v, mask=None, causal=True, dropout_p=0.0):
    """flash_attn_func; it wants (B, T, H, D), takes GQA natively and aligns causal bottom-right."""
    flash_attn = try_import("flash_attn")
    out = flash_attn.flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=causal
    )  # (B, Tq, H, D)
    return out.transpose(1, 2)


ATTENTION = KernelOp(
    "attention",
    [
        Backend("flash_attn", flash_attention, _flash_available, _flash_supports),
        Backend("sdpa", sdpa_attention),
        Backend("eager", eager_attention),
    ],
)
