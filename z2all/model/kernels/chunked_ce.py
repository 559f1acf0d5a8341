"""Fused linear + cross entropy in plain PyTorch, chunked over tokens (no full logits kept).

The usual path materialises the (N, V) logits, a log-softmax copy of them, and in backward two more
(N, V) gradients. Here the loss and both input gradients are produced in one pass over chunks of
``chunk`` tokens, inside the forward:

    for each chunk of rows:          logits_c = h_c W^T                      (c, V), fp32
        loss      += sum(logsumexp(logits_c) - logits_c[target])   over valid rows
        dlogits_c  = (softmax(logits_c) - onehot(target)) * valid / n_valid   (in place)
        grad_h[c]  = dlogits_c W          grad_W += dlogits_c^T h_c

and backward only scales the stored gradients by the incoming scalar. Same three matmuls as the
unfused path, but the (N, V) buffers shrink to (chunk, V). The same idea as liger-kernel's fused
linear cross entropy, written with torch ops so it runs anywhere. Only for callers that need the
loss and not the logits (``forward(..., return_logits=False)``).
"""

from __future__ import annotations

import torch

from z2all.labels import IGNORE_INDEX
from z2all.model.kernels._registry import autocast_dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, want_grads: bool):
        # hidden (N, h), weight (V, h), targets (N,)
        compute_dtype = autocast_dtype(hidden)  # what the lm_head matmul would use
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1).to(torch.float32)
        # Gradients are computed here, in forward; skip them for no-grad calls (evaluation).
        need_gh = want_grads and ctx.needs_input_grad[0]
        need_gw = want_grads and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_gh else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_gw else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            logits = (h[start:end] @ w.t()).float()  # (c, V)
            t = targets[start:end]
            v = valid[start:end]
            rows = torch.arange(end - start, device=hidden.device)
            # Stable softmax in place, one exp: shifted = logits - max; lse - logit[t] = log(sum
            # exp(shifted)) - shifted[t]. Five passes over the (c, V) chunk, no extra buffer.
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            picked = logits[rows, t.clamp(min=0)]  # (c,) shifted target logits
            probs = logits.exp_()
            denom = probs.sum(dim=-1)  # (c,)
            loss += ((denom.log() - picked) * v).sum()
            if grad_h is None and grad_w is None:
                continue
            # dloss/dlogits = (softmax - onehot(target)) * valid / n_valid
            scale = v.float() / n_valid  # (c,)
            probs.mul_((scale / denom)[:, None])
            probs[rows, t.clamp(min=0)] -= scale
            p = probs.to(compute_dtype)
            if grad_h is not None:
                grad_h[start:end] = (p @ w).to(hidden.dtype)
            if grad_w is not None:
                if compute_dtype == torch.float32:
                    grad_w.addmm_(p.t(), h[start:end])
                else:  # half-precision GEMM, accumulated across chunks in fp32
                    grad_w.add_(p.t() @ h[start:end])
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w.to(weight.dtype) if grad_w is not None else torch.empty(0),
        )
        ctx.has = (grad_h is not None, grad_w is not None)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.has[0] else None
        gw = grad_w * grad_out.to(grad_w.dtype) if ctx.has[1] else None
        return gh, gw, None, None, None


def chunked_linear_cross_entropy(hidden, weight, targets, chunk: int = 1024) -> torch.Tensor:
    """Mean CE of ``hidden @ weight.T`` against ``targets`` (``IGNORE_INDEX`` ignored); fp32 scalar."""
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, want_grads)
