"""LM head + next-token cross entropy.

Backends: liger fused linear CE -> torch_chunked (fused linear CE in torch ops) -> flash-attn ->
liger -> torch -> eager. The two fused-linear backends serve loss-only calls; calls that also want
the logits fall through to the next backend that returns them.

Signature shared by every backend::

    lm_head_loss(hidden, weight, targets, need_logits) -> (loss, logits or None)
    hidden: (N, hidden)   weight: (vocab, hidden)   targets: (N,) int64, IGNORE_INDEX = ignored
    loss: fp32 scalar, mean over targets != IGNORE_INDEX   logits: (N, vocab) in hidden's dtype

When every target is ``IGNORE_INDEX`` (-100, from ``z2all.labels``) the loss is 0.0 with zero
gradients, in every backend: a micro-batch with nothing to learn (an SFT batch of prompts cut by
truncation) adds nothing instead of turning the step's loss and gradients into NaN. Each backend
therefore sums the per-token losses and divides by ``max(n_valid, 1)`` itself, without a host sync,
rather than trusting a library's ``mean``.

The fused-linear backends never materialise the (N, vocab) logits (the largest activation of a small
model); they are used only when the caller does not ask for logits, otherwise the chain falls back.
Logits are upcast to fp32 for the loss as transformers does.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from z2all.labels import IGNORE_INDEX
from z2all.model.kernels._registry import Backend, KernelOp, autocast_dtype, cuda_available, try_import
from z2all.model.kernels.chunked_ce import chunked_linear_cross_entropy


def _n_valid(targets: torch.Tensor) -> torch.Tensor:
    """``max(#targets != IGNORE_INDEX, 1)`` as an fp32 scalar tensor (the mean's divisor; 0/1 = 0 if none)."""
    return (targets != IGNORE_INDEX).sum().clamp(min=1).float()


def eager_lm_head_loss(hidden, weight, targets, need_logits=True):
    logits = F.linear(hidden, weight)  # (N, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N,)
    loss = -(picked * valid).sum() / _n_valid(targets)
    return loss, logits


def torch_lm_head_loss(hidden, weight, targets, need_logits=True):
    logits = F.linear(hidden, weight)
    loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / _n_valid(targets), logits


@functools.cache
def _liger_flce():
    mod = try_import("liger_kernel.transformers.fused_linear_cross_entropy")
    return mod.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def liger_fused_linear_loss(hidden, weight, targets, need_logits=True):
    dt = autocast_dtype(hidden)  # the dtype the lm_head matmul would run in under autocast
    return _liger_flce()(weight.to(dt), hidden.to(dt), targets).float() / _n_valid(targets), None


@functools.cache
def _liger_ce():
    mod = try_import("liger_kernel.transformers.cross_entropy")
    return mod.LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def liger_lm_head_loss(hidden, weight, targets, need_logits=True):
    logits = F.linear(hidden, weight)
    return _liger_ce()(logits.float(), targets) / _n_valid(targets), logits


@functools.cache
def _flash_ce():
    mod = try_import("flash_attn.losses.cross_entropy")
    return mod.CrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def flash_lm_head_loss(hidden, weight, targets, need_logits=True):
    logits = F.linear(hidden, weight)
    return _flash_ce()(logits.float(), targets) / _n_valid(targets), logits


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: ~2M logits (8 MiB fp32, cache-sized) on CPU, ~16M on GPUs."""
    budget = 2**24 if device.type == "cuda" else 2**21
    return max(32, min(8192, budget // vocab))


def chunked_lm_head_loss(hidden, weight, targets, need_logits=False):
    return chunked_linear_cross_entropy(
        hidden, weight, targets, chunk_rows(weight.shape[0], hidden.device)
    ), None


def _lib(name: str):
    return lambda: cuda_available() and try_import(name) is not None


CROSS_ENTROPY = KernelOp(
    "cross_entropy",
    [
        Backend(
            "liger_fused_linear",
            liger_fused_linear_loss,
            _lib("liger_kernel.transformers.fused_linear_cross_entropy"),
            lambda hidden, weight, targets, need_logits=True: hidden.is_cuda and not need_logits,
        ),
        Backend(
            "torch_chunked",
            chunked_lm_head_loss,
            lambda: True,
            lambda hidden, weight, targets, need_logits=True: not need_logits,
        ),
        Backend(
            "flash_attn",
            flash_lm_head_loss,
            _lib("flash_attn.losses.cross_entropy"),
            lambda hidden, *a, **k: hidden.is_cuda,
        ),
        Backend(
            "liger",
            liger_lm_head_loss,
            _lib("liger_kernel.transformers.cross_entropy"),
            lambda hidden, *a, **k: hidden.is_cuda,
        ),
        Backend("torch", torch_lm_head_loss),
        Backend("eager", eager_lm_head_loss),
    ],
)
