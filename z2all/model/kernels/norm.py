"""RMSNorm: apex / flash-attn / liger-kernel -> torch.nn.functional.rms_norm -> eager.

Signature shared by every backend: ``rms_norm(x, weight, eps) -> same shape and dtype as x``,
normalising over the last dim: ``weight * x / sqrt(mean(x**2) + eps)``. The eager reference follows
transformers' LlamaRMSNorm exactly (statistics in fp32, cast back to x's dtype, then times weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from z2all.model.kernels._registry import Backend, KernelOp, cuda_available, try_import


def eager_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype != weight.dtype:
        # F.rms_norm wants matching dtypes; keep the reference's "normalise then cast" order.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _cuda_only(x, weight, eps) -> bool:
    return x.is_cuda


def _lib(name: str):
    return lambda: cuda_available() and try_import(name) is not None


def apex_rms_norm(x, weight, eps):
    mod = try_import("apex.normalization.fused_layer_norm")
    return mod.fused_rms_norm_affine(x, weight, (x.shape[-1],), eps)


def flash_rms_norm(x, weight, eps):
    mod = try_import("flash_attn.ops.triton.layer_norm")
    return mod.rms_norm_fn(x, weight, None, eps=eps)


def liger_rms_norm(x, weight, eps):
    mod = try_import("liger_kernel.ops.rms_norm")
    # offset 0, "llama" casting (fp32 statistics, cast before the weight), never in place
    return mod.LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


RMS_NORM = KernelOp(
    "rms_norm",
    [
        Backend("apex", apex_rms_norm, _lib("apex.normalization.fused_layer_norm"), _cuda_only),
        Backend("flash_attn", flash_rms_norm, _lib("flash_attn.ops.triton.layer_norm"), _cuda_only),
        Backend("liger", liger_rms_norm, _lib("liger_kernel.ops.rms_norm"), _cuda_only),
        Backend("torch", torch_rms_norm, lambda: hasattr(F, "rms_norm")),
        Backend("eager", eager_rms_norm),
    ],
)
