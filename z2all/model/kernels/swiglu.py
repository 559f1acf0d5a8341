"""SwiGLU MLP: xformers / liger-kernel -> eager.

Signature shared by every backend::

    swiglu_mlp(x, gate_w, up_w, down_w) -> down(silu(x @ gate_w.T) * (x @ up_w.T))
    x: (..., hidden)   gate_w, up_w: (inter, hidden)   down_w: (hidden, inter)

The weights stay three separate nn.Parameters with transformers' names; a backend that wants them
packed (xformers) packs them per call, so optimizers and DDP never see a fused parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from z2all.model.kernels._registry import Backend, KernelOp, autocast_dtype, cuda_available, try_import


def eager_swiglu(x, gate_w, up_w, down_w):
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def xformers_swiglu(x, gate_w, up_w, down_w):
    xops = try_import("xformers.ops")
    dt = autocast_dtype(x)
    x, gate_w, up_w, down_w = (t.to(dt) for t in (x, gate_w, up_w, down_w))
    # xformers.ops.swiglu(x, w1, b1, w2, b2, w3, b3) = (silu(x w1^T + b1) * (x w2^T + b2)) w3^T + b3,
    # on a 2-D (tokens, hidden) input
    out = xops.swiglu(x.reshape(-1, x.shape[-1]), gate_w, None, up_w, None, down_w, None)
    return out.view(*x.shape[:-1], down_w.shape[0])


def liger_swiglu(x, gate_w, up_w, down_w):
    mod = try_import("liger_kernel.ops.swiglu")
    # LigerSiLUMulFunction fuses silu(a) * b and recomputes silu in backward (saves one activation)
    return F.linear(mod.LigerSiLUMulFunction.apply(F.linear(x, gate_w), F.linear(x, up_w)), down_w)


def _cuda_half(x, gate_w, up_w, down_w) -> bool:
    return x.is_cuda and autocast_dtype(x) in (torch.float16, torch.bfloat16)


SWIGLU = KernelOp(
    "swiglu",
    [
        Backend(
            "xformers",
            xformers_swiglu,
            lambda: cuda_available() and try_import("xformers.ops") is not None,
            _cuda_half,
        ),
        Backend(
            "liger",
            liger_swiglu,
            lambda: cuda_available() and try_import("liger_kernel.ops.swiglu") is not None,
            lambda x, *w: x.is_cuda,
        ),
        Backend("eager", eager_swiglu),
    ],
)
