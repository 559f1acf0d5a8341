"""z2all.model: a from-scratch Llama2 decoder with transformers-compatible names and I/O.

See docs/model.md. Public API::

    Z2allConfig, Z2allForCausalLM, get_preset, list_presets, flops_per_token, estimate_mfu,
    peak_flops_for, PEAK_FLOPS, KVCache, kernels.active_backends()
"""

from z2all.model import kernels
from z2all.model.cache import KVCache
from z2all.model.config import Z2allConfig
from z2all.model.flops import PEAK_FLOPS, estimate_mfu, flops_per_token, peak_flops_for
from z2all.model.llama import CausalLMOutput, Z2allForCausalLM
from z2all.model.presets import get_preset, list_presets

__all__ = [
    "PEAK_FLOPS",
    "CausalLMOutput",
    "KVCache",
    "Z2allConfig",
    "Z2allForCausalLM",
    "estimate_mfu",
    "flops_per_token",
    "get_preset",
    "kernels",
    "list_presets",
    "peak_flops_for",
]
