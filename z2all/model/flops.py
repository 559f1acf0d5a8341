"""FLOPs per token and model FLOPs utilisation (MFU).

Per trained token (forward + backward = 3 x forward, each multiply-add = 2 FLOPs):

    flops_per_token = 6 * N  +  12 * L * h * T

- N: parameters that take part in a matmul, i.e. every parameter except the input embedding table
  (a lookup, not a matmul); with tied embeddings the shared matrix is counted once, as the LM head.
- 12 * L * h * T: attention scores (Q K^T) and weighted values (P V), 2 * h * T each per token per
  layer forward, times 3. Counted over the full T x T square as PaLM (appendix B) and nanoGPT do,
  so numbers are comparable with published MFU even though a causal kernel skips half.

MFU = flops_per_token * tokens_per_second / peak_flops.
"""

from __future__ import annotations

from z2all.model.config import Z2allConfig

# Dense (no sparsity) tensor-core peak FLOP/s in bf16 (fp16 for cards without bf16), per GPU.
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # unqualified name: assume SXM
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,
    "T4": 65e12,
}


def matmul_params(cfg: Z2allConfig) -> int:
    """Parameters that take part in a matmul (everything but the input embedding lookup)."""
    n = cfg.num_parameters
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    return n


def flops_per_token(cfg: Z2allConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context ``seq_len``."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def estimate_mfu(cfg: Z2allConfig, seq_len: int, tokens_per_s: float, peak_flops: float) -> float:
    """Fraction of ``peak_flops`` (FLOP/s of all devices that produced ``tokens_per_s``) achieved."""
    if peak_flops <= 0:
        raise ValueError(f"estimate_mfu: peak_flops must be > 0, got {peak_flops}")
    return flops_per_token(cfg, seq_len) * tokens_per_s / peak_flops


def peak_flops_for(device_name: str) -> float | None:
    """Peak bf16 FLOP/s for a device name like ``torch.cuda.get_device_name()``; None if unknown.

    The longest table key contained in the name wins ("NVIDIA H100 PCIe" -> "H100 PCIe").
    """
    name = device_name.upper()
    hits = [k for k in PEAK_FLOPS if k.upper() in name]
    return PEAK_FLOPS[max(hits, key=len)] if hits else None
